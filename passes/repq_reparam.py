"""RepQLayerNormPass: RepQ-ViT's scale reparameterization of post-LayerNorm activations.

Post-LayerNorm activations X = LN(x) * gamma + beta often have channel ranges that differ by
orders of magnitude, so one per-tensor int8 scale wastes most codes on the narrow channels.
RepQ-ViT calibrates them per channel and folds the per-channel quantizer into the float model,
so that inference quantizes X per tensor. With intq's symmetric quantizer, per channel c of the
calibrated range [lo_c, hi_c]:

    m_c = (hi_c + lo_c) / 2          (channel centre: the per-channel zero point)
    h_c = max((hi_c - lo_c) / 2, eps) (channel half-range)
    r_c = h_c / h,  h = mean_c h_c    (scale ratio to one per-tensor half-range)

    LN:      gamma'_c = gamma_c / r_c,    beta'_c = (beta_c - m_c) / r_c
             so X'_c = (X_c - m_c) / r_c, every channel in [-h, h];
    Linear:  Y = X W + b = X' (diag(r) W) + (m W + b)
             W'[c, :] = r_c W[c, :],      b' = b + m W   (an Add is inserted if there is no b).

The float function is unchanged (up to float rounding). Between the LayerNorm and the linear
layers only channel-preserving ops may sit (Reshape/Flatten/Squeeze/Unsqueeze/Identity keeping
the last axis, Gather/Slice/ReduceMean not on the last axis): they commute with the per-channel
affine map. Any other reader (a residual Add, a graph output) makes the pass skip that LayerNorm,
with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.ir import (
    NameGen,
    attrs,
    consumers,
    get_constant,
    graph_output_names,
    remove_unused,
    static_shapes,
)
from intq.passes.base import Pass, PassResult

_DEFAULT = ("", "ai.onnx")
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
_SELECTS = ("Gather", "Slice", "ReduceMean")
EPS_REL = 1e-6


class RepQLayerNormPass(Pass):
    """Fold per-channel post-LayerNorm ranges into the LayerNorm affine and the next linear
    layers (see the module docstring). `ranges` maps a LayerNorm output to its per-channel
    (min, max) over calibration data (`passes.calibration.channel_ranges`)."""

    def __init__(self, ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.ranges = ranges

    @staticmethod
    def candidates(model: onnx.ModelProto) -> list[str]:
        """Outputs of the LayerNorms this pass would look at (to calibrate per channel)."""
        return [
            n.output[0]
            for n in model.graph.node
            if n.op_type == "LayerNormalization" and n.domain in _DEFAULT
        ]

    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        self.g, self.uses = g, consumers(g)
        self.outs = graph_output_names(g)
        self.shapes = static_shapes(model)
        self.names = NameGen(g)
        rewrites, skipped = [], []
        for ln in [n for n in g.node if n.op_type == "LayerNormalization" and n.domain in _DEFAULT]:
            why = self._fold(ln)
            label = f"LayerNormalization {ln.name or ln.output[0]!r}"
            if why is None:
                rewrites.append(f"{label}: per-channel scales folded into its affine and linears")
            else:
                skipped.append(f"{label}: {why}")
        if rewrites:
            remove_unused(g)
        return PassResult(model, bool(rewrites), rewrites, skipped)

    # ------------------------------------------------------------------ check
    def _linears(self, name: str, c: int) -> tuple[list[onnx.NodeProto], str | None]:
        """The MatMuls with a constant [C, N] weight reached from `name` through channel-
        preserving ops, or the reason there is a reader that cannot absorb the scales."""
        if name in self.outs:
            return [], f"{name!r} is a graph output"
        found: list[onnx.NodeProto] = []
        for node in self.uses.get(name, []):
            op = node.op_type
            if node.domain not in _DEFAULT:
                return [], f"read by {op} {node.name!r} (custom domain)"
            if op == "MatMul" and node.input[0] == name:
                w = get_constant(self.g, node.input[1])
                if w is None or w.ndim != 2 or w.shape[0] != c:
                    return [], f"read by MatMul {node.name!r} without a constant [{c}, N] weight"
                found.append(node)
                continue
            if op in _RESHAPES + _SELECTS and node.input[0] == name:
                sin = self.shapes.get(name, ())
                sout = self.shapes.get(node.output[0], ())
                if not sin or not sout or sin[-1] != c or sout[-1] != c:
                    return [], f"{op} {node.name!r} does not keep the channel axis last"
                if op in _SELECTS and self._touches_last_axis(node, len(sin)):
                    return [], f"{op} {node.name!r} acts on the channel axis"
                more, why = self._linears(node.output[0], c)
                if why:
                    return [], why
                found += more
                continue
            return [], f"read by {op} {node.name!r}, which cannot absorb per-channel scales"
        if not found:
            return [], "no linear layer reads it"
        return found, None

    def _touches_last_axis(self, node: onnx.NodeProto, rank: int) -> bool:
        a = attrs(node)
        if node.op_type == "Gather":
            return int(a.get("axis", 0)) % rank == rank - 1
        if node.op_type == "ReduceMean":
            axes = a.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = get_constant(self.g, node.input[1])
            if axes is None:
                return True  # reduces over every axis
            return any(int(x) % rank == rank - 1 for x in np.atleast_1d(axes))
        has_axes = len(node.input) > 3 and node.input[3]
        axes = get_constant(self.g, node.input[3]) if has_axes else None
        if axes is None:  # Slice without axes: all leading axes, the last included
            starts = get_constant(self.g, node.input[1])
            return starts is None or len(np.atleast_1d(starts)) >= rank
        return any(int(x) % rank == rank - 1 for x in np.atleast_1d(axes))

    # ------------------------------------------------------------------ rewrite
    def _fold(self, ln: onnx.NodeProto) -> str | None:
        y = ln.output[0]
        if len(ln.output) > 1 and any(ln.output[1:]):
            return "mean / inv-std outputs are used"
        if y not in self.ranges:
            return "no per-channel calibration ranges"
        gamma = get_constant(self.g, ln.input[1])
        beta = get_constant(self.g, ln.input[2]) if len(ln.input) > 2 and ln.input[2] else None
        if gamma is None or (len(ln.input) > 2 and ln.input[2] and beta is None):
            return "scale / bias are not constants"
        lo, hi = (np.asarray(v, np.float64) for v in self.ranges[y])
        c = lo.shape[-1]
        if gamma.size != c:
            return f"scale has {gamma.size} values for {c} channels"
        linears, why = self._linears(y, c)
        if why:
            return why
        m = (hi + lo) / 2
        h = (hi - lo) / 2
        h_mean = float(h.mean())
        if not h_mean > 0:
            return "calibrated ranges are empty"
        h = np.maximum(h, EPS_REL * h_mean)
        r = h / h_mean
        beta64 = np.zeros(c) if beta is None else beta.astype(np.float64).reshape(c)
        gamma_new = gamma.astype(np.float64).reshape(c) / r
        beta_new = (beta64 - m) / r
        dt = gamma.dtype
        ln.input[1] = self._init(f"{ln.name}_repq_scale", gamma_new.astype(dt))
        bias_name = self._init(f"{ln.name}_repq_bias", beta_new.astype(dt))
        if len(ln.input) > 2:
            ln.input[2] = bias_name
        else:
            ln.input.append(bias_name)
        for mm in linears:
            self._fold_linear(mm, r, m)
        return None

    def _fold_linear(self, mm: onnx.NodeProto, r: np.ndarray, m: np.ndarray) -> None:
        w = get_constant(self.g, mm.input[1])
        w64 = w.astype(np.float64)
        mm.input[1] = self._init(f"{mm.name}_repq_w", (w64 * r[:, None]).astype(w.dtype))
        shift = m @ w64  # [N]: what the removed channel centres contributed
        uses = self.uses.get(mm.output[0], [])
        if len(uses) == 1 and uses[0].op_type == "Add" and mm.output[0] not in self.outs:
            add = uses[0]
            k = 1 if add.input[0] == mm.output[0] else 0
            b = get_constant(self.g, add.input[k])
            if b is not None and b.shape[-1:] == shift.shape and b.size == shift.size:
                new_b = b.astype(np.float64) + shift.reshape(b.shape)
                add.input[k] = self._init(f"{mm.name}_repq_b", new_b.astype(b.dtype))
                return
        if not np.any(shift):
            return
        raw = self.names(f"{mm.output[0]}_repq")
        out = mm.output[0]
        mm.output[0] = raw
        b = self._init(f"{mm.name}_repq_b", shift.astype(w.dtype))
        idx = list(self.g.node).index(mm)
        self.g.node.insert(idx + 1, helper.make_node("Add", [raw, b], [out], self.names(raw)))
        for vi in self.g.value_info:
            if vi.name == out:
                new_vi = onnx.ValueInfoProto()
                new_vi.CopyFrom(vi)
                new_vi.name = raw
                self.g.value_info.append(new_vi)
                break

    def _init(self, base: str, value: np.ndarray) -> str:
        name = self.names(base)
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name
