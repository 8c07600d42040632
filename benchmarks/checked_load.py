"""Checked load: the client side of the reliability tests and of benchmarks.soak, run as a process
of its own so that it never shares an interpreter (or its GIL) with the server it loads.

N concurrent clients (asyncio coroutines spread over a few channels of stock tritonclient) send
requests back to back, each one a batch drawn at random from a fixed pool of inputs saved with
`save_pool`. Every request carries an id of its own ("c<client>-<seq>"), and every answer is
written to a JSON-lines records file, one line per answer:

    {"id", "kind", "entry", "status", "response_id", "t_sent", "t_done", "message",
     "label", "flagged", "original_label", "bounded_label", "statistic"}

(`status` is the gRPC code name, "OK" or e.g. "UNAVAILABLE", or CLIENT_CANCELLED when the client
cancelled the call itself; the outputs come with OK only; times are time.monotonic(), the same
clock in every process of the machine). Clients are "plain" unless --kinds also makes some of
them give their requests deadlines of a few milliseconds or cancel them. Nothing is checked
here: benchmarks.reliability.check_records compares the records with in-process inference. While
the load runs, the server's resident memory (VmRSS of --server-pid) is sampled every second.
Prints one JSON object: requests sent and answered, answers by status, latency percentiles and
throughput over the measured window (after --warmup-s), the server's RSS at the end of the
warm-up and at the end, and the RSS series.

    .venv/bin/python -m benchmarks.checked_load --url 127.0.0.1:8001 --model NAME \
        --pool pool.npz --records records.jsonl --clients 64 --duration-s 60 --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# the outputs recorded for every OK answer (the server returns all of its outputs)
RECORDED_OUTPUTS = ("label", "flagged", "original_label", "bounded_label", "statistic")


def save_pool(path: Path, entries: Sequence[np.ndarray]) -> None:
    """The pool as an .npz: entry_0, entry_1, ... each one request's batch [n, C, H, W], FP32
    pixels in [0, 1] or UINT8 0..255 (the datatype it is sent with)."""
    arrays: dict[str, Any] = {f"entry_{i}": np.ascontiguousarray(x) for i, x in enumerate(entries)}
    np.savez(path, **arrays)


def load_pool(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[f"entry_{i}"] for i in range(len(f.files))]


def rss_kb(pid: int) -> int | None:
    """Resident set size of a process (VmRSS of /proc/PID/status) in KiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p99 = np.percentile(lat, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(lat.max())}


class _Run:
    """The shared state of one load run: counters, the records file, latencies, RSS samples."""

    def __init__(self, records: TextIO, warmup_s: float, duration_s: float) -> None:
        self.records = records
        self.start = time.monotonic()
        self.measure_from = self.start + warmup_s
        self.stop_at = self.measure_from + duration_s
        self.sent = 0
        self.answered = 0
        self.by_status: Counter[str] = Counter()
        self.first_error: str | None = None
        self.latencies = array("d")  # OK answers completed inside the measured window
        self.window_items = 0
        self.rss_series: list[tuple[float, int]] = []
        self.rss_start: int | None = None
        self.done = asyncio.Event()

    def record(self, rec: dict[str, Any], items: int) -> None:
        self.answered += 1
        self.by_status[rec["status"]] += 1
        if rec["status"] != "OK" and self.first_error is None:
            self.first_error = f"{rec['status']}: {rec.get('message')}"
        t0, t1 = rec["t_sent"], rec["t_done"]
        if rec["status"] == "OK" and self.measure_from <= t1 <= self.stop_at:
            self.latencies.append(t1 - t0)
            self.window_items += items
        self.records.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _status(exc: Exception) -> tuple[str, str]:
    """(gRPC code name, message) of a failed call; a client-side failure is CLIENT_<type>."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return str(exc.status() or "UNKNOWN").removeprefix("StatusCode."), str(exc.message())
    return f"CLIENT_{type(exc).__name__}", str(exc)


KINDS = ("plain", "deadline", "cancel")
SHORT_DEADLINE_S = (0.005, 0.1)  # a "deadline" client's requests time out in this range
CANCEL_AFTER_S = (0.002, 0.05)  # a "cancel" client cancels each request after this long


class ClientCancelled(Exception):
    """A "cancel" client's request ended because the client cancelled it."""


async def _call(client: Any, kind: str, rng: random.Random, timeout_s: float, *args: Any,
                **kw: Any) -> Any:  # fmt: skip
    """One infer call as a client of `kind` makes it: "plain" waits up to timeout_s; "deadline"
    gives it a deadline in SHORT_DEADLINE_S; "cancel" cancels it after CANCEL_AFTER_S unless it
    is over by then (ClientCancelled: whether the cancellation surfaces as CancelledError or,
    caught inside grpc, as a CANCELLED status depends on where it lands)."""
    if kind == "deadline":
        return await client.infer(*args, client_timeout=rng.uniform(*SHORT_DEADLINE_S), **kw)
    if kind == "plain":
        return await client.infer(*args, client_timeout=timeout_s, **kw)
    from tritonclient.utils import InferenceServerException

    task = asyncio.ensure_future(client.infer(*args, client_timeout=timeout_s, **kw))
    await asyncio.sleep(rng.uniform(*CANCEL_AFTER_S))
    if task.done():
        return task.result()  # answered (or failed) before the client cancelled
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        raise ClientCancelled() from None
    except InferenceServerException as exc:
        if exc.status() == "StatusCode.CANCELLED":
            raise ClientCancelled() from None
        raise


async def _client(
    run: _Run, index: int, client: Any, model: str, inputs: list[Any], sizes: list[int],
    timeout_s: float, until_refused: bool, seed: int, kind: str,
) -> None:  # fmt: skip
    """One client: requests back to back until the window ends (or, with until_refused, until the
    server refuses one with UNAVAILABLE: it is shutting down or gone)."""
    rng = random.Random(seed * 1_000_003 + index)
    expected_failure = {"deadline": "DEADLINE_EXCEEDED", "cancel": "CLIENT_CANCELLED"}.get(kind)
    seq = 0
    while (t_sent := time.monotonic()) < run.stop_at:
        entry = rng.randrange(len(inputs))
        request_id = f"c{index}-{seq}"
        seq += 1
        run.sent += 1
        rec: dict[str, Any] = {"id": request_id, "kind": kind, "entry": entry, "t_sent": t_sent}
        try:
            result = await _call(
                client, kind, rng, timeout_s, model, [inputs[entry]], request_id=request_id
            )
        except ClientCancelled:
            rec["status"], rec["message"] = "CLIENT_CANCELLED", "cancelled by the client"
        except Exception as exc:  # every failure is recorded; none may end the run
            rec["status"], rec["message"] = _status(exc)
        else:
            rec["status"] = "OK"
            rec["response_id"] = result.get_response().id
            for name in RECORDED_OUTPUTS:
                rec[name] = result.as_numpy(name).tolist()
        rec["t_done"] = time.monotonic()
        run.record(rec, sizes[entry])
        if rec["status"] not in ("OK", expected_failure):
            if until_refused and rec["status"] == "UNAVAILABLE":
                return
            await asyncio.sleep(0.01)  # a refusing server must not be hammered in a loop


async def _sample_rss(run: _Run, pid: int | None, every_s: float, progress_s: float) -> None:
    """Every `every_s`: the server's RSS into the series; its value at the end of the warm-up is
    the baseline. Every `progress_s` (if > 0), one progress line on stderr."""
    next_progress = run.start + progress_s if progress_s > 0 else float("inf")
    while not run.done.is_set():
        now = time.monotonic()
        kb = rss_kb(pid) if pid is not None else None
        if kb is not None:
            run.rss_series.append((round(now - run.start, 3), kb))
            if run.rss_start is None and now >= run.measure_from:
                run.rss_start = kb
        if now >= next_progress:
            next_progress += progress_s
            rss = "n/a" if kb is None else f"{kb / 1024:.1f} MiB"
            errors = run.answered - run.by_status["OK"]
            print(
                f"[{now - run.start:6.0f} s] {run.answered} answered, {errors} errors, "
                f"server RSS {rss}",
                file=sys.stderr,
                flush=True,
            )
        # sleep to the next tick, but wake for the end of the warm-up to take the baseline there
        wake = now + every_s
        if run.rss_start is None and now < run.measure_from:
            wake = min(wake, run.measure_from)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.done.wait(), max(0.0, wake - time.monotonic()))


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca

    pool = load_pool(args.pool)
    inputs = []
    for x in pool:
        inp = tc.InferInput(
            args.input_name, list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32"
        )
        inp.set_data_from_numpy(x)
        inputs.append(inp)
    sizes = [len(x) for x in pool]
    channels = [
        tca.InferenceServerClient(args.url) for _ in range(min(args.channels, args.clients))
    ]
    with open(args.records, "w") as records:
        run = _Run(records, args.warmup_s, args.duration_s)
        n = args.clients
        client_args = (args.model, inputs, sizes, args.timeout_s, args.until_refused, args.seed)
        kinds = args.kinds.split(",")
        sampler = asyncio.create_task(
            _sample_rss(run, args.server_pid, args.rss_every_s, args.progress_s)
        )
        try:
            await asyncio.gather(
                *(
                    _client(
                        run, i, channels[i % len(channels)], *client_args, kinds[i % len(kinds)]
                    )
                    for i in range(n)
                )
            )
        finally:
            run.done.set()
            await sampler
            for channel in channels:
                await channel.close()
    end = time.monotonic()
    rss_end = rss_kb(args.server_pid) if args.server_pid is not None else None
    window = args.duration_s
    return {
        "clients": args.clients,
        "channels": len(channels),
        "warmup_s": args.warmup_s,
        "window_s": window,
        "elapsed_s": end - run.start,
        "sent": run.sent,
        "answered": run.answered,
        "ok": run.by_status["OK"],
        "errors": run.answered - run.by_status["OK"],
        "by_status": dict(run.by_status),
        "first_error": run.first_error,
        **percentiles_ms(run.latencies),
        "window_answers": len(run.latencies),
        "throughput_rps": len(run.latencies) / window,
        "throughput_inputs_per_s": run.window_items / window,
        "rss_start_kb": run.rss_start,
        "rss_end_kb": rss_end,
        "rss_peak_kb": max((kb for _, kb in run.rss_series), default=None),
        "rss_series": run.rss_series,
        "t_start": run.start,
        "t_end": end,
    }


def load_command(
    url: str, model: str, pool: Path, records: Path, *, clients: int, duration_s: float,
    warmup_s: float = 0.0, channels: int = 4, server_pid: int | None = None,
    until_refused: bool = False, progress_s: float = 0.0, timeout_s: float = 120.0, seed: int = 0,
    kinds: Sequence[str] = ("plain",),
) -> list[str]:  # fmt: skip
    """The command line of this module as a child process (run it from the repository root)."""
    cmd = [
        sys.executable, "-m", "benchmarks.checked_load", "--url", url, "--model", model,
        "--pool", str(pool), "--records", str(records), "--clients", str(clients),
        "--channels", str(channels), "--duration-s", str(duration_s), "--warmup-s", str(warmup_s),
        "--progress-s", str(progress_s), "--timeout-s", str(timeout_s), "--seed", str(seed),
        "--kinds", ",".join(kinds),
    ]  # fmt: skip
    if server_pid is not None:
        cmd += ["--server-pid", str(server_pid)]
    if until_refused:
        cmd.append("--until-refused")
    return cmd


class LoadProcess:
    """This module running as a child process; `result()` waits for it and returns its summary.
    Its stderr (progress lines, a traceback) goes to this process's stderr unless `quiet`."""

    def __init__(self, cmd: list[str], quiet: bool = True) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None, text=True,
        )  # fmt: skip

    def result(self, timeout_s: float) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.proc.returncode != 0:
            raise RuntimeError(
                f"the load process failed ({self.proc.returncode}): {(err or '')[-3000:]}"
            )
        return dict(json.loads(out.splitlines()[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of the gRPC server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--pool", type=Path, required=True, help=".npz written by save_pool")
    ap.add_argument("--records", type=Path, required=True, help="JSON-lines file to write")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels they share")
    ap.add_argument("--duration-s", type=float, default=60.0, help="the measured window")
    ap.add_argument("--warmup-s", type=float, default=0.0, help="load, not measured, first")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="deadline of each request")
    ap.add_argument("--server-pid", type=int, help="sample this process's RSS")
    ap.add_argument("--rss-every-s", type=float, default=1.0)
    ap.add_argument("--progress-s", type=float, default=0.0, help="progress line period (0: none)")
    ap.add_argument(
        "--until-refused", action="store_true",
        help="a client stops at its first UNAVAILABLE (the server is shutting down)",
    )  # fmt: skip
    ap.add_argument(
        "--kinds", default="plain",
        help="client kinds, cycled over the clients: plain (waits for its answer), deadline "
        "(5-100 ms deadlines), cancel (cancels each request after 2-50 ms)",
    )  # fmt: skip
    ap.add_argument("--input-name", default="input")
    ap.add_argument("--seed", type=int, default=0, help="of the clients' choice of entries")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.channels < 1 or not args.duration_s > 0 or args.warmup_s < 0:
        ap.error("need --clients >= 1, --channels >= 1, --duration-s > 0, --warmup-s >= 0")
    if not set(args.kinds.split(",")) <= set(KINDS):
        ap.error(f"--kinds takes a comma-separated list of {', '.join(KINDS)}")
    print(json.dumps(asyncio.run(drive(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
