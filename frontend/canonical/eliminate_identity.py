"""EliminateIdentity: Identity and inference-mode Dropout are removed."""

from __future__ import annotations

import onnx

from intq.frontend.canonical._match import Ctx, PatternPass, Skip, node_label, remove_nodes
from intq.ir import replace_uses


class EliminateIdentity(PatternPass):
    """Pattern: `Identity(x) -> y`, or `Dropout(x, [ratio], [training_mode]) -> y, [mask]`.
    Rewrite: readers of `y` read `x`. When `y` is a graph output, `x`'s producer writes `y`
    instead. Skipped: Dropout whose training_mode is true or not constant, or whose mask is
    used; `y` a graph output while `x` is a graph input, an initializer or a graph output."""

    anchors = ("Identity", "Dropout")

    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None:
        g = ctx.g
        x, y = node.input[0], node.output[0]
        if node.op_type == "Dropout":
            if (
                len(node.output) > 1
                and node.output[1]
                and (ctx.readers(node.output[1]) or node.output[1] in ctx.outputs)
            ):
                return Skip("its mask output is used")
            if len(node.input) > 2 and node.input[2]:
                mode = ctx.const(node.input[2])
                if mode is None:
                    return Skip("training_mode is not a constant")
                if bool(mode.reshape(-1)[0]):
                    return Skip("training_mode is true")
        if y not in ctx.outputs:
            replace_uses(g, y, x)
        elif x in ctx.prods and x not in ctx.outputs:
            p = ctx.prods[x]
            p.output[list(p.output).index(x)] = y
            replace_uses(g, x, y)
        else:
            return Skip(
                "its output is a graph output and its input a graph input, "
                "an initializer or a graph output"
            )
        remove_nodes(g, [node])
        return f"removed {node_label(node)}"
