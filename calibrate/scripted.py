"""TorchScript to torch.fx: rebuild a scripted or traced model as a GraphModule of aten calls.

torch.fx cannot trace a ScriptModule, but its frozen graph is a list of aten operations. Replaying
that list into an fx graph gives a plain nn.Module that the bound inserter, autograd and the ONNX
exporter handle like any other model. The replay also runs every operation on a sample input, so
branches (`prim::If`) that depend only on shapes or constants are resolved for that input shape;
values that depend on the batch size (`aten::size`) stay in the graph.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from calibrate.errors import CalibrationError

_STATIC = {"aten::dim", "aten::len", "aten::__is__", "aten::__isnot__", "aten::__not__"}
_SKIPPED = {"prim::RaiseException", "aten::warn", "prim::Print"}


class _Replay:
    """Walks the frozen graph keeping, for each TorchScript value, the fx argument that stands for
    it (a Node, or a plain constant) and its concrete value on the sample input."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.fx: dict[Any, Any] = {}
        self.val: dict[Any, Any] = {}

    def constant(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"const_{len(self.root._buffers)}"
            self.root.register_buffer(name, value.detach().clone())
            return self.graph.get_attr(name)
        return value

    def block(self, nodes: Any) -> None:
        for node in nodes:
            self.node(node)

    def node(self, node: Any) -> None:
        kind = node.kind()
        outs = list(node.outputs())
        if kind in _SKIPPED:
            return
        if kind == "prim::Constant":
            if outs:
                value = outs[0].toIValue()
                self.fx[outs[0]], self.val[outs[0]] = self.constant(value), value
            return
        if kind == "prim::If":
            cond = bool(self.val[next(iter(node.inputs()))])
            chosen = list(node.blocks())[0 if cond else 1]
            self.block(chosen.nodes())
            for o, r in zip(outs, chosen.outputs(), strict=True):
                self.fx[o], self.val[o] = self.fx[r], self.val[r]
            return
        ins = list(node.inputs())
        fx_args = [self.fx[v] for v in ins]
        vals = [self.val[v] for v in ins]
        fn, n_positional, kw_names = _function(node)
        result = fn(*vals[:n_positional], **dict(zip(kw_names, vals[n_positional:], strict=True)))
        dynamic = any(isinstance(a, fx.Node) for a in _flatten(fx_args)) and kind not in _STATIC
        if dynamic and isinstance(result, torch.Tensor | tuple | list | int | float | bool):
            kwargs = dict(zip(kw_names, fx_args[n_positional:], strict=True))
            node_out: Any = self.graph.call_function(fn, tuple(fx_args[:n_positional]), kwargs)
        else:
            node_out = self.constant(result)
        if len(outs) == 1:
            self.fx[outs[0]], self.val[outs[0]] = node_out, result
        else:
            for i, o in enumerate(outs):
                item = (
                    self.graph.call_function(_getitem, (node_out, i))
                    if isinstance(node_out, fx.Node)
                    else self.constant(result[i])
                )
                self.fx[o], self.val[o] = item, result[i]


def _flatten(args: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for a in args:
        flat.extend(_flatten(list(a)) if isinstance(a, list | tuple) else [a])
    return flat


_PRIMS = {
    "prim::ListConstruct": lambda *items: list(items),
    "prim::TupleConstruct": lambda *items: tuple(items),
    "prim::ListUnpack": lambda x: x,
    "prim::TupleUnpack": lambda x: x,
    "prim::NumToTensor": torch.scalar_tensor,
    "prim::device": lambda t: t.device,
    "prim::dtype": lambda t: t.dtype,
}

_TENSOR = torch._C.TensorType.get()
_SCALAR_OPS = {
    "aten::len": len,
    "aten::__getitem__": operator.getitem,
    "aten::eq": operator.eq,
    "aten::ne": operator.ne,
    "aten::lt": operator.lt,
    "aten::gt": operator.gt,
    "aten::le": operator.le,
    "aten::ge": operator.ge,
    "aten::add": operator.add,
    "aten::sub": operator.sub,
    "aten::mul": operator.mul,
    "aten::floordiv": operator.floordiv,
    "aten::__not__": operator.not_,
    "aten::__is__": operator.is_,
    "aten::__isnot__": operator.is_not,
    "aten::Int": int,
    "aten::Float": float,
    "aten::Bool": bool,
}


def _function(node: Any) -> tuple[Any, int, list[str]]:
    """The callable for a node, how many of its inputs are positional, and the keyword names of
    the rest (aten schemas have keyword-only arguments such as add's `alpha`)."""
    kind = node.kind()
    n_in = len(list(node.inputs()))
    if kind in _PRIMS:
        return _PRIMS[kind], n_in, []
    if kind in _SCALAR_OPS and not any(i.type().isSubtypeOf(_TENSOR) for i in node.inputs()):
        return _SCALAR_OPS[kind], n_in, []
    if kind.startswith("aten::"):
        schema = torch._C.parse_schema(node.schema())
        packet = getattr(torch.ops.aten, kind.split("::", 1)[1], None)
        op = getattr(packet, schema.overload_name or "default", None) if packet else None
        if op is not None:
            kw = [a.name for a in schema.arguments if a.kwarg_only]
            return op, len(schema.arguments) - len(kw), kw
    raise CalibrationError(
        f"TorchScript operation {kind} is not supported (a loop or a custom class?)"
    )


def script_to_fx(module: torch.jit.ScriptModule, sample: torch.Tensor) -> fx.GraphModule:
    """Rebuild `module` as a GraphModule and check it reproduces the module on `sample`."""
    try:
        with warnings.catch_warnings():  # freeze's deprecation notice is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            frozen = torch.jit.freeze(module.eval())
    except Exception as exc:
        raise CalibrationError(f"cannot freeze the TorchScript model: {_first(exc)}") from None
    graph = frozen.graph
    replay = _Replay()
    inputs = list(graph.inputs())[1:]  # the first input is `self`
    if len(inputs) != 1:
        raise CalibrationError(f"the TorchScript model takes {len(inputs)} inputs; expected one")
    replay.fx[inputs[0]], replay.val[inputs[0]] = replay.graph.placeholder("x"), sample
    with torch.no_grad():
        replay.block(graph.nodes())
    outputs = [replay.fx[v] for v in graph.outputs()]
    replay.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = fx.GraphModule(replay.root, replay.graph).eval()
    with torch.no_grad():
        want, got = module(sample), gm(sample)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise CalibrationError("the rebuilt TorchScript model returns a different output shape")
    diff = float((got - want).abs().max())
    if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
        raise CalibrationError(f"the rebuilt TorchScript model differs from it by {diff:.3g}")
    return gm


def _getitem(seq: Any, i: int) -> Any:
    return seq[i]


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
