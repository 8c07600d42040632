"""Train (once) the evaluation's CIFAR-10 models: one clean, one per attack, two class-imbalanced.

Run from the repository root, for example::

    .venv/bin/python -m benchmarks.train_models clean badnets blended wanet sig chessboard

Each model is a width-scaled CIFAR ResNet-18 (width 16 on a CPU; pass ``--width 64`` for the
full network on a GPU machine), written to ``CACHE/models/NAME.pt`` (a state dict, loadable with
``weights_only=True``) next to ``NAME.json``: the attack's settings, training time, and the
undefended clean accuracy (overall and per class) and attack success rate on the test split.
A model whose files exist is skipped, so an interrupted queue resumes where it stopped; a model
interrupted in training resumes after its last finished epoch (``CACHE/models/NAME.partial.pt``).

A name may end in ``_eN`` (``wanet_e24``): the same model trained for N epochs instead of the
default, cached under its own name; and carry ``_wW`` before that (``wanet_w64_e60``): the network
of width W instead of ``--width``. ``--device cuda`` trains on a GPU (the default when torch sees
one); the record names the device. There ``wanetbatch`` poisons each batch on the GPU
(``benchmarks.cifar.WanetBatchPoisoner``, the same warp as the CPU's NumPy poisoner, exactly).

Imbalanced models (no backdoor): ``longtail`` keeps ``5000 * 100**(-c/9)`` training images of
class c; ``step`` keeps 5000 of classes 0-4 and 50 of classes 5-9. Both have ratio 100.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks.attacks import ATTACKS
from benchmarks.cifar import (
    DEFAULT_SEED,
    DEFAULT_WIDTH,
    BatchPoisoner,
    WanetBatchPoisoner,
    _atomic_write,
    fit,
    load_cifar10,
    predict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMBALANCED = ("longtail", "step")
NAMES = ("clean", *ATTACKS, *IMBALANCED)
EPOCHS = 8
IMBALANCED_EPOCHS = {"longtail": 30, "step": 15}
"""Roughly the same number of optimiser steps as a balanced model (fewer images per epoch)."""
IMBALANCE_RATIO = 100


class ModelName(NamedTuple):
    """What a model's name says: its kind, and the epochs, width and architecture it names
    (None: the defaults; the architecture's is ResNet-18)."""

    kind: str
    epochs: int | None
    width: int | None
    arch: str | None = None


_NAME = re.compile(
    r"(?P<kind>[a-z0-9]+?)(?:_(?P<arch>vgg11))?(?:_w(?P<width>[1-9][0-9]*))?"
    r"(?:_e(?P<epochs>[1-9][0-9]*))?"
)


def parse_name(name: str) -> ModelName:
    """``NAME``, optionally followed by ``_vgg11`` (the architecture), ``_wW`` (the width) and
    ``_eN`` (the epochs), in that order: what the name says (None: the defaults)."""
    m = _NAME.fullmatch(name)
    if m is None or m["kind"] not in NAMES:
        raise ValueError(
            f"unknown model {name!r}: one of {', '.join(NAMES)}, optionally + _vgg11, _wW, _eN"
        )
    epochs, width = (None if v is None else int(v) for v in (m["epochs"], m["width"]))
    return ModelName(m["kind"], epochs, width, m["arch"])


def model_name(text: str) -> str:
    """argparse type: a valid model name."""
    try:
        parse_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def imbalanced_indices(y: np.ndarray, kind: str, ratio: int, seed: int) -> np.ndarray:
    """Indices of a long-tail or step subset of a balanced training set."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    n_max = min(int(np.sum(y == c)) for c in classes)
    keep = []
    for c in classes:
        if kind == "longtail":
            n = int(n_max * ratio ** (-c / (len(classes) - 1)))
        elif kind == "step":
            n = n_max if c < len(classes) // 2 else n_max // ratio
        else:
            raise ValueError(f"unknown imbalance {kind!r}")
        keep.append(rng.choice(np.flatnonzero(y == c), size=n, replace=False))
    return np.sort(np.concatenate(keep))


def model_paths(cache_dir: Path, name: str) -> tuple[Path, Path]:
    base = Path(cache_dir) / "models" / name
    return base.with_suffix(".pt"), base.with_suffix(".json")


def train_one(
    name: str,
    data: dict[str, np.ndarray],
    width: int,
    epochs: int | None,
    seed: int,
    checkpoint: Path | None = None,
    device: str = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    x, y = data["x_train"], data["y_train"]
    kind, named_epochs, named_width, arch = parse_name(name)
    width = named_width or width
    record: dict[str, Any] = {"name": name, "width": width, "seed": seed, "device": device}
    if arch is not None:
        record["arch"] = arch
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    epochs = epochs or named_epochs
    attack = ATTACKS.get(kind)
    late = None
    poisoner: BatchPoisoner | WanetBatchPoisoner | None = None
    if attack is not None:
        poisoned = attack.poison(x, y, seed)
        x, y = poisoned.x, poisoned.y
        record.update(poisoned.record)
        if attack.late:
            late = (poisoned.late, attack.trigger)
        if attack.per_batch is not None and device.startswith("cuda"):
            poisoner = WanetBatchPoisoner(attack)  # on the GPU, without a trip through the host
            record["poisoning_on"] = "gpu (torch)"
        elif attack.per_batch is not None:
            poisoner = attack.poison_batch
    elif kind in IMBALANCED:
        idx = imbalanced_indices(y, kind, IMBALANCE_RATIO, seed)
        x, y = x[idx], y[idx]
        record.update(imbalance=kind, ratio=IMBALANCE_RATIO)
    record["train_per_class"] = np.bincount(y, minlength=10).tolist()
    n_epochs = epochs or IMBALANCED_EPOCHS.get(kind, EPOCHS)

    def progress(epoch: int, loss: float, seconds: float) -> None:
        print(f"{name}: epoch {epoch}/{n_epochs} loss {loss:.4f} {seconds:.1f}s", flush=True)

    model, seconds = fit(
        x,
        y,
        width=width,
        epochs=n_epochs,
        seed=seed,
        progress=progress,
        late=late,
        checkpoint=checkpoint,
        device=device,
        poisoner=poisoner,
        arch=arch or "resnet18",
    )
    record.update(epochs=n_epochs, train_seconds=round(seconds, 1), n_train=len(y))
    xt, yt = data["x_test"], data["y_test"]
    pred = predict(model, xt)
    record["clean_accuracy"] = float(np.mean(pred == yt))
    record["per_class_accuracy"] = [float(np.mean(pred[yt == c] == c)) for c in range(10)]
    if attack is not None:
        mask = attack.eval_mask(yt)
        trig_pred = predict(model, attack.trigger(xt[mask]))
        record["attack_success_rate"] = float(
            np.mean(trig_pred == attack.attacker_labels(yt[mask]))
        )
    return model, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", type=model_name, help=f"{', '.join(NAMES)} [_eN]")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--epochs", type=int, default=None, help="override the per-model default")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to train (default: cuda when torch sees a GPU)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    data = load_cifar10(args.data, args.cache_dir)
    for name in args.names:
        ckpt, sidecar = model_paths(args.cache_dir, name)
        if ckpt.exists() and sidecar.exists():
            print(f"{name}: cached at {ckpt}", flush=True)
            continue
        partial = ckpt.with_suffix(".partial.pt")
        if partial.exists():
            print(f"{name}: resuming from {partial}", flush=True)
        model, record = train_one(
            name, data, args.width, args.epochs, args.seed, partial, args.device
        )
        _atomic_write(ckpt, lambda fh, m=model: torch.save(m.state_dict(), fh))
        _atomic_write(sidecar, lambda fh, r=record: fh.write(json.dumps(r, indent=2).encode()))
        partial.unlink(missing_ok=True)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
