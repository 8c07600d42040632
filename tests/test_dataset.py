"""Tests for calibrate.dataset: ImageFolder and npz loading, every input error, the split."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibrate.dataset import CleanSet, check_input_shape, load_clean_set, split_clean_set
from tests.helpers import expect_error as _error


def _write_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> None:
    """A small image of `size` (height, width) filled with a pattern."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    data = (np.arange(size[0] * size[1] * channels) % 256).astype(np.uint8)
    shape = (size[0], size[1], channels) if channels > 1 else size
    Image.fromarray(data.reshape(shape), mode=mode).save(path)


def _folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            _write_image(root / name / f"img{i}{ext}")
    return root


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _folder(tmp_path / "data", {"dog": 3, "cat": 2})


# ---- ImageFolder happy paths ------------------------------------------------------------


def test_image_folder_png_and_jpeg(tree: Path) -> None:
    _write_image(tree / "cat" / "extra.JPEG")
    (tree / "cat" / "notes.txt").write_text("ignored")
    (tree / ".hidden").mkdir()
    cs = load_clean_set(tree, min_per_class=2)
    assert cs.class_names == ("cat", "dog")  # sorted folder names are the labels
    assert cs.images.shape == (6, 3, 8, 6) and cs.images.dtype == np.float32
    assert cs.labels.dtype == np.int64 and cs.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert cs.images.min() >= 0.0 and cs.images.max() <= 1.0
    assert cs.per_class_counts() == [3, 3]


def test_image_folder_gray_and_rgba_become_rgb(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "g.png", mode="L")
    _write_image(tmp_path / "b" / "x.png", mode="RGBA")
    cs = load_clean_set(tmp_path, min_per_class=1)
    assert cs.images.shape == (2, 3, 8, 6)
    assert np.array_equal(cs.images[0, 0], cs.images[0, 2])  # gray replicated


def test_class_names_define_label_order(tree: Path) -> None:
    cs = load_clean_set(tree, min_per_class=2, class_names=["dog", "cat"])
    assert cs.class_names == ("dog", "cat") and cs.per_class_counts() == [3, 2]


def test_image_size_resizes_mixed_sizes(tree: Path) -> None:
    _write_image(tree / "cat" / "big.png", size=(16, 20))
    cs = load_clean_set(tree, min_per_class=2, image_size=(10, 12))
    assert cs.images.shape == (6, 3, 10, 12)


# ---- ImageFolder errors -------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    _error(lambda: load_clean_set(tmp_path / "nope"), "not found", "nope")


def test_not_dir_nor_npz(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x")
    _error(lambda: load_clean_set(tmp_path / "data.csv"), "data.csv", ".npz")


def test_no_class_folders(tmp_path: Path) -> None:
    _error(lambda: load_clean_set(tmp_path), "no class folders", str(tmp_path))


def test_empty_class_folder(tree: Path) -> None:
    (tree / "emu").mkdir()
    (tree / "emu" / "readme.txt").write_text("x")
    _error(lambda: load_clean_set(tree, min_per_class=1), "emu", "no image files")


def test_undecodable_file(tree: Path) -> None:
    (tree / "dog" / "broken.png").write_bytes(b"not a png")
    _error(lambda: load_clean_set(tree, min_per_class=1), "broken.png", "cannot decode")


def test_mixed_sizes_without_image_size(tree: Path) -> None:
    _write_image(tree / "dog" / "wide.png", size=(8, 9))
    _error(lambda: load_clean_set(tree, min_per_class=1), "wide.png", "8x9", "8x6", "image_size")


def test_class_names_must_match_folders(tree: Path) -> None:
    _error(lambda: load_clean_set(tree, class_names=["cat", "cow"]), "cow", "dog")
    _error(lambda: load_clean_set(tree, class_names=["cat", "dog", "dog"]), "class_names")


def test_min_per_class(tree: Path) -> None:
    _error(lambda: load_clean_set(tree, min_per_class=3), "'cat'", "has 2 images", "at least 3")
    _error(lambda: load_clean_set(tree, min_per_class=0), "min_per_class", "0")


# ---- npz ----------------------------------------------------------------------------------


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts).astype(np.int64)


def test_npz_uint8_nhwc(tmp_path: Path) -> None:
    images = np.full((4, 5, 7, 3), 255, dtype=np.uint8)
    path = _npz(tmp_path / "d.npz", images=images, labels=_labels([2, 2]))
    cs = load_clean_set(path, min_per_class=2)
    assert cs.images.shape == (4, 3, 5, 7) and cs.images.dtype == np.float32
    assert float(cs.images.max()) == 1.0 and cs.class_names == ("0", "1")


def test_npz_float_nchw_with_stored_names(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((6, 1, 4, 4))
    names = np.array(["a", "b", "c"])
    path = _npz(tmp_path / "d.npz", images=images, labels=_labels([2, 2, 2]), class_names=names)
    cs = load_clean_set(path, min_per_class=2, class_names=["a", "b", "c"])
    assert cs.images.shape == (6, 1, 4, 4) and cs.class_names == ("a", "b", "c")
    assert np.allclose(cs.images, images)


def test_npz_grayscale_without_a_channel_axis(tmp_path: Path) -> None:
    """[N, H, W], as MNIST-style arrays come: one channel."""
    images = np.arange(4 * 5 * 7, dtype=np.uint8).reshape(4, 5, 7)
    path = _npz(tmp_path / "d.npz", images=images, labels=_labels([2, 2]))
    cs = load_clean_set(path, min_per_class=2)
    assert cs.images.shape == (4, 1, 5, 7)
    np.testing.assert_allclose(cs.images[:, 0] * 255, images, atol=1e-4)


def _float_npz(tmp_path: Path, images: np.ndarray | None = None, **kw: np.ndarray) -> Path:
    arrays = {"images": np.zeros((4, 3, 2, 2), np.float32), "labels": _labels([2, 2])}
    if images is not None:
        arrays["images"] = images
    arrays.update(kw)
    return _npz(tmp_path / "d.npz", **arrays)


def test_npz_missing_keys(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros(3), labels=np.zeros(3))
    _error(lambda: load_clean_set(path), "'images'", "'labels', 'x'")


def test_npz_corrupt(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"garbage bytes")
    _error(lambda: load_clean_set(tmp_path / "bad.npz"), "bad.npz", "not a zip archive")
    with zipfile.ZipFile(tmp_path / "trunc.npz", "w") as zf:
        zf.writestr("images.npy", b"\x93NUMPY broken")
        zf.writestr("labels.npy", b"\x93NUMPY broken")
    _error(lambda: load_clean_set(tmp_path / "trunc.npz"), "trunc.npz", "cannot read npz")


def test_npz_never_unpickles(tmp_path: Path) -> None:
    path = _float_npz(tmp_path, class_names=np.array([{"a": 1}, "b"], dtype=object))
    _error(lambda: load_clean_set(path, min_per_class=1), "d.npz", "allow_pickle")


@pytest.mark.parametrize(
    ("images", "parts"),
    [
        (np.full((4, 3, 2, 2), 1.5, np.float32), ("min 1.5", "max 1.5", "[0, 1]")),
        (np.full((4, 3, 2, 2), -0.25), ("min -0.25",)),
        (np.full((4, 3, 2, 2), np.nan, np.float32), ("48 NaNs",)),
        (np.zeros((4, 5, 2, 2), np.float32), ("channel axis", "(4, 5, 2, 2)")),
        (np.zeros((4, 6), np.float32), ("[N, H, W] (grayscale)", "(4, 6)")),
        (np.zeros((4, 1, 3, 2, 2), np.float32), ("[N, C, H, W]", "(4, 1, 3, 2, 2)")),
        (np.zeros((4, 3, 2, 2), np.int16), ("int16", "uint8")),
    ],
)
def test_npz_bad_images(tmp_path: Path, images: np.ndarray, parts: tuple[str, ...]) -> None:
    _error(lambda: load_clean_set(_float_npz(tmp_path, images), min_per_class=1), *parts)


_AB = ["a", "b"]


@pytest.mark.parametrize(
    ("labels", "names", "parts"),
    [
        (np.array([0, 1, 2, 0]), _AB, ("label 2 at index 2", "0..1")),
        (np.array([0, -1, 1, 1]), None, ("label -1 at index 1",)),
        (np.array([0.0, 1.0, 1.0, 0.0]), None, ("integers", "float64")),
        (np.array([[0], [1], [1], [0]]), None, ("1-D", "(4, 1)")),
        (np.array([0, 1, 1]), None, ("4 images but 3 labels",)),
        (np.array([0, 2, 2, 0]), None, ("class '1'", "label 1")),
    ],
)
def test_npz_bad_labels(
    tmp_path: Path, labels: np.ndarray, names: list[str] | None, parts: tuple[str, ...]
) -> None:
    path = _float_npz(tmp_path, labels=labels)
    _error(lambda: load_clean_set(path, min_per_class=1, class_names=names), *parts)


def test_npz_class_names_count(tmp_path: Path) -> None:
    path = _float_npz(tmp_path)
    _error(lambda: load_clean_set(path, min_per_class=1, class_names=["a"]), "out of range")
    _error(lambda: load_clean_set(path, min_per_class=1, class_names="abc"), "class 'c'")
    stored = _float_npz(tmp_path, class_names=np.array(["x", "y"]))
    _error(lambda: load_clean_set(stored, class_names=["x", "z"]), "'z'", "'y'", "stored")


# ---- split and shape check ----------------------------------------------------------------


def _set(counts: list[int]) -> CleanSet:
    labels = _labels(counts)
    images = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1) / len(labels)
    return CleanSet(images, labels, tuple(f"c{k}" for k in range(len(counts))))


def test_split_stratified_and_deterministic() -> None:
    cs = _set([10, 2, 5])
    fit, held = split_clean_set(cs, 0.3, seed=7)
    assert held.per_class_counts() == [3, 1, 2] and fit.per_class_counts() == [7, 1, 3]
    both = np.concatenate([fit.images.ravel(), held.images.ravel()])
    assert np.array_equal(np.sort(both), cs.images.ravel())
    again = split_clean_set(cs, 0.3, seed=7)[1]
    assert np.array_equal(again.images, held.images)
    assert split_clean_set(cs, 0.01, seed=7)[1].per_class_counts() == [1, 1, 1]
    assert split_clean_set(cs, 0.99, seed=7)[0].per_class_counts() == [1, 1, 1]
    assert cs.subset(np.array([0, 12])).labels.tolist() == [0, 2]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, float("nan")])
def test_split_bad_fraction(fraction: float) -> None:
    _error(lambda: split_clean_set(_set([3, 3]), fraction, seed=0), "heldout_fraction")


def test_split_class_too_small() -> None:
    _error(lambda: split_clean_set(_set([3, 1]), 0.5, seed=0), "'c1'", "1 images")


def test_check_input_shape() -> None:
    cs = _set([2, 2])
    check_input_shape(cs, (1, 1, 1))
    _error(lambda: check_input_shape(cs, (3, 32, 32)), "(1, 1, 1)", "(3, 32, 32)")
