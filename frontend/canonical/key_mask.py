"""CanonicalKeyMask: an attention mask built from a [B, S] integer key mask becomes one form."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from intq.frontend.canonical._match import Ctx, PatternPass, Skip, node_label
from intq.ir import NameGen

# Additive mask values at or below this are "minus infinity": exp() of them is 0 in float32
# next to any score an attention layer produces.
MASKED_BELOW = -1e4
_TRIALS = 4


def _mask_subgraph(ctx: Ctx, out: str) -> tuple[list[onnx.NodeProto], set[str]] | str:
    """The nodes computing `out` back to graph inputs and constants: (nodes in topological
    order, graph inputs read), or why it is not a non-float subgraph of inputs."""
    nodes: list[onnx.NodeProto] = []
    inputs: set[str] = set()
    graph_inputs = {i.name for i in ctx.g.input}
    seen: set[str] = set()

    def visit(name: str) -> str | None:
        if not name or name in seen or ctx.is_const(name):
            return None
        seen.add(name)
        if name in graph_inputs:
            inputs.add(name)
            return None
        p = ctx.prods.get(name)
        if p is None:
            return f"tensor {name!r} has no producer"
        for i in p.input:
            why = visit(i)
            if why:
                return why
        if p.op_type == "Constant":
            return None
        nodes.append(p)
        return None

    why = visit(out)
    return why if why else (nodes, inputs)


class CanonicalKeyMask(PatternPass):
    """Pattern: `Softmax(Add(x, W))` (either operand order) with
    `W = Where(cond, 0, NEG)`, NEG a scalar constant <= -1e4 (or -inf), and `cond` computed
    from exactly one integer graph input M of shape [B, S] and constants (Cast, GatherND,
    And, Expand, Unsqueeze ... : whatever the exporter built).
    Check: the Softmax is over the last axis; evaluating `cond`'s subgraph (onnx.reference) on
    random 0/1 masks gives `M[:, None, None, :] != 0` broadcast to cond's shape (a key mask).
    Rewrite: `Softmax(Where(Cast(Reshape(M, [B, 1, 1, S]), BOOL), x, NEG))`. Where the key is
    masked the score is NEG instead of x + NEG: both give probability 0 in float (exp
    underflows); unmasked scores are unchanged. The quantizer reads this form as a masked
    integer softmax (passes/quantize_bert.py)."""

    anchors = ("Softmax",)
    needs_shapes = True

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        add = ctx.producer(node.input[0], "Add")
        if add is None or ctx.sole_reader(add.output[0]) is not node:
            return None
        for k in (0, 1):
            where = ctx.producer(add.input[k], "Where")
            if where is not None:
                x = add.input[1 - k]
                break
        else:
            return None
        zero, neg = ctx.scalar(where.input[1]), ctx.scalar(where.input[2])
        if zero is None or neg is None or zero != 0.0 or not neg <= MASKED_BELOW:
            return Skip(f"{node_label(where)} is not Where(cond, 0, NEG <= {MASKED_BELOW:g})")
        xs = ctx.shapes.get(x)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if xs is None or None in xs or axis not in (-1, len(xs) - 1):
            return Skip("the softmax input's shape is unknown or the axis is not the last one")
        sub = _mask_subgraph(ctx, where.input[0])
        if isinstance(sub, str):
            return Skip(f"mask: {sub}")
        nodes, ins = sub
        if len(ins) != 1:
            return Skip(f"the mask depends on {len(ins)} graph inputs (need exactly one)")
        m = next(iter(ins))
        mvi = next(i for i in ctx.g.input if i.name == m)
        mtype = mvi.type.tensor_type.elem_type
        mshape = ctx.shapes.get(m)
        np_dt = helper.tensor_dtype_to_np_dtype(mtype)
        if np_dt.kind not in "iu" or mshape is None or len(mshape) != 2 or None in mshape:
            return Skip(f"mask input {m!r} is not a static [B, S] integer tensor")
        why = _check_key_mask(ctx, nodes, m, np_dt, mshape, where.input[0])
        if why:
            return Skip(why)
        b, s = mshape
        new = NameGen(ctx.g)
        shape4 = new(f"{m}_key_shape")
        ctx.g.initializer.append(numpy_helper.from_array(np.array([b, 1, 1, s], np.int64), shape4))
        m4, keep, masked = new(f"{m}_keys"), new(f"{m}_keep"), new(f"{x}_masked")
        idx = next(i for i, n in enumerate(ctx.g.node) if n is add)
        added = [
            helper.make_node("Reshape", [m, shape4], [m4], name=new("key_mask_reshape")),
            helper.make_node("Cast", [m4], [keep], name=new("key_mask_cast"), to=TensorProto.BOOL),
            helper.make_node("Where", [keep, x, where.input[2]], [masked], name=new("key_mask")),
        ]
        for off, n in enumerate(added):
            ctx.g.node.insert(idx + off, n)
        node.input[0] = masked
        return f"{node_label(node)}: additive mask from {m!r} -> Where(key mask, x, {neg:g})"


def _check_key_mask(
    ctx: Ctx, nodes: list[onnx.NodeProto], m: str, dt: np.dtype, mshape, cond: str
) -> str | None:
    """Evaluate the mask subgraph on random 0/1 masks; None when it is the key mask."""
    from onnx.reference import ReferenceEvaluator

    consts = {i: ctx.const(i) for n in nodes for i in n.input if i and i != m and ctx.is_const(i)}
    ins = [helper.make_tensor_value_info(m, helper.np_dtype_to_tensor_dtype(dt), list(mshape))]
    ins += [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in consts.items()
    ]
    g = helper.make_graph(nodes, "mask", ins, [helper.make_empty_tensor_value_info(cond)])
    model = helper.make_model(g, opset_imports=ctx.model.opset_import)
    rng = np.random.default_rng(0)
    try:
        ev = ReferenceEvaluator(model)
        for t in range(_TRIALS):
            mask = (rng.random(mshape) < 0.5).astype(dt)
            mask[:, 0] = 1
            if t == 0:
                mask[:] = 1
            got = np.asarray(ev.run(None, {m: mask, **consts})[0])
            want = mask[:, None, None, :] != 0
            if got.ndim != 4 or got.dtype != np.bool_:
                return f"mask has shape {got.shape} / dtype {got.dtype}, not a 4-D boolean"
            if not np.array_equal(
                got, np.broadcast_to(want, np.broadcast_shapes(want.shape, got.shape))
            ):
                return "the mask is not a key mask (M[:, None, None, :] != 0)"
    except Exception as e:
        return f"evaluating the mask failed: {type(e).__name__}: {e}"
    return None
