"""benchmarks.seeds: the seed list, the draws it records from earlier scoring, and its spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.seeds import main, parse_seeds, read_draws, record_from_results, table


def test_parse_seeds_takes_lists_and_inclusive_ranges() -> None:
    assert parse_seeds("3") == [3]
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert parse_seeds(" 0 - 2 , 5") == [0, 1, 2, 5]


@pytest.mark.parametrize(
    ("text", "says"),
    [("3-1", "runs backwards"), ("1,1", "listed twice"), ("a", "expected"), ("-1", "expected")],
)
def test_parse_seeds_names_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_seeds(text)


def _figures(asr: float, fpr: float) -> dict[str, float]:
    return {"clean_accuracy": 0.9, "fpr": fpr, "asr": asr, "restored": 0.8, "tpr": 1 - asr}


def _scored(cache: Path, name: str, variant: str, seed: int, asr: float, fpr: float) -> None:
    """What `benchmarks.evaluate run NAME --variant V` leaves: results file and report."""
    out = cache / "eval" / name
    (out / f"artifact-{variant}").mkdir(parents=True)
    report = {
        "split": {"seed": seed},
        "iterations": 60,
        "device": "cpu",
        "mmbd": {"suspected": True, "target": 5, "p_value": 1e-4, "gamma": {}},
        "heldout": {"false_positive_rate": 0.01},
        "range_detector": {"null": {}},
    }
    (out / f"artifact-{variant}" / "report.json").write_text(json.dumps(report))
    results = {
        "undefended_clean_accuracy": 0.91,
        "undefended_asr": 0.99,
        "p": _figures(asr, fpr),
        "p_dis": _figures(asr / 2, 0.05),
        "learned_statistic_alone": {"p": _figures(0.5, fpr), "p_dis": _figures(0.4, 0.05)},
        "variant": {"name": variant, "calibrate_args": f"--seed {seed}"},
        "calibrate_seconds": 10.0,
    }
    (out / f"results-{variant}.json").write_text(json.dumps(results))


def test_add_records_a_scored_calibration_once_and_table_gives_the_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _scored(tmp_path, "wanet", "a", 0, 0.01, 0.005)
    _scored(tmp_path, "wanet", "b", 1, 0.03, 0.004)
    _scored(tmp_path, "wanet", "c", 2, 0.10, 0.006)
    record = record_from_results("wanet", tmp_path, "a")
    assert record["seed"] == 0 and record["served"]["p"]["asr"] == 0.01
    assert record["learned_alone"]["p"]["asr"] == 0.5
    assert record["mmbd"] == {"suspected": True, "target": 5, "p_value": 1e-4}
    for variant in ("a", "b", "c", "a"):  # "a" a second time is not a second draw
        argv = ["add", "wanet", "--scored-variant", variant, "--cache-dir", str(tmp_path)]
        assert main(argv) == 0
    assert "already a draw" in capsys.readouterr().err
    draws = read_draws(tmp_path / "eval" / "wanet" / "seeds.jsonl")
    assert [d["seed"] for d in draws] == [0, 1, 2]
    text = table(["wanet", "other"], tmp_path)
    assert "| wanet | 1 | cpu | 60 | 3.00 / 0.40 / 90.00 |" in text
    assert "wanet: 3 draws; guarded ASR min / median / max 1.00 / 3.00 / 10.00" in text
    assert "at or under 2% in 1;" in text
    assert "clean FPR 0.40 / 0.50 / 0.60" in text
    assert "- other: no draws" in text


def test_add_names_a_missing_results_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no .*results-gone\.json"):
        record_from_results("wanet", tmp_path, "gone")


def test_add_refuses_a_calibration_with_other_settings(tmp_path: Path) -> None:
    _scored(tmp_path, "wanet", "ceiling", 0, 0.2, 0.005)
    path = tmp_path / "eval" / "wanet" / "results-ceiling.json"
    results = json.loads(path.read_text())
    results["variant"]["calibrate_args"] = "--range-detector --bound-ceiling max --seed 4"
    path.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"not a default calibration \(bound_ceiling\)"):
        record_from_results("wanet", tmp_path, "ceiling")
    # the seed and a required range detector leave it a default calibration
    results["variant"]["calibrate_args"] = "--range-detector --seed 4"
    path.write_text(json.dumps(results))
    assert record_from_results("wanet", tmp_path, "ceiling")["calibrate_args"].endswith("4")


def test_add_refuses_a_calibration_scored_without_the_range_detector(tmp_path: Path) -> None:
    _scored(tmp_path, "wanet", "old", 0, 0.2, 0.005)
    path = tmp_path / "eval" / "wanet" / "results-old.json"
    results = json.loads(path.read_text())
    del results["learned_statistic_alone"]
    path.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="without the range detector"):
        record_from_results("wanet", tmp_path, "old")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--seeds", "5-2"], "runs backwards"),
        (["--seeds", "1", "--calibrate-args", "--seed 3"], "needs --variant"),
        (["--seeds", "1", "--variant", "a/b"], "letters, digits"),
        (["--seeds", "1", "--variant", "v", "--calibrate-args=--seed=3"], "own option"),
        (["--seeds", "1", "--device", "auto"], "name the device"),
    ],
)
def test_run_names_bad_arguments(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "wanet", *argv])
    assert says in capsys.readouterr().err


def test_a_variants_draws_are_kept_apart(tmp_path: Path) -> None:
    from benchmarks.seeds import draws_path

    assert draws_path(tmp_path, "wanet") == tmp_path / "eval" / "wanet" / "seeds.jsonl"
    assert draws_path(tmp_path, "wanet", "j100").name == "seeds-j100.jsonl"
    _scored(tmp_path, "wanet", "a", 0, 0.01, 0.005)
    main(["add", "wanet", "--scored-variant", "a", "--cache-dir", str(tmp_path)])
    assert "- wanet: no draws" in table(["wanet"], tmp_path, "j100")


def test_run_skips_a_seed_already_drawn_on_that_kind_of_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CPU calibration of a seed is deterministic: drawing it again adds no information."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "wanet.pt").write_bytes(b"")
    (tmp_path / "models" / "wanet.json").write_text("{}")
    _scored(tmp_path, "wanet", "a", 0, 0.01, 0.005)
    main(["add", "wanet", "--scored-variant", "a", "--cache-dir", str(tmp_path)])
    capsys.readouterr()
    # seed 0 is recorded (on the CPU): nothing is left to draw, so no data is read
    argv = ["run", "wanet", "--seeds", "0", "--cache-dir", str(tmp_path), "--data", "/nonexistent"]
    assert main(argv) == 0
    assert "seed 0 on cpu is already a draw" in capsys.readouterr().err
    assert len(read_draws(tmp_path / "eval" / "wanet" / "seeds.jsonl")) == 1
