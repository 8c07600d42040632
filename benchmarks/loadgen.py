"""The client side of benchmarks.serving, run as a process of its own so that it never shares an
interpreter (or its GIL) with what it measures.

N concurrent clients, each sending batch-1 requests of one fixed input back to back through stock
tritonclient (its asyncio client; one channel shared by all, as one client application would),
for a warm-up and then a measured window. Prints one JSON object: the latency of every request
that completed inside the window, the window's length, the errors, and for CPU accounting the
requests answered in all (warm-up included) and this process's CPU seconds.

    .venv/bin/python -m benchmarks.loadgen --url 127.0.0.1:8001 --model NAME --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def fixed_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The one batch-1 input every client sends: uniform [0, 1) FP32 pixels."""
    return np.random.default_rng(seed).random((1, *shape), dtype=np.float32)


async def drive(
    url: str, model: str, x: np.ndarray, input_name: str, clients: int, warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:  # fmt: skip
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca

    cpu0 = time.process_time()
    client = tca.InferenceServerClient(url)
    inp = tc.InferInput(input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s
    latencies: list[float] = []
    errors: list[str] = []
    completed = [0]

    async def one_client() -> None:
        while (t0 := time.perf_counter()) < stop_at:
            try:
                await client.infer(model, [inp], client_timeout=60)
            except Exception as exc:  # tritonclient raises InferenceServerException
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)  # a refused server must not be hammered in a loop
                continue
            t1 = time.perf_counter()
            completed[0] += 1
            if measure_from <= t1 <= stop_at:
                latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        await client.close()
    return {
        "clients": clients,
        "window_s": duration_s,
        "latencies_s": [round(v, 7) for v in latencies],
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completed": completed[0],
        "cpu_s": round(time.process_time() - cpu0, 3),
    }


def load_input(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A batch-1 FP32 input saved with np.save (never unpickled), of `shape` per input if given."""
    x = np.load(path, allow_pickle=False)
    if x.dtype != np.float32 or x.ndim < 2 or x.shape[0] != 1:
        raise ValueError(f"{path}: need one FP32 input of shape [1, ...], got {x.dtype} {x.shape}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{path}: input shape {list(x.shape[1:])}, expected {list(shape)}")
    return x


def run_load(
    url: str, model: str, clients: int, duration_s: float, warmup_s: float, input_npy: Path,
    input_name: str = "input",
) -> dict[str, Any]:  # fmt: skip
    """Run this module as a child process for one measurement point, every client sending the
    input saved at `input_npy`, and return what it printed (the child is killed if it fails to
    finish in time, or on any error here)."""
    cmd = [
        sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--model", model,
        "--clients", str(clients), "--duration-s", str(duration_s), "--warmup-s", str(warmup_s),
        "--input-npy", str(input_npy), "--input-name", input_name,
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=warmup_s + duration_s + 120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"client process failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of the gRPC server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=1, help="concurrent clients")
    ap.add_argument("--duration-s", type=float, default=10.0, help="the measured window")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="run, not measured, first")
    ap.add_argument("--shape", default="3,32,32", help="per-input shape C,H,W of the random input")
    ap.add_argument("--input-name", default="input")
    ap.add_argument("--seed", type=int, default=0, help="of the fixed input (fixed_input)")
    ap.add_argument(
        "--input-npy",
        type=Path,
        default=None,
        help="send this saved input ([1, C, H, W] FP32, np.save) instead of the random one",
    )
    args = ap.parse_args(argv)
    if args.clients < 1 or not args.duration_s > 0 or args.warmup_s < 0:
        raise ValueError(
            f"need clients >= 1, duration_s > 0, warmup_s >= 0; got {args.clients}, "
            f"{args.duration_s}, {args.warmup_s}"
        )
    if args.input_npy is not None:
        x = load_input(args.input_npy)
    else:
        x = fixed_input(tuple(int(v) for v in args.shape.split(",")), args.seed)
    result = asyncio.run(
        drive(
            args.url, args.model, x, args.input_name, args.clients, args.warmup_s,
            args.duration_s,
        )
    )  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
