"""calibrate.export's check of an exported network against torch: each output's difference is
measured against that output's own size, so large outputs (the range detector's ratios, big
logits) are not refused for float32 rounding, and the worst output is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from calibrate.errors import CalibrationError
from calibrate.export import TOLERANCE, export_verified, max_difference


class _Two(nn.Module):
    """(logits [N, 1], ratios [N, 1]): the pixel sum, and 1000 times it."""

    def __init__(self, shift: float = 0.0, logit_shift: float = 0.0, logit_nan: bool = False
                 ) -> None:  # fmt: skip
        super().__init__()
        self.shift, self.logit_shift, self.logit_nan = shift, logit_shift, logit_nan

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.flatten(1).sum(1, keepdim=True)
        logits = s * float("nan") if self.logit_nan else s + self.logit_shift
        return logits, s * 1000 + self.shift


OUTPUTS = ("logits", "ratios")


def test_differences_are_scaled_by_each_outputs_size(tmp_path: Path) -> None:
    x = torch.ones(2, 1, 2, 2)  # sums 4, ratios 4000
    path = tmp_path / "two.onnx"
    diff, _ = export_verified(_Two(), x, path, outputs=OUTPUTS)
    assert diff <= 1e-7
    # torch moved by 2 in the ratios: 2 / 4002 of their size, not the absolute 2
    diff, worst = max_difference(_Two(shift=2.0), path, x, OUTPUTS)
    assert worst == "ratios" and diff == pytest.approx(2 / 4002, rel=1e-6)
    # an output under 1 in size is measured absolutely: 0.2 on logits of 0.04 counts 0.2
    small = torch.full((2, 1, 2, 2), 0.01)
    diff, worst = max_difference(_Two(logit_shift=0.2), path, small, OUTPUTS)
    assert worst == "logits" and diff == pytest.approx(0.2, rel=1e-5)
    diff, worst = max_difference(_Two(logit_nan=True), path, x, OUTPUTS)
    assert np.isnan(diff) and worst == "logits"
    assert not diff <= TOLERANCE  # refused


def test_a_network_onnxruntime_cannot_match_is_refused_naming_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import calibrate.export as export

    monkeypatch.setattr(export, "max_difference", lambda *a, **k: (3e-4, "ratios"))
    with pytest.raises(CalibrationError, match=r"in its output ratios by 0.0003 of that output"):
        export_verified(_Two(), torch.ones(1, 1, 2, 2), tmp_path / "x.onnx", outputs=OUTPUTS)


def unexportable_cnn(num_classes: int = 4) -> nn.Module:
    """A CNN torch.onnx cannot export at 16x16 inputs: adaptive pooling from 16 to 3 positions,
    3 not a factor of 16 (as torchvision's VGG pools to 7 from a 64-pixel image's 2)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(36, num_classes),
    )  # fmt: skip


def test_a_network_torch_onnx_cannot_export_stops_calibration_before_any_work(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from calibrate.export import check_exportable
    from guard.cli import main

    with pytest.raises(CalibrationError, match=r"cannot export the network at this input size "
                       r"\[3, 16, 16\]: .*adaptive_avg_pool2d"):  # fmt: skip
        check_exportable(unexportable_cnn(), torch.zeros(1, 3, 16, 16))
    check_exportable(unexportable_cnn(), torch.zeros(1, 3, 18, 18))  # 3 divides 18

    def no_ascent(*_a: object, **_k: object) -> None:
        raise AssertionError("MM-BD's ascent ran before the export check")

    monkeypatch.setattr("calibrate.pipeline.original_maxima", no_ascent)
    weights = tmp_path / "w.pt"
    torch.save(unexportable_cnn().state_dict(), weights)
    tiny = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"
    code = main(["calibrate", "--factory", "tests.test_export:unexportable_cnn",
                 "--weights", str(weights), "--data", str(tiny / "clean.npz"),
                 "--out", str(tmp_path / "out"), "--quiet"])  # fmt: skip
    out, err = capfd.readouterr()  # at the file descriptors, where torch's C++ side writes
    assert code == 2 and "adaptive_avg_pool2d" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and out == ""  # no TorchScript graph dump
    assert not (tmp_path / "out").exists()
