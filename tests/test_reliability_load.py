"""Load (reliability): `mmguard serve` as a child process, 64 concurrent clients in another
process for 60 s (the first 10 s a warm-up), through benchmarks.soak.run_soak, the code of the
10-minute soak script (`python -m benchmarks.soak`). Every request is answered exactly once,
with its own id and what in-process inference answers for its input; zero errors; the server
counts exactly the answers the clients received and ends with nothing in flight; its resident
memory after the warm-up grows less than 10 %; SIGTERM then stops it cleanly.

The check itself is tested first, on records made up to hold each kind of problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.reliability import Answer, Verdict, check_records
from benchmarks.soak import MAX_RSS_GROWTH, run_soak
from tests.conftest import TINY

pytestmark = pytest.mark.reliability
LOAD_S = 60.0
WARMUP_S = 10.0
CLIENTS = 64
MAX_BATCH = 16  # the server's --max-batch-size; the pool holds a request of this many inputs


def _record(rid: str, entry: int, status: str = "OK", **fields: object) -> dict[str, object]:
    rec: dict[str, object] = {"id": rid, "entry": entry, "status": status, "t_sent": 0.0,
                              "t_done": 0.1}  # fmt: skip
    if status == "OK":
        rec.update(response_id=rid, label=[1], flagged=[False], original_label=[1],
                   bounded_label=[1], statistic=[0.25])  # fmt: skip
    rec.update(fields)
    return rec


def test_the_check_catches_losses_duplicates_foreign_ids_wrong_answers_and_errors(
    tmp_path: Path,
) -> None:
    one = np.array([1])
    expected = [Answer(one, np.array([False]), one, one, np.array([0.25], np.float32))]
    good = [_record("c0-0", 0), _record("c0-1", 0)]
    path = tmp_path / "records.jsonl"

    def check(recs: list[dict[str, object]], sent: int) -> Verdict:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return check_records(path, expected, sent)

    clean = check(good, sent=2)
    assert clean.problems == [] and clean.ok == 2
    lost = check(good, sent=3)
    assert lost.unanswered == 1 and lost.problems == ["3 requests sent, 2 answered"]
    twice = check([*good, _record("c0-1", 0)], sent=3)
    assert twice.duplicates == 1 and twice.problems
    foreign = check([good[0], _record("c0-1", 0, response_id="c0-0")], sent=2)
    assert foreign.id_mismatches == 1 and foreign.problems
    for wrong in ({"label": [2]}, {"flagged": [True]}, {"statistic": [0.3]}, {"label": [1, 1]}):
        bad = check([good[0], _record("c0-1", 0, **wrong)], sent=2)
        assert bad.wrong == 1 and bad.problems, wrong
    failed = check([good[0], _record("c0-1", 0, "UNAVAILABLE", message="gone")], sent=2)
    assert failed.unexpected_status == 1 and failed.problems


def _tiny_images() -> list[np.ndarray]:
    """Clean and triggered images of the tiny example (uint8, NCHW), the artifact's own data."""
    out = []
    for name in ("clean.npz", "poisoned.npz"):
        with np.load(TINY / name) as f:
            out += list(f["images"][:32].transpose(0, 3, 1, 2))
    return [np.ascontiguousarray(x) for x in out]


@pytest.mark.slow  # the session artifact is calibrated with torch
def test_64_clients_for_60_s_get_every_answer_once_right_and_memory_stays_flat(
    artifact_dir: Path, tmp_path: Path
) -> None:
    result = run_soak(
        artifact_dir, _tiny_images(), duration_s=LOAD_S - WARMUP_S, warmup_s=WARMUP_S,
        workdir=tmp_path, clients=CLIENTS, max_batch_size=MAX_BATCH, threads=1,
    )  # fmt: skip
    s, v = result.summary, result.verdict
    # the pool: clean and triggered inputs, singles and batches up to the largest allowed
    assert 0 < result.flagged_inputs < result.pool_inputs
    assert result.pool_entries >= 10
    assert s["clients"] == CLIENTS and s["sent"] >= 1000
    # every request answered exactly once, with its own id and the right outputs
    assert v.records == s["sent"] and v.duplicates == 0 and v.unanswered == 0
    assert v.id_mismatches == 0
    assert v.wrong == 0, v.problems
    assert s["errors"] == 0 and dict(v.by_status) == {"OK": s["sent"]}, s["first_error"]
    # the server saw the same: each answer counted once, nothing left in flight or queued
    assert result.server_ok == s["sent"]
    assert result.server_inflight == 0 and result.server_queue == 0
    # memory: RSS at the end within 10 % of RSS after the warm-up
    assert result.rss_growth is not None and result.rss_growth < MAX_RSS_GROWTH, (
        s["rss_start_kb"], s["rss_end_kb"],
    )  # fmt: skip
    assert result.exit_code == 0
    assert result.failures() == []
