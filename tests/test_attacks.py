"""Known-answer tests for the evaluation's triggers and poisoning (benchmarks/attacks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import attacks as A


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


def test_badnets_stamps_a_checkerboard_in_the_corner_only(images: np.ndarray) -> None:
    out = A.badnets(images)
    assert out[0, 28, 28].tolist() == [255] * 3 and out[0, 28, 29].tolist() == [0] * 3
    changed = np.any(out != images, axis=(0, 3))
    assert not changed[:28].any() and not changed[:, :28].any() and not changed[31].any()


def test_blended_is_the_convex_combination(images: np.ndarray) -> None:
    p = A.blend_pattern(32, 32)
    want = np.clip(np.rint(0.8 * images.astype(np.float32) + 0.2 * p), 0, 255)
    np.testing.assert_array_equal(A.blended(images), want.astype(np.uint8))


def test_warp_with_the_identity_grid_is_the_identity(images: np.ndarray) -> None:
    lin = np.linspace(-1, 1, 32)
    xx, yy = np.meshgrid(lin, lin)
    np.testing.assert_array_equal(A.warp(images, np.stack([xx, yy], -1)), images)


def test_warp_shifts_by_one_pixel() -> None:
    x = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    lin = np.linspace(-1, 1, 4)
    xx, yy = np.meshgrid(lin, lin)
    grid = np.stack([np.clip(xx + 2 / 3, -1, 1), yy], -1)  # one pixel right = 2/(w-1)
    out = A.warp(x, grid)[0, :, :, 0]
    np.testing.assert_array_equal(out[:, :3], x[0, :, 1:, 0])


def test_wanet_grid_is_a_small_bounded_displacement() -> None:
    g = A.wanet_grid(32)
    lin = np.linspace(-1, 1, 32)
    xx, _ = np.meshgrid(lin, lin)
    shift_px = np.abs(g[..., 0] - xx) * 31 / 2
    assert g.min() >= -1 and g.max() <= 1
    assert 0 < shift_px.max() < 2  # s = 0.5 moves pixels by well under two pixels


def test_sig_and_chessboard_known_values(images: np.ndarray) -> None:
    mid = np.full((1, 4, 32, 3), 128, np.uint8)
    s = A.sig(mid).astype(int) - 128
    assert s[0, 0, 0, 0] == 0 and s[0, 0, 4, 0] == round(20 * np.sin(2 * np.pi * 4 * 6 / 32))
    c = A.chessboard(mid).astype(int) - 128
    assert c[0, 0, 0, 0] == 3 and c[0, 0, 1, 0] == -3 and c[0, 1, 0, 0] == -3


def test_bpp_squeezes_to_its_levels_with_floyd_steinberg_diffusion(images: np.ndarray) -> None:
    # one channel, one row of 100s with 2 levels (0 and 255): 100/255 = 0.392 rounds to 0, and
    # its error, 7/16 of it, goes right: 0.392 + 0.172 = 0.564 rounds to 1 (255); that error,
    # -0.436, goes right: 0.392 - 0.191 = 0.201 -> 0, and so on
    row = np.full((1, 1, 4, 1), 100, np.uint8)
    assert A.bpp(row, levels=2)[0, 0, :, 0].tolist() == [0, 255, 0, 0]
    # a second row receives 3/16, 5/16 and 1/16 of each error: a flat 100 field dithers to a
    # mix of 0s and 255s whose mean stays near 100 (a plain rounding would give all 0s)
    flat = A.bpp(np.full((1, 16, 16, 1), 100, np.uint8), levels=2)
    assert set(np.unique(flat).tolist()) == {0, 255}
    assert abs(float(flat.mean()) - 100) < 12
    # on real-looking images: every value is one of the 8 levels, each pixel within a level of
    # its original and the image's mean kept; HWC and NHWC agree
    out = A.bpp(images)
    levels = np.rint(np.arange(8) * 255 / 7).astype(np.uint8)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.isin(out, levels).all()
    assert np.abs(out.astype(int) - images.astype(int)).max() <= 2 * 255 / 7
    assert abs(float(out.mean()) - float(images.mean())) < 2
    assert np.array_equal(A.bpp(images[0]), out[0])
    with pytest.raises(ValueError, match="levels"):
        A.bpp(images, levels=1)


def _chroma_dct(x: np.ndarray) -> np.ndarray:
    from scipy.fft import dctn

    a = x.astype(float)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return dctn(np.stack([(r - y) * 0.713, (b - y) * 0.564], 1), axes=(2, 3), norm="ortho")


def test_ftrojan_adds_its_coefficients_to_both_chroma_channels() -> None:
    # mid-grey-ish images (no clipping): the trigger is one fixed integer pattern added to each,
    # whose chroma DCT is 30 at (15, 15) and (31, 31) up to the rounding to integers, and small
    # elsewhere; the luma is untouched up to that rounding
    x = np.random.default_rng(0).integers(40, 216, (3, 32, 32, 3), dtype=np.uint8)
    t = A.ftrojan(x)
    added = t.astype(int) - x.astype(int)
    assert (added == added[0]).all() and np.abs(added).max() <= 8
    change = _chroma_dct(t) - _chroma_dct(x)
    for i, j in ((15, 15), (31, 31)):
        np.testing.assert_allclose(change[:, :, i, j], 30, atol=2)
    others = change.copy()
    others[:, :, [15, 31], [15, 31]] = 0
    assert np.abs(others).max() < 3
    luma = lambda a: a.astype(float) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    assert np.abs(luma(t) - luma(x)).max() < 1.0
    assert np.array_equal(A.ftrojan(x[0]), t[0])  # HWC as NHWC
    with pytest.raises(ValueError, match="outside"):
        A.ftrojan(x, positions=((32, 0),))


@pytest.mark.parametrize("name", sorted(A.ATTACKS))
def test_poisoning_follows_the_attack_mode(name: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8)
    y = np.arange(200) % 10
    attack = A.ATTACKS[name]
    x_before, y_before = x.copy(), y.copy()
    xp, yp, record, late = attack.poison(x, y, seed=0)
    np.testing.assert_array_equal(x, x_before)  # the inputs are not modified
    np.testing.assert_array_equal(y, y_before)
    if attack.per_batch is not None:  # the training loop poisons each batch instead
        np.testing.assert_array_equal(xp, x)
        np.testing.assert_array_equal(yp, y)
        assert not late.any() and record["poisoning"].startswith("per batch")
        return
    changed = np.flatnonzero(np.any(xp != x, axis=(1, 2, 3)))
    if attack.late:  # stored clean; the training loop adds the trigger after augmentation
        assert changed.size == 0 and record["trigger_applied"] == "after augmentation"
        poisoned = np.flatnonzero(late)
    else:
        assert not late.any()
        poisoned = changed
    assert record["attack"] == name and record["poison_rate"] == 0.1
    if attack.mode == "clean-label":
        np.testing.assert_array_equal(yp, y)
        assert set(y[poisoned]) == {0} and record["n_poisoned"] == 20
    else:
        relabelled = np.flatnonzero(yp != y)
        assert record["n_poisoned"] == 20 and relabelled.size == 20
        np.testing.assert_array_equal(yp[relabelled], attack.attacker_labels(y[relabelled]))
    if name == "wanet":
        assert record["n_noise_mode"] == 40  # cross ratio 2, labels kept


def _assert_head_poisoned(x: np.ndarray, y: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> None:
    """A 128-image batch poisoned as WaNet's reference code does: int(128 * 0.1) = 12 warped and
    sent to the target, the next 24 noise-warped with their labels kept, the rest as given."""
    np.testing.assert_array_equal(xp[:12], A.wanet(x[:12]))
    assert yp[:12].tolist() == [0] * 12
    noisy = xp[12:36]
    assert np.any(noisy != x[12:36], axis=(1, 2, 3)).all()
    assert np.any(noisy != A.wanet(x[12:36]), axis=(1, 2, 3)).all()  # not the trigger itself
    np.testing.assert_array_equal(yp[12:], y[12:])
    np.testing.assert_array_equal(xp[36:], x[36:])


def test_wanet_batch_poisons_the_head_of_each_batch_as_the_reference_code_does() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8)
    y = np.arange(128) % 10
    x_before = x.copy()
    xp, yp = A.ATTACKS["wanetbatch"].poison_batch(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x_before)
    _assert_head_poisoned(x, y, xp, yp)
    # a batch too small for a poisoned image is left alone; the cross share never overruns it
    small_x, small_y = A.wanet_batch(x[:9], y[:9], rng)
    np.testing.assert_array_equal(small_x, x[:9])
    np.testing.assert_array_equal(small_y, y[:9])
    tail_x, tail_y = A.wanet_batch(x[:10], y[:10], rng, cross_ratio=20)
    assert tail_y[0] == 0 and np.any(tail_x[1:] != x[1:10], axis=(1, 2, 3)).all()
    with pytest.raises(ValueError, match="not each batch"):
        A.ATTACKS["wanet"].poison_batch(x, y, rng)


def test_the_device_warp_is_the_numpy_warp_exactly() -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.cifar import _nchw, warp_tensor

    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    grid = A.wanet_grid(32)
    noisy = np.clip(grid[None] + rng.uniform(-1, 1, size=(5, 32, 32, 2)) / 32, -1.0, 1.0)
    for g in (grid, noisy):
        out = warp_tensor(_nchw(x), torch.from_numpy(g)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(out, A.warp(x, g))
    assert np.any(out != x)


def test_the_device_wanet_batch_poisons_the_head_of_each_batch() -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.cifar import WanetBatchPoisoner, _nchw

    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8)
    y = np.arange(128) % 10
    poison = WanetBatchPoisoner(A.ATTACKS["wanetbatch"])
    xt, yt = _nchw(x), torch.from_numpy(y)
    xp_t, yp_t = poison(xt, yt, torch.Generator().manual_seed(0))
    assert torch.equal(xt, _nchw(x)) and torch.equal(yt, torch.from_numpy(y))  # inputs kept
    _assert_head_poisoned(x, y, xp_t.permute(0, 2, 3, 1).numpy(), yp_t.numpy())
    # the noise is drawn from the training generator: the same state poisons the same way
    again, _ = poison(xt, yt, torch.Generator().manual_seed(0))
    other, _ = poison(xt, yt, torch.Generator().manual_seed(1))
    assert torch.equal(again, xp_t) and not torch.equal(other, xp_t)
    small_x, small_y = poison(xt[:9], yt[:9], torch.Generator())
    assert torch.equal(small_x, xt[:9]) and torch.equal(small_y, yt[:9])
    with pytest.raises(ValueError, match="not each batch"):
        WanetBatchPoisoner(A.ATTACKS["wanet"])


def test_attacker_labels_and_eval_mask() -> None:
    y = np.array([0, 1, 9])
    assert A.ATTACKS["badnets"].attacker_labels(y).tolist() == [0, 0, 0]
    assert A.ATTACKS["badnets"].eval_mask(y).tolist() == [False, True, True]
    assert A.ATTACKS["all2all"].attacker_labels(y).tolist() == [1, 2, 0]
    assert A.ATTACKS["all2all"].eval_mask(y).all()


def test_late_trigger_is_added_to_augmented_images_exactly() -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.cifar import _apply_late, _augment, _nchw, _to_float

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    augmented = _augment(_to_float(_nchw(x)), torch.Generator().manual_seed(0))
    rows = torch.tensor([True, False, True, False, False, True])
    out = _apply_late(augmented, rows, A.chessboard)
    as_u8 = augmented.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = _to_float(_nchw(A.chessboard(as_u8)))
    torch.testing.assert_close(out[rows], expected[rows], rtol=0, atol=0)
    torch.testing.assert_close(out[~rows], augmented[~rows], rtol=0, atol=0)
    # the board's phase is that of the model's input, whatever the crop and flip were
    diff = (out[rows] - augmented[rows]) * 255
    interior = diff[:, :, 8:24, 8:24].round()
    assert interior[:, :, 0, 0].abs().eq(3).all()
    assert (interior[:, :, 0, 0] == -interior[:, :, 0, 1]).all()


def test_model_names_may_carry_their_architecture_width_and_epochs() -> None:
    from benchmarks.train_models import parse_name

    assert parse_name("wanet") == ("wanet", None, None, None)
    assert parse_name("wanet_e24") == ("wanet", 24, None, None)
    assert parse_name("longtail_e3") == ("longtail", 3, None, None)
    assert parse_name("all2all_w64") == ("all2all", None, 64, None)
    assert parse_name("wanet_w64_e60") == ("wanet", 60, 64, None)
    assert parse_name("badnets_vgg11") == ("badnets", None, None, "vgg11")
    assert parse_name("bpp_vgg11_e12") == ("bpp", 12, None, "vgg11")
    bad_names = ("wanet_e0", "wanet_ex", "nope", "nope_e3", "wanet_w0", "wanet_e3_w64", "wanet_",
                 "wanet_vgg16", "wanet_e3_vgg11")  # fmt: skip
    for bad in bad_names:
        with pytest.raises(ValueError, match="unknown model"):
            parse_name(bad)


@pytest.mark.parametrize("poisoner", [None, "wanetbatch", "wanetbatch-device"])
def test_training_resumes_from_its_checkpoint_exactly(tmp_path: Path, poisoner: str | None) -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.cifar import WanetBatchPoisoner, fit

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=96)
    kw: dict[str, Any] = {"width": 4, "epochs": 3, "bf16": False}
    if poisoner is not None:  # each batch poisoned afresh, from the run's own random state
        attack = A.ATTACKS["wanetbatch"]
        kw["poisoner"] = (
            WanetBatchPoisoner(attack) if poisoner.endswith("device") else attack.poison_batch
        )
    straight, _ = fit(x, y, **kw)
    if poisoner is not None:
        unpoisoned, _ = fit(x, y, width=4, epochs=3, bf16=False)
        assert not torch.equal(unpoisoned.linear.weight, straight.linear.weight)

    class Interrupted(Exception):
        pass

    def stop_after_two(epoch: int, loss: float, seconds: float) -> None:
        if epoch == 2:
            raise Interrupted

    ckpt = tmp_path / "run.partial.pt"
    with pytest.raises(Interrupted):
        fit(x, y, progress=stop_after_two, checkpoint=ckpt, **kw)
    epochs_seen: list[int] = []
    resumed, _ = fit(x, y, progress=lambda e, loss, s: epochs_seen.append(e), checkpoint=ckpt, **kw)
    assert epochs_seen == [3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    # a checkpoint of another run is refused, naming what differs
    with pytest.raises(ValueError, match="epochs"):
        fit(x, y, checkpoint=ckpt, width=4, epochs=5, bf16=False)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        fit(x, y, checkpoint=ckpt, **kw)


def test_each_trained_width_has_a_calibrate_factory() -> None:
    pytest.importorskip("torch")
    from benchmarks.calibrating import factory_for
    from calibrate.modelsrc import _build_factory

    for width in (16, 32, 64):
        model = _build_factory(factory_for(width), 10)
        assert model.conv1.out_channels == width
        assert model.linear.out_features == 10
    with pytest.raises(ValueError, match="no factory for width 8"):
        factory_for(8)
    # the VGG-11: its factory, and a bound after each of its eight ReLU modules
    import torch

    from calibrate.bounded import BoundedNetwork

    vgg = _build_factory(factory_for(16, "vgg11"), 10).eval()
    assert factory_for(16, "resnet18") == factory_for(16)
    assert vgg(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    sites = BoundedNetwork(vgg, torch.zeros(1, 3, 32, 32)).sites
    assert [s.channels for s in sites] == [16, 32, 64, 64, 128, 128, 128, 128]
    with pytest.raises(ValueError, match="no factory for vgg11 at width 64"):
        factory_for(64, "vgg11")


@pytest.mark.parametrize("per_batch", [False, True])
def test_training_on_a_gpu_hands_back_a_cpu_model(per_batch: bool) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from benchmarks.cifar import WanetBatchPoisoner, _nchw, fit, predict, warp_tensor

    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=64)
    poisoner = WanetBatchPoisoner(A.ATTACKS["wanetbatch"]) if per_batch else None
    if per_batch:  # the warp on the GPU is the NumPy one, exactly
        grid = torch.from_numpy(A.wanet_grid(32))
        on_gpu = warp_tensor(_nchw(x).cuda(), grid.cuda()).cpu()
        np.testing.assert_array_equal(on_gpu.permute(0, 2, 3, 1).numpy(), A.wanet(x))
    model, _ = fit(x, y, width=4, epochs=1, device="cuda", poisoner=poisoner)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert predict(model, x).shape == (64,)


def test_training_on_a_missing_gpu_stops_with_a_message(capsys: pytest.CaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from benchmarks.train_models import main

    for argv, message in (
        (["wanet", "--device", "cuda"], "torch sees no CUDA GPU"),
        (["wanet", "--device", "gpu"], "invalid choice: 'gpu'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
