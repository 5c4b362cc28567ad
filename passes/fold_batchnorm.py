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

Linear layers: `MatMul(X, W[K, M]) -> T` optionally followed by `Add(T, b[M]) -> U`, or
`Gemm(X, W, [C])`, then `BatchNormalization(U) -> Y` (BatchNorm1d after nn.Linear). The BN's
channel axis is 1 and the linear layer's output features are the last axis, so the fold needs
U of rank 2 ([N, M]); then, with the same s,

    W'[:, m] = W[:, m] * s[m]          (Gemm with transB=1: W'[m, :] = W[m, :] * s[m])
    b'[m]    = (b[m] - mean[m]) * s[m] + B[m]

and the layer writes Y directly (a bias Add is created for a bias-less MatMul). Gemm needs
alpha = beta = 1 and transA = 0. Every intermediate (T, U) must be read only by the next node
of the pattern and not be a graph output.
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
    """Fold `BatchNormalization` (inference form) into the preceding `Conv`, `MatMul` (+ bias
    `Add`) or `Gemm`; see the module
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
                rewrites.append(f"{_label(bn)} folded into the layer writing {bn.output[0]!r}")
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
        why = _sole_reader(g, t, bn)
        if why is not None:
            return why
        if conv.domain in _DEFAULT and conv.op_type in ("MatMul", "Add", "Gemm"):
            return _fold_linear(g, bn, conv, params, eps, names)
        if conv.op_type != "Conv" or conv.domain not in _DEFAULT:
            return f"producer of {t!r} is {_label(conv)}, not a Conv, MatMul, Add or Gemm"

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
        _drop(g, bn, [t])
        return None


def _drop(g: onnx.GraphProto, node: onnx.NodeProto, dead: list[str]) -> None:
    """Remove `node` from the graph and the value_info of tensors that no longer exist."""
    for k in reversed(range(len(g.node))):
        if g.node[k] is node:
            del g.node[k]
    for k in reversed(range(len(g.value_info))):
        if g.value_info[k].name in dead:
            del g.value_info[k]


def _sole_reader(g: onnx.GraphProto, t: str, reader: onnx.NodeProto) -> str | None:
    """None when `reader` is the only reader of `t` and `t` is not a graph output, else why."""
    if t in graph_output_names(g):
        return f"{t!r} is a graph output"
    readers = consumers(g).get(t, [])
    if len(readers) != 1 or readers[0] is not reader:
        return f"{t!r} has other readers ({len(readers)} readers)"
    return None


def _rank(g: onnx.GraphProto, name: str) -> int | None:
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _fold_linear(
    g: onnx.GraphProto,
    bn: onnx.NodeProto,
    layer: onnx.NodeProto,
    params: dict[str, np.ndarray],
    eps: float,
    names: NameGen,
) -> str | None:
    """Fold `bn` into the linear layer `layer` (MatMul, bias Add after a MatMul, or Gemm)."""
    u = bn.input[0]
    bias_add: onnx.NodeProto | None = None
    bias_name = ""
    if layer.op_type == "Add":
        bias_add = layer
        prod = producers(g)
        mms = [prod.get(i) for i in layer.input]
        mm = next((p for p in mms if p is not None and p.op_type == "MatMul"), None)
        if mm is None or mm.domain not in _DEFAULT:
            return f"producer of {u!r} is an Add not fed by a MatMul"
        bias_name = layer.input[1] if layer.input[0] == mm.output[0] else layer.input[0]
        why = _sole_reader(g, mm.output[0], layer)
        if why is not None:
            return f"MatMul output {why}"
        layer = mm
    w = get_constant(g, layer.input[1])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return f"{_label(layer)} weight {layer.input[1]!r} is not a constant 2-D float matrix"
    if get_constant(g, layer.input[0]) is not None:
        return f"{_label(layer)} has a constant left operand"
    # MatMul with a 2-D weight keeps its input's rank; Gemm is 2-D by definition
    rank = 2 if layer.op_type == "Gemm" else (_rank(g, u) or _rank(g, layer.input[0]))
    if rank != 2:
        return f"linear output {u!r} has rank {rank}, need 2 (BN channels = linear features)"
    out_axis = 1
    a = attrs(layer)
    if layer.op_type == "Gemm":
        if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
            return f"{_label(layer)} has alpha/beta != 1"
        if int(a.get("transA", 0)):
            return f"{_label(layer)} has transA=1"
        out_axis = 0 if int(a.get("transB", 0)) else 1
        if len(layer.input) > 2 and layer.input[2]:
            bias_name = layer.input[2]
    m = w.shape[out_axis]
    b = np.zeros(m, dtype=np.float64)
    if bias_name:
        bv = get_constant(g, bias_name)
        if bv is None or bv.size != m or bv.shape[-1:] != (m,):
            return f"bias {bias_name!r} is not a constant of {m} elements"
        b = np.asarray(bv, dtype=np.float64).reshape(m)
    bad = {k: v.shape for k, v in params.items() if v.shape != (m,)}
    if bad:
        return f"parameter shapes {bad} do not match the {m} output features"

    s = params["scale"] / np.sqrt(params["var"] + eps)
    shape = (1, m) if out_axis == 1 else (m, 1)
    w_new = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
    b_new = ((b - params["mean"]) * s + params["B"]).astype(w.dtype)
    w_name = names(f"{layer.input[1]}_bnfold")
    b_name = names(f"{bias_name or layer.name or layer.output[0]}_bnfold_bias")
    g.initializer.append(numpy_helper.from_array(w_new, w_name))
    g.initializer.append(numpy_helper.from_array(b_new, b_name))
    layer.input[1] = w_name
    if layer.op_type == "Gemm":
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = b_name
        layer.output[0] = bn.output[0]
        _drop(g, bn, [u])
        return None
    if bias_add is not None:
        k = list(bias_add.input).index(bias_name)
        bias_add.input[k] = b_name
        bias_add.output[0] = bn.output[0]
        _drop(g, bn, [u])
        return None
    # bias-less MatMul: the BN becomes the bias Add
    add = onnx.helper.make_node(
        "Add", [layer.output[0], b_name], [bn.output[0]], name=names(f"{bn.name or 'bn'}_bias")
    )
    pos = [k for k, n in enumerate(g.node) if n is bn][0]
    g.node.insert(pos, add)
    _drop(g, bn, [])
    return None
