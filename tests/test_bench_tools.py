"""The serving benchmark's own tools: the structural floor graph (benchmarks.bounded_cost), the
bare gRPC server (benchmarks.bare_server) it measures the guard against, and the choice of the
steady input its clients send (benchmarks.serving.pick_input, benchmarks.loadgen.load_input)."""

from __future__ import annotations

import collections
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper, numpy_helper

from benchmarks.bounded_cost import identity_after_residuals
from benchmarks.loadgen import load_input
from benchmarks.serving import bare_server, pick_input


def _residual_block() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(x) -> Relu, 4 channels, and a stem Relu before it."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(4, 4, 3, 3)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("Relu", ["x"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r0"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_floor_graph_computes_the_original_with_the_folded_structure() -> None:
    model = _residual_block()
    floor, added = identity_after_residuals(model)
    assert added == 1  # one residual site
    ops = collections.Counter(n.op_type for n in floor.graph.node)
    assert ops["Relu"] == 0 and ops["Clip"] == 3 and ops["Conv"] == 3  # 2 + the identity
    ident = [n for n in floor.graph.node if n.name.endswith("__identity")]
    assert len(ident) == 1 and ident[0].input[0] == "s"  # between the Add and its clip
    x = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(floor, x), _run(model, x))
    assert collections.Counter(n.op_type for n in model.graph.node)["Relu"] == 3  # not modified


def test_bare_server_answers_stock_tritonclient_with_the_guards_outputs(tmp_path: Path) -> None:
    with bare_server("bare", 10) as bare:
        client = tc.InferenceServerClient(bare.url)
        inp = tc.InferInput("input", [1, 3, 32, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        res = client.infer("bare", [inp], client_timeout=30)
        client.close()
    assert res.as_numpy("label").tolist() == [0]
    assert res.as_numpy("flagged").tolist() == [False]
    assert res.as_numpy("logits").shape == (1, 10)
    assert bare.proc.returncode == 0  # SIGTERM ends it cleanly


def test_guard_corrects_only_flagged_inputs_to_the_bounded_best_other_class() -> None:
    from guard.mmdf import guarded_labels

    g = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])
    gz = np.array([[9.0, 1.0, 2.0], [0.0, 2.0, 1.0], [4.0, 3.0, 8.0]])
    flagged = np.array([True, False, True])
    # row 0: original 0, bounded best other than 0 is 2; row 1 unflagged keeps 1; row 2: 0
    np.testing.assert_array_equal(guarded_labels(g.argmax(axis=1), gz, flagged), [2, 1, 0])


class _FlagsBright:
    """A stand-in engine that flags any input whose mean pixel is above 0.3: uniform noise
    (mean ~0.5) always, dark images never."""

    def decide(self, x: np.ndarray) -> types.SimpleNamespace:
        return types.SimpleNamespace(flagged=np.array([float(x.mean()) > 0.3]))


def test_pick_input_takes_the_first_clean_image_the_guard_does_not_flag() -> None:
    images = np.full((5, 3, 4, 4), 0.9, dtype=np.float32)
    images[3] = 0.1  # the first dark one
    images[4] = 0.2
    x, what, flagged = pick_input(_FlagsBright(), (3, 4, 4), 0, images)
    assert (what, flagged) == ("image 3 of --images", False)
    np.testing.assert_array_equal(x, images[3:4])
    # random pixels are all flagged by this engine: the first candidate comes back, marked
    x, what, flagged = pick_input(_FlagsBright(), (3, 4, 4), 7)
    assert (what, flagged, x.shape) == ("uniform random, seed 7", True, (1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\]; the artifact takes \[3, 4, 4\]"):
        pick_input(_FlagsBright(), (3, 4, 4), 0, np.zeros((2, 3, 8, 8), np.float32))


def test_load_input_reads_back_what_was_saved_and_names_a_wrong_one(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_input(tmp_path / "x.npy", (3, 4, 4)), x)
    with pytest.raises(ValueError, match=r"input shape \[3, 4, 4\], expected \[3, 8, 8\]"):
        load_input(tmp_path / "x.npy", (3, 8, 8))
    np.save(tmp_path / "batch.npy", np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="one FP32 input of shape"):
        load_input(tmp_path / "batch.npy")


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("range_offline", ["wanet", "badnets", "--artifact", "a", "--variant", "v"],
         "--artifact takes one model"),
        ("range_offline", ["wanet", "--artifact", "a"], "--artifact takes one model"),
        ("range_offline", ["wanet", "--variant", "a/b"], "use letters, digits"),
        ("range_offline", ["wanet", "--range-scales", "per-class"], "invalid choice"),
        ("evaluate", ["run", "wanet", "--calib-per-class", "20"],
         "--calib-per-class calibrates a --variant"),
        ("evaluate", ["run", "wanet", "--calib-per-class", "20", "--variant", "c20",
                      "--artifact", "a"], "scores no --artifact"),
        ("evaluate", ["run", "wanet", "--calib-per-class", "-3", "--variant", "c"],
         "give a positive count"),
    ],
)  # fmt: skip
def test_benchmark_commands_refuse_bad_arguments_before_any_work(
    command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    main = importlib.import_module(f"benchmarks.{command}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_first_per_class_by_hand() -> None:
    from benchmarks.evaluate import first_per_class

    labels = np.array([2, 0, 2, 1, 0, 2, 0, 1])
    assert first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4, 7]
    assert first_per_class(labels, 1).tolist() == [0, 1, 3]
    assert first_per_class(labels, 5).tolist() == list(range(8))  # fewer than 5 of each: all


@pytest.mark.slow
def test_range_output_times_an_artifacts_three_networks(artifact_dir: Path) -> None:
    from benchmarks.range_output import GRAPHS, measure

    r = measure(artifact_dir, "cpu", threads=1, batch=4, rounds=2, calls=2)
    assert r["provider"] == "CPUExecutionProvider"
    assert r["nodes"] == sum(r["node_types"].values()) and r["node_types"]["Concat"] == 1
    for b in (1, 4):
        assert set(r[f"p50_ms_batch{b}"]) == set(GRAPHS)
        assert all(v > 0 for v in r[f"p50_ms_batch{b}"].values())
        p = r[f"p50_ms_batch{b}"]
        assert r[f"ratios_cost_batch{b}"] == p["with ratios"] / p["logits only"]
    assert "max_abs_diff_from_cpu" not in r  # compared with the CPU only on a GPU
