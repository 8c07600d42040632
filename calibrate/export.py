"""ONNX export followed at once by verification: onnx.checker, then onnxruntime against torch."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibrate.errors import CalibrationError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
MAX_ABS_DIFF = 1e-4


def _ort_max_ir_version() -> int:
    """The highest IR version this onnxruntime accepts (a conservative table by release)."""
    import onnxruntime as ort

    major, minor = (int(v) for v in ort.__version__.split(".")[:2])
    if (major, minor) >= (1, 20):
        return 10
    if (major, minor) >= (1, 16):
        return 9
    return 8


def export_verified(
    module: nn.Module,
    sample: torch.Tensor,
    path: Path,
    *,
    fold: bool = False,
    outputs: Sequence[str] = (OUTPUT_NAME,),
) -> tuple[float, dict[str, Any] | None]:
    """Export `module` (eval mode, pixel input) to one self-contained ONNX file with a dynamic
    batch axis, check it, and compare its outputs with torch's on `sample` in onnxruntime.

    fold: rewrite the bound sites (calibrate.onnx_fold) so onnxruntime keeps its fused kernels;
    the rewritten graph is what gets checked and compared. outputs: the names of what `module`
    returns (a tensor, or a tuple in this order), the logits first. Returns the max absolute
    difference over them and the fold statistics; raises CalibrationError above
    MAX_ABS_DIFF."""
    import onnx

    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample[:1],),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    stats: dict[str, Any] | None = None
    if fold:
        from calibrate.onnx_fold import fold_bounds

        model, stats = fold_bounds(model)
    if model.ir_version > _ort_max_ir_version():
        model.ir_version = _ort_max_ir_version()
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise CalibrationError(f"exported {path.name} fails onnx.checker: {exc}") from None
    diff = max_abs_difference(module, path, sample, outputs)
    if not diff <= MAX_ABS_DIFF:
        raise CalibrationError(
            f"{path.name} in onnxruntime differs from torch by {diff:.3g} in its outputs "
            f"(limit {MAX_ABS_DIFF})"
        )
    return diff, stats


def max_abs_difference(
    module: nn.Module, path: Path, inputs: torch.Tensor, outputs: Sequence[str] = (OUTPUT_NAME,)
) -> float:
    """Largest |onnxruntime - torch| over `inputs` and every output, on the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = inputs.detach().cpu().float()
    with torch.no_grad():
        result = module(x)
    wants = result if isinstance(result, tuple) else (result,)
    gots = sess.run(list(outputs), {INPUT_NAME: x.numpy()})
    worst = 0.0
    for name, want_t, got in zip(outputs, wants, gots, strict=True):
        want = want_t.cpu().numpy()
        if got.shape != want.shape:
            raise CalibrationError(
                f"{path.name} returns {name} of shape {got.shape}, torch {want.shape}"
            )
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
    return worst
