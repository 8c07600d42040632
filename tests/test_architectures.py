"""`mmguard calibrate` end to end on torchvision architectures other than the ResNets the
benchmarks use (random weights, random images: this checks the machinery, not the defence):
the bounded network, the range detector's ratios and the export verification hold on
inverted residuals with ReLU6, on channel split and shuffle, and on EfficientNet's SiLU (a
network without ReLU, bounded after its other activations), and the guard serves the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0"])
def test_calibrate_and_serve_a_torchvision_architecture(arch: str, tmp_path: Path) -> None:
    from guard.artifact import load_artifact
    from guard.cli import main
    from guard.engine import GuardEngine

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(getattr(torchvision.models, arch)(num_classes=10).state_dict(), weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10 * 12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "clean.npz", images=images, labels=np.repeat(np.arange(10), 12))
    out = tmp_path / "art"
    code = main(["calibrate", "--arch", arch, "--weights", str(weights),
                 "--data", str(tmp_path / "clean.npz"), "--out", str(out), "--quiet",
                 "--max-iters", "2", "--min-iters", "0", "--mmbd-steps", "3"])  # fmt: skip
    assert code == 0
    art = load_artifact(out)
    assert art.range_output is not None
    engine = GuardEngine(art, "cpu", threads=1)
    x = images[:5].transpose(0, 3, 1, 2).astype(np.float32) / 255
    o = engine.logits(x)
    assert o.original.shape == o.bounded.shape == (5, 10)
    assert o.ratios is not None and o.ratios.shape[0] == 5 and np.isfinite(o.ratios).all()
    assert engine.decide(x).label.shape == (5,)
