"""What the range detector's output costs the original network, per artifact and provider.

For each artifact: the nodes of its ``original.onnx``; the original network with its activation
ratios, the same network cut to its logits (what ``--mode unguarded`` runs) and the bounded
network, timed side by side in short interleaved rounds at batch 1 and at one larger batch
(p50 per call); and the largest difference of any output from the CPU provider's on the same
random images. On ``--device cuda`` the sessions use the guard's own CUDA options
(``guard.engine.CUDA_OPTIONS``: FP32) and the benchmark also asks onnxruntime whether every node
runs on the CUDA provider (``session.disable_cpu_ep_fallback``).

Run from the repository root (on a GPU machine for ``--device cuda``)::

    .venv/bin/python -m benchmarks.range_output ARTIFACT [ARTIFACT ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path
from typing import Any

import numpy as np

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
GRAPHS = ("with ratios", "logits only", "bounded")


def graphs(art: Any) -> dict[str, Any]:
    """The three networks timed (a path or a serialized model each)."""
    from guard.engine import cut_to_outputs

    plain = cut_to_outputs(art.original_path, [art.output_name]).SerializeToString()
    return {"with ratios": str(art.original_path), "logits only": plain,
            "bounded": str(art.bounded_path)}  # fmt: skip


def session(model: Any, device: str, threads: int, *, fallback: bool = True) -> Any:
    import onnxruntime as ort

    from guard.engine import session_options, with_options

    opts = session_options(threads)
    if not fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    providers = [CPU] if device == "cpu" else [CUDA, CPU] if fallback else [CUDA]
    return ort.InferenceSession(model, opts, providers=with_options(providers))


def all_on_cuda(model: Any, threads: int) -> str:
    """'yes', or onnxruntime's reason for refusing a session without CPU fallback."""
    try:
        session(model, "cuda", threads, fallback=False)
    except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses
        return f"no: {str(exc)[:300]}"
    return "yes"


def timed(sessions: dict[str, Any], feed_name: str, x: np.ndarray, rounds: int, calls: int
          ) -> dict[str, float]:  # fmt: skip
    """p50 ms per call of each session on `x`, in `rounds` rounds of `calls` calls each, the
    sessions' order rotated every round."""
    names = list(sessions)
    for s in sessions.values():  # warm-up: the first calls set up kernels and buffers
        for _ in range(5):
            s.run(None, {feed_name: x})
    per_call: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            s = sessions[name]
            for _ in range(calls):
                t = time.perf_counter()
                s.run(None, {feed_name: x})
                per_call[name].append(time.perf_counter() - t)
    return {n: 1e3 * float(np.median(v)) for n, v in per_call.items()}


def measure(art_dir: Path, device: str, threads: int, batch: int, rounds: int, calls: int
            ) -> dict[str, Any]:  # fmt: skip
    import onnx

    from guard.artifact import load_artifact

    art = load_artifact(art_dir)
    if art.range_output is None:
        raise SystemExit(f"{art_dir}: its original network has no range detector's output")
    models = graphs(art)
    nodes = collections.Counter(n.op_type for n in onnx.load(str(art.original_path)).graph.node)
    shape = [int(d) for d in art.input.shape]
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    sessions = {g: session(m, device, threads) for g, m in models.items()}
    if device == "cuda" and sessions["with ratios"].get_providers()[0] != CUDA:
        raise SystemExit(
            f"--device cuda: onnxruntime runs on {sessions['with ratios'].get_providers()}"
        )
    out: dict[str, Any] = {
        "artifact": str(art_dir),
        "provider": sessions["with ratios"].get_providers()[0],
        "nodes": sum(nodes.values()),
        "node_types": dict(nodes),
    }
    if device == "cuda":
        cpu = {g: session(m, "cpu", threads) for g, m in models.items()}
        out["max_abs_diff_from_cpu"] = {
            g: max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(
                    sessions[g].run(None, {art.input.name: x}),
                    cpu[g].run(None, {art.input.name: x}),
                    strict=True,
                )
            )
            for g in GRAPHS
        }
        out["all_nodes_on_cuda"] = {g: all_on_cuda(m, threads) for g, m in models.items()}
    for b in sorted({1, batch}):
        p50 = timed(sessions, art.input.name, x[:b], rounds, calls)
        out[f"p50_ms_batch{b}"] = p50
        out[f"ratios_cost_batch{b}"] = p50["with ratios"] / p50["logits only"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--batch", type=int, default=32, help="the larger batch timed beside 1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20, help="calls per graph per round")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import onnxruntime as ort

        from guard.engine import EngineError, choose_providers

        try:
            choose_providers("cuda", ort.get_available_providers())
        except EngineError as exc:
            ap.error(f"--device cuda: {exc}")
    for d in args.artifacts:
        r = measure(d, args.device, args.threads, args.batch, args.rounds, args.calls)
        print(f"{r['artifact']} ({r['provider']}): {r['nodes']} nodes in original.onnx")
        for b in sorted({1, args.batch}):
            p = r[f"p50_ms_batch{b}"]
            cells = ", ".join(f"{g} {p[g]:.3f}" for g in GRAPHS)
            print(f"  batch {b:3d} p50 ms: {cells}; with/without ratios "
                  f"{r[f'ratios_cost_batch{b}']:.3f}")  # fmt: skip
        for key in ("max_abs_diff_from_cpu", "all_nodes_on_cuda"):
            if key in r:
                print(f"  {key}: {r[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
