"""Where calibration's torch work runs: `--device auto|cpu|cuda|cuda:N`.

Calibration is forward and backward passes through the network (MM-BD's ascent, the bound
learning, the held-out logits): on an H200 the benchmark's full-width CIFAR ResNet-18 took 10 s,
where a 2-core CPU takes the better part of an hour. Random starts are drawn on the CPU from the
seed, so a seed gives the same starting points on any device. The floating-point results are
not the same on two devices, and the search amplifies the difference: two calibrations of one
model, on a CPU and on a GPU, end with different bounds (docs/RESULTS.md, "calibrated on a
GPU"). The report says which device ran it. Export always runs on the CPU.
"""

from __future__ import annotations

import re

import torch

from calibrate.errors import CalibrationError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str) -> torch.device:
    """`auto`: the first CUDA device when torch has one, else the CPU. `cpu`, `cuda`,
    `cuda:N`: that device, or a one-line error naming why it cannot be used."""
    text = spec.strip().lower()
    if not _SPEC.match(text):
        raise CalibrationError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    if text == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if text == "auto":
        return torch.device("cuda:0" if available else "cpu")
    if not available:
        build = torch.version.cuda
        why = "torch was built without CUDA" if build is None else "torch sees no CUDA device"
        raise CalibrationError(f"--device {spec}: {why}; use --device cpu or auto")
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise CalibrationError(
            f"--device {spec}: torch sees {count} CUDA device{'s' if count != 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    return torch.device(f"cuda:{index}")


def describe(device: torch.device) -> str:
    """The device as the report names it: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one with neither)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
