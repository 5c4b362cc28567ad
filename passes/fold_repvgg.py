"""FoldRepVGGPass: a RepVGG multi-branch block (kxk conv, 1x1 conv, identity, summed) becomes one
convolution, found from the graph's structure (no module names).

Run after `FoldBatchNormPass`, so conv+BN branches are already biased Convs. What is left of an
exported train-time RepVGG block (torch folds conv+BN on export; the identity BN stays) is

    Y = Add(Add(Conv_3x3(X), Conv_1x1(X)), BatchNormalization(X))        (any Add nesting)

Pattern: a tree of default-domain `Add` nodes (every inner Add's output read only by its parent
Add and not a graph output) whose leaves are "branches" of one tensor X:
  * `Conv(X, W[M, C/g, kh, kw], [b])` with constant W, b; odd kh, kw; dilation 1; centred
    padding (pads = [(kh-1)/2, (kw-1)/2] on both sides); no auto_pad;
  * `BatchNormalization(X)` in inference form with constant parameters (an affine identity);
  * X itself (a plain identity branch).
Check: at least one Conv branch; all Conv branches share stride and group g; every branch's
output is read only by the tree. The identity branches need M == C and stride 1.
Rewrite: with K = the largest kernel (per axis) and every kernel zero-padded to K (centred),

    W'[m, c, :, :] = sum_conv pad_K(W_branch)[m, c]
                     + sum_identity s[m] * delta(c == m mod C/g) * delta(centre)
    b'[m]          = sum_conv b_branch[m] + sum_identity t[m]

with s = scale / sqrt(var + eps), t = B - mean * s for an identity BN (s = 1, t = 0 for a plain
X). A centred kxk conv with pad (k-1)/2 equals a KxK conv with pad (K-1)/2 whose kernel is the
kxk one zero-padded to the centre (same stride: output o reads input o*s + i - p for every tap),
and the identity is the centre tap of a diagonal kernel (within a group, channel m reads input
channel m mod C/g, which is channel m of X because M == C). The result is one `Conv(X, W', b')`
writing the root Add's output, with stride and group of the branches and pads (K-1)/2; the
branch nodes and the Adds are removed. Arithmetic in float64, stored in W's dtype. Every Add
tree that was not folded is listed in `skipped` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class _Branch:
    """One summand: weight [M, C/g, kh, kw] (None for an identity), bias [M], its node."""

    x: str
    kind: str  # "conv" | "bn" | "identity"
    node: onnx.NodeProto | None
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    scale: np.ndarray | None = None  # identity: per-channel multiplier s
    stride: tuple[int, int] = (1, 1)
    group: int = 1


class FoldRepVGGPass(Pass):
    """Fold RepVGG multi-branch Add trees into one Conv; see the module docstring."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        rewrites: list[str] = []
        skipped: list[str] = []
        names = NameGen(g)
        cons = consumers(g)
        outs = graph_output_names(g)
        roots = []
        for node in g.node:
            if node.op_type != "Add" or node.domain not in _DEFAULT:
                continue
            readers = cons.get(node.output[0], [])
            inner = (
                node.output[0] not in outs
                and len(readers) == 1
                and readers[0].op_type == "Add"
                and readers[0].domain in _DEFAULT
            )
            if not inner:
                roots.append(node)
        for root_out in [r.output[0] for r in roots]:
            prod = producers(g)  # node messages are re-read after every rewrite
            root = prod[root_out]
            why = self._fold(g, root, names, prod, consumers(g))
            if why is None:
                rewrites.append(f"{_label(root)}: multi-branch block folded into one Conv")
            else:
                skipped.append(f"{_label(root)}: {why}")
        if rewrites:
            remove_unused(g)
        return PassResult(model, bool(rewrites), rewrites, skipped)

    @staticmethod
    def _leaves(g, root, prod, cons) -> tuple[list[str], list[onnx.NodeProto]]:
        """The tensors summed by the Add tree under `root`, and the tree's Add nodes."""
        outs = graph_output_names(g)
        leaves: list[str] = []
        adds: list[onnx.NodeProto] = []
        stack = [root]
        while stack:
            add = stack.pop()
            adds.append(add)
            for t in add.input:
                p = prod.get(t)
                sole = t not in outs and len(cons.get(t, [])) == 1
                if p is not None and p.op_type == "Add" and p.domain in _DEFAULT and sole:
                    stack.append(p)
                else:
                    leaves.append(t)
        return leaves, adds

    def _fold(self, g, root, names, prod, cons) -> str | None:
        leaves, adds = self._leaves(g, root, prod, cons)
        convs = [prod.get(t) for t in leaves if prod.get(t) is not None]
        conv_inputs = {p.input[0] for p in convs if p.op_type == "Conv" and p.domain in _DEFAULT}
        if not conv_inputs:
            return "no Conv branch among the summands"
        if len(conv_inputs) != 1:
            return f"Conv branches read different inputs {sorted(conv_inputs)}"
        (x,) = conv_inputs
        branches: list[_Branch] = []
        outs = graph_output_names(g)
        for t in leaves:
            if t == x:
                branches.append(_Branch(x, "identity", None))
                continue
            p = prod.get(t)
            if p is None:
                return f"summand {t!r} is a graph input or constant, not a branch of {x!r}"
            if t in outs or len(cons.get(t, [])) != 1:
                return f"branch output {t!r} is read outside the block"
            br = _branch(g, p, x)
            if isinstance(br, str):
                return br
            branches.append(br)
        conv_br = [b for b in branches if b.kind == "conv"]
        strides = {b.stride for b in conv_br}
        groups = {b.group for b in conv_br}
        if len(strides) != 1 or len(groups) != 1:
            return f"Conv branches disagree on stride {sorted(strides)} or group {sorted(groups)}"
        stride, group = strides.pop(), groups.pop()
        m, cg = conv_br[0].w.shape[:2]
        if any(b.w.shape[:2] != (m, cg) for b in conv_br):
            return "Conv branches have different weight shapes (channels)"
        c = cg * group
        ident = [b for b in branches if b.kind != "conv"]
        if ident and (m != c or stride != (1, 1)):
            return f"identity branch needs M == C and stride 1 (M={m}, C={c}, stride={stride})"
        kh = max(b.w.shape[2] for b in conv_br)
        kw = max(b.w.shape[3] for b in conv_br)
        w_new = np.zeros((m, cg, kh, kw), dtype=np.float64)
        b_new = np.zeros(m, dtype=np.float64)
        for b in conv_br:
            oh, ow = (kh - b.w.shape[2]) // 2, (kw - b.w.shape[3]) // 2
            w_new[:, :, oh : oh + b.w.shape[2], ow : ow + b.w.shape[3]] += b.w
            b_new += b.b
        for b in ident:
            if b.scale is not None and b.scale.shape != (m,):
                return f"{_label(b.node)} has {b.scale.size} channels, the convs {m}"
            idx = np.arange(m)
            w_new[idx, idx % cg, kh // 2, kw // 2] += 1.0 if b.scale is None else b.scale
            b_new += 0.0 if b.b is None else b.b
        dtype = get_constant(g, conv_br[0].node.input[1]).dtype
        w_name = names(f"{root.name or root.output[0]}_repvgg_w")
        b_name = names(f"{root.name or root.output[0]}_repvgg_b")
        g.initializer.append(numpy_helper.from_array(w_new.astype(dtype), w_name))
        g.initializer.append(numpy_helper.from_array(b_new.astype(dtype), b_name))
        conv = onnx.helper.make_node(
            "Conv",
            [x, w_name, b_name],
            [root.output[0]],
            name=names(f"{root.name or 'repvgg'}_conv"),
            kernel_shape=[kh, kw],
            strides=list(stride),
            pads=[kh // 2, kw // 2, kh // 2, kw // 2],
            dilations=[1, 1],
            group=group,
        )
        dead = {id(n) for n in adds} | {id(b.node) for b in branches if b.node is not None}
        dead_t = {o for n in g.node if id(n) in dead for o in n.output} - {root.output[0]}
        doomed = [k for k, n in enumerate(g.node) if id(n) in dead]
        for k in reversed(doomed):
            del g.node[k]
        g.node.insert(doomed[0], conv)  # x is written before every branch read it
        for k in reversed(range(len(g.value_info))):
            if g.value_info[k].name in dead_t:
                del g.value_info[k]
        return None


def _branch(g: onnx.GraphProto, p: onnx.NodeProto, x: str) -> _Branch | str:
    """Classify producer `p` as a branch of `x`, or say why it is not one."""
    if p.domain not in _DEFAULT or p.input[0] != x:
        return f"summand from {_label(p)} is not a branch of {x!r}"
    if p.op_type == "Conv":
        a = attrs(p)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return f"{_label(p)} uses auto_pad"
        w = get_constant(g, p.input[1])
        if w is None or w.ndim != 4 or not np.issubdtype(w.dtype, np.floating):
            return f"{_label(p)} weight is not a constant 4-D float tensor"
        kh, kw = w.shape[2:]
        if kh % 2 == 0 or kw % 2 == 0:
            return f"{_label(p)} kernel {kh}x{kw} is not odd (no centre tap)"
        if any(int(d) != 1 for d in a.get("dilations", [1, 1])):
            return f"{_label(p)} is dilated"
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        if pads != [kh // 2, kw // 2, kh // 2, kw // 2]:
            return f"{_label(p)} pads {pads} are not centred for a {kh}x{kw} kernel"
        b = np.zeros(w.shape[0])
        if len(p.input) > 2 and p.input[2]:
            bv = get_constant(g, p.input[2])
            if bv is None:
                return f"{_label(p)} bias is not a constant"
            b = np.asarray(bv, np.float64).reshape(-1)
        stride = tuple(int(v) for v in a.get("strides", [1, 1]))
        return _Branch(
            x, "conv", p, np.asarray(w, np.float64), b, None, stride, int(a.get("group", 1))
        )
    if p.op_type == "BatchNormalization":
        a = attrs(p)
        if int(a.get("training_mode", 0)) or sum(1 for o in p.output if o) != 1:
            return f"{_label(p)} is not in inference form"
        vals = [get_constant(g, n) for n in p.input[1:5]]
        if len(vals) != 4 or any(v is None for v in vals):
            return f"{_label(p)} parameters are not constants"
        scale, bias, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in vals)
        s = scale / np.sqrt(var + float(a.get("epsilon", 1e-5)))
        return _Branch(x, "bn", p, None, bias - mean * s, s)
    return f"summand from {_label(p)} is not a Conv or BatchNormalization of {x!r}"
