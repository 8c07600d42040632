"""Known-answer tests for the benchmarks' pure metrics (benchmarks/evalmetrics.py, STRIP's from
calibrate/strip.py), and the bookkeeping of its calibration variants (benchmarks/evaluate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.evalmetrics import low_tail_threshold, strip_blend, strip_entropy, tpr_at_fpr


def test_strip_entropy_known_answers() -> None:
    uniform = np.zeros((1, 3, 4))  # 3 blends, 4 equally likely classes: 2 bits each
    certain = np.zeros((1, 2, 4))
    certain[..., 0] = 1000.0  # one class with probability ~1: 0 bits
    assert strip_entropy(uniform) == pytest.approx([2.0])
    assert strip_entropy(certain) == pytest.approx([0.0], abs=1e-9)


def test_strip_blend_saturates() -> None:
    x = np.full((2, 2, 3), 200, dtype=np.uint8)
    bg = np.stack([np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 100, np.uint8)])
    out = strip_blend(x, bg)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 2, 3)
    assert np.all(out[0] == 210) and np.all(out[1] == 255)


def test_strip_blend_of_float_pixels_saturates_at_one() -> None:
    x = np.full((3, 2, 2), 0.75, dtype=np.float32)  # NCHW-style float pixels in [0, 1]
    bg = np.stack([np.full((3, 2, 2), 0.125, np.float32), np.full((3, 2, 2), 0.5, np.float32)])
    out = strip_blend(x, bg)
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 2)
    assert np.all(out[0] == 0.875) and np.all(out[1] == 1.0)


def test_strip_scores_draws_without_the_input_itself_and_needs_a_big_enough_pool() -> None:
    from calibrate.strip import strip_scores

    # a "network" certain of class 0 when a blend reaches 0.5, else unsure among 4 classes (2
    # bits): only pool image 0 (0.3) blended with itself does
    pool = np.zeros((5, 1, 1, 1), dtype=np.float32)
    pool[0] = 0.3

    def logits(b: np.ndarray) -> np.ndarray:
        z = np.zeros((len(b), 4))
        z[b.reshape(len(b), -1)[:, 0] >= 0.5, 0] = 1000.0
        return z

    rng = np.random.default_rng(0)
    h = strip_scores(logits, pool, pool, rng, exclude_self=True, blends=4)
    np.testing.assert_allclose(h, [2.0] * 5, atol=1e-9)  # never blended with itself
    h = strip_scores(logits, pool[:1], pool, rng, blends=5)  # all five, itself among them
    np.testing.assert_allclose(h, [(4 * 2.0 + 0.0) / 5], atol=1e-9)
    with pytest.raises(ValueError, match="the pool has 4 to draw from"):
        strip_scores(logits, pool, pool, rng, exclude_self=True, blends=5)


def test_low_tail_threshold_flags_at_most_the_nominal_fraction() -> None:
    scores = np.arange(1000, dtype=float)
    t = low_tail_threshold(scores, 0.005)
    assert t == 5.0 and np.sum(scores < t) == 5
    assert low_tail_threshold(scores, 0.0) == 0.0  # flags nothing
    with pytest.raises(ValueError, match="no clean scores"):
        low_tail_threshold(np.array([]), 0.01)


def test_tpr_at_fpr_sets_the_threshold_on_the_negatives() -> None:
    neg = np.arange(1000, dtype=float)  # 0..999: flagging > 994 flags 5 of them, 0.5%
    pos = np.array([994.0, 995.0, 2000.0, -1.0])
    assert tpr_at_fpr(neg, pos, 0.005) == (0.5, 0.005)
    assert tpr_at_fpr(neg, pos, 0.0) == (0.25, 0.0)  # nothing clean flagged: only 2000 > 999
    assert tpr_at_fpr(neg, pos, 1.0) == (1.0, 1.0)  # flags everything


def _result(asr: float, variant: dict[str, str] | None = None) -> dict[str, object]:
    figs = {"clean_accuracy": 0.8, "fpr": 0.005, "asr": asr, "restored": 0.5, "tpr": 1 - asr}
    r: dict[str, object] = {
        "model": {},
        "undefended_clean_accuracy": 0.81,
        "undefended_asr": 0.97,
        "p": figs,
        "p_dis": figs,
        "by_null": {},
        "strip": {"auroc": 0.5, "tpr": 0.0, "fpr": 0.0},
        "auroc_guard_subset": 0.9,
        "mmbd": {"suspected": True, "target": 0, "p_value": 1e-6},
    }
    if variant:
        r["variant"] = variant
    return r


def test_evaluation_variants_keep_apart_from_the_default_and_list_after_it(
    tmp_path: Path,
) -> None:
    import json

    from benchmarks.evaluate import main, table

    model = tmp_path / "eval" / "wanet_e24"
    model.mkdir(parents=True)
    (model / "results.json").write_text(json.dumps(_result(0.4446)))
    variant = {"name": "reference", "calibrate_args": "--schedule reference"}
    (model / "results-reference.json").write_text(json.dumps(_result(0.3519, variant)))
    text = table(tmp_path)
    main_rows = [line for line in text.splitlines() if line.startswith("| wanet_e24 | 81.00")]
    assert len(main_rows) == 1 and "44.46" in main_rows[0]  # the variant is not a main row
    rows = [line for line in text.splitlines() if "`" in line]
    assert rows[0].startswith("| wanet_e24 | default | `(defaults)` |") and "44.46" in rows[0]
    assert rows[1].startswith("| wanet_e24 | reference | `--schedule reference` |")
    assert "35.19" in rows[1]
    # scoring another artifact, or calibrating with other flags, never replaces results.json
    for argv in (
        ["run", "wanet", "--artifact", str(tmp_path)],
        ["run", "wanet", "--calibrate-args", "--schedule reference"],
        ["run", "wanet", "--variant", "../x"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_main_table_of_a_variant_under_another_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from benchmarks.evaluate import table

    variant = {"name": "detect", "calibrate_args": "--schedule detect"}
    for name, asr, by_null in (("wanet", 0.5992, {}), ("badnets", 0.001, {"gpd": None})):
        model = tmp_path / "eval" / name
        model.mkdir(parents=True)
        (model / "results.json").write_text(json.dumps(_result(asr)))
        r = _result(asr / 2, variant)
        if by_null:
            gpd = _result(0.0123)
            r["by_null"] = {"gpd": {"p": gpd["p"], "p_dis": gpd["p_dis"]}}
        (model / "results-detect.json").write_text(json.dumps(r))
    text = table(tmp_path, "gpd", "detect")
    main_rows = [line for line in text.splitlines() if line.endswith("(p=1e-06) |")]
    # badnets' variant row under its gpd figures; wanet's variant has none, so no row
    assert len(main_rows) == 1 and main_rows[0].startswith("| badnets | 81.00")
    assert "1.23 / 1.23" in main_rows[0]
    assert "wanet: no gpd figures" in capsys.readouterr().err


def test_exported_sets_are_what_mmguard_evaluate_reads(tmp_path: Path) -> None:
    from benchmarks.evaluate import export_sets, split_test
    from calibrate.assess import attacker_labels
    from calibrate.dataset import load_labelled_images

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 110)
    names = np.array([f"c{k}" for k in range(10)])
    data = {"x_test": rng.integers(0, 256, (y.size, 32, 32, 3), dtype=np.uint8), "y_test": y,
            "class_names": names}  # fmt: skip
    eval_idx = split_test(y)[2]
    for attack, wanted in (("all2all", lambda t: (t + 1) % 10), ("badnets", np.zeros_like)):
        clean, trig = export_sets(attack, data, tmp_path)
        c = load_labelled_images(clean, class_names=tuple(names))
        assert np.array_equal(c.labels, y[eval_idx])
        t = load_labelled_images(trig, class_names=tuple(names), every_class=False)
        kept = y[eval_idx] if attack == "all2all" else y[eval_idx][y[eval_idx] != 0]
        assert np.array_equal(t.labels, kept)
        got = attacker_labels(trig, None, tuple(names), len(t.labels))
        assert np.array_equal(got, wanted(kept))
        src = c.images if attack == "all2all" else c.images[c.labels != 0]
        changed = np.mean(t.images != src)
        assert 0 < changed < 0.05  # both triggers are a 3x3 patch on the same images
