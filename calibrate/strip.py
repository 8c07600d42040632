"""STRIP (Gao et al., ACSAC 2019), the runtime backdoor detector the guard is compared with:
each input is superimposed on clean images, and an input whose prediction stays confident
whatever it is blended with (low entropy) is flagged. Pure numpy, no model: the caller passes
the network as a function from pixels to logits (`benchmarks/evaluate.py` and
`mmguard evaluate --strip-pool` use the same code).

Known-answer tests: tests/test_evalmetrics.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BLENDS = 64
"""Clean images each input is superimposed on (STRIP's N)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def strip_entropy(blend_logits: np.ndarray) -> np.ndarray:
    """STRIP's score per input: the mean Shannon entropy (bits) of the softmax over its blends.

    ``blend_logits`` is (inputs, blends, classes). A trojaned input keeps its (target) class
    whatever it is blended with, so its entropy is low.
    """
    p = softmax(blend_logits)
    h = -np.sum(p * np.log2(np.clip(p, 1e-300, None)), axis=-1)
    return h.mean(axis=-1)


def strip_blend(x: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """STRIP's superimposition (``cv2.addWeighted(bg, 1, x, 1, 0)``): a saturating sum.

    uint8 images (H, W, C) and backgrounds (B, H, W, C) give uint8 clipped at 255; float
    images in [0, 1] (any layout, the same for both) give float32 clipped at 1.
    """
    if np.asarray(x).dtype == np.uint8:
        wide = np.asarray(backgrounds, dtype=np.int16) + np.asarray(x, dtype=np.int16)[None]
        return np.clip(wide, 0, 255).astype(np.uint8)
    total = np.asarray(backgrounds, dtype=np.float32) + np.asarray(x, dtype=np.float32)[None]
    return np.clip(total, 0.0, 1.0)


def low_tail_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """Threshold t such that flagging ``score < t`` flags at most a fraction ``fpr`` of the clean
    scores it was set on (the empirical lower quantile; STRIP flags low entropy)."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no clean scores to set the threshold on")
    k = int(np.floor(fpr * s.size))
    return float(s[k]) if k < s.size else float(np.inf)


def strip_scores(
    logits: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    exclude_self: bool = False,
    *,
    blends: int = BLENDS,
    chunk: int = 16,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """STRIP entropy of each image in `x`, each blended with `blends` images drawn from `pool`
    without replacement (`strip_blend`; `x` and `pool` in the same dtype and layout).
    `logits` maps a batch of network inputs to logits; `prepare` turns a batch of blends into
    them (e.g. uint8 NHWC to float NCHW; default: as they are). With `exclude_self`, `x` is the
    pool itself and image i is never blended with itself."""
    if len(pool) - int(exclude_self) < blends:
        raise ValueError(f"STRIP blends each input with {blends} pool images; the pool has "
                         f"{len(pool) - int(exclude_self)} to draw from")  # fmt: skip
    out = np.empty(len(x))
    for start in range(0, len(x), chunk):
        batch, rows = [], range(start, min(start + chunk, len(x)))
        for i in rows:
            choices = np.arange(len(pool))
            if exclude_self:
                choices = choices[choices != i]
            batch.append(strip_blend(x[i], pool[rng.choice(choices, blends, replace=False)]))
        joined = np.concatenate(batch)
        z = logits(joined if prepare is None else prepare(joined))
        out[start : start + len(rows)] = strip_entropy(z.reshape(len(rows), blends, -1))
    return out
