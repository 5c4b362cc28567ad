"""FuseLayerNorm: a decomposed layer norm over the last axis becomes LayerNormalization."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.frontend.canonical._match import (
    Ctx,
    PatternPass,
    Skip,
    insert_before,
    node_label,
    other,
    remove_nodes,
)
from intq.frontend.export import default_opset
from intq.ir import NameGen, attrs


def _find(
    ctx: Ctx, name: str, op: str, pred: Callable[[onnx.NodeProto], bool] = lambda n: True
) -> onnx.NodeProto | None:
    """The first reader of `name` of type `op` satisfying `pred`."""
    return next((n for n in ctx.readers(name) if n.op_type == op and pred(n)), None)


def _const_operand(ctx: Ctx, node: onnx.NodeProto | None, name: str) -> np.ndarray | None:
    """The constant other operand of binary `node` reading `name`."""
    if node is None:
        return None
    o = other(node, name)
    return None if o is None or o == name else ctx.const(o)


class FuseLayerNorm(PatternPass):
    """Pattern (any operand order of the commutative ops):
        mean = ReduceMean(x, axes);  d = Sub(x, mean);  sq = Pow(d, 2) | Mul(d, d)
        var = ReduceMean(sq, axes);  std = Sqrt(Add(var, eps))
        n = Div(d, std) | Mul(d, Reciprocal(std));  [n = Mul(n, gamma)];  [n = Add(n, beta)]
    with axes as attribute (opset < 18) or constant input (opset >= 18).
    Check: both reductions over exactly the last axis with keepdims=1, exponent 2, scalar eps,
    intermediates read only inside the pattern, gamma/beta broadcast along the last axis only.
    Rewrite: `LayerNormalization(x, gamma or 1, [beta], axis=-1, epsilon=eps) -> n`."""

    anchors = ("ReduceMean",)
    needs_shapes = True

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        # ---- pattern
        x, mean = node.input[0], node.output[0]
        sub = _find(ctx, mean, "Sub", lambda n: list(n.input) == [x, mean])
        if sub is None:
            return None
        d = sub.output[0]
        sq = next(
            (
                n
                for n in ctx.readers(d)
                if (n.op_type == "Pow" and n.input[0] == d)
                or (n.op_type == "Mul" and list(n.input) == [d, d])
            ),
            None,
        )
        rm2 = sq and _find(ctx, sq.output[0], "ReduceMean")
        add = rm2 and _find(ctx, rm2.output[0], "Add")
        sqrt = add and _find(ctx, add.output[0], "Sqrt")
        if sqrt is None or sq is None or rm2 is None or add is None:
            return None
        std = sqrt.output[0]
        norm = _find(ctx, d, "Div", lambda n: list(n.input) == [d, std])
        chain = [node, sub, sq, rm2, add, sqrt]
        if norm is None:
            rec = _find(ctx, std, "Reciprocal")
            norm = rec and _find(ctx, d, "Mul", lambda n: other(n, d) == rec.output[0])
            if norm is None:
                return None
            chain.append(rec)
        chain.append(norm)
        # ---- checks
        shape = ctx.shapes.get(x)
        if not shape or shape[-1] is None:
            return Skip(f"shape of {x!r} (rank, last dimension) unknown")
        rank, c = len(shape), shape[-1]
        for rm in (node, rm2):
            axes = self._axes(ctx, rm)
            if isinstance(axes, str):
                return Skip(axes)
            if [a % rank for a in axes] != [rank - 1]:
                return Skip(f"{node_label(rm)} reduces over axes {axes}, not the last axis only")
            if attrs(rm).get("keepdims", 1) != 1:
                return Skip(f"{node_label(rm)} has keepdims=0")
        if sq.op_type == "Pow":
            p = ctx.scalar(sq.input[1])
            if p is None or p != 2.0:
                return Skip(f"exponent of {node_label(sq)} is not the constant 2")
        eps = ctx.scalar(other(add, rm2.output[0]) or "", like=rm2.output[0])
        if eps is None or eps < 0:
            return Skip(f"{node_label(add)} does not add a non-negative scalar epsilon")
        inside = {id(n) for n in chain}
        for n in chain[:-1]:
            for t in n.output:
                if t in ctx.outputs or any(id(r) not in inside for r in ctx.readers(t)):
                    return Skip(f"intermediate {t!r} has consumers outside the pattern")
        if default_opset(ctx.model) < 17:
            return Skip("LayerNormalization needs opset >= 17")
        # ---- optional affine tail
        out, gamma, beta = norm.output[0], None, None
        mul = ctx.sole_reader(out)
        g = _const_operand(ctx, mul if mul and mul.op_type == "Mul" else None, out)
        if g is not None and self._per_channel(g, c, rank):
            chain.append(mul)
            out, gamma = mul.output[0], g
        addb = ctx.sole_reader(out)
        b = _const_operand(ctx, addb if addb and addb.op_type == "Add" else None, out)
        if b is not None and self._per_channel(b, c, rank):
            chain.append(addb)
            out, beta = addb.output[0], b
        # ---- rewrite
        dtype = (gamma if gamma is not None else ctx.const(other(add, rm2.output[0]))).dtype
        names = NameGen(ctx.g)
        scale = np.broadcast_to(np.ones(1, dtype) if gamma is None else gamma.reshape(-1), (c,))
        ins = [x, names(f"{out}_scale")]
        ctx.g.initializer.append(numpy_helper.from_array(scale.astype(dtype), ins[1]))
        if beta is not None:
            ins.append(names(f"{out}_bias"))
            bias = np.broadcast_to(beta.reshape(-1), (c,)).astype(dtype)
            ctx.g.initializer.append(numpy_helper.from_array(bias, ins[2]))
        ln = helper.make_node(
            "LayerNormalization", ins, [out], names(f"{node.name or x}_ln"), axis=-1, epsilon=eps
        )
        insert_before(ctx.g, chain[-1], [ln])
        remove_nodes(ctx.g, chain)
        return f"{len(chain)} nodes from {node_label(node)} -> LayerNormalization {ln.name!r}"

    @staticmethod
    def _axes(ctx: Ctx, rm: onnx.NodeProto) -> list[int] | str:
        a = attrs(rm)
        if "axes" in a:
            return [int(v) for v in a["axes"]]  # type: ignore[union-attr]
        if len(rm.input) > 1 and rm.input[1]:
            v = ctx.const(rm.input[1])
            return (
                f"axes of {node_label(rm)} are not constant"
                if v is None
                else [int(i) for i in v.reshape(-1)]
            )
        return f"{node_label(rm)} reduces over all axes"

    @staticmethod
    def _per_channel(v: np.ndarray, c: int, rank: int) -> bool:
        """`v` broadcasts along the last axis only and does not raise the rank."""
        return (
            v.size in (1, c)
            and all(s == 1 for s in v.shape[:-1])
            and v.ndim <= rank
            and np.issubdtype(v.dtype, np.floating)
        )
