"""`mmguard demo` end to end (calibrate, serve as a child process, query through tritonclient,
shut down) on an example directory built from the tiny synthetic example, so that it runs in
seconds; the shipped CIFAR-10 example goes through the same code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrate.config import CalibrationConfig
from calibrate.demo import DEMO_MMBD_STEPS, EXAMPLE

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    ex = tmp_path / "example"
    ex.mkdir()
    shutil.copyfile(TINY / "model.pt", ex / "model.pt")
    shutil.copyfile(TINY / "clean.npz", ex / "clean.npz")
    with np.load(TINY / "clean.npz") as c, np.load(TINY / "poisoned.npz") as p:
        names = c["class_names"].tolist()
        np.savez(
            ex / "test.npz",
            clean=c["images"][:40],
            clean_labels=c["labels"][:40],
            triggered=p["images"],
            triggered_labels=p["labels"],
        )
    meta = {
        "name": "tiny-demo",
        "description": "the tiny synthetic example",
        "factory": "calibrate.synthetic:small_cnn",
        "attack": "patch",
        "target": 0,
        "class_names": names,
    }
    (ex / "example.json").write_text(json.dumps(meta))
    return ex


def _row(text: str, title: str) -> list[float]:
    line = next(ln for ln in text.splitlines() if ln.startswith(title))
    return [float(v) for v in re.findall(r"(\d+\.\d)%", line)]


def test_demo_calibrates_serves_queries_and_shuts_down(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-m", "guard.cli", "demo", "--example", str(example), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert (out / "manifest.json").is_file()
    # the one setting the demo shortens is recorded, and said
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["mmbd_steps"] == DEMO_MMBD_STEPS < CalibrationConfig().mmbd_steps
    assert f"shortened to {DEMO_MMBD_STEPS} steps" in text
    assert "server exited with status 0" in text
    assert re.search(r"metrics were served at http://127\.0\.0\.1:\d+/metrics", text)
    undefended_asr, guarded_asr = _row(text, "attack success")
    assert undefended_asr > 90.0 and guarded_asr < 50.0
    (triggered_flag_rate,) = _row(text, "flag rate, triggered")
    (clean_flag_rate,) = _row(text, "flag rate, clean")
    assert triggered_flag_rate > 50.0 > clean_flag_rate


def test_demo_refuses_a_directory_that_is_not_an_example(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "guard.cli", "demo", "--example", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "example.json is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_example_is_complete_and_small() -> None:
    files = {p.name: p.stat().st_size for p in EXAMPLE.iterdir()}
    assert {"model.pt", "clean.npz", "test.npz", "example.json"} <= set(files)
    assert sum(files.values()) <= 10 * 1024 * 1024
    meta = json.loads((EXAMPLE / "example.json").read_text())
    with np.load(EXAMPLE / "clean.npz") as c, np.load(EXAMPLE / "test.npz") as t:
        assert np.bincount(c["labels"]).tolist() == [50] * 10
        assert len(t["triggered"]) == len(t["triggered_labels"]) > 0
        assert not np.any(t["triggered_labels"] == meta["target"])


def test_demo_names_a_missing_field_in_one_line(example: Path) -> None:
    meta = json.loads((example / "example.json").read_text())
    del meta["factory"]
    (example / "example.json").write_text(json.dumps(meta))
    cmd = [sys.executable, "-m", "guard.cli", "demo", "--example", str(example)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lacks the field or array 'factory'" in proc.stderr and "Traceback" not in proc.stderr
