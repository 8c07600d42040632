"""Fold the bounded network's per-channel `Min` nodes into the surrounding weights.

The bounded export (calibrate.bounded) puts ``Min(Relu(z), b)`` after every ReLU call site, with a
constant per-channel bound ``b >= 0``. onnxruntime cannot fuse a per-channel `Min` into anything,
and on x86 it also has to leave its blocked (NCHWc) layout around each one, so every site costs two
reorders and an elementwise pass, and a residual ``Add`` + ``Relu`` no longer fuses into its Conv.

For ``b > 0``: ``min(relu(z), b) = b * clip(z / b, 0, 1)``.

Conv (or Gemm) -> Relu -> Min: the producer's output channels are divided by ``b`` (weights and
bias), ``Clip(0, 1)`` follows and fuses into it, and the factor ``b`` moves into the consumers:
the input channels of a Conv (zero padding commutes with the scale; groups handled), Gemm or
MatMul, through max/average/global pooling and Flatten (all commute with a per-channel scale
``>= 0``). A consumer that cannot take it gets one per-channel scaling node.

Add -> Relu -> Min (a residual block): onnxruntime's NCHWc Conv can absorb the Add (as its "Sum"
input) but then fuses only Relu, never Clip, so a Clip right after the Add would cost two reorders.
Instead the Add is made to yield ``y / p`` with ``p`` the scale of an identity shortcut that is
itself a folded site's output, so the shortcut's unscaled tensor is added as is (no node), the other
operand takes ``1 / p`` in its producer's weights, and one depthwise 1x1 Conv multiplies by
``p / b`` and carries the fused Clip: one cheap elementwise node in the blocked layout per residual
site. That node is the least this onnxruntime allows: the Clip needs an op of its own once the Add
is fused, and the Add must be fused for the original's speed. (`residual="clip"` instead divides
both operands by ``b`` and puts the Clip right after the Add.)

A channel with ``b`` below `TINY` is constant zero: its producer row and bias (or depthwise weight)
become 0, so the clip gives exactly 0, and its scale is 0. Sites that do not match are left as
they are and counted in the stats with a reason.

`fold_bounds` is a pure rewrite of the ONNX graph: same inputs and outputs, dynamic batch kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["TINY", "fold_bounds"]

# A bound below this is treated as 0: the channel's activation is at most TINY, and becomes 0.
TINY = 1e-12
# Consumers through which a non-negative per-channel scale (channel axis 1) passes unchanged.
_PASS_THROUGH = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
_FLOATS = (np.float32, np.float64, np.float16)
# Producers whose output channels can take a scale in their constant inputs.
_PRODUCERS = ("Conv", "Gemm", "MatMul", "BatchNormalization")


@dataclass
class _Scaled:
    """Tensor `name` (no longer produced) equals `scale` (along axis 1) times tensor `base`."""

    name: str
    base: str
    scale: np.ndarray
    rank: int
    dtype: Any


class _Skip(Exception):
    """This site cannot be rewritten exactly; the message is the reason in the stats."""


def fold_bounds(
    model: onnx.ModelProto, *, scaler: str = "conv", residual: str = "dwclip"
) -> tuple[onnx.ModelProto, dict]:
    """An equivalent, faster copy of a bounded model (the input is not modified), and stats.

    `residual`: how an Add -> Relu -> Min site is rewritten, "dwclip" (a depthwise 1x1 Conv with
    the Clip after the Add; the default) or "clip" (the Clip right after the Add).
    `scaler`: the node used where a per-channel scale on a tensor of rank >= 3 cannot be folded
    into weights, "conv" (a depthwise 1x1 Conv, which onnxruntime keeps in its blocked layout)
    or "mul" (a broadcast Mul); 2-D tensors always use Mul.

    Stats: `sites` (Min nodes), `rewritten`, `skipped` ({reason: count}), `folded` (consumer
    edges that took a scale into their weights), `passed_through` (pooling/Flatten edges the
    scale moved through), `scale_nodes` (per-channel scaling nodes added), `residual_nodes`
    (depthwise Clip carriers added at residual sites), `zero_channels` (bounds below TINY),
    `min_nodes_before`/`min_nodes_after` and `nodes_before`/`nodes_after`.
    """
    if scaler not in ("conv", "mul"):
        raise ValueError(f"scaler must be 'conv' or 'mul', got {scaler!r}")
    if residual not in ("dwclip", "clip"):
        raise ValueError(f"residual must be 'dwclip' or 'clip', got {residual!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    folder = _Folder(out, scaler, residual)
    folder.run()
    return out, folder.stats


class _Folder:
    def __init__(self, model: onnx.ModelProto, scaler: str, residual: str) -> None:
        self.residual = residual
        self.model = model
        self.graph = model.graph
        self.scaler = scaler
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_arrays: dict[str, np.ndarray] = {}
        self.scaled: dict[str, _Scaled] = {}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.shapes, self.types = _static_shapes(model)
        self.names = _all_names(self.graph)
        self.counter = 0
        self.limits: dict[str, tuple[str, str]] = {}
        self.skipped: Counter[str] = Counter()
        self.stats: dict[str, Any] = {
            "sites": 0,
            "rewritten": 0,
            "skipped": {},
            "folded": 0,
            "passed_through": 0,
            "scale_nodes": 0,
            "residual_nodes": 0,
            "zero_channels": 0,
            "min_nodes_before": sum(n.op_type == "Min" for n in self.nodes),
            "nodes_before": len(self.nodes),
        }

    # -- graph queries ------------------------------------------------------------------------

    def producer(self, name: str) -> onnx.NodeProto | None:
        for n in self.nodes:
            if name in n.output:
                return n
        return None

    def consumers(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n in self.nodes for i, x in enumerate(n.input) if x == name]

    def used_only_by(self, name: str, node: onnx.NodeProto) -> bool:
        users = self.consumers(name)
        return (
            name not in self.graph_outputs
            and len(users) == 1
            and users[0][0] is node
            and name not in self.scaled
        )

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer, a Constant or an Identity of one."""
        if not name:
            return None
        if name in self.new_arrays:
            return self.new_arrays[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def fresh(self, base: str) -> str:
        while True:
            self.counter += 1
            name = f"{base}__fold{self.counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    # -- edits --------------------------------------------------------------------------------

    def weight(self, node: onnx.NodeProto, idx: int) -> np.ndarray:
        """The current value of constant input `idx` of `node`, as float64 for the edit."""
        value = self.constant(node.input[idx])
        if value is None or value.dtype.type not in _FLOATS:
            raise _Skip(f"{node.op_type} input {idx} is not a float constant")
        return value.astype(np.float64)

    def set_weight(self, node: onnx.NodeProto, idx: int, value: np.ndarray, dtype: Any) -> None:
        """Give `node` its own initializer for input `idx` (shared ones stay untouched)."""
        name = node.input[idx] if idx < len(node.input) else ""
        if name not in self.new_arrays:
            name = self.fresh(f"{node.name or node.op_type}_{'WBC'[min(idx, 2) - 1]}")
            while len(node.input) <= idx:
                node.input.append("")
            node.input[idx] = name
        self.new_arrays[name] = value.astype(dtype)

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_arrays[name] = value
        return name

    def insert_before(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self.nodes.insert(next(i for i, n in enumerate(self.nodes) if n is anchor), node)

    def scale_node(self, src: str, scale: np.ndarray, rank: int, out: str, dtype: Any) -> None:
        """out = scale (per channel, axis 1) * src, as a depthwise 1x1 Conv or a Mul."""
        channels = scale.shape[0]
        if self.scaler == "conv" and rank >= 3:
            w = self.add_const("fold_scale", scale.reshape((channels,) + (1,) * (rank - 1)))
            node = helper.make_node(
                "Conv",
                [src, w],
                [out],
                name=self.fresh("fold_scale_conv"),
                group=channels,
                kernel_shape=[1] * (rank - 2),
            )
        else:
            s = self.add_const("fold_scale", scale.reshape((1, channels) + (1,) * (rank - 2)))
            node = helper.make_node("Mul", [src, s], [out], name=self.fresh("fold_scale_mul"))
        self.new_arrays[node.input[1]] = self.new_arrays[node.input[1]].astype(dtype)
        first_user = next((n for n in self.nodes if out in n.input), None)
        if first_user is None:
            self.nodes.append(node)
        else:
            self.insert_before(first_user, node)
        self.stats["scale_nodes"] += 1

    # -- the pass -----------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.nodes):
            if node.op_type == "Min":
                self.stats["sites"] += 1
                try:
                    self.rewrite_site(node)
                    self.stats["rewritten"] += 1
                except _Skip as why:
                    self.skipped[str(why)] += 1
        self.resolve_scaled()
        self.finish()

    def rewrite_site(self, mn: onnx.NodeProto) -> None:
        if len(mn.input) != 2:
            raise _Skip("Min with other than two operands")
        consts = [self.constant(x) for x in mn.input]
        if (consts[0] is None) == (consts[1] is None):
            raise _Skip("Min operand is not one tensor and one constant")
        k = 0 if consts[0] is None else 1
        x, bound = mn.input[k], consts[1 - k]
        assert bound is not None
        act = self.producer(x)
        cap = self.relu_cap(act)
        if act is None or cap is None:
            raise _Skip("Min does not follow a ReLU")
        if not self.used_only_by(x, mn):
            raise _Skip("ReLU output has other users")
        if bound.dtype.type not in _FLOATS:
            raise _Skip("bound is not floating point")
        rank = bound.ndim
        if rank < 2 or bound.shape[1] != bound.size:
            raise _Skip("bound is not per-channel along axis 1")
        if self.rank_of(x) not in (None, rank):
            raise _Skip("bound rank differs from the activation's")
        b = np.minimum(bound.reshape(-1).astype(np.float64), cap)
        if not np.all(np.isfinite(b)):
            raise _Skip("non-finite bound")
        if np.any(b < 0):
            raise _Skip("negative bound")
        live = b >= TINY
        inv = np.where(live, 1.0 / np.where(live, b, 1.0), 0.0)
        scale = np.where(live, b, 0.0)
        z = act.input[0]
        if not self.used_only_by(z, act):
            raise _Skip("pre-activation has other users")
        prod = self.producer(z)
        if prod is None:
            raise _Skip("pre-activation is a graph input")
        dtype = bound.dtype
        clip_input = z
        if prod.op_type == "Add" and self.residual == "dwclip" and rank >= 3:
            # The Add yields y / p, p being the scale of an identity shortcut so that it needs no
            # node; then one depthwise 1x1 Conv by p / b carries the Clip (onnxruntime fuses it).
            # A Clip right after the Add would not fuse: the NCHWc Conv+Sum takes only Relu.
            p, plan = self.plan_residual(prod, rank, len(b))
            for edit in plan:
                edit()
            channels = len(b)
            weight = np.where(live, p * inv, 0.0).reshape((channels,) + (1,) * (rank - 1))
            clip_input = self.fresh(f"{z}_dw")
            dw = helper.make_node(
                "Conv",
                [z, self.add_const("fold_dw", weight.astype(dtype))],
                [clip_input],
                name=self.fresh("fold_dw_conv"),
                group=channels,
                kernel_shape=[1] * (rank - 2),
            )
            self.insert_before(act, dw)
            self.stats["residual_nodes"] += 1
        else:
            # All checks before any edit: a plan is a list of edits that cannot fail.
            for edit in self.plan_output_scale(prod, z, inv, rank):
                edit()
        lo, hi = self.clip_limits(dtype)
        clipped = self.fresh(mn.output[0])
        if self.opset >= 11:
            clip = helper.make_node(
                "Clip", [clip_input, lo, hi], [clipped], name=self.fresh("fold_clip")
            )
        else:
            clip = helper.make_node(
                "Clip", [clip_input], [clipped], name=self.fresh("fold_clip"), min=0.0, max=1.0
            )
        self.insert_before(act, clip)
        self.nodes.remove(act)
        self.nodes.remove(mn)
        self.scaled[mn.output[0]] = _Scaled(mn.output[0], clipped, scale, rank, dtype)
        self.stats["zero_channels"] += int((~live).sum())

    def plan_residual(self, add: onnx.NodeProto, rank: int, n: int) -> tuple[np.ndarray, list]:
        """Edits that make a residual Add yield y / p, and p (> 0 per channel): the scale of an
        operand that is a folded site's output (its zero channels are exactly 0 there, so any
        p works for them: 1), else 1."""
        if len(add.input) != 2 or add.domain not in ("", "ai.onnx"):
            raise _Skip("pre-activation comes from an Add with other than two operands")
        p, anchor = np.ones(n), None
        for i, name in enumerate(add.input):
            s = self.scaled.get(name)
            if s is not None and s.rank == rank and len(s.scale) == n:
                p, anchor = np.where(s.scale > 0, s.scale, 1.0), i
                break
        plan: list[Any] = []
        for i in range(2):
            if i == anchor:
                base = self.scaled[add.input[i]].base

                def use_base(i: int = i, base: str = base) -> None:
                    add.input[i] = base

                plan.append(use_base)
            else:
                plan.append(self.plan_add_operand(add, i, 1.0 / p, rank))
        return p, plan

    def clip_limits(self, dtype: Any) -> tuple[str, str]:
        """Shared 0 and 1 initializers for the Clip nodes."""
        key = np.dtype(dtype).str
        if key not in self.limits:
            self.limits[key] = (
                self.add_const("fold_zero", np.zeros((), dtype)),
                self.add_const("fold_one", np.ones((), dtype)),
            )
        return self.limits[key]

    def relu_cap(self, act: onnx.NodeProto | None) -> float | None:
        """inf for Relu, the upper limit for Clip(0, m) (ReLU6), None for anything else."""
        if act is None or act.domain not in ("", "ai.onnx"):
            return None
        if act.op_type == "Relu":
            return float("inf")
        if act.op_type != "Clip":
            return None
        lo: Any = None
        hi: Any = float("inf")
        if self.opset < 11:
            attrs = {a.name: helper.get_attribute_value(a) for a in act.attribute}
            lo, hi = attrs.get("min"), attrs.get("max", hi)
        else:
            if len(act.input) > 1 and act.input[1]:
                lo = self.constant(act.input[1])
            if len(act.input) > 2 and act.input[2]:
                hi = self.constant(act.input[2])
                if hi is None:
                    return None
        if lo is None or np.size(lo) != 1 or np.size(hi) != 1 or float(lo) != 0.0:
            return None
        return float(hi)

    def rank_of(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    # -- scaling a producer's output channels by inv ------------------------------------------

    def plan_output_scale(
        self, prod: onnx.NodeProto, out: str, inv: np.ndarray, rank: int
    ) -> list[Any]:
        if prod.op_type in _PRODUCERS and prod.domain in ("", "ai.onnx"):
            return [self.plan_weighted_output(prod, inv, rank)]
        if prod.op_type == "Add" and prod.domain in ("", "ai.onnx") and len(prod.input) == 2:
            return [self.plan_add_operand(prod, i, inv, rank) for i in range(2)]
        raise _Skip(f"pre-activation comes from {prod.op_type}")

    def plan_weighted_output(self, node: onnx.NodeProto, inv: np.ndarray, rank: int) -> Any:
        """Scale the output channels of a Conv, Gemm, 2-D MatMul or inference BatchNormalization
        by `inv` (returns the edit)."""
        n = len(inv)
        w = self.weight(node, 1)
        dtype = self.constant(node.input[1]).dtype  # type: ignore[union-attr]
        bias = self.weight(node, 2) if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "BatchNormalization":
            # y = scale * (x - mean) / sqrt(var + eps) + B: scale and B carry the factor
            if len(node.output) != 1 or bias is None or w.shape != (n,) or bias.shape != (n,):
                raise _Skip("BatchNormalization is not a per-channel inference one")
            w_new, b_new = w * inv, bias * inv
        elif node.op_type == "Conv":
            if w.ndim != rank or w.shape[0] != n:
                raise _Skip("Conv weight does not match the bound")
            w_new = w * inv.reshape((n,) + (1,) * (w.ndim - 1))
            b_new = None if bias is None else bias * inv
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if rank != 2:
                raise _Skip("Gemm output is not 2-D")
            trans_b = bool(attrs.get("transB", 0))
            if w.ndim != 2 or w.shape[0 if trans_b else 1] != n:
                raise _Skip("Gemm weight does not match the bound")
            w_new = w * (inv[:, None] if trans_b else inv[None, :])
            b_new = None
            if bias is not None:
                if bias.size not in (1, n) or (bias.ndim == 2 and bias.shape[0] != 1):
                    raise _Skip("Gemm bias is not per-output")
                b_new = np.broadcast_to(bias.reshape(-1), (n,)) * inv
        else:  # MatMul: activation @ W
            if (
                rank != 2
                or w.ndim != 2
                or w.shape[1] != n
                or self.constant(node.input[0]) is not None
            ):
                raise _Skip("MatMul is not a 2-D activation times a constant")
            w_new, b_new = w * inv[None, :], None

        def edit() -> None:
            self.set_weight(node, 1, w_new, dtype)
            if b_new is not None:
                self.set_weight(node, 2, b_new, dtype)

        return edit

    def plan_add_operand(self, add: onnx.NodeProto, idx: int, inv: np.ndarray, rank: int) -> Any:
        """Make operand `idx` of an Add enter multiplied by `inv` per channel (returns the edit):
        in a constant, in the weights of a producer used only here, else by a scaling node
        (merged with the operand's own scale when it is a folded site's output)."""
        name = add.input[idx]
        n = len(inv)
        const = self.constant(name)
        if const is not None:
            if const.dtype.type not in _FLOATS:
                raise _Skip("Add operand is not floating point")
            value = _scale_broadcast(const.astype(np.float64), inv, rank)
            if value is None:
                raise _Skip("Add constant does not broadcast per channel")

            def edit_const() -> None:
                add.input[idx] = self.add_const("fold_add", value.astype(const.dtype))

            return edit_const
        prod = self.producer(name)
        if (
            prod is not None
            and prod.op_type in _PRODUCERS
            and prod.domain in ("", "ai.onnx")
            and add.input[1 - idx] != name
            and self.used_only_by(name, add)
        ):
            if np.all(inv == 1.0):
                return lambda: None
            try:
                return self.plan_weighted_output(prod, inv, rank)
            except _Skip:
                pass
        if name not in self.scaled and np.all(inv == 1.0):
            return lambda: None
        dtype = self.dtype_of(name)
        src, scale = name, inv
        if name in self.scaled:
            s = self.scaled[name]
            if s.rank != rank or len(s.scale) != n:
                raise _Skip("residual operand has another channel layout")
            src, scale = s.base, s.scale * inv

        def edit_scale() -> None:
            out = self.fresh(f"{name}_scaled")
            add.input[idx] = out
            self.scale_node(src, scale, rank, out, dtype)

        return edit_scale

    def dtype_of(self, name: str) -> Any:
        """The float dtype to use for a scale on `name`: its inferred type, else float32."""
        elem = self.types.get(name)
        return np.float32 if elem is None else helper.tensor_dtype_to_np_dtype(elem)

    # -- giving the scale to the consumers ---------------------------------------------------

    def resolve_scaled(self) -> None:
        """Give each folded site's scale to its consumers: into their weights, through pooling and
        Flatten, or, for any consumer that takes neither, back by one scaling node."""
        work = list(self.scaled.values())
        while work:
            item = work.pop(0)
            materialize = item.name in self.graph_outputs
            users = self.consumers(item.name)
            counts = Counter(id(n) for n, _ in users)
            for node, idx in users:
                if counts[id(node)] > 1 or idx != 0:
                    materialize = True
                elif self.fold_into(node, item):
                    node.input[0] = item.base
                    self.stats["folded"] += 1
                elif (nxt := self.pass_through(node, item)) is not None:
                    node.input[0] = item.base
                    self.stats["passed_through"] += 1
                    work.append(nxt)
                else:
                    materialize = True
            if materialize:
                self.scale_node(
                    item.base,
                    item.scale,
                    item.rank,
                    item.name,
                    item.dtype,
                )

    def fold_into(self, node: onnx.NodeProto, item: _Scaled) -> bool:
        """Scale the input channels of a Conv/Gemm/MatMul reading `item` (True if done)."""
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            return False
        s, n = item.scale, len(item.scale)
        try:
            w = self.weight(node, 1)
        except _Skip:
            return False
        dtype = self.constant(node.input[1]).dtype  # type: ignore[union-attr]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            group = int(attrs.get("group", 1))
            if w.ndim != item.rank or w.shape[1] * group != n or w.shape[0] % group:
                return False
            per_group_in, per_group_out = w.shape[1], w.shape[0] // group
            # output channel o reads input channel g*per_group_in + j through w[o, j]
            groups = np.arange(w.shape[0]) // per_group_out
            cols = groups[:, None] * per_group_in + np.arange(per_group_in)[None, :]
            w_new = w * s[cols].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        elif node.op_type == "Gemm":
            if item.rank != 2 or attrs.get("transA", 0):
                return False
            trans_b = bool(attrs.get("transB", 0))
            if w.ndim != 2 or w.shape[1 if trans_b else 0] != n:
                return False
            w_new = w * (s[None, :] if trans_b else s[:, None])
        else:
            if item.rank != 2 or w.ndim != 2 or w.shape[0] != n:
                return False
            w_new = w * s[:, None]
        self.set_weight(node, 1, w_new, dtype)
        return True

    def pass_through(self, node: onnx.NodeProto, item: _Scaled) -> _Scaled | None:
        """Move the scale past a pooling op or a Flatten (the op now reads the unscaled base)."""
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return None
        out = node.output[0]
        if node.op_type in _PASS_THROUGH:
            new = _Scaled(out, self.fresh(out), item.scale, item.rank, item.dtype)
        elif node.op_type == "Flatten":
            axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
            shape = self.shapes.get(item.name)
            if axis != 1 or shape is None or len(shape) != item.rank:
                return None
            inner = shape[2:]
            if any(not isinstance(d, int) for d in inner):
                return None
            scale = np.repeat(item.scale, int(np.prod(inner, dtype=np.int64)))
            new = _Scaled(out, self.fresh(out), scale, 2, item.dtype)
        else:
            return None
        node.output[0] = new.base
        return new

    # -- write back ---------------------------------------------------------------------------

    def finish(self) -> None:
        for name, value in self.new_arrays.items():
            self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        nodes = _dead_code_removed(self.nodes, self.graph_outputs)
        nodes = _toposorted(nodes, {i.name for i in self.graph.input} | _init_names(self.graph))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {x for n in nodes for x in n.input} | self.graph_outputs
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        produced = {x for n in nodes for x in n.output}
        keep_vi = [v for v in self.graph.value_info if v.name in produced]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep_vi)
        self.skipped_to_stats()
        self.stats["min_nodes_after"] = sum(n.op_type == "Min" for n in nodes)
        self.stats["nodes_after"] = len(nodes)

    def skipped_to_stats(self) -> None:
        self.stats["skipped"] = dict(self.skipped)


def _scale_broadcast(value: np.ndarray, inv: np.ndarray, rank: int) -> np.ndarray | None:
    """`value` (broadcast against a rank-`rank` tensor) times inv along axis 1, or None."""
    if value.ndim > rank:
        return None
    axis = 1 - (rank - value.ndim)
    if axis < 0:  # the constant does not reach the channel axis: it is the same for all of them
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        axis = 1
    if value.shape[axis] not in (1, len(inv)):
        return None
    shape = [1] * value.ndim
    shape[axis] = len(inv)
    return value * inv.reshape(shape)


def _static_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, int]]:
    """name -> dims (int, or "?" where unknown or symbolic) and name -> element type, from onnx
    shape inference (empty where it fails: it is a help, not a requirement)."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return {}, {}
    shapes: dict[str, list] = {}
    types: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.elem_type:
            types[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else "?" for d in t.shape.dim]
    return shapes, types


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | _init_names(graph)
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    names.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    return names


def _init_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer}


def _dead_code_removed(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    nodes = list(nodes)
    while True:
        used = {x for n in nodes for x in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def _toposorted(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order, keeping the given order wherever it is already valid."""
    ready = set(available) | {""}
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        for i, n in enumerate(pending):
            if all(x in ready for x in n.input):
                out.append(n)
                ready.update(n.output)
                del pending[i]
                break
        else:
            raise ValueError("fold_bounds produced a graph with a cycle or a missing input")
    return out
