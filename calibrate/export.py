"""ONNX export followed at once by verification: onnx.checker, then onnxruntime against torch."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibrate.errors import CalibrationError, first_line

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
TOLERANCE = 1e-4
"""An exported network passes when, for each of its outputs, the largest |onnxruntime - torch|
is at most TOLERANCE times the output's largest magnitude (taken as at least 1). An absolute
1e-4 refused a MobileNetV2 whose range detector ratios reach 23: float32 rounding alone moved
them by 1.0e-4 (4e-6 of their size), and large logits would be refused the same way."""


def _ort_max_ir_version() -> int:
    """The highest IR version this onnxruntime accepts (a conservative table by release)."""
    import onnxruntime as ort

    major, minor = (int(v) for v in ort.__version__.split(".")[:2])
    if (major, minor) >= (1, 20):
        return 10
    if (major, minor) >= (1, 16):
        return 9
    return 8


@contextlib.contextmanager
def _native_output_muted() -> Iterator[None]:
    """Standard output and error, at the file-descriptor level, into a discarded temporary
    file. On a failed export torch's C++ side writes the whole TorchScript graph to standard
    output (about a hundred lines for a VGG), ahead of the one-line error the command prints."""
    for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with tempfile.TemporaryFile() as sink:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                for fd, copy in zip((1, 2), saved, strict=True):
                    os.dup2(copy, fd)
    finally:
        for copy in saved:
            os.close(copy)


def _export(module: nn.Module, sample: torch.Tensor, f: Any, outputs: Sequence[str]) -> None:
    """torch.onnx.export of `module` in eval mode at batch 1 with a dynamic batch axis; a
    network it cannot export is a CalibrationError naming the reason."""
    module.eval()
    try:
        quiet = contextlib.redirect_stdout(io.StringIO())
        with warnings.catch_warnings(), quiet, _native_output_muted():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (sample[:1],),
                f,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except Exception as exc:  # torch.onnx raises many types; the user needs the reason
        raise CalibrationError(
            f"torch.onnx cannot export the network at this input size "
            f"{list(sample.shape[1:])}: {first_line(exc)}"
        ) from None


def check_exportable(model: nn.Module, sample: torch.Tensor) -> None:
    """Export `model` to ONNX in memory and discard it: run before calibration, so that a
    network torch.onnx cannot export (an operator or a shape it does not support) stops the
    command in seconds, not after the minutes of work that precede the real export."""
    _export(model, sample, io.BytesIO(), (OUTPUT_NAME,))


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
    returns (a tensor, or a tuple in this order), the logits first. Returns the largest scaled
    difference over them (`max_difference`) and the fold statistics; raises CalibrationError
    above TOLERANCE."""
    import onnx

    _export(module, sample, str(path), outputs)
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
    diff, worst_output = max_difference(module, path, sample, outputs)
    if not diff <= TOLERANCE:
        raise CalibrationError(
            f"{path.name} in onnxruntime differs from torch in its output {worst_output} by "
            f"{diff:.3g} of that output's largest magnitude (limit {TOLERANCE})"
        )
    return diff, stats


def max_difference(
    module: nn.Module, path: Path, inputs: torch.Tensor, outputs: Sequence[str] = (OUTPUT_NAME,)
) -> tuple[float, str]:
    """The largest over every output of max |onnxruntime - torch| / max(1, max |torch|), on
    `inputs` and the CPU provider, and the output it comes from."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = inputs.detach().cpu().float()
    with torch.no_grad():
        result = module(x)
    wants = result if isinstance(result, tuple) else (result,)
    gots = sess.run(list(outputs), {INPUT_NAME: x.numpy()})
    worst, worst_name = 0.0, outputs[0]
    for name, want_t, got in zip(outputs, wants, gots, strict=True):
        want = want_t.cpu().numpy().astype(np.float64)
        if got.shape != want.shape:
            raise CalibrationError(
                f"{path.name} returns {name} of shape {got.shape}, torch {want.shape}"
            )
        scale = max(1.0, float(np.max(np.abs(want))))
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
        if np.isnan(diff) or diff > worst:
            worst, worst_name = diff, name
        if np.isnan(worst):  # nothing is worse
            break
    return worst, worst_name
