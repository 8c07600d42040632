"""`mmguard evaluate` on the session's tiny artifact: its figures against the guard engine's
own decisions on the same images, the attacker's labels from --target or the .npz, the files it
writes, and bad input as one line on stderr with exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # the session artifact is calibrated with torch

TINY = Path(__file__).resolve().parents[1] / "calibrate" / "examples" / "tiny"
TARGET = 0  # calibrate/examples/tiny/example.json


def _nchw_float(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def _reference(engine: Any, x: np.ndarray) -> Any:
    return engine.decide(_nchw_float(x))


def test_figures_are_the_engines_decisions_on_the_same_images(
    artifact_dir: Path, engine: Any, tmp_path: Path
) -> None:
    # the tiny example has no clean test set of its own: its calibration images stand in, which
    # is enough here, where the figures are checked against the engine's decisions
    clean, trig = np.load(TINY / "clean.npz"), np.load(TINY / "poisoned.npz")
    code, out, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(TINY / "clean.npz"),
            "--triggered", str(TINY / "poisoned.npz"), "--target", "stripes_h",
            "--out", str(tmp_path / "eval"), "--threads", "1", "--batch-size", "7",
        ]
    )  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    dc, dt = _reference(engine, clean["images"]), _reference(engine, trig["images"])
    y, ty = clean["labels"], trig["labels"]
    assert r["clean_images"] == len(y) and r["triggered_images"] == len(ty)
    assert r["triggered_left_out"] == 0  # poisoned.npz holds no image of the target class
    g = r["guarded"]
    assert g["clean_accuracy"] == pytest.approx(np.mean(dc.label == y))
    assert g["fpr"] == pytest.approx(np.mean(dc.flagged))
    assert g["asr"] == pytest.approx(np.mean(dt.label == TARGET))
    assert g["restored"] == pytest.approx(np.mean(dt.label == ty))
    assert g["tpr"] == pytest.approx(np.mean(dt.flagged))
    u = r["undefended"]
    assert u["asr"] == pytest.approx(np.mean(dt.original_label == TARGET))
    assert u["clean_accuracy"] == pytest.approx(np.mean(dc.original_label == y))
    # the backdoor works and the guard stops it on this example
    assert u["asr"] > 0.9 and g["asr"] < 0.1 and g["tpr"] > 0.9
    # the disagreement rule can only add flags
    assert r["guarded_with_disagreement"]["tpr"] >= g["tpr"]
    assert r["guarded_with_disagreement"]["fpr"] >= g["fpr"]
    assert 0.9 < r["auroc_p_value"] <= 1.0
    assert r["forward_passes_per_input"] == 2
    assert r["providers"][0] == "CPUExecutionProvider"
    assert "activation range" in r["detectors"]  # the range detector is on by default
    assert r["alpha"] == 0.005
    # a level of 0.5 flags at least as many inputs of each kind as the manifest's 0.005
    code, _, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(TINY / "clean.npz"),
            "--triggered", str(TINY / "poisoned.npz"), "--target", "0", "--alpha", "0.5",
            "--out", str(tmp_path / "loose"), "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0, err
    loose = json.loads((tmp_path / "loose" / "evaluation.json").read_text())
    assert loose["alpha"] == 0.5
    assert loose["guarded"]["fpr"] >= g["fpr"] and loose["guarded"]["tpr"] >= g["tpr"]
    assert loose["guarded"]["fpr"] > 0.2  # clean p-values spread over (0, 1]: many fall below
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "attack success (-> stripes_h)" in md and md.strip() in out
    png = (tmp_path / "eval" / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_image_target_labels_and_the_attackers_own_class_left_out(
    artifact_dir: Path, engine: Any, tmp_path: Path
) -> None:
    trig = np.load(TINY / "poisoned.npz")
    x, y = trig["images"], trig["labels"]
    wanted = (y + 1) % 4  # an all-to-all attack s -> s + 1
    wanted[:5] = y[:5]  # five images whose true class is already the attacker's
    path = tmp_path / "a2a.npz"
    np.savez(path, images=x, labels=y, target_labels=wanted)
    code, _, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(TINY / "clean.npz"),
            "--triggered", str(path), "--out", str(tmp_path / "eval"), "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert r["triggered_left_out"] == 5 and r["triggered_images"] == len(y) - 5
    dt = _reference(engine, x[5:])
    assert r["guarded"]["asr"] == pytest.approx(np.mean(dt.label == wanted[5:]))
    assert r["undefended"]["asr"] == pytest.approx(np.mean(dt.original_label == wanted[5:]))
    names = ("stripes_h", "stripes_v", "blob", "rings")
    assert r["attacker_classes"] == [names[k] for k in np.unique(wanted[5:])]


def test_an_image_folder_without_the_attackers_class(artifact_dir: Path, tmp_path: Path) -> None:
    trig = np.load(TINY / "poisoned.npz")
    names = ("stripes_h", "stripes_v", "blob", "rings")
    root = tmp_path / "triggered"
    for i, (img, label) in enumerate(zip(trig["images"][:12], trig["labels"][:12], strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    code, out, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(TINY / "clean.npz"),
            "--triggered", str(root), "--target", "0", "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0, err
    assert "120 clean and 12 triggered test images" in out


def _bad(artifact_dir: Path, *extra: str) -> str:
    args = ["evaluate", "--artifact", str(artifact_dir), "--clean", str(TINY / "clean.npz")]
    code, out, err = run_cli([*args, *extra])
    assert code == 2 and out == ""
    assert err.startswith("mmguard evaluate: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_status_2(artifact_dir: Path, tmp_path: Path) -> None:
    poisoned = str(TINY / "poisoned.npz")
    assert "--target CLASS" in _bad(artifact_dir, "--triggered", poisoned)
    assert "'cat'" in _bad(artifact_dir, "--triggered", poisoned, "--target", "cat")
    assert "classes 0..3" in _bad(artifact_dir, "--triggered", poisoned, "--target", "7")
    missing = str(tmp_path / "nope.npz")
    assert "triggered test set not found" in _bad(artifact_dir, "--triggered", missing)
    trig = np.load(TINY / "poisoned.npz")
    short = tmp_path / "short.npz"
    np.savez(short, images=trig["images"], labels=trig["labels"], target_labels=np.zeros(3, int))
    assert "expected [90]" in _bad(artifact_dir, "--triggered", str(short))
    objects = tmp_path / "objects.npz"
    labels = np.array([None] * len(trig["labels"]), dtype=object)
    np.savez(objects, images=trig["images"], labels=trig["labels"], target_labels=labels)
    assert "cannot read target_labels" in _bad(artifact_dir, "--triggered", str(objects))
    big = tmp_path / "big.npz"
    np.savez(big, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([1, 2]))
    assert "takes [3, 16, 16]" in _bad(artifact_dir, "--triggered", str(big), "--target", "0")
    only_target = tmp_path / "target.npz"
    np.savez(only_target, images=trig["images"][:2], labels=np.zeros(2, int))
    assert "nothing to measure" in _bad(
        artifact_dir, "--triggered", str(only_target), "--target", "0"
    )
    err = _bad(tmp_path, "--triggered", poisoned, "--target", "0")  # not an artifact
    assert "manifest" in err
    assert "--alpha must be in (0, 1)" in _bad(
        artifact_dir, "--triggered", poisoned, "--target", "0", "--alpha", "1.5"
    )
    (tmp_path / "flat").mkdir()
    assert "triggered test set directory" in _bad(
        artifact_dir, "--triggered", str(tmp_path / "flat"), "--target", "0"
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = _bad(artifact_dir, "--triggered", poisoned, "--target", "0", "--out", str(a_file))
    assert "is not a directory" in err


def test_missing_matplotlib_with_out_fails_before_evaluating(
    artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    out = tmp_path / "report"
    poisoned = str(TINY / "poisoned.npz")
    err = _bad(artifact_dir, "--triggered", poisoned, "--target", "0", "--out", str(out))
    assert "matplotlib" in err and "mmguard[calibrate]" in err
    assert not out.exists()  # nothing evaluated or written


def test_strip_beside_the_guard_on_the_same_inputs(
    artifact_dir: Path, engine: Any, tmp_path: Path
) -> None:
    """--strip-pool: STRIP's figures are calibrate.strip's on the same draws, its threshold set
    on the pool alone; the table and the ROC plot show it beside the guard."""
    from calibrate import strip

    clean = np.load(TINY / "clean.npz")
    order = np.random.default_rng(0).permutation(len(clean["labels"]))
    pool_rows, test_rows = order[:70], order[70:]  # the pool is never scored
    for name, rows in (("pool", pool_rows), ("test", test_rows)):
        np.savez(tmp_path / f"{name}.npz", images=clean["images"][rows],
                 labels=clean["labels"][rows])  # fmt: skip
    trig = np.load(TINY / "poisoned.npz")
    code, out, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(tmp_path / "test.npz"),
            "--triggered", str(TINY / "poisoned.npz"), "--target", "stripes_h",
            "--strip-pool", str(tmp_path / "pool.npz"), "--strip-seed", "3",
            "--out", str(tmp_path / "eval"), "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0, err
    st = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["strip"]

    def logits(b: np.ndarray) -> np.ndarray:
        return engine.original_logits(b)

    rng = np.random.default_rng(3)
    pool = _nchw_float(clean["images"][pool_rows])
    h_pool = strip.strip_scores(logits, pool, pool, rng, exclude_self=True)
    threshold = strip.low_tail_threshold(h_pool, 0.005)
    h_clean = strip.strip_scores(logits, _nchw_float(clean["images"][test_rows]), pool, rng)
    h_trig = strip.strip_scores(logits, _nchw_float(trig["images"]), pool, rng)
    assert st["pool_images"] == 70 and st["blends"] == 64 and st["forward_passes_per_input"] == 65
    assert st["threshold_entropy_bits"] == pytest.approx(threshold)
    assert st["fpr"] == pytest.approx(np.mean(h_clean < threshold))
    assert st["tpr"] == pytest.approx(np.mean(h_trig < threshold))
    reach = engine.original_logits(_nchw_float(trig["images"])).argmax(1) == TARGET
    assert st["asr_flagged_rejected"] == pytest.approx(np.mean(reach & (h_trig >= threshold)))
    assert 0.0 <= st["auroc"] <= 1.0
    assert "## Beside STRIP (64 blends per input with 70 pool images" in out
    assert (st["clean_scored"], st["triggered_scored"]) == (50, 90)
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 0
    # refused: the pool as the scored clean images, and a pool too small for 64 blends
    poisoned = str(TINY / "poisoned.npz")
    err = _bad(artifact_dir, "--triggered", poisoned, "--target", "0",
               "--strip-pool", str(TINY / "clean.npz"))  # fmt: skip
    assert "must not be the --clean images" in err
    np.savez(tmp_path / "small.npz", images=clean["images"][:64], labels=clean["labels"][:64])
    err = _bad(artifact_dir, "--triggered", poisoned, "--target", "0",
               "--strip-pool", str(tmp_path / "small.npz"))  # fmt: skip
    assert "has 64 images; it needs at least 65" in err
    err = _bad(artifact_dir, "--triggered", poisoned, "--target", "0",
               "--strip-pool", str(tmp_path / "pool.npz"), "--strip-limit", "0")  # fmt: skip
    assert "--strip-limit must be at least 1" in err
    # at most --strip-limit inputs of each kind, drawn at random
    code, out, err = run_cli(
        [
            "evaluate", "--artifact", str(artifact_dir), "--clean", str(tmp_path / "test.npz"),
            "--triggered", poisoned, "--target", "stripes_h", "--threads", "1",
            "--strip-pool", str(tmp_path / "pool.npz"), "--strip-limit", "20",
            "--out", str(tmp_path / "limited"),
        ]
    )  # fmt: skip
    assert code == 0, err
    limited = json.loads((tmp_path / "limited" / "evaluation.json").read_text())
    assert (limited["strip"]["clean_scored"], limited["strip"]["triggered_scored"]) == (20, 20)
    assert limited["clean_images"] == 50  # the guard's own figures use every input
