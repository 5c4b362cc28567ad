"""GemmToMatMulAdd: a linear Gemm becomes MatMul (+ Add)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.frontend.canonical._match import (
    Ctx,
    PatternPass,
    Skip,
    insert_before,
    node_label,
    remove_nodes,
)
from intq.ir import NameGen, attrs


class GemmToMatMulAdd(PatternPass):
    """Pattern: `Gemm(A, B, [C], alpha, beta, transA, transB) -> Y`.
    Check: alpha == 1, beta == 1 (when C is given), transA == 0, B constant.
    Rewrite: `MatMul(A, B') -> Y` with B' = B^T if transB else B (a new initializer), plus
    `Add(., C) -> Y` when C is given."""

    anchors = ("Gemm",)

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        a = attrs(node)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        has_c = len(node.input) > 2 and bool(node.input[2])
        if alpha != 1.0:
            return Skip(f"alpha={alpha} != 1")
        if has_c and beta != 1.0:
            return Skip(f"beta={beta} != 1")
        if a.get("transA", 0):
            return Skip("transA=1")
        b = ctx.const(node.input[1])
        if b is None:
            return Skip(f"B {node.input[1]!r} is not a constant")
        names = NameGen(ctx.g)
        b_name = node.input[1]
        if a.get("transB", 0) or b_name not in ctx.inits:
            b_name = names(f"{node.input[1]}_T" if a.get("transB", 0) else node.input[1])
            b = np.ascontiguousarray(b.T if a.get("transB", 0) else b)
            ctx.g.initializer.append(numpy_helper.from_array(b, b_name))
        y = node.output[0]
        base = node.name or y
        mm_out = names(f"{y}_matmul") if has_c else y
        new = [helper.make_node("MatMul", [node.input[0], b_name], [mm_out], names(f"{base}_mm"))]
        if has_c:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [y], names(f"{base}_add")))
        insert_before(ctx.g, node, new)
        remove_nodes(ctx.g, [node])
        return f"{node_label(node)} -> {' + '.join(n.op_type for n in new)}"
