"""`mmguard calibrate` on bad input: one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import run_cli

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"


class NanNet(nn.Module):
    """Four-class logits that are all NaN."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.flatten(1))) * float("nan")


def nan_net(num_classes: int = 4) -> NanNet:
    return NanNet(num_classes)


def _tiny_args(out: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        "--factory",
        "calibrate.synthetic:small_cnn",
        "--weights",
        str(TINY / "model.pt"),
        "--data",
        str(TINY / "clean.npz"),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _calibrate_tiny(out: Path, *extra: str) -> tuple[dict, dict]:
    """Calibrate the tiny example into ``out`` with ``extra`` flags; expect success and return
    the manifest and the report."""
    import json

    code, _, err = run_cli(_tiny_args(out, *extra))
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, json.loads((out / "report.json").read_text())


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_unknown_architecture(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(
        [
            "calibrate",
            "--arch",
            "resnet181",
            "--weights",
            str(TINY / "model.pt"),
            "--data",
            str(TINY / "clean.npz"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    _assert_one_line_error(code, err, "resnet181", "resnet18")
    _nothing_written(tmp_path, out)


def test_wrong_number_of_classes(tmp_path: Path) -> None:
    c = np.load(TINY / "clean.npz")
    keep = c["labels"] < 3  # three classes of data for a four-class model
    np.savez(tmp_path / "three.npz", images=c["images"][keep], labels=c["labels"][keep])
    out = tmp_path / "art"
    args = _tiny_args(out)
    args[args.index("--data") + 1] = str(tmp_path / "three.npz")
    code, _, err = run_cli(args)
    _assert_one_line_error(code, err)
    assert "class" in err and ("4" in err or "3" in err)
    _nothing_written(tmp_path, out)


def test_corrupted_image(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "folder"
    c = np.load(TINY / "clean.npz")
    names = [str(n) for n in c["class_names"]]
    for i, (img, lab) in enumerate(zip(c["images"], c["labels"], strict=True)):
        (data / names[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / names[lab] / f"{i:03d}.png")
    (data / names[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "art"
    args = _tiny_args(out)
    args[args.index("--data") + 1] = str(data)
    code, _, err = run_cli(args)
    _assert_one_line_error(code, err, "broken.png")
    _nothing_written(tmp_path, out)


def test_nan_logits(tmp_path: Path) -> None:
    torch.save(NanNet().state_dict(), tmp_path / "nan.pt")
    out = tmp_path / "art"
    args = _tiny_args(out)
    args[args.index("--factory") + 1] = "tests.test_cli:nan_net"
    args[args.index("--weights") + 1] = str(tmp_path / "nan.pt")
    code, _, err = run_cli(args)
    _assert_one_line_error(code, err, "NaN")
    _nothing_written(tmp_path, out)


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(_tiny_args(out))
    _assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--alpha", "1.5", "alpha: 1.5 (between 0 and 1)"),
        ("--heldout-fraction", "0", "heldout_fraction"),
        ("--bound-init", "large", "bound_init"),
        ("--max-iters", "0", "max_iters: 0 (at least 1)"),
        ("--overtime-iters", "-1", "overtime_iters: -1 (0 or more)"),
        # below the default min_iters (50): the message says what the limit is
        ("--max-iters", "3", "min_iters: 50 (0 to max_iters, 3)"),
        ("--lambda-init", "-1", "lambda_init: -1.0 (a finite number, 0 or more)"),
    ],
)
def test_bad_option_values(tmp_path: Path, flag: str, value: str, fragment: str) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(_tiny_args(out, flag, value))
    _assert_one_line_error(code, err, "invalid value for " + fragment)
    _nothing_written(tmp_path, out)


def test_weights_are_required_for_a_factory(tmp_path: Path) -> None:
    args = _tiny_args(tmp_path / "art")
    i = args.index("--weights")
    del args[i : i + 2]
    code, _, err = run_cli(args)
    _assert_one_line_error(code, err, "weights")


def test_mean_without_std(tmp_path: Path) -> None:
    code, _, err = run_cli(_tiny_args(tmp_path / "art", "--mean", "0.5,0.5,0.5"))
    _assert_one_line_error(code, err, "--std")


def test_torchscript_model_calibrates_end_to_end(tmp_path: Path) -> None:
    """A scripted model is rebuilt as an fx graph: bounds at every ReLU site, verified export."""
    import json

    from calibrate.synthetic import small_cnn

    model = small_cnn()
    model.load_state_dict(torch.load(TINY / "model.pt", weights_only=True))
    torch.jit.save(torch.jit.script(model.eval()), str(tmp_path / "model.ts"))
    out = tmp_path / "art"
    code, stdout, err = run_cli(
        ["calibrate", "--torchscript", str(tmp_path / "model.ts"),
         "--data", str(TINY / "clean.npz"), "--out", str(out), "--quiet",
         "--max-iters", "5", "--min-iters", "1", "--mmbd-steps", "20"]
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["bounds"]) == 4
    assert max(manifest["onnx"]["max_diff"].values()) <= 1e-4
    assert "wrote" in stdout
    assert "warning" not in stdout  # a network that works on its clean set
    # 120 clean images, 48 held out: too few for the default gpd null, and the summary says so
    assert "\n  null yeojohnson: the 48 held-out images are too few for a gpd null" in stdout


def test_mmom_objective_records_its_settings(tmp_path: Path) -> None:
    manifest, report = _calibrate_tiny(
        tmp_path / "art", "--objective", "mmom", "--max-iters", "6", "--min-iters", "6",
        "--mmom-lambda", "0.3", "--mmbd-steps", "10",
    )  # fmt: skip
    assert manifest["objective"] == "mmom"
    assert manifest["hyperparameters"]["schedule"]["mmom_lambda"] == 0.3
    assert [row["lambda"] for row in report["history"]] == [0.3] * 6  # MMOM: lambda is fixed


def test_empirical_null_too_small_to_flag(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(_tiny_args(out, "--null", "empirical"))
    _assert_one_line_error(code, err, "empirical null", "48")
    _nothing_written(tmp_path, out)


def test_gpd_null_too_few_heldout_images(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(_tiny_args(out, "--null", "gpd"))
    _assert_one_line_error(code, err, "gpd null", "48", "100")
    _nothing_written(tmp_path, out)


def test_detect_schedule_runs_one_iteration_from_the_clean_maxima(tmp_path: Path) -> None:
    manifest, report = _calibrate_tiny(
        tmp_path / "art", "--schedule", "detect", "--mmbd-steps", "10"
    )
    sched = manifest["hyperparameters"]["schedule"]
    assert (sched["max_iters"], sched["min_iters"], sched["overtime_iters"]) == (1, 0, 0)
    assert report["iterations"] == 1 and len(report["history"]) == 1
    # one Adam step of relative size 0.05 from the maxima: no bound moves further than that
    for site in manifest["bounds"]:
        assert site["final_max"] <= site["init_max"] * 1.05 + 1e-6


def test_detect_schedule_refuses_mmom(tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, _, err = run_cli(_tiny_args(out, "--schedule", "detect", "--objective", "mmom"))
    _assert_one_line_error(code, err, "--schedule detect", "mmac")
    _nothing_written(tmp_path, out)


def test_a_null_that_cannot_be_fitted_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import calibrate.pipeline

    # bounds that change no held-out margin: every statistic is 0, a Gaussian has no width
    monkeypatch.setattr(calibrate.pipeline, "statistic", lambda g, gz: np.zeros(len(g)))
    out = tmp_path / "art"
    code, _, err = run_cli(
        _tiny_args(out, "--null", "gaussian", "--max-iters", "1", "--min-iters", "0",
                   "--mmbd-steps", "5")
    )  # fmt: skip
    _assert_one_line_error(code, err, "gaussian null", "all equal")
    _nothing_written(tmp_path, out)


def test_gpd_null_calibrates_and_the_guard_reads_it(tmp_path: Path) -> None:
    from guard.artifact import load_artifact
    from guard.mmdf import p_values, threshold

    out = tmp_path / "art"
    _, report = _calibrate_tiny(
        out, "--null", "gpd", "--heldout-fraction", "0.9", "--max-iters", "4", "--min-iters", "1",
        "--mmbd-steps", "10", "--no-range-detector",  # the learned statistic alone, at alpha
    )  # fmt: skip
    assert report["null"]["kind"] == "gpd" and report["null"]["n"] == 108
    art = load_artifact(out)
    assert art.null.kind == "gpd" and art.null.tail_zeta == 22 / 108  # ceil(0.2 * 108) above u
    thr = threshold(art.null, art.rule.alpha)
    assert report["null"]["threshold"] == thr
    assert p_values(art.null, [thr])[0] == pytest.approx(art.rule.alpha)


@pytest.mark.slow
def test_torchvision_arch_with_normalisation_on_an_image_folder(tmp_path: Path) -> None:
    """The path a user of a torchvision model takes: --arch + state_dict, --mean/--std folded
    into both graphs, clean data as an ImageFolder of PNG files."""
    import json

    import onnxruntime as ort
    import torchvision
    from PIL import Image

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    out = tmp_path / "art"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    code, stdout, err = run_cli(
        ["calibrate", "--arch", "resnet18", "--weights", str(tmp_path / "r18.pt"),
         "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)),
         "--data", str(tmp_path / "data"), "--min-per-class", "8", "--objective", "mmom",
         "--out", str(out), "--quiet", "--max-iters", "3", "--min-iters", "3",
         "--mmbd-steps", "5", "--starts-per-class", "2"]
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["normalization"]["mean"] == list(mean)
    assert manifest["class_names"] == ["cat", "dog", "fox"]
    assert len(manifest["bounds"]) == 17
    # an untrained network on noise: the summary says the inputs look wrong for it
    report = json.loads((out / "report.json").read_text())
    assert report["clean_set"]["accuracy_original"] < 0.5
    assert "warning: the original network classifies" in stdout
    # the exported original graph takes [0,1] pixels and normalises inside
    x = rng.random((2, 3, 32, 32), dtype=np.float32)
    want = model((torch.from_numpy(x) - torch.tensor(mean).view(1, 3, 1, 1))
                 / torch.tensor(std).view(1, 3, 1, 1)).detach().numpy()  # fmt: skip
    sess = ort.InferenceSession(str(out / "original.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    assert np.max(np.abs(got - want)) <= 1e-4


def test_summary_says_when_the_run_fell_back_to_earlier_bounds(tmp_path: Path) -> None:
    from calibrate.cli import summary

    report = {
        "heldout": {
            "accuracy_original": 0.8,
            "accuracy_guarded": 0.79,
            "agreement": 0.93,
            "false_positive_rate": 0.005,
        },
        "mmbd": {"suspected": False, "p_value": 0.4, "target": 0},
        "model": {"class_names": ["a", "b"]},
        "iterations": 120,
        "timing_s": {"total": 10.0},
        "null": {"alpha": 0.005, "kind": "yeojohnson"},
        "bounds_from_iteration": 75,
    }
    text = summary(report, tmp_path)
    assert "after 120 iterations; these are the bounds of iteration 75" in text
    report["bounds_from_iteration"] = None
    assert "bounds of iteration" not in summary(report, tmp_path)


# Runs `mmguard` in a fresh interpreter and prints its exit code and the OMP_WAIT_POLICY that
# was in the environment at the moment torch was first imported (OpenMP reads it then).
_POLICY_PROBE = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
from guard.cli import main
code = main(sys.argv[1:])
print(code, seen)
"""


@pytest.mark.parametrize("command", ["calibrate", "demo"])
@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_the_user_chose(
    tmp_path: Path, command: str, preset: str | None, expected: str
) -> None:
    """torch's OpenMP threads are told to sleep, not spin, while they wait (a spinning thread
    slows calibration when another process holds a core); a user's own OMP_WAIT_POLICY wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    if command == "calibrate":  # fails after torch is imported: the (last) weights file is missing
        argv = _tiny_args(tmp_path / "out", "--weights", str(tmp_path / "missing.pt"))
    else:  # fails after torch is imported: not an example directory
        argv = ["demo", "--example", str(tmp_path), "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", _POLICY_PROBE, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.stdout.split() == ["2", f"['{expected}']"], proc.stdout + proc.stderr


def gray_net(num_classes: int = 4) -> nn.Module:
    """A single-channel CNN (MNIST-style inputs)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, num_classes),
    )  # fmt: skip


@pytest.mark.slow
def test_a_single_channel_model_from_grayscale_arrays(tmp_path: Path) -> None:
    """Grayscale [N, H, W] arrays calibrate a single-channel model end to end, and RGB images
    given to it are refused with the way out named."""
    from guard.artifact import load_artifact
    from guard.engine import GuardEngine

    torch.manual_seed(0)
    weights = tmp_path / "gray.pt"
    torch.save(gray_net().state_dict(), weights)
    rgb = np.load(TINY / "clean.npz")
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=rgb["images"].mean(axis=3).astype(np.uint8), labels=rgb["labels"])
    args = ["calibrate", "--factory", "tests.test_cli:gray_net", "--weights", str(weights),
            "--quiet", "--max-iters", "2", "--min-iters", "0", "--mmbd-steps", "3"]  # fmt: skip
    code, _, err = run_cli([*args, "--data", str(TINY / "clean.npz"), "--out", str(tmp_path / "a")])
    assert code == 2 and "does not accept images of shape (3, 16, 16)" in err
    assert "it takes single-channel images: give them as an .npz of [N, H, W]" in err
    code, _, err = run_cli([*args, "--data", str(gray), "--out", str(tmp_path / "b")])
    assert code == 0, err
    art = load_artifact(tmp_path / "b")
    assert tuple(art.input.shape) == (1, 16, 16)
    x = np.load(gray)["images"][:4, None].astype(np.float32) / 255
    assert GuardEngine(art, "cpu", threads=1).decide(x).label.shape == (4,)


def softmax_cnn(num_classes: int = 4) -> nn.Module:
    """The tiny example's network with a softmax at the end (the same weights load into it)."""
    from calibrate.synthetic import SmallCNN

    class SoftmaxCNN(SmallCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).softmax(dim=1)

    return SoftmaxCNN(num_classes=num_classes)


@pytest.mark.slow
def test_a_model_that_returns_probabilities_is_warned_about(tmp_path: Path) -> None:
    args = _tiny_args(tmp_path / "out", "--max-iters", "2", "--min-iters", "0",
                      "--mmbd-steps", "3")  # fmt: skip
    args[args.index("--factory") + 1] = "tests.test_cli:softmax_cnn"
    code, stdout, err = run_cli(args)
    assert code == 0, err
    assert "warning: the model returns probabilities" in stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["clean_set"]["outputs_are_probabilities"] is True
    plain = _tiny_args(tmp_path / "plain", "--max-iters", "2", "--min-iters", "0",
                       "--mmbd-steps", "3")  # fmt: skip
    code, stdout, err = run_cli(plain)
    assert code == 0 and "returns probabilities" not in stdout
