"""FoldBatchNormPass: an inference-form BatchNormalization folds into the Conv before it.

Pattern: `Conv(X, W, [b]) -> T; BatchNormalization(T, scale, B, mean, var, epsilon) -> Y`.
Check: the BN is in inference form (training_mode absent or 0, one output, spatial != 0 on
old opsets); scale, B, mean, var are constants of shape [M] where M = W.shape[0] (the Conv's
output channels); T is written by a default-domain Conv with a constant W and, if present, a
constant b; T is read only by this BN and is not a graph output.
Rewrite: with s = scale / sqrt(var + epsilon) (per output channel m, in float64),

    W'[m, ...] = W[m, ...] * s[m]
    b'[m]      = (b[m] - mean[m]) * s[m] + B[m]        (b = 0 when the Conv has no bias)

the Conv reads W', b' (new initializers with fresh names) and writes Y; the BN is removed, and
initializers / Constant nodes nothing reads any more are dropped (`remove_unused`). Any `group`
is fine: W's first axis is always the output channel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from intq.ir import (
    NameGen,
    attrs,
    consumers,
    get_constant,
    graph_output_names,
    producers,
    remove_unused,
)
from intq.passes.base import Pass, PassResult

_DEFAULT = ("", "ai.onnx")


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


class FoldBatchNormPass(Pass):
    """Fold `BatchNormalization` (inference form) into the preceding `Conv`; see the module
    docstring for the formula and the checks. Every BN that is not folded is listed in
    `skipped` with the reason."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        rewrites: list[str] = []
        skipped: list[str] = []
        names = NameGen(g)
        for bn in [n for n in g.node if n.op_type == "BatchNormalization" and n.domain in _DEFAULT]:
            why = self._fold(g, bn, names)
            if why is None:
                rewrites.append(f"{_label(bn)} folded into Conv writing {bn.output[0]!r}")
            else:
                skipped.append(f"{_label(bn)}: {why}")
        if rewrites:
            remove_unused(g)
        return PassResult(model, bool(rewrites), rewrites, skipped)

    @staticmethod
    def _fold(g: onnx.GraphProto, bn: onnx.NodeProto, names: NameGen) -> str | None:
        """Fold `bn` in place and return None, or return why it was not folded."""
        a = attrs(bn)
        if int(a.get("training_mode", 0)):
            return "training_mode=1"
        if int(a.get("spatial", 1)) == 0:
            return "spatial=0 (per-activation statistics)"
        if len(bn.input) < 5:
            return f"expected 5 inputs, got {len(bn.input)}"
        if sum(1 for o in bn.output if o) != 1 or not bn.output[0]:
            return "has optional training outputs (mean/var) in use"
        eps = float(a.get("epsilon", 1e-5))
        params = {}
        for role, name in zip(("scale", "B", "mean", "var"), bn.input[1:5], strict=True):
            v = get_constant(g, name)
            if v is None:
                return f"{role} {name!r} is not a constant"
            params[role] = np.asarray(v, dtype=np.float64)

        t = bn.input[0]
        conv = producers(g).get(t)
        if conv is None:
            return f"input {t!r} has no producer (graph input or initializer), not a Conv"
        if conv.op_type != "Conv" or conv.domain not in _DEFAULT:
            return f"producer of {t!r} is {_label(conv)}, not a Conv"
        if t in graph_output_names(g):
            return f"Conv output {t!r} is a graph output"
        readers = consumers(g).get(t, [])
        if len(readers) != 1 or readers[0] is not bn:
            return f"Conv output {t!r} has other readers ({len(readers)} readers)"

        w = get_constant(g, conv.input[1])
        if w is None:
            return f"Conv weight {conv.input[1]!r} is not a constant"
        if not np.issubdtype(w.dtype, np.floating):
            return f"Conv weight {conv.input[1]!r} has non-float dtype {w.dtype}"
        m = w.shape[0]
        has_b = len(conv.input) > 2 and bool(conv.input[2])
        b = np.zeros(m, dtype=np.float64)
        if has_b:
            bv = get_constant(g, conv.input[2])
            if bv is None:
                return f"Conv bias {conv.input[2]!r} is not a constant"
            b = np.asarray(bv, dtype=np.float64)
        shapes = {k: v.shape for k, v in params.items()} | {"conv bias": b.shape}
        bad = {k: s for k, s in shapes.items() if s != (m,)}
        if bad:
            return f"parameter shapes {bad} do not match the {m} Conv output channels"

        s = params["scale"] / np.sqrt(params["var"] + eps)
        w_new = (w.astype(np.float64) * s.reshape((m,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b_new = ((b - params["mean"]) * s + params["B"]).astype(w.dtype)
        w_name = names(f"{conv.input[1]}_bnfold")
        b_name = names(f"{conv.input[2] if has_b else conv.name or conv.output[0]}_bnfold_bias")
        g.initializer.append(numpy_helper.from_array(w_new, w_name))
        g.initializer.append(numpy_helper.from_array(b_new, b_name))
        conv.input[1] = w_name
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = b_name
        conv.output[0] = bn.output[0]
        for k in reversed(range(len(g.node))):
            if g.node[k] is bn:
                del g.node[k]
        for k in reversed(range(len(g.value_info))):  # T no longer exists
            if g.value_info[k].name == t:
                del g.value_info[k]
        return None
