"""Tests for calibrate.modelsrc: arch/factory/TorchScript loading and every error it reports."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from calibrate.modelsrc import ModelSource, count_output_classes, load_model
from tests.helpers import expect_error as _error

FACTORY = "tests.test_modelsrc:make_net"
NOT_A_MODULE = 42


def make_net(num_classes: int = 3) -> nn.Module:
    """The tiny model the factory tests import: 3x4x4 inputs to `num_classes` logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, num_classes))


def make_net_no_args() -> nn.Module:
    return make_net(4)


def make_not_module(num_classes: int) -> str:
    return f"{num_classes} classes"


def make_failing(num_classes: int) -> nn.Module:
    """A factory whose own code fails (user code raises anything)."""
    return {"width": 3}["depth"]  # type: ignore[no-any-return]


class TupleNet(nn.Module):
    """Returns (logits, features): not plain logits."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = torchvision.models.resnet18(num_classes=10)
    return _save(model.state_dict(), tmp_path_factory.mktemp("rn") / "resnet18.pt")


# ---- ModelSource --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({}, ("exactly one", "none")),
        ({"arch": "resnet18", "factory": FACTORY}, ("exactly one", "arch, factory")),
        ({"arch": "resnet18"}, ("weights", "arch")),
        ({"factory": FACTORY}, ("weights", "factory")),
        ({"torchscript": Path("m.pt"), "weights": Path("w.pt")}, ("torchscript",)),
        ({"torchscript": Path("m.pt"), "weights_key": "netC"}, ("weights key",)),
    ],
)
def test_model_source_validation(kwargs: dict[str, object], parts: tuple[str, ...]) -> None:
    _error(lambda: ModelSource(**kwargs), *parts)  # type: ignore[arg-type]


# ---- arch ---------------------------------------------------------------------------------


def test_arch_resnet18(resnet_weights: Path) -> None:
    model = load_model(ModelSource(arch="resnet18", weights=resnet_weights), num_classes=10)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert count_output_classes(model, (3, 32, 32)) == 10


def test_arch_wrong_num_classes(resnet_weights: Path) -> None:
    src = ModelSource(arch="resnet18", weights=resnet_weights)
    _error(
        lambda: load_model(src, num_classes=100),
        "resnet18.pt",
        "fc.weight: checkpoint [10, 512] vs model [100, 512]",
        "wrong number of classes",
    )


def test_arch_unknown_name(tmp_path: Path) -> None:
    src = ModelSource(arch="resnet19", weights=tmp_path / "w.pt")
    _error(lambda: load_model(src, 10), "'resnet19'", "resnet18")
    detection = ModelSource(arch="fasterrcnn_resnet50_fpn", weights=tmp_path / "w.pt")
    _error(lambda: load_model(detection, 10), "unknown torchvision classification model")


# ---- weights files ------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_factory_with_wrapped_weights(tmp_path: Path, wrapper: str | None) -> None:
    net = make_net(5)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    model = load_model(ModelSource(factory=FACTORY, weights=_save(payload, tmp_path / "w.pt")), 5)
    loaded, saved = model.state_dict(), net.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert count_output_classes(model, (3, 4, 4)) == 5


def _wanet_checkpoint(net: nn.Module, generator: nn.Module | None = None) -> dict:
    """A checkpoint as WaNet's reference code writes it (the input-aware attack's code adds
    its trigger generator, netG, beside the classifier)."""
    payload = {
        "netC": net.state_dict(),
        "optimizerC": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "schedulerC": {"milestones": {100: 1}, "last_epoch": 3},
        "best_clean_acc": torch.tensor(0.93),
        "epoch_current": 3,
        "identity_grid": torch.zeros(1, 4, 4, 2),
        "noise_grid": torch.zeros(1, 4, 4, 2),
    }
    if generator is not None:
        payload["netG"] = generator.state_dict()
    return payload


def test_the_one_state_dict_in_a_trainer_checkpoint_is_found(tmp_path: Path) -> None:
    net = make_net(5)
    path = _save(_wanet_checkpoint(net), tmp_path / "w.pt")
    model = load_model(ModelSource(factory=FACTORY, weights=path), 5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    # named, it is taken as named
    model = load_model(ModelSource(factory=FACTORY, weights=path, weights_key="netC"), 5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


def test_several_state_dicts_in_a_checkpoint_need_the_key(tmp_path: Path) -> None:
    net, generator = make_net(5), nn.Sequential(nn.Conv2d(3, 3, 1))
    path = _save(_wanet_checkpoint(net, generator), tmp_path / "w.pt")
    _error(
        lambda: load_model(ModelSource(factory=FACTORY, weights=path), 5),
        "holds 2 state_dicts", "netC, netG", "--weights-key",
    )  # fmt: skip
    model = load_model(ModelSource(factory=FACTORY, weights=path, weights_key="netC"), 5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    _error(
        lambda: load_model(ModelSource(factory=FACTORY, weights=path, weights_key="netX"), 5),
        "'netX' is not in", "netC, netG",
    )  # fmt: skip
    _error(  # the generator's weights: the usual mismatch message
        lambda: load_model(ModelSource(factory=FACTORY, weights=path, weights_key="netG"), 5),
        "do not match the model",
    )  # fmt: skip
    plain = _save(net.state_dict(), tmp_path / "plain.pt")
    _error(
        lambda: load_model(ModelSource(factory=FACTORY, weights=plain, weights_key="netC"), 5),
        "'netC' is not in",
    )  # fmt: skip


@pytest.mark.parametrize("wrapped", [False, True])
def test_module_versions_saved_with_the_weights_reach_the_model(
    tmp_path: Path, wrapped: bool
) -> None:
    """torch.save keeps each module's state-dict version (`_metadata`); torchvision's MNASNet
    refuses weights without it. Kept through DataParallel's "module." prefix as well."""
    net = torchvision.models.mnasnet0_5(num_classes=4)
    state = net.state_dict()
    if wrapped:
        state = nn.DataParallel(net).state_dict()
        assert next(iter(state)).startswith("module.") and "module" in state._metadata
    weights = _save(state, tmp_path / "w.pt")
    model = load_model(ModelSource(arch="mnasnet0_5", weights=weights), 4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    # without the versions the model's own check refuses them: one line, not a traceback
    bare = _save(dict(net.state_dict()), tmp_path / "bare.pt")
    _error(
        lambda: load_model(ModelSource(arch="mnasnet0_5", weights=bare), 4),
        "do not match the model",
        "version should be set to 1 or 2",
    )


@pytest.mark.parametrize("aux", [False, True])
def test_googlenet_weights_with_or_without_their_auxiliary_heads(tmp_path: Path, aux: bool) -> None:
    """torchvision builds GoogLeNet with two auxiliary training heads; weights saved without
    them (as torchvision's pretrained ones are) load into the model built without them."""
    net = torchvision.models.googlenet(num_classes=4, aux_logits=aux, init_weights=False)
    weights = _save(net.state_dict(), tmp_path / "w.pt")
    model = load_model(ModelSource(arch="googlenet", weights=weights), 4)
    assert model.state_dict().keys() == net.state_dict().keys()
    assert any(k.startswith("aux1.") for k in model.state_dict()) == aux
    assert count_output_classes(model, (3, 64, 64)) == 4  # eval mode: plain logits


def test_factory_without_num_classes(tmp_path: Path) -> None:
    weights = _save(make_net(4).state_dict(), tmp_path / "w.pt")
    model = load_model(
        ModelSource(factory="tests.test_modelsrc:make_net_no_args", weights=weights), 9
    )
    assert count_output_classes(model, (3, 4, 4)) == 4


def test_weights_missing_or_unreadable(tmp_path: Path) -> None:
    src = ModelSource(factory=FACTORY, weights=tmp_path / "none.pt")
    _error(lambda: load_model(src, 3), "not found", "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    src = ModelSource(factory=FACTORY, weights=tmp_path / "junk.pt")
    _error(lambda: load_model(src, 3), "junk.pt", "state_dict saved with torch.save")


def test_weights_full_pickled_module_refused(tmp_path: Path) -> None:
    weights = _save(make_net(3), tmp_path / "whole.pt")  # a pickled nn.Module, not a state_dict
    src = ModelSource(factory=FACTORY, weights=weights)
    message = _error(lambda: load_model(src, 3), "whole.pt", "state_dict", "Python objects")
    assert "\x1b" not in message and "weights_only" not in message


def test_weights_not_a_state_dict(tmp_path: Path) -> None:
    weights = _save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    src = ModelSource(factory=FACTORY, weights=weights)
    _error(lambda: load_model(src, 3), "meta.pt", "not a state_dict", "epoch")


def test_weights_key_mismatch(tmp_path: Path) -> None:
    state = make_net(3).state_dict()
    state["extra.weight"] = state.pop("1.weight")
    weights = _save(state, tmp_path / "keys.pt")
    src = ModelSource(factory=FACTORY, weights=weights)
    _error(
        lambda: load_model(src, 3), "1 missing keys (1.weight)", "1 unexpected keys (extra.weight)"
    )


def test_weights_inner_shape_mismatch(tmp_path: Path) -> None:
    state = make_net(3).state_dict()
    state["1.weight"] = torch.zeros(8, 12)
    src = ModelSource(factory=FACTORY, weights=_save(state, tmp_path / "s.pt"))
    message = _error(lambda: load_model(src, 3), "1.weight: checkpoint [8, 12] vs model [8, 48]")
    assert "wrong number of classes" not in message


# ---- factory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("tests.test_modelsrc.make_net", ("'package.module:callable'",)),
        ("tests.test_modelsrc:", ("'package.module:callable'",)),
        ("a b:c", ("'package.module:callable'",)),
        ("no_such_pkg_xyz.mod:make", ("cannot import", "'no_such_pkg_xyz.mod'", "PYTHONPATH")),
        ("tests.test_modelsrc:make_nett", ("no attribute", "'make_nett'")),
        ("tests.test_modelsrc:NOT_A_MODULE", ("not a callable", "int")),
        ("tests.test_modelsrc:make_not_module", ("returned str", "torch.nn.Module")),
        ("tests.test_modelsrc:make_failing", ("factory", "failed", "KeyError: 'depth'")),
        ("tests.failing_factory:make", ("importing factory module", "RuntimeError: no GPU")),
    ],
)
def test_factory_errors(tmp_path: Path, spec: str, parts: tuple[str, ...]) -> None:
    weights = _save(make_net(3).state_dict(), tmp_path / "w.pt")
    _error(lambda: load_model(ModelSource(factory=spec, weights=weights), 3), *parts)


# ---- TorchScript --------------------------------------------------------------------------


def test_torchscript(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* announces its deprecation
        torch.jit.save(torch.jit.trace(make_net(6), torch.zeros(1, 3, 4, 4)), tmp_path / "m.pt")
        model = load_model(ModelSource(torchscript=tmp_path / "m.pt"), 6)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert count_output_classes(model, (3, 4, 4)) == 6


def test_torchscript_errors(tmp_path: Path) -> None:
    _error(lambda: load_model(ModelSource(torchscript=tmp_path / "m.pt"), 3), "not found", "m.pt")
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    src = ModelSource(torchscript=tmp_path / "bad.pt")
    _error(lambda: load_model(src, 3), "bad.pt", "torch.jit.save")


# ---- count_output_classes -----------------------------------------------------------------


def test_count_output_classes_errors() -> None:
    net = make_net(3).eval()
    _error(lambda: count_output_classes(net, (3, 5, 5)), "zeros(1, 3, 5, 5)", "failed")
    _error(lambda: count_output_classes(TupleNet(), (3, 4, 4)), "tuple")
    _error(lambda: count_output_classes(nn.Identity(), (3, 4, 4)), "[1, 3, 4, 4]")
