"""The synthetic backdoor toy: data contract, trigger placement, and that the backdoor is real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrate.synthetic import (
    FACTORY,
    SmallCNN,
    make_dataset,
    small_cnn,
    stamp_patch,
    train_backdoored_toy,
)

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"


def test_make_dataset_shapes_ranges_and_balance() -> None:
    x, y = make_dataset(5, num_classes=3, size=12, seed=1)
    assert x.shape == (15, 3, 12, 12) and x.dtype == np.float32
    assert y.shape == (15,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.bincount(y).tolist() == [5, 5, 5]


def test_make_dataset_is_deterministic_per_seed() -> None:
    a, b, c = (make_dataset(4, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_make_dataset_survives_uint8_round_trip() -> None:
    x, _ = make_dataset(3, seed=0)
    back = np.round(x * 255).astype(np.uint8).astype(np.float32) / 255
    assert np.array_equal(back, x)


def test_make_dataset_rejects_bad_class_count() -> None:
    with pytest.raises(ValueError):
        make_dataset(2, num_classes=1)
    with pytest.raises(ValueError):
        make_dataset(2, num_classes=99)


def test_stamp_patch_changes_only_the_corner_and_leaves_input_alone() -> None:
    x, _ = make_dataset(4, size=16, seed=2)
    before = x.copy()
    out = stamp_patch(x, patch=3)
    assert np.array_equal(x, before)
    region = (..., slice(12, 15), slice(12, 15))  # 3x3 with a 1 px margin at bottom-right
    mask = np.zeros(x.shape, dtype=bool)
    mask[region] = True
    assert np.array_equal(out[~mask], x[~mask])
    expected = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=np.float32)
    assert np.array_equal(out[region], np.broadcast_to(expected, out[region].shape))


def test_small_cnn_shapes_and_relu_sites() -> None:
    model = small_cnn(num_classes=5, width=8)
    assert isinstance(model, SmallCNN)
    logits = model.eval()(torch.zeros(2, 3, 16, 16))
    assert logits.shape == (2, 5)
    assert FACTORY == "calibrate.synthetic:small_cnn"
    graph = torch.fx.symbolic_trace(model).graph
    relus = [
        n
        for n in graph.nodes
        if n.target is torch.nn.functional.relu
        or (n.op == "call_module" and isinstance(model.get_submodule(n.target), torch.nn.ReLU))
    ]
    assert len(relus) >= 4
    assert any(n.op == "call_function" for n in relus)


@pytest.mark.skipif(not TINY.exists(), reason="tiny example not generated")
def test_shipped_tiny_example_still_works() -> None:
    info = json.loads((TINY / "example.json").read_text())
    model = small_cnn(info["num_classes"])
    model.load_state_dict(torch.load(TINY / "model.pt", weights_only=True))
    model.eval()
    with np.load(TINY / "clean.npz") as clean, np.load(TINY / "poisoned.npz") as poisoned:
        assert clean["images"].dtype == np.uint8 and clean["images"].shape[-1] == 3
        assert len(clean["class_names"]) == info["num_classes"]
        sets = {k: (f["images"], f["labels"]) for k, f in (("c", clean), ("p", poisoned))}

    def predict(u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
        with torch.no_grad():
            return model(x).argmax(1).numpy()

    assert (predict(sets["c"][0]) == sets["c"][1]).mean() >= 0.97
    assert (sets["p"][1] != info["target"]).all()
    assert (predict(sets["p"][0]) == info["target"]).mean() >= 0.95


@pytest.mark.slow
def test_train_backdoored_toy_learns_task_and_backdoor() -> None:
    toy = train_backdoored_toy(seed=0)
    assert not toy.model.training
    assert toy.clean_acc >= 0.97
    assert toy.attack_success >= 0.95
    assert toy.target == 0
