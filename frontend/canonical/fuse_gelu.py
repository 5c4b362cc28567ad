"""FuseGelu: the erf and tanh decompositions of GELU become ONNX Gelu (opset 20)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx
from onnx import helper

from intq.frontend.canonical._match import (
    Ctx,
    PatternPass,
    Skip,
    close,
    insert_before,
    node_label,
    other,
    remove_nodes,
    split_const,
)
from intq.frontend.export import default_opset
from intq.ir import NameGen

GELU_OPSET = 20
# Ops whose signature changed incompatibly between opsets 18 and 20 (DFT: axis attribute ->
# input; GridSample: mode values renamed). Every other op revised at 19/20 only gained types
# or attribute values, so re-stamping an opset >= 18 model as opset 20 keeps its meaning.
CHANGED_BY_20 = {"DFT", "GridSample"}
SQRT2 = math.sqrt(2.0)
TANH_K = math.sqrt(2.0 / math.pi)
TANH_C = 0.044715


def _op_types(graph: onnx.GraphProto) -> Iterator[str]:
    for n in graph.node:
        yield n.op_type
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                yield from _op_types(sub)


def bump_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset import (and the IR version it needs) to `version`."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, version)
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", version)])
    model.ir_version = max(model.ir_version, ir)


class FuseGelu(PatternPass):
    """Pattern, erf form:  s = Add(Erf(Div(x, c1) | Mul(x, c1')), c2)
               tanh form: s = Add(Tanh(Mul(Add(x, Mul(Pow(x, 3) | x*x*x, c3)), c4)), c2)
    then y = x * 0.5 * s in any association and operand order: Mul(Mul(s, 0.5), x),
    Mul(Mul(s, x), 0.5), Mul(Mul(x, 0.5), s).
    Check: c1 = sqrt(2) (c1' = 1/sqrt(2)), c2 = 1, 0.5, c3 = 0.044715, c4 = sqrt(2/pi), each
    within 1e-3 relative; intermediates read only inside the pattern; model opset >= 18 and
    no op whose meaning changed by opset 20.
    Rewrite: `Gelu(x, approximate="none"|"tanh") -> y`; the default-domain opset import is
    raised to 20 (Gelu's opset; see CHANGED_BY_20 for why this is safe from 18)."""

    anchors = ("Erf", "Tanh")
    needs_shapes = True

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        inner = self._erf(ctx, node) if node.op_type == "Erf" else self._tanh(ctx, node)
        if isinstance(inner, Skip):
            return inner
        x, chain = inner
        s_add = next((n for n in ctx.readers(node.output[0]) if n.op_type == "Add"), None)
        if s_add is None:
            return Skip("its output is not fed to Add(., 1)")
        one = ctx.scalar(other(s_add, node.output[0]) or "", like=node.output[0])
        if one is None or not close(one, 1.0):
            return Skip(f"{node_label(s_add)} does not add 1 (got {one})")
        chain += [node, s_add]
        outer = self._outer(ctx, s_add.output[0], x)
        if isinstance(outer, Skip):
            return outer
        chain += outer
        inside = {id(n) for n in chain}
        for n in chain[:-1]:
            for t in n.output:
                if t in ctx.outputs or any(id(r) not in inside for r in ctx.readers(t)):
                    return Skip(f"intermediate {t!r} has consumers outside the pattern")
        if default_opset(ctx.model) < 18:
            return Skip("model opset < 18: Gelu needs opset 20 and ops changed at 18")
        changed = CHANGED_BY_20 & set(_op_types(ctx.g))
        if default_opset(ctx.model) < GELU_OPSET and changed:
            return Skip(f"raising the opset to {GELU_OPSET} would change {sorted(changed)}")
        approx = "none" if node.op_type == "Erf" else "tanh"
        y = chain[-1].output[0]
        gelu = helper.make_node(
            "Gelu", [x], [y], NameGen(ctx.g)(f"{node.name or y}_gelu"), approximate=approx
        )
        insert_before(ctx.g, chain[-1], [gelu])
        remove_nodes(ctx.g, chain)
        bump_opset(ctx.model, GELU_OPSET)
        return f"{len(chain)} nodes around {node_label(node)} -> Gelu(approximate={approx!r})"

    @staticmethod
    def _erf(ctx: Ctx, erf: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]] | Skip:
        pre = ctx.producer(erf.input[0], ("Div", "Mul"))
        xc = pre and split_const(ctx, pre)
        if pre is None or xc is None or (pre.op_type == "Div" and pre.input[0] != xc[0]):
            return Skip("its input is not x / c or x * c with a scalar constant c")
        x, c = xc
        want = SQRT2 if pre.op_type == "Div" else 1.0 / SQRT2
        if not close(c, want):
            return Skip(f"{node_label(pre)} scales by {c:g}, expected {want:.6g} (rtol 1e-3)")
        return x, [pre]

    @staticmethod
    def _tanh(ctx: Ctx, tanh: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]] | Skip:
        mk = ctx.producer(tanh.input[0], "Mul")
        vk = mk and split_const(ctx, mk)
        add = vk and ctx.producer(vk[0], "Add")
        if mk is None or vk is None or add is None:
            return Skip("its input is not c * (x + c' * x^3)")
        for x, cub in (tuple(add.input), tuple(add.input)[::-1]):
            mc = ctx.producer(cub, "Mul")
            vc = mc and split_const(ctx, mc)
            cube = vc and FuseGelu._cube(ctx, vc[0], x)
            if mc is not None and vc is not None and cube is not None:
                break
        else:
            return Skip("its input is not c * (x + c' * x^3)")
        for got, want, what in ((vk[1], TANH_K, "sqrt(2/pi)"), (vc[1], TANH_C, "0.044715")):
            if not close(got, want):
                return Skip(f"constant {got:g} is not {what} (rtol 1e-3)")
        return x, [*cube, mc, add, mk]

    @staticmethod
    def _cube(ctx: Ctx, name: str, x: str) -> list[onnx.NodeProto] | None:
        """Nodes computing name = x^3: Pow(x, 3), Mul(x, Mul(x, x)) or Mul(Mul(x, x), x)."""
        p = ctx.producer(name, "Pow")
        if p is not None:
            e = ctx.scalar(p.input[1])
            return [p] if p.input[0] == x and e is not None and close(e, 3.0) else None
        m = ctx.producer(name, "Mul")
        sq_name = m and other(m, x)
        sq = sq_name and ctx.producer(sq_name, "Mul")
        if sq is not None and list(sq.input) == [x, x]:
            return [sq, m]
        return None

    @staticmethod
    def _outer(ctx: Ctx, s: str, x: str) -> list[onnx.NodeProto] | Skip:
        """Nodes computing y = x * 0.5 * s, in pattern order (the last writes y)."""
        for m1 in (n for n in ctx.readers(s) if n.op_type == "Mul"):
            o = other(m1, s)
            if o is None:
                continue
            half = ctx.scalar(o, like=s)
            if half is not None:  # (s * 0.5) * x
                m2 = next(
                    (
                        n
                        for n in ctx.readers(m1.output[0])
                        if n.op_type == "Mul" and other(n, m1.output[0]) == x
                    ),
                    None,
                )
                nodes = [m1, m2]
            elif o == x:  # (s * x) * 0.5
                m2 = next((n for n in ctx.readers(m1.output[0]) if n.op_type == "Mul"), None)
                half = m2 and ctx.scalar(other(m2, m1.output[0]) or "", like=m1.output[0])
                nodes = [m1, m2]
            else:  # (x * 0.5) * s
                hx = ctx.producer(o, "Mul")
                xh = hx and split_const(ctx, hx)
                half = xh[1] if xh and xh[0] == x else None
                nodes = [hx, m1]
            if half is None or None in nodes:
                continue
            if not close(half, 0.5):
                return Skip(f"the factor {half:g} is not 0.5 (rtol 1e-3)")
            return nodes  # type: ignore[return-value]
        return Skip("no Mul computes x * 0.5 * (1 + ...) from its output")
