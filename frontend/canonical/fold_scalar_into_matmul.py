"""FoldScalarIntoMatMul: attention's scalar scaling moves behind the activation MatMul."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.frontend.canonical._match import Ctx, PatternPass, Skip, node_label, remove_nodes
from intq.ir import NameGen


def _scaling(ctx: Ctx, p: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """For p = Mul(t, c) | Mul(c, t) | Div(t, c), c constant and t not: (t, c)."""
    for k in (1, 0) if p.op_type == "Mul" else (1,):
        c = ctx.const(p.input[k])
        if c is not None and not ctx.is_const(p.input[1 - k]):
            return p.input[1 - k], c
    return None


def _not_positive_scalar(c: np.ndarray) -> str | None:
    """Why `c` is not a positive float scalar (None when it is)."""
    if c.size != 1 or not np.issubdtype(c.dtype, np.floating):
        return f"the constant has shape {list(c.shape)} and dtype {c.dtype}, not a float scalar"
    if not float(c.reshape(())) > 0:
        return f"the constant {float(c.reshape(())):g} is not positive"
    return None


def _init(ctx: Ctx, value: np.ndarray, base: str) -> str:
    name = NameGen(ctx.g)(base)
    ctx.g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


class FoldScalarIntoMatMul(PatternPass):
    """Pattern: `MatMul(A, B)` with neither A nor B constant (Q.K^T, attn.V) where A or B is
    `Mul(t, c)` / `Mul(c, t)` / `Div(t, c)` with c constant; or such a MatMul whose output y
    is read by `Div(y, c)`.
    Check: c is a positive float scalar; the scaled tensor is read by nothing else.
    Rewrite: the MatMul reads t and its output is scaled by c (1/c for Div) instead: merged
    into the constant of a `Mul|Div(y, c0)` (c0 > 0 scalar) that is y's only reader, else by a
    new `Mul(y', c) -> y`. An output `Div(y, c)` becomes `Mul(y, 1/c)`. So canonical
    attention is `MatMul(Q, K^T) -> Mul(c) -> Softmax`."""

    anchors = ("MatMul",)

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        if any(ctx.is_const(i) for i in node.input) or node.input[0] == node.input[1]:
            return None
        y = node.output[0]
        skip = None
        for k, name in enumerate(node.input):
            p = ctx.producer(name, ("Mul", "Div"))
            sc = p and _scaling(ctx, p)
            if p is None or sc is None:
                continue
            why = _not_positive_scalar(sc[1])
            if not why and ctx.sole_reader(name) is not node:
                why = f"{name!r} has other consumers"
            if why:
                skip = skip or Skip(f"{node_label(p)} on input {k}: {why}")
                continue
            c = sc[1].reshape(())
            node.input[k] = sc[0]
            remove_nodes(ctx.g, [p])
            self._scale_output(ctx, node, (1 / c if p.op_type == "Div" else c).astype(c.dtype))
            return f"{node_label(p)} moved behind {node_label(node)}"
        for r in ctx.readers(y):
            if r.op_type == "Div" and r.input[0] == y:
                c = ctx.const(r.input[1])
                if c is not None and not _not_positive_scalar(c):
                    inv = (1 / c.reshape(())).astype(c.dtype)
                    r.op_type = "Mul"
                    r.input[1] = _init(ctx, inv, f"{r.input[1]}_inv")
                    return f"{node_label(r)} after {node_label(node)} -> Mul"
        return skip

    @staticmethod
    def _scale_output(ctx: Ctx, mm: onnx.NodeProto, c: np.ndarray) -> None:
        y = mm.output[0]
        r = ctx.sole_reader(y)
        sc = _scaling(ctx, r) if r is not None and r.op_type in ("Mul", "Div") else None
        if r is not None and sc is not None and sc[0] == y and not _not_positive_scalar(sc[1]):
            old = sc[1].reshape(()).astype(c.dtype)
            scale = _init(ctx, c * old if r.op_type == "Mul" else c / old, f"{y}_scale")
            del r.input[:]
            r.input.extend([y, scale])
            r.op_type = "Mul"
            return
        names = NameGen(ctx.g)
        mm.output[0] = names(f"{y}_unscaled")
        idx = next(k for k, n in enumerate(ctx.g.node) if n is mm)
        mul = helper.make_node(
            "Mul", [mm.output[0], _init(ctx, c, f"{y}_scale")], [y], names(f"{mm.name or y}_scale")
        )
        ctx.g.node.insert(idx + 1, mul)
