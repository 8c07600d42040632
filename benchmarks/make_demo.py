"""Rebuild the embedded demo example (``calibrate/examples/cifar10``) from the real CIFAR-10.

Run from the repository root: ``.venv/bin/python -m benchmarks.make_demo``. It takes the BadNets
model of ``benchmarks.train_models`` (trained first if it is not cached; about 8 minutes on a
2-core CPU) and writes, all under 10 MB:

- ``model.pt``: its state dict (``calibrate.cifar_resnet:cifar_resnet18``, width 16);
- ``clean.npz``: the clean balanced calibration set, 50 test-split images per class;
- ``test.npz``: 20 other clean test images per class, and the BadNets-triggered copies of the
  non-target ones (the trigger applied to decoded pixels, stored losslessly);
- ``example.json``: where it came from and its undefended accuracy and attack success rate.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from benchmarks.attacks import ATTACKS
from benchmarks.cifar import load_cifar10
from benchmarks.evaluate import split_test
from benchmarks.train_models import main as train_main
from benchmarks.train_models import model_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_PER_CLASS = 20
ATTACK = "badnets"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10_jpg.tar.xz"
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "calibrate/examples/cifar10")
    args = parser.parse_args(argv)
    weights, record_path = model_paths(args.cache_dir, ATTACK)
    if not weights.exists():
        train_main([ATTACK, "--data", str(args.data), "--cache-dir", str(args.cache_dir)])
    record = json.loads(record_path.read_text())
    data = load_cifar10(args.data, args.cache_dir)
    calib, _, evaluation = split_test(data["y_test"])
    rng = np.random.default_rng(3)
    y_eval = data["y_test"][evaluation]
    picked = np.sort(
        np.concatenate(
            [rng.choice(evaluation[y_eval == c], TEST_PER_CLASS, replace=False) for c in range(10)]
        )
    )
    x, y = data["x_test"][picked], data["y_test"][picked]
    attack = ATTACKS[ATTACK]
    mask = attack.eval_mask(y)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, args.out / "model.pt")
    np.savez_compressed(
        args.out / "clean.npz",
        images=data["x_test"][calib],
        labels=data["y_test"][calib],
        class_names=data["class_names"],
    )
    np.savez_compressed(
        args.out / "test.npz",
        clean=x,
        clean_labels=y,
        triggered=attack.trigger(x[mask]),
        triggered_labels=y[mask],
    )
    meta = {
        "name": "cifar10-badnets-demo",
        "description": "a BadNets-backdoored CIFAR-10 ResNet-18 (width 16)",
        "factory": "calibrate.cifar_resnet:cifar_resnet18",
        "attack": ATTACK,
        "target": record["target"],
        "class_names": data["class_names"].tolist(),
        "model": record,
        "rebuild": "python -m benchmarks.make_demo (needs ../shared/data/cifar10_jpg.tar.xz)",
    }
    (args.out / "example.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
