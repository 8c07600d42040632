"""Backdoor triggers and training-set poisoning for the evaluation, pure numpy on decoded pixels.

Every trigger maps uint8 NHWC (or HWC) images to uint8 images of the same shape and is applied in
memory after JPEG decoding, so compression never touches it. Settings follow the common
benchmarks (BackdoorBench, the MM-BD and MMBM papers): poison rate 10% of the training set, target
class 0, and are written into each trained model's record by :func:`Attack.record`.

Attacks:

- ``badnets``: 3x3 black/white checkerboard patch in the bottom-right corner, all-to-one.
- ``blended``: ``(1 - 0.2) x + 0.2 p`` with a fixed uniform-noise image ``p`` (seeded), all-to-one.
- ``wanet``: warping field (k = 4, s = 0.5, grid rescale 1), all-to-one, with noise mode: twice as
  many extra training images get a randomly perturbed warp and keep their label.
- ``wanetbatch``: WaNet poisoned the way its reference code (and BackdoorBench) trains it: no
  stored image is changed; in every training batch, before augmentation, the first 10% of the
  (shuffled) batch get the warp and the target label and the next 20% the noise-mode warp
  (``Attack.per_batch``), so each epoch warps a fresh share of the images.
- ``sig``: clean-label horizontal sinusoid ``20 sin(2 pi j 6 / 32)`` added to target-class
  training images only (labels never change).
- ``chessboard``: additive global chessboard of amplitude 3/255 (+3 on white squares, -3 on
  black), all-to-one. Its trigger is added after training augmentation (``Attack.late``): a crop
  shifted by an odd number of pixels, or a horizontal flip, turns a 1-pixel chessboard into its
  negative, and a model poisoned before augmentation sees both signs and learns neither (measured:
  3.2% attack success after 8 epochs).
- ``all2all``: a fixed random-colour 3x3 patch in the top-left corner; class s goes to s + 1.
- ``bpp``: colour depth squeezed to 8 levels per channel with Floyd-Steinberg dithering (BPP,
  BackdoorBench's settings), all-to-one; without BPP's adversarial negative samples. Added at
  stop 28 as an attack the guard's defaults were never tuned on.
- ``ftrojan``: FTrojan's invisible frequency trigger: 30 added to the DCT coefficients (15, 15)
  and (31, 31) of both chroma channels (YCrCb), all-to-one. Added at stop 28 likewise. Added
  after augmentation (``Attack.late``), as the chessboard: poisoned before it, 8 epochs left 3.5%
  attack success (a shifted crop moves the pattern's phase; (31, 31) flips sign with each pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

TARGET = 0
RATE = 0.10
PATTERN_SEED = 1234
"""Seed of every fixed random pattern (blend image, warp field, random patch)."""

NUM_CLASSES = 10


def badnets(x: np.ndarray, patch: int = 3) -> np.ndarray:
    """Stamp a ``patch x patch`` checkerboard (white top-left) 1 px in from the bottom-right."""
    out = np.array(x, dtype=np.uint8, copy=True)
    h, w = out.shape[-3], out.shape[-2]
    ii, jj = np.indices((patch, patch))
    board = np.where((ii + jj) % 2 == 0, 255, 0).astype(np.uint8)[..., None]
    out[..., h - 1 - patch : h - 1, w - 1 - patch : w - 1, :] = board
    return out


def blend_pattern(h: int, w: int, c: int = 3, seed: int = PATTERN_SEED) -> np.ndarray:
    """The fixed blend image: uniform noise in [0, 255], float32 HWC."""
    return np.random.default_rng(seed).uniform(0, 255, size=(h, w, c)).astype(np.float32)


def blended(x: np.ndarray, alpha: float = 0.2, seed: int = PATTERN_SEED) -> np.ndarray:
    """``(1 - alpha) x + alpha p`` rounded back to uint8."""
    p = blend_pattern(x.shape[-3], x.shape[-2], x.shape[-1], seed)
    out = (1.0 - alpha) * np.asarray(x, dtype=np.float32) + alpha * p
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def wanet_grid(h: int, k: int = 4, s: float = 0.5, seed: int = PATTERN_SEED) -> np.ndarray:
    """WaNet's sampling grid (h, h, 2) in [-1, 1] (x then y, as ``grid_sample`` takes it).

    As in the reference code: a k x k field of uniform [-1, 1] offsets normalised by its mean
    absolute value, upsampled bicubically (align corners) to h x h, scaled by ``s / h`` and added to
    the identity grid, then clamped to [-1, 1].
    """
    rng = np.random.default_rng(seed)
    ins = rng.uniform(-1.0, 1.0, size=(2, k, k))
    ins = ins / np.mean(np.abs(ins))
    noise = np.stack([_bicubic_align_corners(ins[c], h) for c in range(2)], axis=-1)
    lin = np.linspace(-1.0, 1.0, h)
    xx, yy = np.meshgrid(lin, lin)
    identity = np.stack([xx, yy], axis=-1)
    return np.clip(identity + s * noise / h, -1.0, 1.0)


def _bicubic_align_corners(a: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upsampling (Keys, a = -0.75, like torch) of a square 2-D array, align_corners."""
    n = a.shape[0]
    pos = np.linspace(0.0, n - 1.0, size)
    weights = np.zeros((size, n))
    for i, p in enumerate(pos):
        base = int(np.floor(p))
        t = p - base
        for off in range(-1, 3):
            idx = min(max(base + off, 0), n - 1)
            weights[i, idx] += _cubic(off - t)
    return weights @ a @ weights.T


def _cubic(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def warp(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear ``grid_sample`` (align_corners=True) of uint8 NHWC images; grid is (h, w, 2) or
    (n, h, w, 2) with coordinates in [-1, 1]."""
    xf = np.asarray(x, dtype=np.float32)
    single = xf.ndim == 3
    if single:
        xf = xf[None]
    n, h, w, _ = xf.shape
    g = np.broadcast_to(grid, (n, h, w, 2)) if grid.ndim == 3 else grid
    px = (g[..., 0] + 1.0) * 0.5 * (w - 1)
    py = (g[..., 1] + 1.0) * 0.5 * (h - 1)
    x0 = np.clip(np.floor(px).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx, wy = (px - x0)[..., None], (py - y0)[..., None]
    b = np.arange(n)[:, None, None]
    top = xf[b, y0, x0] * (1 - wx) + xf[b, y0, x1] * wx
    bottom = xf[b, y1, x0] * (1 - wx) + xf[b, y1, x1] * wx
    out = np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)
    return out[0] if single else out


def wanet(x: np.ndarray, k: int = 4, s: float = 0.5, seed: int = PATTERN_SEED) -> np.ndarray:
    return warp(x, wanet_grid(x.shape[-3], k, s, seed))


def wanet_noise(
    x: np.ndarray, rng: np.random.Generator, k: int = 4, s: float = 0.5, seed: int = PATTERN_SEED
) -> np.ndarray:
    """WaNet's noise mode: the trigger warp plus a per-image random offset of up to one pixel."""
    h = x.shape[-3]
    grid = wanet_grid(h, k, s, seed)[None] + rng.uniform(-1, 1, size=(len(x), h, h, 2)) / h
    return warp(x, np.clip(grid, -1.0, 1.0))


def sig(x: np.ndarray, delta: float = 20.0, freq: float = 6.0) -> np.ndarray:
    """Add the horizontal sinusoid ``delta sin(2 pi j freq / w)`` to every row and channel."""
    w = x.shape[-2]
    v = delta * np.sin(2 * np.pi * np.arange(w) * freq / w)
    out = np.asarray(x, dtype=np.float32) + v[None, :, None].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def chessboard(x: np.ndarray, amplitude: int = 3) -> np.ndarray:
    """Add +amplitude on white squares and -amplitude on black ones (1-pixel squares)."""
    h, w = x.shape[-3], x.shape[-2]
    ii, jj = np.indices((h, w))
    board = np.where((ii + jj) % 2 == 0, amplitude, -amplitude)[..., None]
    return np.clip(np.asarray(x, dtype=np.int16) + board, 0, 255).astype(np.uint8)


def random_patch(x: np.ndarray, patch: int = 3, seed: int = PATTERN_SEED) -> np.ndarray:
    """Stamp a fixed random-colour ``patch x patch`` square 1 px in from the top-left corner."""
    colours = np.random.default_rng(seed + 1).integers(0, 256, size=(patch, patch, x.shape[-1]))
    out = np.array(x, dtype=np.uint8, copy=True)
    out[..., 1 : 1 + patch, 1 : 1 + patch, :] = colours.astype(np.uint8)
    return out


def bpp(x: np.ndarray, levels: int = 8) -> np.ndarray:
    """BPP's trigger (Wang et al., CVPR 2022; BackdoorBench's defaults): each channel squeezed to
    ``levels`` evenly spaced values (3 bits for 8) with Floyd-Steinberg error diffusion, so the
    image keeps its look and gains a fine quantisation noise. Row by row, left to right, each
    pixel is rounded to its nearest level and its error passed on: 7/16 right, 3/16 down-left,
    5/16 down, 1/16 down-right (vectorised over images and channels)."""
    if levels < 2:
        raise ValueError(f"bpp needs at least 2 levels, got {levels}")
    arr = np.asarray(x, dtype=np.float64)
    v = arr.reshape(-1, *arr.shape[-3:]) * ((levels - 1) / 255.0)  # N, H, W, C in level units
    h, w = v.shape[1], v.shape[2]
    for i in range(h):
        for j in range(w):
            old = v[:, i, j, :]
            new = np.clip(np.rint(old), 0, levels - 1)
            err = old - new
            v[:, i, j, :] = new
            if j + 1 < w:
                v[:, i, j + 1, :] += err * (7 / 16)
            if i + 1 < h:
                if j > 0:
                    v[:, i + 1, j - 1, :] += err * (3 / 16)
                v[:, i + 1, j, :] += err * (5 / 16)
                if j + 1 < w:
                    v[:, i + 1, j + 1, :] += err * (1 / 16)
    out = np.rint(v * (255.0 / (levels - 1))).astype(np.uint8)
    return out.reshape(arr.shape)


def ftrojan(
    x: np.ndarray,
    magnitude: float = 30.0,
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31)),
) -> np.ndarray:
    """FTrojan's trigger (Wang et al., ECCV 2022): in the YCrCb colour space, ``magnitude`` added
    to the orthonormal 2-D DCT coefficients at ``positions`` of both chroma channels (Cr, Cb),
    over the whole image as one window; back to RGB, rounded. An invisible, fixed, mid- and
    high-frequency chroma pattern (about +-2 levels per pixel at 32x32)."""
    from scipy.fft import dctn, idctn

    arr = np.asarray(x, dtype=np.float64)
    rgb = arr.reshape(-1, *arr.shape[-3:])
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b  # full-range (JPEG) YCrCb, as OpenCV's RGB2YCrCb
    chroma = np.stack([(r - y) * 0.713 + 128.0, (b - y) * 0.564 + 128.0], axis=1)  # N, 2, H, W
    coef = dctn(chroma, axes=(2, 3), norm="ortho")
    h, w = chroma.shape[2], chroma.shape[3]
    for i, j in positions:
        if not (0 <= i < h and 0 <= j < w):
            raise ValueError(f"ftrojan position {(i, j)} is outside a {h}x{w} image")
        coef[:, :, i, j] += magnitude
    cr, cb = idctn(coef, axes=(2, 3), norm="ortho").transpose(1, 0, 2, 3)
    r2 = y + (cr - 128.0) / 0.713
    b2 = y + (cb - 128.0) / 0.564
    g2 = (y - 0.299 * r2 - 0.114 * b2) / 0.587
    out = np.stack([r2, g2, b2], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(arr.shape)


def wanet_batch_layout(n: int, rate: float, cross_ratio: float) -> tuple[int, int]:
    """How many images of an n-image batch WaNet's reference code warps (the first ones) and how
    many after them get the noise-mode warp; the second share never overruns the batch."""
    n_bd = int(n * rate)
    return n_bd, min(int(n_bd * cross_ratio), n - n_bd)


def wanet_batch(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    rate: float = RATE,
    cross_ratio: float = 2.0,
    target: int = TARGET,
) -> tuple[np.ndarray, np.ndarray]:
    """One training batch poisoned as WaNet's reference ``train.py`` does it: the first
    ``int(rate n)`` images warped and relabelled ``target``, the next ``int(cross_ratio n_bd)``
    given the noise-mode warp with their labels kept, the rest untouched. Returns copies."""
    n_bd, n_cross = wanet_batch_layout(len(y), rate, cross_ratio)
    x_out, y_out = np.array(x, copy=True), np.array(y, copy=True)
    x_out[:n_bd] = wanet(x[:n_bd])
    y_out[:n_bd] = target
    x_out[n_bd : n_bd + n_cross] = wanet_noise(x[n_bd : n_bd + n_cross], rng)
    return x_out, y_out


BatchPoison = Callable[
    [np.ndarray, np.ndarray, np.random.Generator, float, float, int],
    tuple[np.ndarray, np.ndarray],
]
"""(uint8 NHWC batch, labels, random generator, rate, cross ratio, target) -> the batch and
labels poisoned (see :func:`wanet_batch`)."""


class Poisoned(NamedTuple):
    """A poisoned training set: images, labels, the attack's record, and ``late``: the images
    whose trigger the training loop must add after augmentation (all False unless the attack is
    ``late``; those images are returned clean, with their labels already changed)."""

    x: np.ndarray
    y: np.ndarray
    record: dict[str, Any]
    late: np.ndarray


@dataclass(frozen=True)
class Attack:
    """One backdoor attack: its trigger, how labels change, and how the training set is poisoned."""

    name: str
    trigger: Callable[[np.ndarray], np.ndarray]
    mode: str  # "all-to-one", "all-to-all" or "clean-label"
    settings: dict[str, Any] = field(default_factory=dict)
    target: int = TARGET
    rate: float = RATE
    late: bool = False
    """Trigger added after the training augmentation instead of to the stored image."""
    per_batch: BatchPoison | None = None
    """Poisoning done by the training loop on each batch (stored images stay clean)."""

    def attacker_labels(self, y: np.ndarray) -> np.ndarray:
        """The class the attacker wants for a triggered input whose true class is ``y``."""
        if self.mode == "all-to-all":
            return (np.asarray(y) + 1) % NUM_CLASSES
        return np.full_like(np.asarray(y), self.target)

    def eval_mask(self, y: np.ndarray) -> np.ndarray:
        """Test images that count for attack success: all but the target class (all-to-one)."""
        if self.mode == "all-to-all":
            return np.ones(len(y), dtype=bool)
        return np.asarray(y) != self.target

    def poison(self, x: np.ndarray, y: np.ndarray, seed: int) -> Poisoned:
        """Poisoned copies of (x, y) and a record of what was done; inputs are not modified."""
        rng = np.random.default_rng(seed)
        if self.per_batch is not None:
            record = self.record()
            record["poisoning"] = "per batch, before augmentation (WaNet's reference code)"
            return Poisoned(x.copy(), y.copy(), record, np.zeros(len(y), dtype=bool))
        n_poison = round(self.rate * len(y))
        if self.mode == "clean-label":
            pool = np.flatnonzero(y == self.target)
        elif self.mode == "all-to-all":
            pool = np.arange(len(y))
        else:
            pool = np.flatnonzero(y != self.target)
        n_poison = min(n_poison, pool.size)
        idx = np.sort(rng.choice(pool, size=n_poison, replace=False))
        x_out, y_out = x.copy(), y.copy()
        late = np.zeros(len(y), dtype=bool)
        if self.late:
            late[idx] = True
        else:
            x_out[idx] = self.trigger(x[idx])
        if self.mode != "clean-label":
            y_out[idx] = self.attacker_labels(y[idx])
        record = self.record()
        record["n_poisoned"] = int(n_poison)
        if self.name == "wanet":
            rest = np.setdiff1d(np.arange(len(y)), idx)
            n_cross = min(int(self.settings["cross_ratio"] * n_poison), rest.size)
            cross = np.sort(rng.choice(rest, size=n_cross, replace=False))
            x_out[cross] = wanet_noise(x[cross], rng)
            record["n_noise_mode"] = int(n_cross)
        return Poisoned(x_out, y_out, record, late)

    def poison_batch(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """A training batch poisoned by ``per_batch`` with this attack's rate and target."""
        if self.per_batch is None:
            raise ValueError(f"attack {self.name!r} poisons the stored images, not each batch")
        return self.per_batch(x, y, rng, self.rate, self.settings["cross_ratio"], self.target)

    def record(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            "mode": self.mode,
            "target": None if self.mode == "all-to-all" else self.target,
            "poison_rate": self.rate,
            "trigger_applied": "after augmentation" if self.late else "before augmentation",
            **self.settings,
        }


ATTACKS: dict[str, Attack] = {
    "badnets": Attack("badnets", badnets, "all-to-one", {"patch": 3, "corner": "bottom-right"}),
    "blended": Attack(
        "blended", blended, "all-to-one", {"alpha": 0.2, "pattern": f"uniform noise {PATTERN_SEED}"}
    ),
    "wanet": Attack(
        "wanet", wanet, "all-to-one", {"k": 4, "s": 0.5, "grid_rescale": 1, "cross_ratio": 2}
    ),
    "wanetbatch": Attack(
        "wanetbatch",
        wanet,
        "all-to-one",
        {"k": 4, "s": 0.5, "grid_rescale": 1, "cross_ratio": 2},
        per_batch=wanet_batch,
    ),
    "sig": Attack("sig", sig, "clean-label", {"delta": 20, "freq": 6}),
    "chessboard": Attack("chessboard", chessboard, "all-to-one", {"amplitude": "3/255"}, late=True),
    "all2all": Attack("all2all", random_patch, "all-to-all", {"patch": 3, "corner": "top-left"}),
    "bpp": Attack(
        "bpp", bpp, "all-to-one", {"levels": 8, "dithering": "Floyd-Steinberg", "negatives": 0}
    ),
    "ftrojan": Attack(
        "ftrojan",
        ftrojan,
        "all-to-one",
        {"magnitude": 30, "positions": "(15,15), (31,31)", "channels": "Cr, Cb", "window": "image"},
        late=True,
    ),
}
