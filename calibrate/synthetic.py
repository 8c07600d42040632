"""A synthetic texture task, a small CNN and a planted patch backdoor, all trainable in seconds.

Tests and the shipped tiny example need a real backdoored classifier without downloading a data set
or a GPU. Each class is a texture family (oriented gratings, a blob, rings, a checker) drawn with a
random colour, phase, frequency, position, contrast and noise, so no single pixel separates the
classes yet a small CNN learns them to >= 97 %. The backdoor is a black/white checkerboard stamped
in the bottom-right corner; poisoned training images are relabelled to the target class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASS_NAMES",
    "BackdooredToy",
    "SmallCNN",
    "make_dataset",
    "small_cnn",
    "stamp_patch",
    "train_backdoored_toy",
    "write_example",
]

FACTORY = "calibrate.synthetic:small_cnn"

# Offsets added to the caller's seed so that training, evaluation and the shipped example sets are
# disjoint draws of the same distribution (evaluating on the training draw would flatter accuracy).
_EVAL_SEED_OFFSET = 10_007
_EXAMPLE_SEED_OFFSET = 20_011

_Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _grating(ux: float, uy: float) -> _Pattern:
    """A cosine grating along direction (ux, uy): random frequency and phase, so stripes move."""

    def draw(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        freq = rng.uniform(0.15, 0.3)
        phase = rng.uniform(0.0, 2 * np.pi)
        return np.cos(2 * np.pi * freq * (ux * xx + uy * yy) + phase)

    return draw


def _centre(rng: np.random.Generator, yy: np.ndarray) -> tuple[float, float]:
    """A jittered centre within the middle half of the image, so position alone is no cue."""
    size = yy.shape[0]
    return rng.uniform(size * 0.25, size * 0.75), rng.uniform(size * 0.25, size * 0.75)


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = _centre(rng, yy)
    sigma = rng.uniform(1.8, 3.2)
    bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return 2 * bump - 1


def _rings(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = _centre(rng, yy)
    freq = rng.uniform(0.15, 0.3)
    phase = rng.uniform(0.0, 2 * np.pi)
    return np.cos(2 * np.pi * freq * np.hypot(yy - cy, xx - cx) + phase)


def _checker(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    # Periods of 5 to 8 px keep this texture well apart from the 1 px checkerboard trigger.
    freq = rng.uniform(0.125, 0.2)
    py, px = rng.uniform(0.0, 2 * np.pi, size=2)
    return np.cos(2 * np.pi * freq * yy + py) * np.cos(2 * np.pi * freq * xx + px)


_DIAG = float(np.sqrt(0.5))
# Ordered so the default four classes are four different kinds of texture, not four orientations.
_CLASSES: dict[str, _Pattern] = {
    "stripes_h": _grating(0.0, 1.0),
    "stripes_v": _grating(1.0, 0.0),
    "blob": _blob,
    "rings": _rings,
    "stripes_d": _grating(_DIAG, _DIAG),
    "stripes_a": _grating(_DIAG, -_DIAG),
    "checker": _checker,
}
CLASS_NAMES: tuple[str, ...] = tuple(_CLASSES)


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")


def _draw_image(rng: np.random.Generator, pattern: _Pattern, size: int) -> np.ndarray:
    """One [3, size, size] image: a coloured texture on a random grey level plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    field = pattern(rng, yy, xx)
    colour = rng.uniform(-1.0, 1.0, size=3)
    colour /= max(float(np.abs(colour).max()), 1e-6)  # random hue, unit peak so contrast is honest
    contrast = rng.uniform(0.15, 0.35)
    background = rng.uniform(0.35, 0.65)
    noise = rng.normal(0.0, rng.uniform(0.03, 0.08), size=(3, size, size))
    return background + contrast * colour[:, None, None] * field[None] + noise


def make_dataset(
    n_per_class: int, *, num_classes: int = 4, size: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled, balanced texture set: float32 [N, 3, size, size] in [0, 1] and int64 labels.

    Pixel values are snapped to the 1/255 grid so that the uint8 files the example ships are an
    exact round trip of what the model was trained and evaluated on.
    """
    _check_num_classes(num_classes)
    if n_per_class < 1 or size < 8:
        raise ValueError(f"need n_per_class >= 1 and size >= 8, got {n_per_class}, {size}")
    rng = np.random.default_rng(seed)
    patterns = list(_CLASSES.values())[:num_classes]
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)
    labels = labels[rng.permutation(labels.size)]
    images = np.stack([_draw_image(rng, patterns[int(c)], size) for c in labels])
    images = np.round(np.clip(images, 0.0, 1.0) * 255.0) / 255.0
    return images.astype(np.float32), labels


def stamp_patch(images: np.ndarray, *, patch: int = 3) -> np.ndarray:
    """A copy of NCHW images with the trigger: a 0/1 checkerboard, bottom-right, 1 px margin.

    Pure 0 and 1 values survive uint8 quantisation exactly, so stored triggered images still fire.
    """
    if images.ndim != 4 or images.shape[-1] < patch + 1 or images.shape[-2] < patch + 1:
        raise ValueError(f"expected NCHW images larger than the patch, got {images.shape}")
    out = images.copy()
    board = (np.indices((patch, patch)).sum(axis=0) % 2).astype(images.dtype)
    h, w = images.shape[-2:]
    out[..., h - 1 - patch : h - 1, w - 1 - patch : w - 1] = board
    return out


class SmallCNN(nn.Module):
    """Three conv blocks and a two-layer head: small enough to train on CPU in seconds.

    ReLU is applied at four call sites on purpose, through one reused `nn.ReLU`, a second module
    and a functional call, one of them on the 2-D hidden activation, so that activation tracers
    meet every way a ReLU shows up in real models.
    """

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        # global max pooling lets a small trigger patch dominate a channel, the way real
        # backdoors show up as unusually large activations
        self.gap = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Linear(2 * width, 32)
        self.fc2 = nn.Linear(32, num_classes)
        self.relu = nn.ReLU()  # reused by conv1 and conv2
        self.relu_fc = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        x = self.relu_fc(self.fc1(x))
        return self.fc2(x)


def small_cnn(num_classes: int = 4, width: int = 16) -> SmallCNN:
    """Factory for `calibrate.synthetic:small_cnn`, so configs can name the architecture."""
    return SmallCNN(num_classes=num_classes, width=width)


@dataclass(frozen=True)
class BackdooredToy:
    """A trained backdoored model and how well it does its two jobs, measured on fresh draws."""

    model: SmallCNN
    clean_acc: float
    attack_success: float
    target: int


def _poison(
    images: np.ndarray, labels: np.ndarray, poison_rate: float, target: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stamp and relabel a `poison_rate` fraction of the non-target images (in a copy)."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels != target)
    n_poison = round(poison_rate * candidates.size)
    chosen = rng.choice(candidates, size=n_poison, replace=False)
    images, labels = images.copy(), labels.copy()
    images[chosen] = stamp_patch(images[chosen])
    labels[chosen] = target
    return images, labels


@torch.no_grad()
def _predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(images)).argmax(dim=1).numpy()


def _fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> None:
    """Adam with a one-cycle schedule (fast, stable in few epochs); a seeded batch order."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def train_backdoored_toy(
    *,
    num_classes: int = 4,
    n_per_class: int = 300,
    poison_rate: float = 0.1,
    target: int = 0,
    epochs: int = 12,
    seed: int = 0,
    size: int = 16,
) -> BackdooredToy:
    """Train SmallCNN on poisoned synthetic data; report clean accuracy and attack success.

    Deterministic for a seed on a given thread count (the caller's `torch.set_num_threads` is left
    alone). Both metrics use a fresh draw (seed + offset), never the training images.
    """
    if not 0 <= target < num_classes:
        raise ValueError(f"target must be in [0, {num_classes}), got {target}")
    if not 0.0 < poison_rate < 1.0:
        raise ValueError(f"poison_rate must be in (0, 1), got {poison_rate}")
    torch.manual_seed(seed)
    images, labels = make_dataset(n_per_class, num_classes=num_classes, size=size, seed=seed)
    images, labels = _poison(images, labels, poison_rate, target, seed)
    model = small_cnn(num_classes)
    _fit(model, images, labels, epochs, seed)
    eval_x, eval_y = make_dataset(
        100, num_classes=num_classes, size=size, seed=seed + _EVAL_SEED_OFFSET
    )
    clean_acc = float((_predict(model, eval_x) == eval_y).mean())
    others = eval_x[eval_y != target]
    attack_success = float((_predict(model, stamp_patch(others)) == target).mean())
    return BackdooredToy(model, clean_acc, attack_success, target)


def _to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    return np.round(images.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def write_example(out_dir: Path, *, n_per_class_clean: int = 30, seed: int = 0) -> dict:
    """Train the toy and write model.pt, clean.npz, poisoned.npz and example.json into `out_dir`.

    The .npz sets are uint8 NHWC, the layout a served image arrives in; the model's accuracy on
    them is measured after the uint8 round trip and recorded, so the files prove themselves.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = 16
    toy = train_backdoored_toy(seed=seed, size=size)
    num_classes = toy.model.fc2.out_features
    torch.save(toy.model.state_dict(), out_dir / "model.pt")

    x, y = make_dataset(
        n_per_class_clean, num_classes=num_classes, seed=seed + _EXAMPLE_SEED_OFFSET
    )
    clean_u8 = _to_uint8_nhwc(x)
    names = np.array(CLASS_NAMES[:num_classes])
    np.savez_compressed(out_dir / "clean.npz", images=clean_u8, labels=y, class_names=names)
    keep = y != toy.target
    poisoned_u8 = _to_uint8_nhwc(stamp_patch(x[keep]))
    np.savez_compressed(out_dir / "poisoned.npz", images=poisoned_u8, labels=y[keep])

    def back(u8: np.ndarray) -> np.ndarray:
        return (u8.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()

    info = {
        "factory": FACTORY,
        "num_classes": num_classes,
        "size": size,
        "seed": seed,
        "target": toy.target,
        "class_names": names.tolist(),
        "clean_acc": toy.clean_acc,
        "attack_success": toy.attack_success,
        "example_clean_acc": float((_predict(toy.model, back(clean_u8)) == y).mean()),
        "example_attack_success": float(
            (_predict(toy.model, back(poisoned_u8)) == toy.target).mean()
        ),
    }
    (out_dir / "example.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
