"""Soak test of the guard server: `mmguard serve` held under load for a long time, every answer
checked, nothing lost, memory flat. The long version of tests/test_reliability_load.py, which
runs this same code for 60 s in CI.

1. A pool of request batches from the given images (--data, an .npz array) and synthetic
   ones (all zeros, all ones, mid-grey, uniform noise), kept only where no numerical noise could
   flip the decision; in-process inference (guard.engine + guard.mmdf) gives each its answer.
2. `mmguard serve ARTIFACT_DIR` as a child process, on 127.0.0.1 with free ports.
3. benchmarks.checked_load in a separate process: --clients concurrent clients for --warmup then
   --duration seconds, requests back to back, each one of the pool's batches at random.
4. Checks: every request answered exactly once, with its own id and the expected outputs, zero
   errors; the server's own count of OK ModelInfer calls equals the clients'; its RSS at the end
   is within 10 % of its RSS at the end of the warm-up; SIGTERM then stops it with status 0.

Prints requests, errors, RSS at start and end, p50/p99 latency and throughput; writes them as
JSON (--json). Exit status 0 when every check passes, 1 otherwise. From the repository root,
on the artifact of `make demo` with the example's clean and triggered test images:

    .venv/bin/python -m benchmarks.soak runs/demo \
        --data calibrate/examples/cifar10/test.npz:clean \
        --data calibrate/examples/cifar10/test.npz:triggered

or on an artifact of the tiny example (`mmguard calibrate --factory calibrate.synthetic:small_cnn
--weights calibrate/examples/tiny/model.pt --data calibrate/examples/tiny/clean.npz --out DIR`)
with `--data calibrate/examples/tiny/clean.npz --data calibrate/examples/tiny/poisoned.npz`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.checked_load import REPO_ROOT, LoadProcess, load_command, save_pool
from benchmarks.reliability import (
    Verdict,
    build_pool,
    check_records,
    expected_answers,
    metric,
)
from guard.process import ServerProcess, serve_command

MAX_RSS_GROWTH = 0.10  # RSS at the end over RSS after the warm-up, minus 1


@dataclass
class SoakResult:
    summary: dict[str, Any]  # what the load process printed (benchmarks.checked_load)
    verdict: Verdict
    pool_entries: int
    flagged_inputs: int  # in the pool, by in-process inference
    pool_inputs: int
    server_ok: float  # guard_requests_total{method="ModelInfer",code="OK"} at the end
    server_inflight: float
    server_queue: float
    exit_code: int  # of the server after SIGTERM
    exit_s: float  # from SIGTERM to its exit

    @property
    def rss_growth(self) -> float | None:
        start, end = self.summary["rss_start_kb"], self.summary["rss_end_kb"]
        return None if not start or end is None else end / start - 1.0

    def failures(self) -> list[str]:
        """Every check that did not pass, described; empty when the soak passed."""
        v, s = self.verdict, self.summary
        out = [f"answers: {p}" for p in v.problems]
        if s["errors"]:
            out.append(f"{s['errors']} errors, first: {s['first_error']}")
        if self.server_ok != v.ok:
            out.append(f"the server counted {self.server_ok:.0f} OK calls, the clients {v.ok}")
        if self.server_inflight or self.server_queue:
            out.append(
                f"after the load {self.server_inflight:.0f} requests still in flight and "
                f"{self.server_queue:.0f} queued"
            )
        growth = self.rss_growth
        if growth is None:
            out.append("the server's RSS could not be read")
        elif growth >= MAX_RSS_GROWTH:
            out.append(
                f"server RSS grew {growth:+.1%} after the warm-up (limit {MAX_RSS_GROWTH:.0%})"
            )
        if self.exit_code != 0:
            out.append(f"the server exited with {self.exit_code} after SIGTERM")
        return out


def run_soak(
    artifact_dir: Path, candidates: Sequence[np.ndarray], *, duration_s: float, warmup_s: float,
    workdir: Path, clients: int = 64, channels: int = 4, max_batch_size: int = 32,
    threads: int = 1, server_flags: Sequence[str] = (), progress_s: float = 0.0,
    singles: int = 16, seed: int = 0,
) -> SoakResult:  # fmt: skip
    """Build the pool, serve, load, check (see the module docstring); workdir receives the pool
    and the records."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    artifact = load_artifact(artifact_dir)
    engine = GuardEngine(artifact, "cpu", threads=1)
    pool = build_pool(engine, candidates, max_batch_size=max_batch_size, singles=singles)
    expected = expected_answers(engine, pool)
    del engine
    pool_path, records = workdir / "pool.npz", workdir / "records.jsonl"
    save_pool(pool_path, pool)
    flags = [
        "--threads", str(threads), "--max-batch-size", str(max_batch_size),
        "--shutdown-grace-s", "30", *server_flags,
    ]  # fmt: skip
    with ServerProcess(serve_command(artifact_dir, flags), cwd=REPO_ROOT) as server:
        server.wait_serving(timeout_s=600)
        cmd = load_command(
            server.url, artifact.name, pool_path, records, clients=clients,
            duration_s=duration_s, warmup_s=warmup_s, channels=channels, server_pid=server.pid,
            progress_s=progress_s, seed=seed,
        )  # fmt: skip
        load = LoadProcess(cmd, quiet=progress_s <= 0)
        try:
            summary = load.result(timeout_s=warmup_s + duration_s + 300)
        finally:
            load.kill()
        samples = server.metrics()
        exit_code, exit_s = server.terminate(timeout_s=60)
    return SoakResult(
        summary=summary,
        verdict=check_records(records, expected, summary["sent"]),
        pool_entries=len(pool),
        flagged_inputs=int(sum(a.flagged.sum() for a in expected)),
        pool_inputs=sum(len(x) for x in pool),
        server_ok=metric(
            samples, "guard_requests_total", method="ModelInfer", outcome="success", code="OK"
        ),
        server_inflight=metric(samples, "guard_inflight_requests"),
        server_queue=metric(samples, "guard_queue_depth"),
        exit_code=exit_code,
        exit_s=exit_s,
    )


def images_from_npz(spec: str, shape: Sequence[int], limit: int) -> list[np.ndarray]:
    """Up to `limit` images [C, H, W] from an .npz, `FILE` (its `images`) or `FILE:KEY`; uint8 or
    float pixels, NHWC or NCHW, kept as stored (uint8 stays uint8)."""
    path, key = spec, "images"
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier():
        path, key = head, tail
    with np.load(path) as f:
        if key not in f.files:
            raise ValueError(f"{path} has no array {key!r} (it has {sorted(f.files)})")
        images = f[key][:limit]
    c, h, w = shape
    if images.shape[1:] == (h, w, c) and images.shape[1:] != (c, h, w):
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1:] != tuple(shape):
        raise ValueError(f"{spec}: images of shape {images.shape[1:]}, the model takes {shape}")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    return [np.ascontiguousarray(x) for x in images]


def synthetic_images(shape: Sequence[int], noise: int, seed: int) -> list[np.ndarray]:
    """All zeros, all ones, mid-grey and `noise` uniform [0, 1) images, FP32."""
    rng = np.random.default_rng(seed)
    flat = [np.full(shape, v, dtype=np.float32) for v in (0.0, 1.0, 0.5)]
    return flat + [rng.random(tuple(shape), dtype=np.float32) for _ in range(noise)]


def report(result: SoakResult, artifact_dir: Path) -> str:
    s, v = result.summary, result.verdict

    def mib(kb: int | None) -> str:
        return "n/a" if kb is None else f"{kb / 1024:.1f} MiB"

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} ms"

    growth = result.rss_growth
    failures = result.failures()
    lines = [
        f"soak of {artifact_dir}: {s['clients']} clients on {s['channels']} channels, "
        f"{s['warmup_s']:g} s warm-up + {s['window_s']:g} s measured",
        f"pool           {result.pool_entries} requests, {result.pool_inputs} inputs "
        f"({result.flagged_inputs} flagged by in-process inference)",
        f"requests       {s['sent']} sent, {v.records} answered, {v.duplicates} twice, "
        f"{v.unanswered} never",
        f"errors         {s['errors']} ({dict(v.by_status)})",
        f"checks         {v.wrong} wrong answers, {v.id_mismatches} with another id; server "
        f"counted {result.server_ok:.0f} OK",
        f"latency        p50 {ms(s['p50_ms'])}, p99 {ms(s['p99_ms'])}, max {ms(s['max_ms'])} "
        f"({s['window_answers']} answers in the window)",
        f"throughput     {s['throughput_rps']:.1f} requests/s, "
        f"{s['throughput_inputs_per_s']:.1f} inputs/s",
        f"server RSS     {mib(s['rss_start_kb'])} after the warm-up, {mib(s['rss_end_kb'])} at "
        f"the end: "
        + ("n/a" if growth is None else f"{growth:+.2%}")
        + f" (limit +{MAX_RSS_GROWTH:.0%}); peak {mib(s['rss_peak_kb'])}",
        f"shutdown       SIGTERM -> exit {result.exit_code} in {result.exit_s:.2f} s",
        "verdict        " + ("PASS" if not failures else "FAIL"),
    ]
    lines += [f"  - {f}" for f in failures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("artifact_dir", type=Path, help="a directory written by `mmguard calibrate`")
    ap.add_argument("--duration", type=float, default=600.0, help="measured seconds (600)")
    ap.add_argument("--warmup", type=float, default=30.0, help="load before the RSS baseline")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels the clients share")
    ap.add_argument("--data", action="append", default=[], metavar="NPZ[:KEY]",
                    help="images to draw inputs from: an .npz's `images` or its array KEY "
                    "(repeatable)")  # fmt: skip
    ap.add_argument("--per-file", type=int, default=64, help="images taken from each --data")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the server's")
    ap.add_argument("--threads", type=int, default=1, help="the server's onnxruntime threads")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more `mmguard serve` argument (repeatable)")  # fmt: skip
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--json", type=Path, default=REPO_ROOT / ".cache" / "bench" / "soak.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.duration > 0 or args.warmup < 0 or args.clients < 1:
        ap.error("need --duration > 0, --warmup >= 0 and --clients >= 1")

    from guard.artifact import load_artifact

    shape = load_artifact(args.artifact_dir).input.shape
    candidates = [x for p in args.data for x in images_from_npz(p, shape, args.per_file)]
    candidates += synthetic_images(shape, noise=13, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="mmguard-soak-") as tmp:
        result = run_soak(
            args.artifact_dir, candidates, duration_s=args.duration, warmup_s=args.warmup,
            workdir=Path(tmp), clients=args.clients, channels=args.channels,
            max_batch_size=args.max_batch_size, threads=args.threads,
            server_flags=args.server_arg, progress_s=args.progress, seed=args.seed,
        )  # fmt: skip
    print(report(result, args.artifact_dir), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "artifact": str(args.artifact_dir),
        "summary": result.summary,
        "verdict": {
            "records": result.verdict.records,
            "by_status": dict(result.verdict.by_status),
            "duplicates": result.verdict.duplicates,
            "id_mismatches": result.verdict.id_mismatches,
            "wrong": result.verdict.wrong,
            "problems": result.verdict.problems,
        },
        "server_ok": result.server_ok,
        "rss_growth": result.rss_growth,
        "exit_code": result.exit_code,
        "exit_s": result.exit_s,
        "failures": result.failures(),
    }
    args.json.write_text(json.dumps(out, indent=1))
    print(f"results: {args.json}", file=sys.stderr)
    return 0 if not result.failures() else 1


if __name__ == "__main__":
    raise SystemExit(main())
