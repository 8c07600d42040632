"""The bounded network (SPEC section 1): a_bar = min(ReLU(z), b) after every ReLU-type call site.

Call sites are found by tracing with torch.fx, not by module type, so a ReLU module used three
times, `F.relu`, `torch.relu`, `Tensor.relu`, in-place variants and ReLU6 each get their own bound.
A network with no ReLU-type activation at all (EfficientNet's SiLU, for one) is bounded the same
way after its other activations (SiLU, GELU, Hardswish, ...), where their channel axis is dim 1:
an extension of SPEC 1, which is written for ReLU; `activation_kind` says which.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from calibrate.errors import CalibrationError

_aten = torch.ops.aten
_RELU_FUNCTIONS = {
    F.relu, F.relu6, torch.relu, torch.relu_, F.relu_,
    # rebuilt TorchScript models (calibrate.scripted) call aten operators directly
    _aten.relu.default, _aten.relu_.default, _aten.relu6.default,
}  # fmt: skip
# hardtanh(x, 0, 6) is how ReLU6 reaches aten
_HARDTANH = {F.hardtanh, _aten.hardtanh.default, _aten.hardtanh_.default}
_RELU_METHODS = {"relu", "relu_"}
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
# Bounded only in a network without any ReLU-type activation (EfficientNet's SiLU, say), and
# only on channels-first tensors: SPEC 1 is written for ReLU; the bound min(a, b) is the same
_OTHER_MODULES = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.CELU,
                  nn.SELU)  # fmt: skip
_OTHER_FUNCTIONS = {
    F.silu, F.gelu, F.hardswish, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
    _aten.silu.default, _aten.silu_.default, _aten.gelu.default, _aten.hardswish.default,
    _aten.hardswish_.default, _aten.mish.default, _aten.leaky_relu.default, _aten.elu.default,
}  # fmt: skip
_OTHER_NAMES = "SiLU, GELU, Hardswish, Mish, LeakyReLU, ELU, CELU, SELU"
_LINEAR = (nn.Linear,)


class Normalized(nn.Module):
    """Folds a model's input normalisation into the graph: takes [0,1] pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise CalibrationError(f"--mean has {len(mean)} values but --std has {len(std)}")
        if any(s <= 0 for s in std):
            raise CalibrationError(f"--std values must be positive, got {list(std)}")
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class ChannelBound(nn.Module):
    """min(a, b) with one bound per channel (dim 1): per channel for conv maps, per neuron for
    linear layers. While `recording`, it tracks the per-channel maximum it has seen.
    `ceiling`, when set, is the most `clamp_` lets the bound rise to (not part of the state)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bound = nn.Parameter(torch.full((channels,), float("inf")))
        self.observed_max: torch.Tensor
        self.register_buffer("observed_max", torch.zeros(channels))
        self.recording = False
        self.ceiling: torch.Tensor | None = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        if self.recording:
            per_channel = a.detach().transpose(0, 1).reshape(a.shape[1], -1).amax(dim=1)
            torch.maximum(self.observed_max, per_channel, out=self.observed_max)
        return torch.minimum(a, self.bound.view(shape))


@dataclass(frozen=True)
class BoundSite:
    """One bounded call site: the module attribute holding its bound and what it follows."""

    name: str  # submodule name of the ChannelBound, e.g. "bound_03"
    follows: str  # the traced node it bounds, e.g. "layer1_0_relu_1"
    kind: str  # "conv" (4-D activation) or "linear" (2-D) or "other"
    channels: int


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        if node.target in _HARDTANH:
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            return isinstance(low, int | float) and low == 0
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _RELU_MODULES)
    return False


def _is_other_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """One of the non-ReLU activations `_OTHER_MODULES` / `_OTHER_FUNCTIONS` (and the
    `F.silu`-style tensor methods)."""
    if node.op == "call_function":
        return node.target in _OTHER_FUNCTIONS
    if node.op == "call_method":
        return node.target in {"silu", "gelu", "hardswish"}
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _OTHER_MODULES)
    return False


def _channels_first(node: fx.Node, modules: dict[str, nn.Module], ndim: int) -> bool:
    """Whether dim 1 of the activation `node` returns is its channel axis: a 2-D [N, C] tensor,
    or a 4-D one not made by a Linear layer (which, on a 4-D tensor, works on the LAST axis,
    as in ConvNeXt's channels-last blocks). 3-D tensors (a transformer's tokens) are not."""
    if ndim == 2:
        return True
    if ndim != 4:
        return False
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return True
    if src.op == "call_module" and isinstance(modules.get(str(src.target)), _LINEAR):
        return False
    return not (src.op == "call_function" and src.target in (F.linear, torch.matmul))


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return node.target == "relu_"
    if node.target in (torch.relu_, F.relu_, _aten.relu_.default, _aten.hardtanh_.default):
        return True
    return bool(node.kwargs.get("inplace", False)) or (len(node.args) > 1 and node.args[1] is True)


def _redirect_later_uses(graph: fx.Graph, node: fx.Node, bounded: fx.Node) -> None:
    """An in-place ReLU also changed its input tensor: readers of that input after the ReLU saw
    the activation, so they must see the bounded activation too."""
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(src.users):
        if user is not node and order[user] > order[bounded]:
            user.replace_input_with(src, bounded)


def _trace(model: nn.Module, sample: torch.Tensor) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the user needs the first line only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(
            f"cannot trace the model with torch.fx to find its ReLU sites: {first}"
        ) from None
    with torch.no_grad():
        ShapeProp(gm).propagate(sample)
    return gm


class BoundedNetwork(nn.Module):
    """The traced network with a ChannelBound after every ReLU-type call site. It shares the
    original weights (frozen) and exposes only the bounds as trainable parameters. The bounds
    live on `sample`'s device, which must be the model's."""

    def __init__(self, model: nn.Module, sample: torch.Tensor) -> None:
        super().__init__()
        gm = _trace(model, sample)
        modules = dict(gm.named_modules())
        sites: list[BoundSite] = []
        output_inputs = {n for n in gm.graph.nodes if n.op == "output"}
        # ReLU-type call sites (SPEC 1); in a network with none, its other activations
        relu_net = any(_is_relu(n, modules) for n in gm.graph.nodes)
        self.activation_kind = "relu" if relu_net else "other"

        def is_site(node: fx.Node) -> bool:
            if relu_net:
                return _is_relu(node, modules)
            meta = node.meta.get("tensor_meta")
            return (
                _is_other_activation(node, modules)
                and meta is not None
                and _channels_first(node, modules, len(meta.shape))
            )

        for node in list(gm.graph.nodes):
            if not is_site(node) or set(node.users) & output_inputs:
                continue  # the logit layer is never bounded
            meta = node.meta.get("tensor_meta")
            if meta is None or len(meta.shape) < 2:
                continue
            name = f"bound_{len(sites):02d}"
            gm.add_submodule(name, ChannelBound(int(meta.shape[1])).to(sample.device))
            with gm.graph.inserting_after(node):
                bounded = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(bounded, delete_user_cb=lambda u, b=bounded: u is not b)
            if _is_inplace(node, modules):
                _redirect_later_uses(gm.graph, node, bounded)
            if not bounded.users:  # a dead activation: nothing to bound
                gm.graph.erase_node(bounded)
                gm.delete_submodule(name)
                continue
            kind = {4: "conv", 2: "linear"}.get(len(meta.shape), "other")
            sites.append(BoundSite(name, node.name, kind, int(meta.shape[1])))
        if not sites:
            raise CalibrationError(
                "the model has no activation to bound: no ReLU-type one (nn.ReLU, nn.ReLU6, "
                f"F.relu, torch.relu) and none of {_OTHER_NAMES} on a channels-first tensor "
                "(a transformer's tokens and channels-last blocks have their channels last; "
                "bounded there, a toy vision transformer kept its backdoor: docs/RESULTS.md)"
            )
        gm.graph.lint()
        gm.recompile()
        for p in gm.parameters():
            p.requires_grad_(False)
        self.net = gm
        self.sites: tuple[BoundSite, ...] = tuple(sites)
        for b in self.bound_modules():
            b.bound.requires_grad_(True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def bound_modules(self) -> list[ChannelBound]:
        return [operator.attrgetter(s.name)(self.net) for s in self.sites]

    def bounds(self) -> list[nn.Parameter]:
        return [m.bound for m in self.bound_modules()]

    def clamp_(self) -> None:
        """Bounds stay >= 0 (SPEC 1), and at or below their ceiling where one is set."""
        with torch.no_grad():
            for m in self.bound_modules():
                m.bound.clamp_(min=0.0)
                if m.ceiling is not None:
                    torch.minimum(m.bound, m.ceiling, out=m.bound)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Track per-channel maxima during the forward passes inside the block."""
        mods = self.bound_modules()
        for m in mods:
            m.observed_max.zero_()
            m.recording = True
        try:
            yield
        finally:
            for m in mods:
                m.recording = False

    def init_bounds(
        self,
        mode: str | float,
        images: torch.Tensor,
        batch_size: int = 256,
        ceiling: bool = False,
    ) -> None:
        """`max`: per-channel maximum activation over `images`, so the bounded network starts
        equal to the original on them (SPEC 1, bound_init). A number: that constant.

        `ceiling`: `clamp_` keeps every bound at or below that per-channel maximum from then
        on. A bound above every activation the images produce does not change the network on
        them; it only lets larger activations, the kind a trigger drives, pass."""
        with torch.no_grad():
            for m in self.bound_modules():
                m.bound.fill_(float("inf"))
                m.ceiling = None
            if mode == "max" or ceiling:
                with self.recording():
                    for i in range(0, images.shape[0], batch_size):
                        self(images[i : i + batch_size])
            for m in self.bound_modules():
                if mode == "max":
                    m.bound.copy_(m.observed_max)
                else:
                    m.bound.fill_(float(mode))
                if ceiling:
                    m.ceiling = m.observed_max.clone()
            self.clamp_()
