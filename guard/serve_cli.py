"""`mmguard serve ARTIFACT_DIR`: a thin argparse front-end over guard.server.

Parsing builds one frozen ServeConfig (the token is read here, from a file or an environment
variable); `serve` runs the server until SIGTERM or SIGINT, then stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from guard.config import BatchingConfig, MiB, QuarantineConfig, ServeConfig, TlsConfig
from guard.logs import configure_logging

log = logging.getLogger("guard.server")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve an artifact over gRPC (Open Inference Protocol) with the MMDF guard",
        description="Serve a calibration artifact: both networks in onnxruntime, the MMDF "
        "decision on every input, KServe/Triton-compatible gRPC, Prometheus metrics.",
    )
    p.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    net.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one")
    net.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port")
    net.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    net.add_argument("--max-message-bytes", type=int, default=64 * MiB, help="largest message")
    net.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="time in-flight requests get after SIGTERM/SIGINT",
    )
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", type=Path, help="PEM server certificate (chain)")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates")
    sec.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="PEM Ed25519 public key (repeatable): refuse an artifact whose manifest.json is "
        "not signed by one of them (`mmguard sign`)",
    )
    tok = sec.add_mutually_exclusive_group()
    tok.add_argument("--auth-token-file", type=Path, help="file holding the bearer token")
    tok.add_argument("--auth-token-env", metavar="VAR", help="environment variable holding it")
    _add_model_flags(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("model and decision")
    run.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    run.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: the CPUs)")
    run.add_argument("--model-name", help="name clients use (default: the artifact's name)")
    run.add_argument("--model-version", default="1", help="the version served (default 1)")
    run.add_argument("--alpha", type=float, help="flag when p < alpha (default: manifest)")
    run.add_argument(
        "--flag-on-disagreement",
        action=argparse.BooleanOptionalAction,
        help="also flag when the networks disagree (default: manifest)",
    )
    run.add_argument(
        "--mode",
        choices=["enforce", "shadow", "unguarded"],
        default="enforce",
        help="shadow: answer the original label, still flag, log and count; unguarded: NO "
        "protection, the original network alone (a baseline for benchmarks)",
    )
    bat = p.add_argument_group("batching")
    d = BatchingConfig()
    bat.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    bat.add_argument("--max-queue-delay-ms", type=float, default=d.max_queue_delay_ms)
    bat.add_argument("--max-queue-size", type=int, default=d.max_queue_size)
    bat.add_argument(
        "--warmup-batch-sizes",
        type=_sizes,
        default=(),
        help="e.g. 1,8,32 (default: every size up to --max-batch-size)",
    )
    ops = p.add_argument_group("operations")
    ops.add_argument("--quarantine-dir", type=Path, help="keep flagged inputs here for review")
    ops.add_argument("--quarantine-max-mb", type=float, default=256.0, help="size cap")
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ops.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line (flagged inputs carry their fields)",
    )


def _token(args: argparse.Namespace) -> str | None:
    if args.auth_token_file is not None:
        token = args.auth_token_file.read_text().strip()
        if not token:
            raise ValueError(f"auth token file {args.auth_token_file} is empty")
        return token
    if args.auth_token_env is not None:
        token = os.environ.get(args.auth_token_env, "").strip()
        if not token:
            raise ValueError(f"environment variable {args.auth_token_env} is unset or empty")
        return token
    return None


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Raises ValueError (a bad value) or OSError (an unreadable token file)."""
    quarantine = None
    if args.quarantine_dir is not None:
        max_bytes = int(args.quarantine_max_mb * MiB)
        quarantine = QuarantineConfig(args.quarantine_dir, max_bytes=max_bytes)
    return ServeConfig(
        artifact_dir=args.artifact_dir,
        host=args.host,
        port=args.port,
        metrics_port=None if args.no_metrics else args.metrics_port,
        device=args.device,
        threads=args.threads,
        model_name=args.model_name,
        model_version=args.model_version,
        alpha=args.alpha,
        flag_on_disagreement=args.flag_on_disagreement,
        mode=args.mode,
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_size=args.max_queue_size,
            warmup_batch_sizes=args.warmup_batch_sizes,
        ),
        shutdown_grace_s=args.shutdown_grace_s,
        tls=_tls(args),
        auth_token=_token(args),
        max_message_bytes=args.max_message_bytes,
        quarantine=quarantine,
        trusted_keys=tuple(args.trusted_key),
    )


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT (also during the warm-up), then stop gracefully."""
    from prometheus_client import CollectorRegistry

    from guard.server import create_server

    server, port = await create_server(config, registry=CollectorRegistry())
    log.info("listening on %s:%d", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is None:
        await stopping
    else:
        starting.cancel()
        stopping.cancel()
    try:
        await server.stop()
    finally:
        if starting.done() and not starting.cancelled():
            starting.result()  # re-raise a failed start (e.g. the warm-up)
    return 0


def run(args: argparse.Namespace) -> int:
    """Returns the exit status; a bad flag, artifact or device is one line on stderr and 2."""
    from guard.artifact import ArtifactError
    from guard.engine import EngineError

    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
        return asyncio.run(serve(config))
    except (ValueError, OSError, ArtifactError, EngineError) as exc:
        print(f"mmguard serve: error: {exc}", file=sys.stderr)
        return 2
