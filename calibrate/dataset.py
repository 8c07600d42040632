"""The small clean labelled set a user supplies: load it, check it, split it.

Calibration bounds are only as good as this set, so every defect (a missing class, an undecodable
file, mixed sizes, out-of-range pixels) is reported up front as a one-line `CalibrationError`
rather than surfacing later as a confusing shape error deep inside a forward pass.

Two input forms are accepted:

* an ImageFolder directory, ``root/<class_name>/<image files>``. As in
  ``torchvision.datasets.ImageFolder`` the labels follow the sorted folder names, unless
  ``class_names`` is given: then that order defines the labels, so a model trained with another
  class order can still be calibrated. Hidden folders and non-image files are ignored. Every
  image is converted to RGB with Pillow: grayscale is replicated to three channels and the alpha
  channel of RGBA/LA/palette images is dropped.
* an ``.npz`` archive with ``images`` and ``labels`` (and optionally ``class_names``), read with
  ``allow_pickle=False`` so a user file can never execute code. Its channel count is kept
  (1 or 3; a 3-D array [N, H, W] is grayscale), so it is the form for a single-channel model.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from calibrate.errors import CalibrationError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays with == is ambiguous
class CleanSet:
    """Clean images and labels; images float32 [N, C, H, W] in [0, 1], labels int64 in 0..K-1."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def per_class_counts(self) -> list[int]:
        """Images per class, indexed by label, so callers can report thin classes."""
        return [int(n) for n in np.bincount(self.labels, minlength=len(self.class_names))]

    def subset(self, idx: np.ndarray) -> CleanSet:
        """The rows at `idx`, keeping all class names so labels keep their meaning."""
        return CleanSet(self.images[idx], self.labels[idx], self.class_names)


def load_clean_set(
    path: Path,
    *,
    min_per_class: int = 10,
    class_names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
) -> CleanSet:
    """Load an ImageFolder directory or an ``.npz`` file and check it is usable for calibration.

    `image_size` is (height, width); when given, folder images of another size are resized
    bilinearly instead of rejected. Every class must be present with at least `min_per_class`
    images, because per-class statistics from a handful of samples are meaningless.
    """
    if min_per_class < 1:
        raise CalibrationError(f"min_per_class must be at least 1, got {min_per_class}")
    cs = load_labelled_images(path, class_names=class_names, image_size=image_size)
    _check_class_counts(cs, Path(path), min_per_class)
    return cs


def load_labelled_images(
    path: Path,
    *,
    class_names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    what: str = "clean set",
    every_class: bool = True,
) -> CleanSet:
    """Load an ImageFolder directory or an ``.npz`` file of labelled images, as
    :func:`load_clean_set` does but without counting images per class. `what` names the set in
    messages. Without `every_class`, a folder set may lack some of `class_names`' folders (a
    test set of triggered images lacks the attacker's class)."""
    path = Path(path)
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise CalibrationError(f"image_size must be (height, width) > 0, got {image_size}")
    if not path.exists():
        raise CalibrationError(f"{what} not found: {path}")
    if path.is_dir():
        images, labels, names = _load_image_folder(path, class_names, image_size, every_class, what)
    elif path.suffix.lower() == ".npz":
        images, labels, names = _load_npz(path, class_names)
    else:
        raise CalibrationError(f"{what} {path} must be an ImageFolder directory or a .npz file")
    return CleanSet(images, labels, names)


def _load_image_folder(
    root: Path,
    class_names: Sequence[str] | None,
    image_size: tuple[int, int] | None,
    every_class: bool = True,
    what: str = "clean set",
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode ``root/<class>/<image>`` into arrays; labels by `class_names` or sorted folders.
    Without `every_class` the folders may be any of `class_names`' (labels still by its order)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CalibrationError(f"{what} directory {root} has no class folders (root/<class>/)")
    names = tuple(folders)
    if class_names is not None:
        given = tuple(class_names)
        fits = set(given) == set(folders) if every_class else set(folders) <= set(given)
        if len(set(given)) != len(given) or not fits:
            raise CalibrationError(
                f"class_names {list(given)} do not match the class folders {folders} in {root}"
            )
        names = given
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for label, name in enumerate(names):
        if name not in folders:
            continue  # without every_class only
        files = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise CalibrationError(f"class folder {root / name} contains no image files")
        for file in files:
            img = _read_rgb(file, image_size)
            size = (img.height, img.width)
            if first is None:
                first = (file, size)
            elif size != first[1]:
                raise CalibrationError(
                    f"image {file} is {size[0]}x{size[1]} (HxW) but {first[0]} is "
                    f"{first[1][0]}x{first[1][1]}; pass image_size to resize all images"
                )
            arrays.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    images = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), names


def _read_rgb(file: Path, image_size: tuple[int, int] | None) -> Image.Image:
    """Decode one file fully (so truncation is caught here) as RGB, resized when asked."""
    try:
        with Image.open(file) as raw:
            img = raw.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(f"cannot decode image {file}: {detail}") from exc
    if image_size is not None and (img.height, img.width) != tuple(image_size):
        img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    return img


def _load_npz(
    path: Path, class_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``images``/``labels`` (and ``class_names``) without ever unpickling user data."""
    if not zipfile.is_zipfile(path):  # garbage, or an .npy renamed: np.load's error misleads
        raise CalibrationError(f"npz {path} is not a zip archive as written by np.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            if "images" not in keys or "labels" not in keys:
                raise CalibrationError(
                    f"npz {path} must contain arrays 'images' and 'labels'; it has {keys}"
                )
            raw_images, raw_labels = npz["images"], npz["labels"]
            stored = npz["class_names"] if "class_names" in keys else None
    except CalibrationError:
        raise
    except _NPZ_READ_ERRORS as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "; store strings, not objects" if "allow_pickle" in detail else ""
        raise CalibrationError(f"cannot read npz {path}: {detail}{hint}") from exc
    images = _npz_images(raw_images, path)
    labels = _npz_labels(raw_labels, path, len(images))
    names = _npz_class_names(stored, class_names, labels, path)
    if labels.min() < 0 or labels.max() >= len(names):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
        raise CalibrationError(
            f"npz {path}: label {labels[bad]} at index {bad} is out of range "
            f"0..{len(names) - 1} ({len(names)} classes)"
        )
    return images, labels, names


def _npz_images(raw: np.ndarray, path: Path) -> np.ndarray:
    """Normalise npz images to float32 NCHW in [0, 1], inferring NHWC from a 1/3-sized axis; a
    3-D array [N, H, W] is single-channel (grayscale, as MNIST-style arrays come)."""
    if raw.ndim == 3 and raw.shape[0] > 0:
        raw = raw[:, None]
    if raw.ndim != 4 or raw.shape[0] == 0:
        raise CalibrationError(
            f"npz {path}: images must be a non-empty array [N, H, W] (grayscale) or "
            f"[N, C, H, W] / [N, H, W, C], got {raw.shape}"
        )
    if raw.shape[1] in (1, 3):
        nchw = raw
    elif raw.shape[3] in (1, 3):
        nchw = raw.transpose(0, 3, 1, 2)
    else:
        raise CalibrationError(
            f"npz {path}: cannot find a channel axis of size 1 or 3 in images shape {raw.shape}"
        )
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(nchw, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(raw.dtype, np.floating):
        raise CalibrationError(
            f"npz {path}: images dtype {raw.dtype} unsupported; use uint8 or float in [0, 1]"
        )
    images = np.ascontiguousarray(nchw, dtype=np.float32)
    if np.isnan(images).any():
        raise CalibrationError(f"npz {path}: images contain {int(np.isnan(images).sum())} NaNs")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise CalibrationError(
            f"npz {path}: float images must be in [0, 1], got min {lo:g} max {hi:g}"
        )
    return images


def _npz_labels(raw: np.ndarray, path: Path, n_images: int) -> np.ndarray:
    """Labels must be a 1-D integer array with one entry per image."""
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer):
        raise CalibrationError(f"npz {path}: labels must be integers, got dtype {raw.dtype}")
    if raw.ndim != 1:
        raise CalibrationError(f"npz {path}: labels must be 1-D [N], got shape {raw.shape}")
    if len(raw) != n_images:
        raise CalibrationError(f"npz {path}: {n_images} images but {len(raw)} labels")
    if raw.dtype == np.uint64 and raw.max() > np.iinfo(np.int64).max:
        raise CalibrationError(f"npz {path}: label {raw.max()} is out of range")
    return raw.astype(np.int64)


def _npz_class_names(
    stored: np.ndarray | None, given: Sequence[str] | None, labels: np.ndarray, path: Path
) -> tuple[str, ...]:
    """Class names from the argument, else the archive, else "0".."K-1" from the labels."""
    stored_names = None
    if stored is not None:
        stored_names = tuple(
            s.decode(errors="replace") if isinstance(s, bytes) else str(s)
            for s in np.ravel(stored).tolist()
        )
    if given is not None:
        names = tuple(given)
        if stored_names is not None and stored_names != names:
            raise CalibrationError(
                f"class_names {list(names)} do not match class_names {list(stored_names)} "
                f"stored in npz {path}"
            )
        return names
    if stored_names is not None:
        return stored_names
    return tuple(str(k) for k in range(max(int(labels.max()), 0) + 1))


def _check_class_counts(cs: CleanSet, path: Path, min_per_class: int) -> None:
    """Every class 0..K-1 must be present with at least `min_per_class` images."""
    counts = cs.per_class_counts()
    for k, n in enumerate(counts):
        if n == 0:
            raise CalibrationError(
                f"clean set {path} has no images of class {cs.class_names[k]!r} (label {k})"
            )
    thin = [k for k, n in enumerate(counts) if n < min_per_class]
    if thin:
        k = thin[0]
        more = f" (and {len(thin) - 1} more classes)" if len(thin) > 1 else ""
        raise CalibrationError(
            f"class {cs.class_names[k]!r} (label {k}) has {counts[k]} images in {path}, "
            f"need at least {min_per_class} (min_per_class){more}"
        )


def split_clean_set(cs: CleanSet, heldout_fraction: float, seed: int) -> tuple[CleanSet, CleanSet]:
    """Split into (calibration, held-out), stratified so both parts contain every class.

    Each class c holds out round(n_c * heldout_fraction) images (Python rounding), clamped to
    [1, n_c - 1]. The split depends only on `seed`, so reruns calibrate on the same images.
    """
    if not 0.0 < float(heldout_fraction) < 1.0:  # NaN fails this too
        raise CalibrationError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for k, name in enumerate(cs.class_names):
        idx = np.flatnonzero(cs.labels == k)
        if len(idx) < 2:
            raise CalibrationError(
                f"class {name!r} (label {k}) has {len(idx)} images; splitting needs at least 2"
            )
        perm = rng.permutation(idx)
        n_held = min(max(round(len(idx) * heldout_fraction), 1), len(idx) - 1)
        held.append(perm[:n_held])
        keep.append(perm[n_held:])
    return cs.subset(np.sort(np.concatenate(keep))), cs.subset(np.sort(np.concatenate(held)))


def check_input_shape(cs: CleanSet, expected_chw: tuple[int, int, int]) -> None:
    """Fail early when the data cannot be fed to the model as-is."""
    got = tuple(int(d) for d in cs.images.shape[1:])
    want = tuple(int(d) for d in expected_chw)
    if got != want:
        raise CalibrationError(
            f"clean set images are (C, H, W) = {got} but the model expects {want}; "
            "resize with image_size or check the channel count"
        )
