"""Loading the user's classifier from a torchvision name, a factory or a TorchScript file.

Weights are read with ``torch.load(..., weights_only=True)`` only: a checkpoint is untrusted user
input and a full unpickle could run arbitrary code. Every failure (unknown architecture, bad
checkpoint, key or shape mismatch, broken factory) becomes a one-line `CalibrationError` that
names the file or name at fault and, where it can, the likely cause.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
import torchvision
from torch import nn

from calibrate.errors import CalibrationError, first_line

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# DataParallel / DistributedDataParallel save "module.<name>"; torch.compile saves "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN_KEYS = 3


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: exactly one of `arch`, `torchscript` or `factory`.

    `factory` is ``"package.module:callable"`` and must be importable (installed or on
    PYTHONPATH); it is called as ``callable(num_classes=K)`` when it accepts ``num_classes``.
    `weights` (a ``torch.save``-d state_dict) is required with `arch`/`factory`, because
    calibrating randomly initialised weights is meaningless, and forbidden with `torchscript`,
    whose archive already carries its weights. `weights_key` names the entry of a checkpoint
    dict that holds the model's state_dict, where the dict holds several.
    """

    arch: str | None = None
    weights: Path | None = None
    torchscript: Path | None = None
    factory: str | None = None
    weights_key: str | None = None

    def __post_init__(self) -> None:
        chosen = [n for n in ("arch", "torchscript", "factory") if getattr(self, n) is not None]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise CalibrationError(
                f"give exactly one of arch, torchscript or factory for the model (got {got})"
            )
        if self.torchscript is not None and self.weights is not None:
            raise CalibrationError(
                "weights cannot be combined with torchscript: the TorchScript file holds its own"
            )
        if self.torchscript is None and self.weights is None:
            raise CalibrationError(f"weights (a state_dict file) are required with {chosen[0]}")
        if self.weights_key is not None and self.weights is None:
            raise CalibrationError("a weights key needs a weights file")


def load_model(src: ModelSource, num_classes: int) -> nn.Module:
    """Build or load the model, frozen: eval() mode and no parameter requires grad.

    `num_classes` sizes the head of `arch`/`factory` models; a TorchScript model is used as
    saved (check its output width with `count_output_classes`).
    """
    if num_classes < 1:
        raise CalibrationError(f"num_classes must be at least 1, got {num_classes}")
    if src.torchscript is not None:
        model = _load_torchscript(src.torchscript)
    else:
        assert src.weights is not None  # guaranteed by ModelSource.__post_init__
        state = None
        if src.arch is not None:
            if src.arch in _AUX_HEADS:  # the weights decide how it is built: read them once
                state = _read_state_dict(src.weights, src.weights_key)
            model = _build_arch(src.arch, num_classes, _arch_options(src.arch, state))
        else:
            assert src.factory is not None
            model = _build_factory(src.factory, num_classes)
        _load_weights(model, src.weights, num_classes, state, src.weights_key)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_output_classes(model: nn.Module, input_chw: tuple[int, int, int]) -> int:
    """K from one forward pass on zeros: the model must return logits shaped [1, K]."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros((1, *input_chw), device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure of user code on a valid-shaped input is reported
        raise CalibrationError(
            f"model forward on zeros{tuple(x.shape)} failed: {first_line(exc)}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise CalibrationError(
            f"model must return a logits tensor [1, K], got {type(out).__name__}"
        )
    if out.dim() != 2 or out.shape[0] != 1:
        raise CalibrationError(
            f"model must return logits shaped [1, K] for one input, got {list(out.shape)}"
        )
    return int(out.shape[1])


_AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
"""torchvision architectures built with auxiliary training heads unless told otherwise, and the
state-dict prefixes of those heads. Weights saved without them (the heads are dropped after
training, as torchvision's own pretrained ones are) load into the model built without them."""


def _arch_options(name: str, state: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """Builder options that the weights' `state` decides: `aux_logits=False` for an
    architecture with auxiliary heads (`_AUX_HEADS`) whose weights hold none; `init_weights=False`
    for those two, whose random initialisation is slow and is overwritten by the weights anyway.
    None for any other architecture."""
    if name not in _AUX_HEADS or state is None:
        return {}
    has_aux = any(k.startswith(_AUX_HEADS[name]) for k in state)
    return {"aux_logits": has_aux, "init_weights": False}


def _build_arch(name: str, num_classes: int, options: dict[str, Any] | None = None) -> nn.Module:
    """A torchvision classification model with a `num_classes` head and no pretrained weights
    (`options`: more builder arguments, `_arch_options`)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CalibrationError(f"unknown torchvision classification model {name!r}{hint}")
    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **(options or {})
        )
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"cannot build {name!r}: {first_line(exc)}") from exc
    return model


def _build_factory(spec: str, num_classes: int) -> nn.Module:
    """Import ``package.module:callable`` and call it, passing num_classes when accepted."""
    module_name, sep, attr_path = spec.partition(":")
    parts = [*module_name.split("."), *attr_path.split(".")]
    if not sep or ":" in attr_path or not all(p.isidentifier() for p in parts):
        raise CalibrationError(f"factory {spec!r} must look like 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as exc:
        raise CalibrationError(
            f"cannot import factory module {module_name!r} (is it on PYTHONPATH?): "
            f"{first_line(exc)}"
        ) from exc
    except Exception as exc:  # the module's own code failed while it was imported
        raise CalibrationError(
            f"importing factory module {module_name!r} failed: {first_line(exc)}"
        ) from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise CalibrationError(f"factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise CalibrationError(f"factory {spec!r} is a {type(obj).__name__}, not a callable")
    try:
        model = obj(num_classes=num_classes) if _accepts_num_classes(obj) else obj()
    except Exception as exc:  # user code: any failure is reported in one line
        raise CalibrationError(f"factory {spec!r} failed: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CalibrationError(
            f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _accepts_num_classes(fn: Any) -> bool:
    """True when `fn` takes a ``num_classes`` keyword (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call without arguments
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "num_classes" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


def _load_torchscript(path: Path) -> nn.Module:
    """Load a ``torch.jit.save`` archive onto the CPU."""
    if not Path(path).is_file():
        raise CalibrationError(f"TorchScript file not found: {path}")
    try:
        with warnings.catch_warnings():  # the deprecation notice is for us, not the end user
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError, ValueError, OSError, ...
        raise CalibrationError(
            f"cannot load TorchScript {path} (it must be saved with torch.jit.save): "
            f"{first_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"TorchScript {path} did not load as a module")
    return model


def _is_state_dict(obj: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap_checkpoint(obj: object, path: Path, key: str | None) -> object:
    """The model's state_dict inside a trainer's checkpoint dict: the entry `key` when given;
    else the first of `_WRAPPER_KEYS` present; else the one entry that is a dict of tensors
    (WaNet's reference code saves the classifier as "netC" beside its optimiser, scheduler and
    warping grids). Several such entries (a generator beside the classifier) need `key`."""
    if not isinstance(obj, Mapping):
        if key is not None:
            raise CalibrationError(f"--weights-key {key!r}: weights {path} is not a dict")
        return obj
    candidates = [k for k, v in obj.items() if isinstance(v, Mapping) and v and _is_state_dict(v)]
    if key is not None:
        if key not in obj:
            named = ", ".join(map(str, candidates)) or "none"
            raise CalibrationError(
                f"--weights-key {key!r} is not in weights {path} (its dicts of tensors: {named})"
            )
        return obj[key]
    if _is_state_dict(obj):
        return obj
    for wrapper in _WRAPPER_KEYS:
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper]
    if len(candidates) > 1:
        raise CalibrationError(
            f"weights {path} holds {len(candidates)} state_dicts "
            f"({', '.join(map(str, candidates))}): name the model's with --weights-key"
        )
    return obj[candidates[0]] if candidates else obj


def _read_state_dict(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a tensors-only checkpoint, unwrapping the usual trainer wrappers and prefixes
    (`key`: the checkpoint entry that holds the model's state_dict, `_unwrap_checkpoint`)."""
    if not Path(path).is_file():
        raise CalibrationError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ...
        detail = first_line(exc)
        if isinstance(exc, pickle.UnpicklingError):  # its text suggests weights_only=False
            detail = "it holds Python objects besides tensors, e.g. a whole pickled model"
        raise CalibrationError(
            f"cannot load weights {path}: it must be a state_dict saved with torch.save ({detail})"
        ) from exc
    obj = _unwrap_checkpoint(obj, path, key)
    if not _is_state_dict(obj):
        found = f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else "no dict"
        raise CalibrationError(
            f"weights {path} is not a state_dict of tensors ({type(obj).__name__}, {found}); "
            "save model.state_dict() with torch.save"
        )
    state = dict(obj)
    # torch.save keeps each module's state-dict version in `_metadata`; some modules refuse a
    # state without it (torchvision's MNASNet: "version should be set to 1 or 2")
    meta = dict(getattr(obj, "_metadata", None) or {})
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            meta = {_strip_module_prefix(k, prefix): v for k, v in meta.items()}
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    if meta:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _strip_module_prefix(module_key: str, prefix: str) -> str:
    """A `_metadata` key (a module path, "" for the root) without the wrapper's prefix: the
    wrapper itself ("module") becomes the root."""
    name = prefix.rstrip(".")
    if module_key == name:
        return ""
    return module_key[len(prefix) :] if module_key.startswith(prefix) else module_key


def _load_weights(
    model: nn.Module,
    path: Path,
    num_classes: int,
    state: Mapping[str, torch.Tensor] | None = None,
    key: str | None = None,
) -> None:
    """Strictly load `path` (its entry `key`) into `model` (its `state`, when already read),
    explaining any mismatch in one line."""
    if state is None:
        state = _read_state_dict(path, key)
    expected = model.state_dict()
    problem = _describe_mismatch(state, expected, model, num_classes)
    if problem:
        raise CalibrationError(f"weights {path} do not match the model: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # RuntimeError from torch; a module's own check may raise others
        raise CalibrationError(f"weights {path} do not match the model: {first_line(exc)}") from exc


def _describe_mismatch(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    model: nn.Module,
    num_classes: int,
) -> str:
    """Missing/unexpected keys and the first shape mismatch; empty when the load will succeed."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = ", ..." if len(keys) > _SHOWN_KEYS else ""
            parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:_SHOWN_KEYS])}{more})")
    if shapes:
        k = shapes[0]
        got, want = list(state[k].shape), list(expected[k].shape)
        text = f"{len(shapes)} shape mismatches, first {k}: checkpoint {got} vs model {want}"
        last_layer = [name for name, _ in model.named_parameters()][-2:]
        if k in last_layer and want and want[0] == num_classes and got:
            text += (
                f" (the last layer: the checkpoint has {got[0]} classes but "
                f"num_classes is {num_classes}; wrong number of classes?)"
            )
        parts.append(text)
    return "; ".join(parts)
