"""`mmguard calibrate --device`: which device the torch work runs on, the one-line errors for a
device that cannot be used, and (on a machine with a CUDA GPU; skipped elsewhere) a calibration
on the GPU that matches the CPU's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrate.ascent import random_starts
from calibrate.device import describe, device_of, resolve_device
from tests.helpers import expect_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"
SHORT = ("--mmbd-steps", "10", "--max-iters", "6", "--min-iters", "6", "--overtime-iters", "0")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _calibrate(out: Path, *flags: str) -> tuple[int, str, str]:
    return run_cli(
        ["calibrate", "--factory", "calibrate.synthetic:small_cnn",
         "--weights", str(TINY / "model.pt"), "--data", str(TINY / "clean.npz"),
         "--out", str(out), "--quiet", *SHORT, *flags]
    )  # fmt: skip


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cuda_devices(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_is_the_cpu_and_auto_falls_back_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_and_cuda_pick_a_gpu_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_devices(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_a_device_that_cannot_be_used_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    expect_error(lambda: resolve_device("gpu"), "--device 'gpu'", "auto, cpu, cuda or cuda:N")
    expect_error(lambda: resolve_device("cuda:x"), "--device 'cuda:x'")
    _cuda_devices(monkeypatch, 1)
    expect_error(lambda: resolve_device("cuda:1"), "--device cuda:1", "1 CUDA device", "cuda:0")
    _cuda_devices(monkeypatch, 3)
    expect_error(lambda: resolve_device("cuda:3"), "3 CUDA devices (cuda:0 to cuda:2)")
    _no_cuda(monkeypatch)
    message = expect_error(lambda: resolve_device("cuda"), "--device cuda", "--device cpu")
    assert "no CUDA" in message or "without CUDA" in message


def test_device_of_a_module_and_its_description() -> None:
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")  # neither parameters nor buffers
    assert describe(torch.device("cpu")) == "cpu"


def test_random_starts_are_drawn_on_the_cpu_then_moved() -> None:
    """The seed fixes the starting points whatever the device (here: the CPU, and meta)."""
    x, k = random_starts(3, 2, (1, 2, 2), torch.Generator().manual_seed(5))
    y, j = random_starts(3, 2, (1, 2, 2), torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(x, y) and torch.equal(k, j)
    m, c = random_starts(3, 2, (1, 2, 2), torch.Generator().manual_seed(5), torch.device("meta"))
    assert m.device.type == "meta" and c.device.type == "meta" and m.shape == x.shape


def test_cli_bad_device_stops_before_any_work(tmp_path: Path) -> None:
    code, out, err = _calibrate(tmp_path / "art", "--device", "tpu")
    assert code == 2, (out, err)
    assert err.strip().splitlines() == [
        "mmguard calibrate: error: --device 'tpu': expected auto, cpu, cuda or cuda:N"
    ]
    assert not (tmp_path / "art").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    code, _, err = _calibrate(tmp_path / "art", "--device", "cuda")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("mmguard calibrate: error: --device cuda: torch ")
    assert not (tmp_path / "art").exists()


def test_the_report_names_the_device(tmp_path: Path) -> None:
    code, out, err = _calibrate(tmp_path / "art", "--device", "cpu")
    assert code == 0, err
    assert "s on cpu)" in out.splitlines()[0]
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["device"] == "cpu"
    assert "Calibrated on cpu (export on the CPU)." in (tmp_path / "art" / "report.md").read_text()


@requires_cuda
def test_a_gpu_calibration_matches_the_cpu_one(tmp_path: Path) -> None:
    """Same seed, same images, same number of iterations: the GPU's floating point is not the
    CPU's, so the two runs drift apart a little (on an H200, after 6 iterations: MM-BD's margins
    within 0.13%, 97% of the bounds within 5%, the largest difference 14%), and reach the same
    verdict and held-out figures. Its exported networks (on the CPU) passed the export check."""
    runs = {}
    for device in ("cpu", "cuda"):
        code, _, err = _calibrate(tmp_path / device, "--device", device, "--range-detector")
        assert code == 0, err
        runs[device] = json.loads((tmp_path / device / "report.json").read_text())
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda:0 (")
    assert gpu["iterations"] == cpu["iterations"]
    assert gpu["mmbd"]["target"] == cpu["mmbd"]["target"]
    assert gpu["mmbd"]["suspected"] == cpu["mmbd"]["suspected"]
    assert gpu["mmbd"]["r"] == pytest.approx(cpu["mmbd"]["r"], rel=1e-2, abs=1e-2)
    a = np.concatenate([layer["values"] for layer in gpu["bounds"]])
    b = np.concatenate([layer["values"] for layer in cpu["bounds"]])
    assert np.mean(np.isclose(a, b, rtol=0.05, atol=1e-3)) >= 0.9
    assert np.allclose(a, b, rtol=0.25, atol=0.05)
    assert np.allclose(gpu["clean_statistics"], cpu["clean_statistics"], rtol=0.05, atol=0.25)
    for key in ("accuracy_guarded", "agreement", "false_positive_rate"):
        assert gpu["heldout"][key] == pytest.approx(cpu["heldout"][key], abs=0.02)
    for name in ("original.onnx", "bounded.onnx", "manifest.json"):
        assert (tmp_path / "cuda" / name).is_file()


def _tensors_on(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def test_the_networks_calibration_builds_live_on_the_models_device() -> None:
    """The bounded network's bounds and the range network's scales are made where the model
    is (here the meta device, which has shapes and no values, standing in for a GPU): one
    tensor left on the CPU stops a GPU calibration at its first forward pass."""
    from calibrate.bounded import BoundedNetwork
    from calibrate.rangeprobe import RangeNetwork
    from calibrate.synthetic import small_cnn

    model = small_cnn(3).to("meta").eval()
    sample = torch.zeros((2, 3, 16, 16), device="meta")
    net = BoundedNetwork(model, sample)
    assert _tensors_on(net) == {"meta"}
    assert device_of(net) == torch.device("meta")
    scales = [torch.ones(site.channels) for site in net.sites]  # on the CPU, as fitted
    ranged = RangeNetwork(net, scales)
    assert _tensors_on(ranged) == {"meta"}
    logits, ratios = ranged(sample)
    assert logits.device.type == "meta" and ratios.shape == (2, len(net.sites))
