"""What the bounded network costs the guard in onnxruntime, and what folding its bounds saves.

Builds the CIFAR ResNet-18 of the calibration benchmark (the cached BadNets weights when present,
else random ones: the graph, not the weights, sets the cost), gives it bounds without calibrating
(per-channel maxima of random [0, 1] images times random factors in [0.3, 1], a few set to 0),
exports the original, the bounded and the folded bounded network (calibrate.onnx_fold), checks the
folded one against the bounded one, builds the floor (the original plus one identity node per
residual site, see identity_after_residuals), and times the four on the CPU provider side by
side in one process: short interleaved rounds, the order rotated each round, per-call latency;
it prints the median and 10th percentile per graph and the ratios to the original (see "method:"
in the output).

Run from the repository root: ``.venv/bin/python -m benchmarks.bounded_cost``.
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting keeps a shared 2-core CPU from thrashing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ("original", "bounded", "folded", "floor")


def identity_after_residuals(model: Any) -> tuple[Any, int]:
    """The structural floor of a bounded network in onnxruntime: a copy of `model` with every
    Relu written as ``Clip(0, FLT_MAX)`` and, at each residual site (a Relu after an Add), an
    identity depthwise 1x1 Conv between the Add and that Clip. It computes exactly what `model`
    does, with the nodes of a folded bounded network (calibrate.onnx_fold) whose bounds are all
    infinite and whose scales are all 1: onnxruntime fuses a residual Add into its Conv but then
    only a Relu, never a Clip, so the clip at a residual site needs a node of its own. Returns the
    copy and the number of identity nodes."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = shape_inference.infer_shapes(out)
    channels = {
        v.name: v.type.tensor_type.shape.dim[1].dim_value
        for v in (*inferred.graph.value_info, *inferred.graph.output)
        if len(v.type.tensor_type.shape.dim) == 4
    }
    lo = numpy_helper.from_array(np.array(0.0, np.float32), "floor__clip_min")
    hi = numpy_helper.from_array(np.array(np.finfo(np.float32).max, np.float32), "floor__clip_max")
    out.graph.initializer.extend([lo, hi])
    producer = {o: n for n in out.graph.node for o in n.output}
    nodes, added = [], 0
    for node in out.graph.node:
        if node.op_type != "Relu":
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        src, c = producer.get(x), channels.get(y, 0)
        if src is not None and src.op_type == "Add" and c > 0:
            w = numpy_helper.from_array(np.ones((c, 1, 1, 1), np.float32), f"{y}__identity_w")
            out.graph.initializer.append(w)
            ident = f"{y}__identity"
            nodes.append(
                helper.make_node(
                    "Conv", [x, w.name], [ident], group=c, kernel_shape=[1, 1], name=ident
                )
            )
            x, added = ident, added + 1
        nodes.append(helper.make_node("Clip", [x, lo.name, hi.name], [y], name=f"{y}__clip"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out, added


def build(width: int, seed: int, zero_fraction: float, out_dir: Path) -> tuple[dict, dict]:
    """Export the three graphs into `out_dir`; returns their paths and the fold stats."""
    import onnx
    import torch

    from benchmarks.cifar import (
        DEFAULT_EPOCHS,
        DEFAULT_SEED,
        badnets_checkpoint_path,
        cifar_resnet18,
    )
    from calibrate.bounded import BoundedNetwork
    from calibrate.export import export_verified
    from calibrate.onnx_fold import fold_bounds

    torch.manual_seed(seed)
    model = cifar_resnet18(width=width).eval()
    ckpt = badnets_checkpoint_path(
        REPO_ROOT / ".cache" / "bench", width, DEFAULT_EPOCHS, DEFAULT_SEED
    )
    weights = "random"
    if ckpt.exists():
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        weights = str(ckpt.relative_to(REPO_ROOT))
    images = torch.rand(256, 3, 32, 32)
    net = BoundedNetwork(model, images[:2])
    net.init_bounds("max", images)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in net.bounds():
            b.mul_(torch.rand(b.shape, generator=gen) * 0.7 + 0.3)
            b[torch.rand(b.shape, generator=gen) < zero_fraction] = 0.0
    paths = {g: out_dir / f"{g}.onnx" for g in GRAPHS}
    export_verified(model, images[:8], paths["original"])
    export_verified(net, images[:8], paths["bounded"])
    folded, stats = fold_bounds(onnx.load(str(paths["bounded"])))
    onnx.checker.check_model(folded, full_check=True)
    onnx.save(folded, str(paths["folded"]))
    floor, stats["floor_identity_nodes"] = identity_after_residuals(
        onnx.load(str(paths["original"]))
    )
    onnx.save(floor, str(paths["floor"]))
    stats["weights"] = weights
    return paths, stats


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    from guard.engine import session_options

    # the guard's options: a pool left spinning after one graph's run would steal the cores
    # from the next graph timed, and the interleaved rounds would measure that instead
    opts = session_options(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_interleaved(
    sessions: dict,
    batch: int,
    rounds: int,
    iters: int,
    seed: int,
    shape: tuple[int, ...] = (3, 32, 32),
    input_name: str = "input",
) -> dict[str, list[list[float]]]:
    """Per-call seconds, [graph][round][call]: every round runs each graph `iters` times back to
    back, in an order rotated from round to round, all on the same input; one warm-up call per
    graph first. Short rounds pair the graphs in time, so load drift on a shared machine hits
    all three alike."""
    x = np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)
    feed = {input_name: x}
    for s in sessions.values():
        s.run(None, feed)
    names = list(sessions)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = sessions[name].run
            calls = []
            for _ in range(iters):
                t0 = time.perf_counter()
                run(None, feed)
                calls.append(time.perf_counter() - t0)
            times[name].append(calls)
    return times


def max_abs_diff(a: Any, b: Any, batch: int, seed: int) -> float:
    x = np.random.default_rng(seed).random((batch, 3, 32, 32), dtype=np.float32)
    ya, yb = a.run(None, {"input": x})[0], b.run(None, {"input": x})[0]
    return float(np.abs(ya.astype(np.float64) - yb.astype(np.float64)).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds1", type=int, default=20, help="rounds at batch 1")
    ap.add_argument("--iters1", type=int, default=25, help="calls per graph per round, batch 1")
    ap.add_argument("--rounds64", type=int, default=12, help="rounds at batch 64")
    ap.add_argument("--iters64", type=int, default=3, help="calls per graph per round, batch 64")
    ap.add_argument("--zero-fraction", type=float, default=0.05, help="bounds set to 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths, stats = build(args.width, args.seed, args.zero_fraction, Path(tmp))
        sessions = {g: session(paths[g], args.threads) for g in GRAPHS}
    print(f"cifar_resnet18(width={args.width}), weights: {stats.pop('weights')}")
    print(f"fold stats: {json.dumps(stats)}")
    diff = max_abs_diff(sessions["bounded"], sessions["folded"], 16, args.seed + 1)
    print(f"max |logit(folded) - logit(bounded)| on 16 random images: {diff:.3g}")
    same = max_abs_diff(sessions["original"], sessions["floor"], 16, args.seed + 1)
    print(
        f"floor: the original with its ReLUs as Clip(0, FLT_MAX) and "
        f"{stats['floor_identity_nodes']} identity depthwise 1x1 Convs, one per residual site "
        f"(max |logit(floor) - logit(original)|: {same:.3g})"
    )
    print(
        f"method: onnxruntime {ort.__version__} CPUExecutionProvider, ORT_ENABLE_ALL, "
        f"intra_op_num_threads={args.threads}, sequential execution; per batch size R rounds, "
        f"each running every graph N calls back to back (order rotated per round, one warm-up "
        f"call each first), per-call wall time by time.perf_counter; reported: the median and "
        f"10th percentile over all calls, and the ratio of each round's fastest call to the "
        f"original's in the same round (paired in time)"
    )
    results: dict[str, Any] = {"fold_stats": stats, "max_abs_diff": diff}
    for batch, rounds, iters in ((1, args.rounds1, args.iters1), (64, args.rounds64, args.iters64)):
        times = time_interleaved(sessions, batch, rounds, iters, args.seed)
        med = {g: float(np.median(np.concatenate(times[g]))) for g in GRAPHS}
        low = {g: float(np.percentile(np.concatenate(times[g]), 10)) for g in GRAPHS}
        # each round's fastest call: the least disturbed one on a shared CPU
        round_min = {g: np.array([min(r) for r in times[g]]) for g in GRAPHS}
        paired = {g: round_min[g] / round_min["original"] for g in GRAPHS[1:]}
        print(f"\nbatch {batch}: {rounds} rounds x {iters} calls per graph")
        for g in GRAPHS:
            print(
                f"  {g:9s} median {med[g] * 1e3:8.3f} ms   10th percentile {low[g] * 1e3:8.3f} ms"
            )
        for g in GRAPHS[1:]:
            q1, q2, q3 = np.percentile(paired[g], [25, 50, 75])
            print(
                f"  {g}/original: medians {med[g] / med['original']:.3f}, 10th percentiles "
                f"{low[g] / low['original']:.3f}; per-round fastest-call ratio: median "
                f"{q2:.3f}, quartiles {q1:.3f}-{q3:.3f}"
            )
        results[f"batch{batch}"] = {
            "median_ms": {g: v * 1e3 for g, v in med.items()},
            "p10_ms": {g: v * 1e3 for g, v in low.items()},
            "ratio_of_medians": {g: med[g] / med["original"] for g in GRAPHS[1:]},
            "ratio_of_p10": {g: low[g] / low["original"] for g in GRAPHS[1:]},
            "per_round_min_ratio_median": {g: float(np.median(v)) for g, v in paired.items()},
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
