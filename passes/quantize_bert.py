"""Integer rules for BERT-style encoders (registered into QuantizePass via @quant_rule).

* Gather(float table [V, D], ids): `IntEmbedding` from a per-row int8 table, s_v =
  max|W[v]| / 127, to int16 at s = max|W| / 32767 with row multipliers
  m_v = round(s_v / s * 2^22) (so m_v < 2^31); ids read straight from a graph input get the
  valid range [0, V - 1] in the Signature (checked at the boundary, InputValueError).
* Cast of an integer tensor: to BOOL or to a float type the tensor itself (scale 1; 0/1 masks
  and counts are exact).
* Where(Cast(M, BOOL), x, NEG <= -1e4) read only by Softmax (the canonical key mask,
  frontend CanonicalKeyMask): the Softmax becomes a masked integer softmax reading M.
* Softmax: CompileConfig.softmax_kernel: "shiftmax" -> IntSoftmax / IntMaskedSoftmax (base-2
  exponent: log2(e) folded into the requantization); "ibert" -> IBertSoftmax (natural
  exponent with F fraction bits; i-exp constants ln2 = round(ln 2 2^F), b = floor(1.353 2^F),
  c = floor(0.344 / 0.3585 2^2F)).
* Gelu: CompileConfig.gelu_kernel: "shiftgelu" -> IntGELU; "ibert" -> IBertGELU on int16 (int8
  when the int16 constants would overflow int64), B = round(1.769 sqrt2 / s),
  C = round(2 / (0.2888 s^2)), output int32 at s / (2C) 2^out_shift with the smallest
  out_shift that keeps |Y| < 2^31.
* Masked mean pooling `Div(ReduceSum(Mul(h, m), 1), Clip(ReduceSum(m, 1), eps))` (m a cast
  integer mask): `IntMaskedMean(h, M)`, int32 at h's scale (one anchor at the Div).
* L2 normalisation `Div(x, [Expand](Clip(ReduceL2(x, last axis, keepdims), eps)))`: x
  requantized to int16 (minmax), `IntL2Normalize` with 14 fraction bits (int32, scale 2^-14).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto

from intq.errors import UnsupportedOpError
from intq.ir import attrs, consumers, producers
from intq.ops.core import SOFTMAX_OUT_BITS
from intq.passes.quantize import (
    LOG2E,
    ONNX_DT,
    QTensor,
    QuantizePass,
    _base,
    int16_linear_qmax,
    quant_prescan,
    quant_rule,
    round_half_up,
)

EMBEDDING_SHIFT = 22
MASKED_BELOW = -1e4
L2_FRAC_BITS = 14
ROW_NORM_FRAC_BITS = 8
IEXP_A, IEXP_B, IEXP_C = 0.3585, 1.353, 0.344
IERF_A, IERF_B = 0.2888, 1.769
_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# ------------------------------------------------------------------ embeddings
@quant_rule("Gather")
def gather(qp: QuantizePass, node: onnx.NodeProto) -> None:
    table = qp._const_value(node.input[0])
    if table is None or table.dtype.kind != "f" or qp._const_value(node.input[1]) is not None:
        qp._movement(node)
        return
    if table.ndim != 2 or int(attrs(node).get("axis", 0)) != 0:
        raise UnsupportedOpError("Gather", node.name, "embedding tables must be [V, D], axis 0")
    ids = qp._get(node.input[1])
    base = _base(node.name or node.output[0])
    w = table.astype(np.float64)
    row_amax = np.abs(w).max(axis=1)
    amax = float(row_amax.max()) or 1.0
    s_row = np.where(row_amax > 0, row_amax, amax) / 127.0  # all-zero rows (padding) stay 0
    tq = np.clip(round_half_up(w / s_row[:, None]), -127, 127).astype(np.int8)
    s_out = amax / 32767.0
    mult = round_half_up(s_row / s_out * 2.0**EMBEDDING_SHIFT).astype(np.int64)
    assert int(mult.max()) < 2**31
    y = qp._emit(
        "IntEmbedding",
        [
            ids.name,
            qp._const(f"{base}_table_i8", tq),
            qp._const(f"{base}_row_mult", mult.astype(np.int32)),
        ],
        f"{base}_int16",
        base,
        shift=EMBEDDING_SHIFT,
        to=TensorProto.INT16,
    )
    qp.q[node.output[0]] = QTensor(y, "int16", np.asarray(s_out))
    if node.input[1] in {i.name for i in qp.src.graph.input}:
        qp.input_ranges[node.input[1]] = (0, int(table.shape[0]) - 1)
    qp.rewrites.append(f"{node.name}: Gather from a float table -> IntEmbedding (per-row int8)")


# ------------------------------------------------------------------ casts and the key mask
@quant_rule("Cast")
def cast(qp: QuantizePass, node: onnx.NodeProto) -> None:
    qt = qp._get(node.input[0])
    to = int(attrs(node)["to"])
    if not qt.dtype.startswith(("int", "uint")) or float(np.max(qt.scale)) != 1.0:
        raise UnsupportedOpError("Cast", node.name, "only casts of exact integer tensors")
    if to != TensorProto.BOOL and to not in _FLOAT:
        raise UnsupportedOpError("Cast", node.name, f"cast to type {to}")
    qp.q[node.output[0]] = QTensor(qt.name, qt.dtype, np.asarray(1.0))


def _key_mask(qp: QuantizePass, where: onnx.NodeProto) -> tuple[str, str] | None:
    """(scores, integer key mask) when `where` is Where(mask != 0, x, NEG <= -1e4)."""
    neg = qp._const_value(where.input[2])
    if neg is None or neg.size != 1 or not float(neg.reshape(())) <= MASKED_BELOW:
        return None
    uses = qp.uses.get(where.output[0], [])
    if not uses or any(u.op_type != "Softmax" for u in uses):
        return None
    return where.input[1], where.input[0]


@quant_rule("Where")
def where(qp: QuantizePass, node: onnx.NodeProto) -> None:
    km = _key_mask(qp, node)
    if km is None:
        raise UnsupportedOpError(
            "Where", node.name, "only Where(key mask, scores, NEG <= -1e4) feeding a Softmax"
        )
    qp.masked_scores[node.output[0]] = km  # the Softmax rule reads it


# ------------------------------------------------------------------ softmax
@quant_rule("Softmax")
def softmax(qp: QuantizePass, node: onnx.NodeProto) -> None:
    masked = qp.masked_scores.get(node.input[0])
    kernel = qp.cfg.softmax_kernel
    if qp.cfg.softmax_out == "log2" and (masked is not None or kernel != "shiftmax"):
        raise UnsupportedOpError(
            "Softmax",
            node.name,
            "softmax_out='log2' is implemented for the unmasked shiftmax kernel only",
        )
    if masked is None and kernel == "shiftmax":
        qp._op_Softmax(node)
        return
    a = attrs(node)
    shape = qp.shapes.get(node.input[0])
    if shape and int(a.get("axis", -1)) not in (-1, len(shape) - 1):
        raise UnsupportedOpError("Softmax", node.name, "axis must be the last one")
    base = _base(node.name or node.output[0])
    f = qp.cfg.softmax_frac_bits
    scores = masked[0] if masked else node.input[0]
    qt = qp._get(scores)
    ins = []
    if qp.cfg.deferred_softmax and _feeds_only_attention(qp, node.output[0]):
        _softmax_numerator(qp, node, qt, masked, base)
        return
    if kernel == "shiftmax":
        z = qp.requant(qt, "int32", 1.0 / (LOG2E * 2**f), f"{base}_exp2in")
        ins = [z.name, qp._get(masked[1]).name]
        y = qp._emit("IntMaskedSoftmax", ins, f"{base}_u8", base, frac_bits=f)
    else:
        z = qp.requant(qt, "int32", 1.0 / 2**f, f"{base}_expin")
        ins = [z.name] + ([qp._get(masked[1]).name] if masked else [])
        y = qp._emit(
            "IBertSoftmax",
            ins,
            f"{base}_u8",
            base,
            frac_bits=f,
            **_iexp_constants(f),
        )
    qp.q[node.output[0]] = QTensor(y, "uint8", np.asarray(2.0**-SOFTMAX_OUT_BITS))


def _feeds_only_attention(qp: QuantizePass, out: str) -> bool:
    """`out` is read only as the left operand of activation MatMuls (P @ V)."""
    uses = qp.uses.get(out, [])
    return (
        bool(uses)
        and out not in qp.graph_outputs
        and all(
            u.op_type == "MatMul"
            and u.input[0] == out
            and u.input[1] != out
            and qp._const_value(u.input[1]) is None
            for u in uses
        )
    )


def _iexp_constants(f: int) -> dict[str, int]:
    return {
        "ln2": int(round_half_up(math.log(2.0) * 2**f)),
        "poly_b": int(math.floor(IEXP_B * 2**f)),
        "poly_c": int(math.floor(IEXP_C / IEXP_A * 2 ** (2 * f))),
    }


def _softmax_numerator(qp: QuantizePass, node, qt: QTensor, masked, base: str) -> None:
    """Deferred normalisation: the softmax becomes uint8 numerators e / e(0) (scale 1/255
    *relative to the row*), and the P @ V MatMul divides its accumulator by the row's sum of
    numerators (IntRowNormalize). The numerators' resolution is relative to the row's largest
    probability instead of to 1."""
    f = qp.cfg.softmax_frac_bits
    kernel = qp.cfg.softmax_kernel
    if kernel == "shiftmax":
        z = qp.requant(qt, "int32", 1.0 / (LOG2E * 2**f), f"{base}_exp2in")
    else:
        z = qp.requant(qt, "int32", 1.0 / 2**f, f"{base}_expin")
    ins = [z.name] + ([qp._get(masked[1]).name] if masked else [])
    nmax, dt = 255, "uint8"
    keys = (qp.shapes.get(node.input[0]) or (0,))[-1]
    if qp.cfg.softmax_numerator_bits == 16 and keys > 0:
        # P @ V sums `keys` products |e| |v| <= nmax 127: keep them below 2^31
        nmax, dt = min(32767, (2**31 - 1) // (127 * int(keys))), "int16"
    y = qp._emit(
        "IntSoftmaxNumerator",
        ins,
        f"{base}_num_{dt}",
        base,
        kernel=kernel,
        frac_bits=f,
        nmax=nmax,
        **_iexp_constants(f),
    )
    qp.deferred_softmax[node.output[0]] = y
    qp.q[node.output[0]] = QTensor(y, dt, np.asarray(1.0 / nmax))  # row-relative
    qp.rewrites.append(f"{node.name}: softmax with deferred normalisation")


# ------------------------------------------------------------------ GELU
def ibert_gelu_constants(s: float, qmax: int) -> tuple[int, int, int] | None:
    """(B, C, out_shift) of IBertGELU for input scale s and |q| <= qmax; None on overflow."""
    clip_b = max(int(round_half_up(IERF_B * math.sqrt(2.0) / s)), 1)
    poly_c = int(round_half_up(2.0 / (IERF_A * s * s)))
    peak = qmax * 2 * poly_c
    if peak >= 2**62 or clip_b * clip_b >= 2**62:
        return None
    out_shift = max(0, peak.bit_length() - 31)
    return clip_b, poly_c, out_shift


POLY_ERF_DEGREE = 9
POLY_ERF_CLIP = 3.0  # erf(3) = 1 - 2.2e-5


def poly_gelu_attrs(s: float, qmax: int) -> dict:
    """IntPolyGELU attributes for input scale s, |q| <= qmax: erf fitted on [0, 3] by a
    degree-9 polynomial (least squares on Chebyshev nodes; max error 3e-5), in Q30."""
    from intq.ops import bert
    from intq.ops import fixedpoint as fp

    nodes = (1 - np.cos(np.linspace(0, np.pi, 2000))) / 2 * POLY_ERF_CLIP
    erf = np.array([math.erf(v) for v in nodes])
    # fitted in real units of u: Horner's (acc * u_Q16) >> 16 multiplies by the real u
    coeffs = np.polyfit(nodes, erf, POLY_ERF_DEGREE)
    q_coeffs = [int(round_half_up(c * 2**bert.POLY_ONE_BITS)) for c in coeffs]
    mult, shift = fp.quantize_multiplier(s / math.sqrt(2.0) * 2**bert.POLY_U_BITS)
    clip = int(round_half_up(POLY_ERF_CLIP * 2**bert.POLY_U_BITS))
    peak = qmax * 2 ** (bert.POLY_ONE_BITS + 1)
    return {
        "mult": mult,
        "shift": shift,
        "clip": clip,
        "coeffs": q_coeffs,
        "out_shift": max(0, peak.bit_length() - 31),
    }


@quant_rule("Gelu")
def gelu(qp: QuantizePass, node: onnx.NodeProto) -> None:
    if qp.cfg.gelu_kernel == "shiftgelu":
        qp._op_Gelu(node)
        return
    if qp.cfg.gelu_kernel == "poly":
        base = _base(node.name or node.output[0])
        x = qp.as_dtype(node.input[0], "int16")
        s = float(x.scale)
        a = poly_gelu_attrs(s, 32767)
        y = qp._emit("IntPolyGELU", [x.name], f"{base}_i32", base, **a)
        scale = s / 2 * 2.0**-(30) * 2 ** a["out_shift"]
        qp.q[node.output[0]] = QTensor(y, "int32", np.asarray(scale))
        return
    base = _base(node.name or node.output[0])
    for dt in ("int16", "int8"):
        x = qp.as_dtype(node.input[0], dt)
        s = float(x.scale)
        consts = ibert_gelu_constants(s, 32767 if dt == "int16" else 127)
        if consts is not None:
            break
    else:
        raise UnsupportedOpError("Gelu", node.name, "input scale too small for i-GELU")
    clip_b, poly_c, out_shift = consts
    y = qp._emit(
        "IBertGELU",
        [x.name],
        f"{base}_i32",
        base,
        clip_b=clip_b,
        poly_c=poly_c,
        out_shift=out_shift,
    )
    qp.q[node.output[0]] = QTensor(y, "int32", np.asarray(s / (2 * poly_c) * 2**out_shift))


# ------------------------------------------------------------------ pooling / normalisation
def _axes(qp: QuantizePass, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        v = qp._const_value(node.input[1])
        return None if v is None else [int(a) for a in np.atleast_1d(v)]
    a = attrs(node).get("axes")
    return None if a is None else [int(v) for v in a]


def _positive_clip(qp: QuantizePass, node: onnx.NodeProto | None, limit: float) -> bool:
    """A Clip(min = small positive constant, no max)."""
    if node is None or node.op_type != "Clip" or len(node.input) < 2:
        return False
    lo = qp._const_value(node.input[1])
    has_hi = len(node.input) > 2 and node.input[2]
    return lo is not None and 0 < float(lo.reshape(-1)[0]) <= limit and not has_hi


@quant_prescan
def bert_state(qp: QuantizePass, g: onnx.GraphProto) -> None:
    """Per-run state of these rules: masked scores (Where output -> (scores, key mask)) and
    deferred softmaxes (Softmax output -> its numerator tensor)."""
    qp.masked_scores = {}
    qp.deferred_softmax = {}


@quant_prescan
def pooling_patterns(qp: QuantizePass, g: onnx.GraphProto) -> None:
    """Find masked-mean pooling and L2 normalisation; mark their inner nodes fused and anchor
    one rule at each pattern's final Div."""
    prods = producers(g)
    uses = consumers(g)
    shapes = qp.shapes

    def prod(name: str, op: str) -> onnx.NodeProto | None:
        p = prods.get(name)
        return p if p is not None and p.op_type == op else None

    def sole(name: str) -> bool:
        return len(uses.get(name, [])) == 1 and name not in qp.graph_outputs

    for d in g.node:
        if d.op_type != "Div":
            continue
        # masked mean: Div(ReduceSum(Mul(h, m), [1]), Clip(ReduceSum(m, [1]), eps))
        num = prod(d.input[0], "ReduceSum")
        den = prods.get(d.input[1])
        clip = den if den is not None and den.op_type == "Clip" else None
        if clip is not None:
            den = prod(clip.input[0], "ReduceSum") if _positive_clip(qp, clip, 1e-3) else None
        mul = prod(num.input[0], "Mul") if num is not None else None
        if num is not None and den is not None and mul is not None and den.op_type == "ReduceSum":
            m = den.input[0]
            if m in mul.input and _axes(qp, num) == [1] and _axes(qp, den) == [1]:
                h = mul.input[1] if mul.input[0] == m else mul.input[0]
                hs = shapes.get(h)
                if hs and len(hs) == 3 and sole(mul.output[0]) and sole(num.output[0]):
                    qp.fused |= {mul.name, num.name, den.name} | ({clip.name} if clip else set())
                    qp.anchors[d.name] = _masked_mean_rule(h, m)
                    continue
        # L2 normalisation: Div(x, [Expand](Clip(ReduceL2(x, [-1], keepdims=1), eps)))
        x = d.input[0]
        den = prods.get(d.input[1])
        expand = den if den is not None and den.op_type == "Expand" else None
        if expand is not None:
            den = prods.get(expand.input[0])
        clip = den if _positive_clip(qp, den, 1e-3) else None
        red = prod(clip.input[0], "ReduceL2") if clip is not None else None
        xs = shapes.get(x)
        if red is None or red.input[0] != x or not xs:
            continue
        keep = int(attrs(red).get("keepdims", 1))
        if _axes(qp, red) not in ([-1], [len(xs) - 1]) or not keep:
            continue
        inner = [red, clip] + ([expand] if expand is not None else [])
        if not all(sole(n.output[0]) for n in inner):
            continue
        qp.fused |= {n.name for n in inner}
        qp.anchors[d.name] = _l2_rule(x)


def _masked_mean_rule(h: str, m: str):
    def rule(qp: QuantizePass, node: onnx.NodeProto) -> None:
        hq = qp.materialize(h)
        base = _base(node.name or node.output[0])
        y = qp._emit("IntMaskedMean", [hq.name, qp._get(m).name], f"{base}_i32", base)
        qp.q[node.output[0]] = QTensor(y, "int32", hq.scale)
        qp.rewrites.append(f"{node.name}: masked mean pooling -> IntMaskedMean")

    return rule


def _l2_rule(x: str):
    def rule(qp: QuantizePass, node: onnx.NodeProto) -> None:
        xq = qp.as_dtype(x, "int16")
        base = _base(node.name or node.output[0])
        y = qp._emit("IntL2Normalize", [xq.name], f"{base}_i32", base, frac_bits=L2_FRAC_BITS)
        qp.q[node.output[0]] = QTensor(y, "int32", np.asarray(2.0**-L2_FRAC_BITS))
        qp.rewrites.append(f"{node.name}: L2 normalisation -> IntL2Normalize")

    return rule


# ------------------------------------------------------------------ SmoothQuant matmuls
@quant_rule("MatMul")
def matmul(qp: QuantizePass, node: onnx.NodeProto) -> None:
    """With CompileConfig.smooth_alpha: per-input-channel int8 activation scales migrated into
    the weight rows (see the config docstring); otherwise the plain MatMul rule."""
    deferred = qp.deferred_softmax.get(node.input[0])
    if deferred is not None:
        base = _base(node.name or node.output[0])
        v = qp.as_dtype(node.input[1], "int8")
        acc = qp._emit("IntMatMul", [deferred, v.name], f"{base}_acc", base)
        k = ROW_NORM_FRAC_BITS
        y = qp._emit("IntRowNormalize", [acc, deferred], f"{base}_i32", f"{base}_norm", frac_bits=k)
        qp.q[node.output[0]] = QTensor(y, "int32", np.asarray(float(v.scale) / 2**k))
        return
    alpha = qp.cfg.smooth_alpha
    w = qp._const_value(node.input[1])
    src = qp.q.get(node.input[0])
    ca = qp.cal.channel_amax(node.input[0])
    if (
        alpha is None
        or w is None
        or w.ndim != 2
        or src is None
        or not src.per_tensor
        or src.dtype not in ("int16", "int32")
        or ca is None
        or ca.shape != (w.shape[0],)
        or qp._const_value(node.input[0]) is not None
    ):
        qp._op_MatMul(node)
        return
    from intq.ops import fixedpoint as fp

    base = _base(node.name or node.output[0])
    w64 = w.astype(np.float64)
    xa = np.maximum(ca.astype(np.float64), 1e-6)
    wa = np.maximum(np.abs(w64).max(axis=1), 1e-6)
    m = xa**alpha / wa ** (1.0 - alpha)
    wname, sw = qp._quantize_weight(w64 * m[:, None], 1, base)
    bias_add = qp._fusable_bias(node, w.shape[1])
    amax = float((xa / m).max())  # range of the smoothed activation x / m
    dt, clip = "int8", {}
    if qp.cfg.linear_input == "int16":
        bias = None if bias_add is None else bias_add[1]
        qmax = int16_linear_qmax(int(w.shape[0]), bias, amax, sw)
        dt, clip = "int16", {"clip_min": -qmax, "clip_max": qmax}
    s_act = amax / (clip["clip_max"] if clip else 127)
    ratios = float(src.scale) / (s_act * m)
    bc = [fp.quantize_multiplier(float(r)) for r in ratios]
    b = np.array([v[0] for v in bc], dtype=np.int32)
    c = np.array([v[1] for v in bc], dtype=np.int32)
    xq = qp._emit(
        "Requantize",
        [src.name, qp._const(f"{base}_smooth_mult", b), qp._const(f"{base}_smooth_shift", c)],
        f"{base}_smooth_{dt}",
        f"{base}_smooth_requant",
        to=ONNX_DT[dt],
        axis=-1,
        **clip,
    )
    acc_scale = s_act * sw
    ins = [xq, wname]
    out_float = node.output[0]
    if bias_add is not None:
        add, bias = bias_add
        ins.append(qp._quantize_bias(bias, acc_scale, base))
        qp.fused.add(add.name)
        out_float = add.output[0]
    out = qp._emit("IntMatMul", ins, f"{base}_acc", base)
    qp.q[out_float] = QTensor(out, "int32", acc_scale, axis=-1)
    qp.rewrites.append(f"{node.name}: SmoothQuant (alpha {alpha}) per-channel {dt} input")
