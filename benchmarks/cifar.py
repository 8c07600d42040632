"""CIFAR-10 data, a width-scaled CIFAR ResNet-18 and a BadNets-backdoored model for the benchmark.

The benchmark needs one backdoored classifier that every method is evaluated against. Training it
takes tens of minutes on a CPU, so the trained weights and their metrics are cached on disk and
reused; the decoded data set is cached too, because decoding 60,000 JPEGs from an xz archive is
slow.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks.attacks import Attack, badnets, wanet_batch_layout, wanet_grid
from calibrate.cifar_resnet import DEFAULT_WIDTH, CifarResNet18, cifar_resnet18

DEFAULT_TARGET = 0
DEFAULT_RATE = 0.05
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
BATCH_SIZE = 128
PEAK_LR = 0.1
NUM_THREADS = 2

ProgressFn = Callable[[int, float, float], None]
"""Called after each epoch with (epoch number from 1, mean training loss, epoch seconds)."""


def cifar_resnet18_w32(num_classes: int = 10) -> CifarResNet18:
    """The width-32 network, as a ``mmguard calibrate --factory`` (given num_classes only)."""
    return cifar_resnet18(num_classes=num_classes, width=32)


def cifar_resnet18_w64(num_classes: int = 10) -> CifarResNet18:
    """The full-width network, as a ``mmguard calibrate --factory``."""
    return cifar_resnet18(num_classes=num_classes, width=64)


VGG11_LAYOUT = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")
"""VGG-11's convolutions in units of the width (64 at full width: 64, 128, 256, 512 channels)
and its five max-pools."""


class CifarVGG11(nn.Module):
    """A CIFAR VGG-11 with batch norm (the common CIFAR form: 3x3 convolutions, each followed by
    BatchNorm and an ``nn.ReLU`` module, five 2x2 max-pools to 1x1, one linear layer), channels
    scaled by ``width`` (64 at full width). A second architecture for the benchmarks: module
    ReLUs, no residual additions, pooling between the bound sites."""

    def __init__(self, num_classes: int = 10, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG11_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out_ch = int(v) * width
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]  # fmt: skip
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def cifar_vgg11(num_classes: int = 10, width: int = DEFAULT_WIDTH) -> CifarVGG11:
    """The VGG-11 network, as a ``mmguard calibrate --factory``."""
    return CifarVGG11(num_classes=num_classes, width=width)


ARCHS: dict[str, Callable[..., nn.Module]] = {"resnet18": cifar_resnet18, "vgg11": cifar_vgg11}
"""The architectures the benchmarks train (a model name's ``_vgg11`` picks the second)."""

FACTORIES = {
    DEFAULT_WIDTH: "benchmarks.cifar:cifar_resnet18",
    32: "benchmarks.cifar:cifar_resnet18_w32",
    64: "benchmarks.cifar:cifar_resnet18_w64",
}
"""``--factory`` of each width the benchmarks train (ResNet-18)."""
ARCH_FACTORIES = {("vgg11", DEFAULT_WIDTH): "benchmarks.cifar:cifar_vgg11"}
"""``--factory`` of the other architectures, by (architecture, width)."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_cifar10(archive: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """Return CIFAR-10 as uint8 NHWC arrays, decoding the JPEG archive only on the first call.

    Keys: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and ``class_names`` (unicode array).
    The decoded cache (``cache_dir/cifar10.npz``) is what later calls read, so the archive need
    not exist once the cache does.
    """
    cache = Path(cache_dir) / "cifar10.npz"
    if not cache.exists():
        data = _decode_archive(Path(archive))
        _atomic_savez(cache, data)
    with np.load(cache, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _decode_archive(archive: Path) -> dict[str, np.ndarray]:
    """Decode every ``<split>/<class>/<file>.jpg`` member straight from the tar, in sorted order.

    Sorting (split, class, file name) makes the arrays independent of the tar's member order,
    so the same archive always yields the same index for the same image.
    """
    images: dict[tuple[str, str, str], np.ndarray] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            key = _member_key(member)
            if key is None:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            with Image.open(io.BytesIO(handle.read())) as img:
                images[key] = np.asarray(img.convert("RGB"), dtype=np.uint8)
    class_names = sorted({cls for split, cls, _ in images if split == "train"})
    out: dict[str, np.ndarray] = {"class_names": np.array(class_names, dtype=np.str_)}
    for split in ("train", "test"):
        keys = sorted(k for k in images if k[0] == split)
        out[f"x_{split}"] = np.stack([images[k] for k in keys])
        out[f"y_{split}"] = np.array([class_names.index(k[1]) for k in keys], dtype=np.int64)
    return out


def _member_key(member: tarfile.TarInfo) -> tuple[str, str, str] | None:
    """Map a tar member to (split, class, file) if it is an image of the ImageFolder layout."""
    if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg", ".png")):
        return None
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if len(parts) < 3 or parts[-3] not in ("train", "test"):
        return None
    return parts[-3], parts[-2], parts[-1]


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz via a temporary file so an interrupted run never leaves a truncated cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# BadNets poisoning (pure numpy, applied after decoding so JPEG never touches the trigger)
# --------------------------------------------------------------------------------------------


apply_badnets = badnets
"""The BadNets trigger of :mod:`benchmarks.attacks`, under the name this module's callers use."""


def poison_training_set(
    x: np.ndarray,
    y: np.ndarray,
    target: int = DEFAULT_TARGET,
    rate: float = DEFAULT_RATE,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamp and relabel to ``target`` a random fraction ``rate`` of the non-target images.

    Only non-target images are poisoned: stamping a target-class image teaches nothing about the
    trigger. Returns (poisoned images, poisoned labels, sorted indices of poisoned samples); the
    inputs are not modified.
    """
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(y != target)
    n_poison = round(rate * len(candidates))
    idx = np.sort(rng.choice(candidates, size=n_poison, replace=False))
    x_out, y_out = x.copy(), y.copy()
    x_out[idx] = apply_badnets(x[idx])
    y_out[idx] = target
    return x_out, y_out, idx


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _to_float(x_uint8_nchw: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1], the model's input domain."""
    return x_uint8_nchw.float().div_(255.0)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero pad 4) and horizontal flip, vectorised over the batch, on x's device
    (``gen`` lives there too)."""
    n, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (4, 4, 4, 4))
    oy = torch.randint(0, 9, (n,), generator=gen, device=dev)
    ox = torch.randint(0, 9, (n,), generator=gen, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


LateTrigger = tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]
"""(mask over the training set, uint8 NHWC trigger): images triggered after augmentation."""


def _apply_late(inputs: torch.Tensor, rows: torch.Tensor, trigger: Callable) -> torch.Tensor:
    """Add a uint8 NHWC trigger to augmented float images ``inputs[rows]``.

    Augmented pixels are still exact multiples of 1/255 (crop pads with zeros, flip permutes), so
    the round trip through uint8 is exact and the trigger is the same function the test uses.
    """
    if rows.numel() == 0:
        return inputs
    u8 = inputs[rows].mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    triggered = torch.from_numpy(np.ascontiguousarray(trigger(u8))).permute(0, 3, 1, 2)
    out = inputs.clone()
    out[rows] = _to_float(triggered.to(inputs.device))
    return out


BatchPoisoner = Callable[
    [np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]
]
"""(uint8 NHWC batch, labels, generator) -> poisoned batch and labels, e.g. a bound
``Attack.poison_batch``: applied to each training batch before augmentation."""


def _poison_batch(
    x: torch.Tensor, y: torch.Tensor, poisoner: BatchPoisoner, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``poisoner`` on a uint8 NCHW batch; its random draws are seeded from ``gen``, so a
    resumed run poisons its batches as an uninterrupted one does."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    xn, yn = poisoner(
        x.permute(0, 2, 3, 1).cpu().numpy(), y.cpu().numpy(), np.random.default_rng(seed)
    )
    return _nchw(xn).to(x.device), torch.from_numpy(np.asarray(yn, dtype=np.int64)).to(y.device)


def warp_tensor(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """:func:`benchmarks.attacks.warp` on a uint8 NCHW tensor, on its own device: the same
    bilinear sampling and border handling in float64, so the two agree exactly. ``grid`` is
    (h, w, 2) or (n, h, w, 2), float64, x then y in [-1, 1]."""
    n, _, h, w = x.shape
    xf = x.permute(0, 2, 3, 1).to(torch.float64)
    g = grid.to(device=x.device, dtype=torch.float64).expand(n, h, w, 2)
    px = (g[..., 0] + 1.0) * 0.5 * (w - 1)
    py = (g[..., 1] + 1.0) * 0.5 * (h - 1)
    x0 = px.floor().long().clamp(0, w - 1)
    y0 = py.floor().long().clamp(0, h - 1)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    wx, wy = (px - x0)[..., None], (py - y0)[..., None]
    b = torch.arange(n, device=x.device)[:, None, None]
    top = xf[b, y0, x0] * (1 - wx) + xf[b, y0, x1] * wx
    bottom = xf[b, y1, x0] * (1 - wx) + xf[b, y1, x1] * wx
    out = (top * (1 - wy) + bottom * wy).round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 3, 1, 2).contiguous()


class WanetBatchPoisoner:
    """WaNet's per-batch poisoning (:func:`benchmarks.attacks.wanet_batch`: the first ``rate``
    of each batch warped and sent to the target, the next ``cross_ratio`` times as many given
    the noise-mode warp) on torch tensors, on the batch's own device. On a GPU the NumPy
    poisoner's round trip through the host would cost more than the training step: 13 ms a
    batch on the 2-core development CPU, against 7.6 ms a full-width step on an H200. Its
    random offsets are drawn from the training generator, so a run's draws differ from the
    NumPy poisoner's, as a run on another device's do."""

    def __init__(self, attack: Attack) -> None:
        if attack.per_batch is None:
            raise ValueError(f"attack {attack.name!r} poisons the stored images, not each batch")
        self.rate, self.target = attack.rate, attack.target
        self.cross_ratio = float(attack.settings["cross_ratio"])
        self.k, self.s = int(attack.settings["k"]), float(attack.settings["s"])
        self._grids: dict[tuple[int, torch.device], torch.Tensor] = {}

    def grid(self, h: int, device: torch.device) -> torch.Tensor:
        """The trigger's sampling grid for h x h images, on ``device`` (made once)."""
        if (h, device) not in self._grids:
            self._grids[h, device] = torch.from_numpy(wanet_grid(h, self.k, self.s)).to(device)
        return self._grids[h, device]

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.shape[-2]
        n_bd, n_cross = wanet_batch_layout(len(y), self.rate, self.cross_ratio)
        grid = self.grid(h, x.device)
        x_out, y_out = x.clone(), y.clone()
        x_out[:n_bd] = warp_tensor(x[:n_bd], grid)
        y_out[:n_bd] = self.target
        if n_cross:
            offsets = torch.rand(
                (n_cross, h, h, 2), generator=gen, device=gen.device, dtype=torch.float64
            )
            noisy = (grid + (offsets.to(x.device) * 2 - 1) / h).clamp(-1.0, 1.0)
            x_out[n_bd : n_bd + n_cross] = warp_tensor(x[n_bd : n_bd + n_cross], noisy)
        return x_out, y_out


def _nchw(x_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> contiguous uint8 NCHW tensor (kept uint8 to save memory)."""
    return torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc.transpose(0, 3, 1, 2)))


@torch.no_grad()
def predict(model: nn.Module, x_uint8_nhwc: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted labels for uint8 NHWC images, in eval mode, on the model's device."""
    model.eval()
    dev = next(model.parameters()).device
    xs = _nchw(x_uint8_nhwc)
    preds = [
        model(_to_float(xs[i : i + batch_size].to(dev))).argmax(1).cpu()
        for i in range(0, len(xs), batch_size)
    ]
    return torch.cat(preds).numpy()


def evaluate_badnets(
    model: nn.Module, x_test: np.ndarray, y_test: np.ndarray, target: int = DEFAULT_TARGET
) -> dict[str, float]:
    """Clean accuracy, and attack success rate on triggered non-target-class test images."""
    clean_acc = float((predict(model, x_test) == y_test).mean())
    others = x_test[y_test != target]
    asr = float((predict(model, apply_badnets(others)) == target).mean())
    return {"clean_accuracy": clean_acc, "attack_success_rate": asr}


def _train_epoch(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    max_batches: int | None = None,
    bf16: bool = False,
    late: LateTrigger | None = None,
    poisoner: BatchPoisoner | WanetBatchPoisoner | None = None,
) -> float:
    """One pass over a shuffled training set (on ``xs``'s device); returns the mean loss.

    With ``bf16`` the forward pass runs under bfloat16 autocast (weights and optimiser stay
    float32) on channels-last tensors: 2.7x faster per batch than float32 NCHW on this CPU.
    The loss is summed on the device and read once, so a GPU never waits for the host.
    """
    model.train()
    dev = xs.device
    order = torch.randperm(len(xs), generator=gen, device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    for b, start in enumerate(range(0, len(xs), BATCH_SIZE)):
        if max_batches is not None and b >= max_batches:
            break
        idx = order[start : start + BATCH_SIZE]
        batch, labels = xs[idx], ys[idx]
        if isinstance(poisoner, WanetBatchPoisoner):
            batch, labels = poisoner(batch, labels, gen)
        elif poisoner is not None:
            batch, labels = _poison_batch(batch, labels, poisoner, gen)
        inputs = _augment(_to_float(batch), gen)
        if late is not None:
            rows = torch.from_numpy(late[0][idx.cpu().numpy()]).to(dev)
            inputs = _apply_late(inputs, rows, late[1])
        if bf16:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs)
        loss = F.cross_entropy(out.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(idx)
        count += len(idx)
    return float(total) / max(count, 1)


def fit(
    x_uint8_nhwc: np.ndarray,
    y: np.ndarray,
    width: int = DEFAULT_WIDTH,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    num_classes: int = 10,
    progress: ProgressFn | None = None,
    bf16: bool = True,
    late: LateTrigger | None = None,
    checkpoint: Path | None = None,
    device: str = "cpu",
    poisoner: BatchPoisoner | WanetBatchPoisoner | None = None,
    arch: str = "resnet18",
) -> tuple[nn.Module, float]:
    """Train a CIFAR ResNet-18 (or another of ``ARCHS``: ``arch``) on (already poisoned) uint8
    images; returns (model, seconds).

    ``late`` names training images whose trigger is added after augmentation, each time they are
    drawn (see :class:`benchmarks.attacks.Poisoned`). ``poisoner`` poisons each batch before
    augmentation (see :attr:`benchmarks.attacks.Attack.per_batch`): a NumPy ``BatchPoisoner``,
    or a :class:`WanetBatchPoisoner` that works on the device.

    With ``checkpoint`` the model, optimiser, schedule and shuffling state are written there after
    every epoch, and a run that finds one resumes after its last epoch, with the same batches and
    steps an uninterrupted run takes (the caller deletes it once the model is saved).

    ``device`` (``"cpu"``, ``"cuda"``) is where the data, model and augmentation live. The same
    seed gives other random draws on another device, so a checkpoint resumes on its own device
    only.

    The model comes back on the CPU, in float32, contiguous NCHW memory format and eval mode,
    exactly as a user would hand it to ``mmguard calibrate``.
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    xs = _nchw(x_uint8_nhwc).to(dev)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(dev)
    model = ARCHS[arch](num_classes=num_classes, width=width).to(dev)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    steps = (len(xs) + BATCH_SIZE - 1) // BATCH_SIZE
    opt, sched = _make_optimizer(model, epochs, steps)
    run: dict[str, Any] = {
        "width": width,
        "epochs": epochs,
        "seed": seed,
        "n_train": len(xs),
        "bf16": bf16,
    }
    if dev.type != "cpu":
        run["device"] = dev.type
    if arch != "resnet18":
        run["arch"] = arch
    done, spent = 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        done, spent = _resume(checkpoint, run, model, opt, sched, gen)
    t0 = time.perf_counter()
    for epoch in range(done + 1, epochs + 1):
        t_ep = time.perf_counter()
        loss = _train_epoch(model, xs, ys, opt, sched, gen, bf16=bf16, late=late, poisoner=poisoner)
        if checkpoint is not None:
            state = {
                "run": run,
                "epoch": epoch,
                "seconds": spent + time.perf_counter() - t0,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
            }
            _atomic_write(checkpoint, lambda fh, state=state: torch.save(state, fh))
        if progress is not None:
            progress(epoch, loss, time.perf_counter() - t_ep)
    seconds = spent + time.perf_counter() - t0
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    return model.eval(), seconds


def _resume(
    path: Path,
    run: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
) -> tuple[int, float]:
    """Load a :func:`fit` checkpoint into the fresh training state; returns (epochs done,
    seconds spent). Refuses one written for another run, naming what differs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["run"]
    except Exception as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({exc}); delete it") from exc
    if saved != run:
        diff = {k: (saved.get(k), v) for k, v in run.items() if saved.get(k) != v}
        raise ValueError(
            f"{path} is a checkpoint of another run (checkpoint vs now: {diff}); delete it "
            "to start afresh"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    return int(state["epoch"]), float(state["seconds"])


def _make_optimizer(
    model: nn.Module, epochs: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov, wd 5e-4), one-cycle LR peaking at 0.1: the most accuracy from few epochs."""
    opt = torch.optim.SGD(
        model.parameters(), lr=PEAK_LR, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=PEAK_LR, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    return opt, sched


def train_badnets(
    data: dict[str, np.ndarray],
    width: int = DEFAULT_WIDTH,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    target: int = DEFAULT_TARGET,
    rate: float = DEFAULT_RATE,
    progress: ProgressFn | None = None,
) -> tuple[CifarResNet18, dict[str, Any]]:
    """Train a BadNets-backdoored ResNet-18 on ``data`` (as from :func:`load_cifar10`).

    Returns the model in eval mode and its metrics (clean accuracy, attack success rate and the
    settings that produced it). On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE`` before torch is
    imported (the CLI does): with busy-waiting OpenMP threads, one competing process makes each
    batch several times slower.
    """
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_p, y_p, idx = poison_training_set(data["x_train"], data["y_train"], target, rate, seed)
    xs, ys = _nchw(x_p), torch.from_numpy(y_p.astype(np.int64))
    model = cifar_resnet18(num_classes=len(data["class_names"]), width=width)
    steps = (len(xs) + BATCH_SIZE - 1) // BATCH_SIZE
    opt, sched = _make_optimizer(model, epochs, steps)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t_ep = time.perf_counter()
        loss = _train_epoch(model, xs, ys, opt, sched, gen)
        if progress is not None:
            progress(epoch, loss, time.perf_counter() - t_ep)
    train_seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = evaluate_badnets(model, data["x_test"], data["y_test"], target)
    metrics.update(
        width=width,
        epochs=epochs,
        train_seconds=round(train_seconds, 1),
        poison_rate=rate,
        n_poisoned=len(idx),
        target=target,
        seed=seed,
    )
    return model.eval(), metrics


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def badnets_checkpoint_path(cache_dir: Path, width: int, epochs: int, seed: int) -> Path:
    """Where the cached weights live; the metrics sidecar is the same path with ``.json``."""
    return Path(cache_dir) / f"badnets_resnet18_w{width}_e{epochs}_s{seed}.pt"


def get_or_train_badnets(
    archive: Path,
    cache_dir: Path,
    width: int = DEFAULT_WIDTH,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    target: int = DEFAULT_TARGET,
    rate: float = DEFAULT_RATE,
    progress: ProgressFn | None = None,
) -> tuple[CifarResNet18, dict[str, Any]]:
    """Load the cached backdoored model and metrics, or train once and cache them.

    The archive is only read when the model has to be trained. A cached model trained with a
    different target or rate is refused rather than silently reused or overwritten.
    """
    ckpt = badnets_checkpoint_path(cache_dir, width, epochs, seed)
    sidecar = ckpt.with_suffix(".json")
    if ckpt.exists() and sidecar.exists():
        metrics = json.loads(sidecar.read_text())
        _check_cached_settings(metrics, sidecar, target, rate)
        model = cifar_resnet18(num_classes=10, width=width)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        return model.eval(), metrics
    data = load_cifar10(archive, cache_dir)
    model, metrics = train_badnets(data, width, epochs, seed, target, rate, progress)
    _atomic_write(ckpt, lambda fh: torch.save(model.state_dict(), fh))
    _atomic_write(sidecar, lambda fh: fh.write(json.dumps(metrics, indent=2).encode() + b"\n"))
    return model, metrics


def _check_cached_settings(
    metrics: dict[str, Any], sidecar: Path, target: int, rate: float
) -> None:
    """Refuse a cached model whose poisoning settings differ from the ones requested."""
    if metrics.get("target") != target or metrics.get("poison_rate") != rate:
        raise ValueError(
            f"{sidecar} was trained with target={metrics.get('target')}, "
            f"rate={metrics.get('poison_rate')}; requested target={target}, rate={rate}. "
            "Move the cached files away to retrain."
        )


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Write via a temporary file so a crash never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)
