"""calibrate.onnx_fold: the folded bounded graph is valid, equivalent and has no Min left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.cifar import cifar_resnet18
from calibrate.bounded import BoundedNetwork
from calibrate.export import export_verified
from calibrate.onnx_fold import fold_bounds
from calibrate.synthetic import small_cnn

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _max_diff(a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict]) -> float:
    sa, sb = _session(a), _session(b)
    worst = 0.0
    for feed in feeds:
        for ya, yb in zip(sa.run(None, feed), sb.run(None, feed), strict=True):
            assert ya.shape == yb.shape
            worst = max(worst, float(np.abs(ya.astype(np.float64) - yb).max()))
    return worst


def _bounded_export(model: torch.nn.Module, size: int, path: Path) -> tuple[onnx.ModelProto, int]:
    """The bounded export of `model` with random bounds: per-channel maxima on random images
    times factors in [0.3, 1], the first channel of every site and ~10% of the rest set to 0."""
    torch.manual_seed(0)
    model.eval()
    x = torch.rand(16, 3, size, size)
    net = BoundedNetwork(model, x[:2])
    net.init_bounds("max", x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in net.bounds():
            b.mul_(torch.rand(b.shape, generator=gen) * 0.7 + 0.3)
            b[torch.rand(b.shape, generator=gen) < 0.1] = 0.0
            b[0] = 0.0
    export_verified(net, x[:4], path)
    return onnx.load(str(path)), len(net.sites)


@pytest.mark.parametrize(
    ("name", "factory", "size"),
    [("small_cnn", lambda: small_cnn(), 16), ("resnet18_w8", lambda: cifar_resnet18(width=8), 32)],
)
def test_folded_export_is_equivalent_and_min_free(tmp_path, name, factory, size):
    bounded, n_sites = _bounded_export(factory(), size, tmp_path / f"{name}.onnx")
    before = bounded.SerializeToString()
    folded, stats = fold_bounds(bounded)
    assert bounded.SerializeToString() == before  # the input model is left alone
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in bounded.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in bounded.graph.output]

    rng = np.random.default_rng(2)
    feeds = [{"input": rng.random((batch, 3, size, size), dtype=np.float32)} for batch in (1, 7)]
    assert _max_diff(bounded, folded, feeds) <= TOL

    mins = [sum(n.op_type == "Min" for n in m.graph.node) for m in (bounded, folded)]
    assert mins == [n_sites, 0]
    assert stats["sites"] == stats["rewritten"] == n_sites
    assert stats["skipped"] == {}
    assert stats["min_nodes_before"] == n_sites and stats["min_nodes_after"] == 0
    assert stats["zero_channels"] >= n_sites
    assert stats["nodes_after"] < stats["nodes_before"]
    if name == "resnet18_w8":
        # 8 residual sites, each one depthwise Clip carrier; identity shortcuts need no node
        assert stats["residual_nodes"] == 8 and stats["scale_nodes"] == 0


def test_residual_clip_variant_is_equivalent(tmp_path):
    bounded, n_sites = _bounded_export(cifar_resnet18(width=8), 32, tmp_path / "r.onnx")
    folded, stats = fold_bounds(bounded, residual="clip", scaler="mul")
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(3).random((3, 3, 32, 32), dtype=np.float32)
    assert _max_diff(bounded, folded, [{"input": x}]) <= TOL
    assert stats["rewritten"] == n_sites and stats["residual_nodes"] == 0
    assert stats["scale_nodes"] == 5  # the identity shortcuts


# ---------------------------------------------------------------------------------------------
# a hand-built graph with the less common shapes of a site


def _const(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.4):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _hand_built() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        _const(rng, "w1", (8, 4, 3, 3)),
        _const(rng, "b1", (8,)),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"),
        _const(rng, "bn_b", (8,)),
        _const(rng, "bn_m", (8,)),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
        numpy_helper.from_array(
            np.array([0, 0.3, 0.5, 0, 1, 2, 0.1, 0.7], np.float32).reshape(1, 8, 1, 1), "bound1"
        ),
        _const(rng, "w2", (8, 2, 3, 3)),  # grouped consumer, group=4
        numpy_helper.from_array(
            np.array([0.2, 9, 0, 0.4, 8, 0.3, 0.6, 0], np.float32).reshape(1, 8, 1, 1), "bound2"
        ),
        _const(rng, "w3", (8, 1, 3, 3)),  # depthwise consumer, stride 2
        _const(rng, "b3", (8,)),
        numpy_helper.from_array(rng.uniform(0, 0.5, (1, 8, 1, 1)).astype(np.float32), "bound3"),
        _const(rng, "g1", (128, 10), 0.2),  # Gemm transB=0 after Flatten of [N, 8, 4, 4]
        _const(rng, "gb1", (10,)),
        numpy_helper.from_array(
            np.r_[0.0, rng.uniform(0, 0.4, 9)].astype(np.float32).reshape(1, 10), "bound4"
        ),
        _const(rng, "g2", (3, 10)),  # transB=1
        numpy_helper.from_array(np.full((1, 3), np.inf, np.float32), "bound_inf"),
        numpy_helper.from_array(np.full((1, 3), 0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Min", ["r1", "bound1"], ["m1"]),
        helper.make_node("Conv", ["m1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=4),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"]),  # ReLU6
        helper.make_node("Min", ["bound2", "r2"], ["m2"]),  # constant first
        helper.make_node(
            "Conv", ["m2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], group=8, strides=[2, 2]
        ),
        helper.make_node("MaxPool", ["m2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["c3", "p2"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("Min", ["r3", "bound3"], ["m3"]),
        helper.make_node("Flatten", ["m3"], ["f3"], axis=1),
        helper.make_node("Gemm", ["f3", "g1", "gb1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r4"]),
        helper.make_node("Min", ["r4", "bound4"], ["m4"]),
        helper.make_node("Gemm", ["m4", "g2"], ["logits"], transB=1),
        helper.make_node("Relu", ["logits"], ["r5"]),
        helper.make_node("Min", ["r5", "bound_inf"], ["unbounded"]),  # skipped: inf
        helper.make_node("Sigmoid", ["logits"], ["s6"]),
        helper.make_node("Min", ["s6", "half"], ["capped"]),  # skipped: not after a ReLU
    ]
    shapes: list[tuple[str, list[str | int | None]]] = [
        ("logits", ["batch", 3]),
        ("m3", ["batch", 8, 4, 4]),
        ("unbounded", ["batch", 3]),
        ("capped", ["batch", 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("residual", ["dwclip", "clip"])
@pytest.mark.parametrize("scaler", ["conv", "mul"])
def test_hand_built_graph(residual, scaler):
    model = _hand_built()
    folded, stats = fold_bounds(model, residual=residual, scaler=scaler)
    onnx.checker.check_model(folded, full_check=True)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((b, 4, 8, 8)).astype(np.float32)} for b in (1, 5)]
    assert _max_diff(model, folded, feeds) <= TOL
    assert stats["sites"] == 6 and stats["rewritten"] == 4
    assert stats["skipped"] == {"non-finite bound": 1, "Min does not follow a ReLU": 1}
    assert stats["min_nodes_after"] == 2
    assert stats["passed_through"] >= 1  # MaxPool and/or Flatten
    assert stats["zero_channels"] == 2 + 2 + 1


def test_rejects_unknown_options():
    with pytest.raises(ValueError, match="residual"):
        fold_bounds(onnx.ModelProto(), residual="nope")
    with pytest.raises(ValueError, match="scaler"):
        fold_bounds(onnx.ModelProto(), scaler="nope")
