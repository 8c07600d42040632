"""What the reliability tests and benchmarks.soak share: the pool of inputs the load draws from,
the answers in-process inference gives for it, and the check of a load run's records against
them. (The server as a child process is guard.process.ServerProcess.)

The expected answers come from guard.engine.GuardEngine and guard.mmdf.decide on the artifact's
null and rule, with guard.tensors.to_pixels converting UINT8 exactly as the server does: the same
decision code the server runs, in this process.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# an input's decision must be this far (a factor) from alpha, and its top two logits this far
# apart in both networks, for the pool: no rounding anywhere can flip its expected answer
P_VALUE_FACTOR = 4.0
MIN_LOGIT_GAP = 1e-3


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """One sample of ServerProcess.metrics() (0 if it is not exported)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------------------------------------
# the pool and its expected answers


@dataclass(frozen=True)
class Answer:
    """What in-process inference answers for one pool entry (one value per input)."""

    label: np.ndarray
    flagged: np.ndarray
    original_label: np.ndarray
    bounded_label: np.ndarray
    statistic: np.ndarray  # float32, as the server encodes it


def answers(engine: Any, x: np.ndarray) -> Answer:
    """The server's decision for a batch as received (FP32 pixels or UINT8), computed here."""
    from guard.tensors import to_pixels

    d = _decide(engine, *engine.logits(to_pixels(x)))
    return Answer(
        d.label, d.flagged, d.original_label, d.bounded_label, d.statistic.astype(np.float32)
    )


def _decide(engine: Any, original: Any, bounded: Any, start: Any, ratios: Any) -> Any:
    """guard.mmdf.decide on an engine's outputs, with its artifact's start and range detectors
    if any."""
    from guard.mmdf import decide

    a = engine.artifact
    return decide(
        original, bounded, a.null, a.rule, a.start_detector(start), a.range_detector(ratios)
    )


def _chunked_logits(engine: Any, pixels: np.ndarray, size: int) -> tuple[Any, ...]:
    """The engine's outputs (original, bounded, start or None, ratios or None), run in batches
    of ``size``."""
    runs = [engine.logits(pixels[i : i + size]) for i in range(0, len(pixels), size)]
    parts = [list(part) for part in zip(*runs, strict=True)]
    return tuple(None if part[0] is None else np.concatenate(part) for part in parts)


def _top2_gap(logits: np.ndarray) -> np.ndarray:
    top = np.sort(np.asarray(logits, dtype=np.float64), axis=1)
    return top[:, -1] - top[:, -2]


def stable(engine: Any, pixels: np.ndarray, max_batch_size: int) -> np.ndarray:
    """Which inputs (FP32 pixels [N, C, H, W]) have a decision no numerical noise can flip: the
    same answer alone and inside a batch, a p-value at least P_VALUE_FACTOR from alpha and
    top-two logits at least MIN_LOGIT_GAP apart in both networks."""
    alone = _chunked_logits(engine, pixels, 1)
    original, bounded = alone[0], alone[1]
    d1 = _decide(engine, *alone)
    d2 = _decide(engine, *_chunked_logits(engine, pixels, max_batch_size))
    a = engine.artifact
    same = (
        (d1.label == d2.label)
        & (d1.flagged == d2.flagged)
        & (d1.original_label == d2.original_label)
        & (d1.bounded_label == d2.bounded_label)
    )
    with np.errstate(divide="ignore"):
        far = np.abs(np.log(np.maximum(d1.p_value, 1e-300) / a.rule.alpha)) >= np.log(
            P_VALUE_FACTOR
        )
    gaps = (_top2_gap(original) >= MIN_LOGIT_GAP) & (_top2_gap(bounded) >= MIN_LOGIT_GAP)
    return np.asarray(same & far & gaps)


def build_pool(
    engine: Any, candidates: Sequence[np.ndarray], *, max_batch_size: int, singles: int = 16
) -> list[np.ndarray]:
    """Request batches for the load, from single images [C, H, W] (uint8 0..255 or FP32 pixels):

    - `singles` one-image requests of stable candidates, flagged and unflagged ones alternately
      (as far as there are both), uint8 candidates sent, a pair at a time, as UINT8 and as
      FP32 / 255;
    - multi-image requests of 2, 3, max_batch_size // 2 and max_batch_size (the largest allowed
      batch) inputs, FP32, mixing flagged and unflagged ones.

    Raises ValueError when no candidate is stable."""
    from guard.tensors import to_pixels

    pixels = np.stack([to_pixels(c[None])[0] for c in candidates])
    keep = np.flatnonzero(stable(engine, pixels, max_batch_size))
    if keep.size == 0:
        raise ValueError("no candidate input has a stable decision to check answers against")
    flagged = answers(engine, pixels[keep]).flagged
    groups = [list(keep[flagged]), list(keep[~flagged])]
    order: list[int] = []
    while any(groups):  # alternate flagged and unflagged while both last
        for g in groups:
            if g:
                order.append(int(g.pop(0)))
    entries: list[np.ndarray] = []
    for n, i in enumerate(order[:singles]):
        c = candidates[i]
        as_uint8 = c.dtype == np.uint8 and n % 4 < 2  # pairs of one flagged, one not
        entries.append(c[None] if as_uint8 else pixels[i : i + 1])
    for size in sorted({2, 3, max(1, max_batch_size // 2), max_batch_size}):
        if size > 1:
            entries.append(pixels[[order[j % len(order)] for j in range(size)]])
    return entries


def expected_answers(engine: Any, entries: Sequence[np.ndarray]) -> list[Answer]:
    return [answers(engine, x) for x in entries]


# ---------------------------------------------------------------------------------------------
# checking a run's records


@dataclass
class Verdict:
    """A load run's records against the expected answers."""

    sent: int
    records: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # ids answered more than once
    id_mismatches: int = 0  # OK answers carrying another request's id
    wrong: int = 0  # OK answers that differ from in-process inference
    unexpected_status: int = 0  # answers with a status outside `allowed`
    problems: list[str] = field(default_factory=list)  # the first few, described

    @property
    def ok(self) -> int:
        return self.by_status["OK"]

    @property
    def unanswered(self) -> int:
        return self.sent - self.records

    def note(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)


def _differs(rec: dict[str, Any], want: Answer) -> str | None:
    for name in ("label", "flagged", "original_label", "bounded_label"):
        got = np.asarray(rec[name])
        expected = getattr(want, name)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            return f"{name} {got.tolist()} != {expected.tolist()}"
    got = np.asarray(rec["statistic"], dtype=np.float32)
    if got.shape != want.statistic.shape or not np.allclose(
        got, want.statistic, rtol=1e-5, atol=1e-5
    ):
        return f"statistic {got.tolist()} != {want.statistic.tolist()}"
    return None


def check_records(
    path: Path, expected: Sequence[Answer], sent: int, allowed: Sequence[str] = ("OK",)
) -> Verdict:
    """Every request answered exactly once (as many records as requests sent, no id twice), each
    OK answer with its own request's id and the expected outputs for its entry, and no status
    outside `allowed`. Counts everything; describes the first problems."""
    v = Verdict(sent=sent)
    seen: set[str] = set()
    for rec in read_records(path):
        v.records += 1
        rid, status = rec["id"], rec["status"]
        v.by_status[status] += 1
        if rid in seen:
            v.duplicates += 1
            v.note(f"{rid}: answered more than once")
        seen.add(rid)
        if status not in allowed:
            v.unexpected_status += 1
            v.note(f"{rid}: {status} {rec.get('message')}")
        if status != "OK":
            continue
        if rec.get("response_id") != rid:
            v.id_mismatches += 1
            v.note(f"{rid}: the response carries id {rec.get('response_id')!r}")
        if (problem := _differs(rec, expected[rec["entry"]])) is not None:
            v.wrong += 1
            v.note(f"{rid} (entry {rec['entry']}): {problem}")
    if v.records != sent:
        v.note(f"{sent} requests sent, {v.records} answered")
    return v
