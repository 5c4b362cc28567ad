"""intq-domain ops (``ai.intq``): integer matmul/conv, requantization, residual add and the
integer nonlinearities. The numpy functions here ARE the semantics; docs/OPS.md restates them.

Conventions: "int" inputs are widened to int64 before any arithmetic; outputs are saturated to
the output dtype's range exactly as written; no op wraps around.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import onnx

from intq.errors import GraphError
from intq.ir import INTQ_DOMAIN
from intq.ops import fixedpoint as fp
from intq.ops.registry import InputSpec, OpDef, Shape, register

I64 = np.int64
OUT_DTYPES = {
    onnx.TensorProto.INT8: np.dtype("int8"),
    onnx.TensorProto.UINT8: np.dtype("uint8"),
    onnx.TensorProto.INT16: np.dtype("int16"),
    onnx.TensorProto.INT32: np.dtype("int32"),
}
# |acc| bound for IntMatMul / IntConv: K * 255 * 128 must stay below 2^31.
MAX_REDUCTION = (2**31 - 1) // (255 * 128)
# Softmax probabilities: uint8 with scale 2^-SOFTMAX_OUT_BITS; reciprocal has 2^30 numerator.
SOFTMAX_OUT_BITS = 8
SOFTMAX_RECIP_BITS = 30


def out_dtype(attrs: dict[str, Any]) -> np.dtype:
    return OUT_DTYPES[int(attrs["to"])]


def _broadcast(a: Shape, b: Shape) -> Shape:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError as e:
        raise GraphError(f"shapes {a} and {b} do not broadcast") from e


def _exact_int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer matmul through float64 BLAS: every product and partial sum is an integer of
    magnitude < 2^31 << 2^53, so float64 represents each exactly and no rounding can occur."""
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(I64)


# ---------------------------------------------------------------------------------------------
# IntMatMul
def _matmul_shape(shapes, dtypes, attrs):
    a, b = shapes[0], shapes[1]
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        raise GraphError(f"IntMatMul: shapes {a} and {b} are not matmul-compatible")
    if a[-1] > MAX_REDUCTION:
        raise GraphError(f"IntMatMul: reduction length {a[-1]} > {MAX_REDUCTION} may overflow")
    if len(shapes) > 2 and shapes[2] not in ((b[-1],), ()):
        raise GraphError(f"IntMatMul: bias shape {shapes[2]} is not ({b[-1]},)")
    batch = _broadcast(a[:-2], b[:-2])
    return [((*batch, a[-2], b[-1]), np.dtype("int32"))]


def _matmul_ref(xs, attrs):
    acc = _exact_int_matmul(xs[0], xs[1])
    if len(xs) > 2 and xs[2] is not None:
        acc = acc + xs[2].astype(I64)
    return [acc.astype(np.int32)]


register(
    OpDef(
        name="IntMatMul",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("A", ("int8", "uint8", "int16"), doc="[..., M, K]"),
            InputSpec("B", ("int8",), doc="[..., K, N]"),
            InputSpec("C", ("int32",), optional=True, doc="bias [N]"),
        ),
        attributes={},
        shape=_matmul_shape,
        reference=_matmul_ref,
        doc="Y = A @ B (+ C), int32 accumulation with numpy matmul broadcasting.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntConv
def _conv_geometry(x: Shape, w: Shape, attrs: dict[str, Any]) -> Shape:
    nd = len(x) - 2
    strides = list(attrs["strides"] or [1] * nd)
    dil = list(attrs["dilations"] or [1] * nd)
    pads = list(attrs["pads"] or [0] * (2 * nd))
    g = int(attrs["group"])
    if nd != 2 or len(w) != 4:
        raise GraphError(f"IntConv: only 2-D convolution is supported, got input {x} weight {w}")
    if x[1] != w[1] * g or w[0] % g:
        raise GraphError(f"IntConv: channels {x[1]} / weight {w} / group {g} disagree")
    if x[1] // g * w[2] * w[3] > MAX_REDUCTION:
        raise GraphError("IntConv: reduction length may overflow int32")
    out = [x[0], w[0]]
    for i in range(nd):
        eff = dil[i] * (w[2 + i] - 1) + 1
        out.append((x[2 + i] + pads[i] + pads[i + nd] - eff) // strides[i] + 1)
    return tuple(out)


def _conv_shape(shapes, dtypes, attrs):
    return [(_conv_geometry(shapes[0], shapes[1], attrs), np.dtype("int32"))]


def _conv_ref(xs, attrs):
    x, w = xs[0], xs[1]
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    g = int(attrs["group"])
    sh, sw = attrs["strides"] or [1, 1]
    dh, dw = attrs["dilations"] or [1, 1]
    pt, pl, pb, pr = attrs["pads"] or [0, 0, 0, 0]
    _, _, oh, ow = _conv_geometry(x.shape, w.shape, attrs)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out = np.empty((n, m, oh, ow), dtype=I64)
    mg = m // g
    for gi in range(g):
        xg = xp[:, gi * cg : (gi + 1) * cg]
        cols = np.empty((n, cg, kh, kw, oh, ow), dtype=np.float64)
        for i in range(kh):
            for j in range(kw):
                hs, ws = i * dh, j * dw
                cols[:, :, i, j] = xg[:, :, hs : hs + sh * oh : sh, ws : ws + sw * ow : sw]
        wg = w[gi * mg : (gi + 1) * mg].reshape(mg, -1).astype(np.float64)
        # exact: integer products and sums of magnitude < 2^31 (see _exact_int_matmul)
        out[:, gi * mg : (gi + 1) * mg] = (
            np.einsum("mk,nkp->nmp", wg, cols.reshape(n, cg * kh * kw, oh * ow))
            .reshape(n, mg, oh, ow)
            .astype(I64)
        )
    if len(xs) > 2 and xs[2] is not None:
        out = out + xs[2].astype(I64)[None, :, None, None]
    return [out.astype(np.int32)]


register(
    OpDef(
        name="IntConv",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int8", "uint8"), doc="[N, C, H, W]"),
            InputSpec("W", ("int8",), doc="[M, C/group, kH, kW]"),
            InputSpec("B", ("int32",), optional=True, doc="bias [M]"),
        ),
        attributes={"strides": [], "pads": [], "dilations": [], "group": 1},
        shape=_conv_shape,
        reference=_conv_ref,
        doc="2-D convolution (ONNX Conv geometry), zero padding, int32 accumulation (+ B).",
    )
)


# ---------------------------------------------------------------------------------------------
# Requantize
def multiplier_array(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A scalar, a per-channel vector (reshaped to broadcast along `axis` of an ndim tensor) or
    an array of the tensor's rank (broadcast as it is)."""
    v = v.astype(I64)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    if v.ndim == ndim and ndim > 1:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def _requant_shape(shapes, dtypes, attrs):
    x, b, c = shapes
    if b != c:
        raise GraphError(f"Requantize: multiplier {b} and shift {c} must have one shape")
    if len(b) > 1 or (len(b) == 1 and len(x) == 1):
        if len(b) != len(x) or any(bd not in (1, xd) for bd, xd in zip(b, x, strict=True)):
            raise GraphError(f"Requantize: multiplier of shape {b} does not broadcast to {x}")
    elif len(b) == 1 and b[0] != 1:
        ax = int(attrs["axis"]) % max(1, len(x))
        if x[ax] != b[0]:
            raise GraphError(f"Requantize: {b[0]} multipliers for axis {ax} of shape {x}")
    return [(x, out_dtype(attrs))]


def requant_bounds(attrs: dict[str, Any]) -> tuple[int, int]:
    lo, hi = fp.dtype_bounds(out_dtype(attrs))
    cmin, cmax = attrs.get("clip_min"), attrs.get("clip_max")
    return (
        max(lo, int(cmin)) if cmin is not None else lo,
        min(hi, int(cmax)) if cmax is not None else hi,
    )


def _requant_ref(xs, attrs):
    x = xs[0].astype(I64)
    b = multiplier_array(xs[1], x.ndim, int(attrs["axis"]))
    c = multiplier_array(xs[2], x.ndim, int(attrs["axis"]))
    if np.any(c < 0) or np.any(c > fp.MAX_SHIFT) or np.any(b < 0) or np.any(b >= 2**31):
        raise GraphError("Requantize: multiplier must be in [0, 2^31) and shift in [0, 62]")
    lo, hi = requant_bounds(attrs)
    return [fp.requantize_dyadic(x, b, c, lo, hi).astype(out_dtype(attrs))]


register(
    OpDef(
        name="Requantize",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int8", "uint8", "int16", "int32")),
            InputSpec(
                "multiplier",
                ("int32",),
                doc="b: scalar, [C] along axis, or X's rank broadcasting to X; 0 <= b < 2^31",
            ),
            InputSpec("shift", ("int32",), doc="c: b's shape, 0 <= c <= 62"),
        ),
        attributes={"axis": -1, "to": onnx.TensorProto.INT8, "clip_min": None, "clip_max": None},
        shape=_requant_shape,
        reference=_requant_ref,
        doc="Y = saturate(floor((X*b + 2^(c-1)) / 2^c)); int64 intermediate; clip_min/max "
        "narrow the saturation range (ReLU/clip folding).",
    )
)


# ---------------------------------------------------------------------------------------------
# QuantizeFloatBits (the input quantizer)
def _qbits_shape(shapes, dtypes, attrs):
    b, c = int(attrs["multiplier"]), int(attrs["shift"])
    if not (0 < b < 2**fp.MANTISSA_BITS) or not (0 <= c <= fp.MAX_SHIFT):
        raise GraphError(
            f"QuantizeFloatBits: multiplier {b} must be in (0, 2^31) and shift {c} in [0, 62]"
        )
    if out_dtype(attrs).itemsize > 2:  # the shift clamp saturates exactly only below 2^23
        raise GraphError(f"QuantizeFloatBits: output {out_dtype(attrs)} (8 or 16 bits only)")
    return [(shapes[0], out_dtype(attrs))]


def _qbits_ref(xs, attrs):
    lo, hi = requant_bounds(attrs)
    b, c = int(attrs["multiplier"]), int(attrs["shift"])
    return [fp.quantize_float_bits(xs[0], b, c, lo, hi).astype(out_dtype(attrs))]


register(
    OpDef(
        name="QuantizeFloatBits",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int32",), doc="IEEE-754 binary32 bit patterns"),),
        attributes={"multiplier": 1, "shift": 0, "to": onnx.TensorProto.INT8},  # 8 / 16 bits
        shape=_qbits_shape,
        reference=_qbits_ref,
        doc="The input quantizer on the float input's bits: Y = saturate(floor(value(X) * b / "
        "2^c + 1/2)) with b / 2^c = 1 / scale, decoded and rounded in int64 "
        "(fixedpoint.quantize_float_bits); inf and NaN saturate by their sign bit.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntAdd
def _add_shape(shapes, dtypes, attrs):
    return [(_broadcast(shapes[0], shapes[1]), out_dtype(attrs))]


def _add_ref(xs, attrs):
    lo, hi = fp.dtype_bounds(out_dtype(attrs))
    y = np.clip(xs[0].astype(I64) + xs[1].astype(I64), lo, hi)
    return [y.astype(out_dtype(attrs))]


register(
    OpDef(
        name="IntAdd",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("A", ("int8", "int16", "int32")),
            InputSpec("B", ("int8", "int16", "int32")),
        ),
        attributes={"to": onnx.TensorProto.INT16},
        shape=_add_shape,
        reference=_add_ref,
        doc="Y = saturate(A + B) (broadcasting); A and B share one scale (the pass ensures it).",
    )
)


# ---------------------------------------------------------------------------------------------
# IntLayerNorm
def layernorm_row_stats(x, n: int, eps: int, reduce_sum, xp=fp.NUMPY):
    """(mean, std) of each row of int64 `x` (last axis, length n), shape [..., 1]."""
    mean = fp.div_round(reduce_sum(x), n)
    xc = x - mean
    var = xp.maximum(fp.div_round(reduce_sum(xc * xc), n) + eps, 1)
    std = xp.maximum(fp.isqrt_newton(var, xp), 1)
    return mean, std


LN_STD_BITS = fp.ISQRT_DOMAIN_BITS // 2  # std <= 2^20: isqrt_newton starts there and decreases


def layernorm_normalise(
    x, mean, std, gamma, beta, frac_bits: int, in_bits: int, xp=fp.NUMPY, magic=None
):
    """div_round((x - mean) << frac_bits, std) * gamma + beta (int64), for |x - mean| <
    2^in_bits: the division by the row's std through fixedpoint.div_round_by_row (exactly
    div_round; `magic` = fixedpoint.row_magic(std, in_bits + frac_bits, LN_STD_BITS) when the
    caller computed it per row already)."""
    xc = x - mean
    y = fp.div_round_by_row(xc << frac_bits, std, in_bits + frac_bits, LN_STD_BITS, xp, magic)
    return y * gamma + beta


@functools.lru_cache(maxsize=64)
def layernorm_q_bound(n: int, eps: int, frac_bits: int, in_bits: int) -> int | None:
    """An upper bound Q on |q|, q = div_round((x - mean) << frac_bits, std), over every row of n
    values with |x - mean| < 2^in_bits (layernorm_row_stats' mean and std); None outside the
    domain it is proved on (4^in_bits + eps < 2^ISQRT_DOMAIN_BITS, where std = max(floor(
    sqrt(var)), 1) exactly). Then q * gamma + beta fits in int32 wherever Q |gamma| + |beta| <
    2^31 (a lowering's int32 path: the saturation to int32 never acts).

    Proof: with d_i = x_i - mean and s2 = sum d_i^2, every |d_i| <= sqrt(s2), and var >=
    div_round(s2, n) + eps >= (2 s2 - n + 1) / (2n) + eps, so s2 < n (var + 1 - eps). For std = k
    (var in [k^2, (k+1)^2 - 1], k >= isqrt(max(eps, 1))): s2 < n ((k+1)^2 - eps) = S_k and
    |q| <= floor(|d| 2^f / k + 1/2) <= floor((isqrt(S_k 4^f) + 1) / k) + 1. Q is the largest of
    these over the k the domain allows (k <= isqrt(4^in_bits + eps))."""
    if in_bits > 16 or eps < 0 or (1 << (2 * in_bits)) + eps >= (1 << fp.ISQRT_DOMAIN_BITS):
        return None
    k_lo = max(math.isqrt(max(eps, 1)), 1)
    k_hi = math.isqrt((1 << (2 * in_bits)) + eps)
    scale = 1 << (2 * frac_bits)
    best = 0
    for k in range(k_lo, k_hi + 1):
        s_k = n * ((k + 1) ** 2 - eps)
        best = max(best, (math.isqrt(s_k * scale) + 1) // k + 1)
    return best


def layernorm_affine_fits_int32(gamma, beta, n: int, eps: int, frac_bits: int, in_bits: int):
    """Whether q * gamma + beta fits in int32 for every q a row can give (layernorm_q_bound) and
    every channel of the constant `gamma`, `beta`."""
    q = layernorm_q_bound(n, eps, frac_bits, in_bits)
    if q is None or q >= (1 << 31):  # (then q * |gamma| < 2^62: int64 below is exact)
        return False
    g = np.abs(np.asarray(gamma, np.int64))
    b = np.abs(np.asarray(beta, np.int64))
    return bool((q * g + b).max(initial=0) < (1 << 31))


def layernorm_core(
    x, gamma, beta, n: int, eps: int, frac_bits: int, reduce_sum, xp=fp.NUMPY, in_bits: int = 16
):
    """Integer LayerNorm over the last axis (length n) of int64 `x` (|x| <= 2^(in_bits-1), so
    |x - mean| < 2^in_bits); `reduce_sum(t)` sums the last axis keeping it. Returns int64
    (caller saturates to int32)."""
    mean, std = layernorm_row_stats(x, n, eps, reduce_sum, xp)
    return layernorm_normalise(x, mean, std, gamma, beta, frac_bits, in_bits, xp)


def _ln_shape(shapes, dtypes, attrs):
    x, g, b = shapes
    if g != (x[-1],) or b != (x[-1],):
        raise GraphError(f"IntLayerNorm: gamma {g} / beta {b} must be ({x[-1]},)")
    if int(attrs["axis"]) not in (-1, len(x) - 1):
        raise GraphError("IntLayerNorm: only the last axis is supported")
    return [(x, np.dtype("int32"))]


def _ln_ref(xs, attrs):
    x = xs[0].astype(I64)
    n = x.shape[-1]
    y = layernorm_core(
        x,
        xs[1].astype(I64),
        xs[2].astype(I64),
        n,
        int(attrs["epsilon"]),
        int(attrs["frac_bits"]),
        lambda t: t.sum(axis=-1, keepdims=True),
        in_bits=8 * xs[0].dtype.itemsize,
    )
    lo, hi = fp.dtype_bounds(np.int32)
    return [np.clip(y, lo, hi).astype(np.int32)]


register(
    OpDef(
        name="IntLayerNorm",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int8", "int16"), doc="[..., C]"),
            InputSpec("gamma", ("int32",), doc="[C], |gamma| < 2^11"),
            InputSpec("beta", ("int32",), doc="[C]"),
        ),
        attributes={"axis": -1, "epsilon": 0, "frac_bits": 10},
        shape=_ln_shape,
        reference=_ln_ref,
        doc="mean = div_round(sum x, C); xc = x - mean; var = div_round(sum xc^2, C) + eps; "
        "std = isqrt_newton(max(var,1)); Y = div_round(xc << k, std) * gamma + beta.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntSoftmax (Shiftmax)
def softmax_core(x, frac_bits: int, reduce_max, reduce_sum, xp=fp.NUMPY):
    """Shiftmax over the last axis of int64 `x` (a base-2 exponent with `frac_bits` fraction
    bits). Returns int64 probabilities in [0, 255] with scale 2^-8."""
    e = fp.exp2_neg(reduce_max(x) - x, frac_bits, xp)
    s = reduce_sum(e)
    recip = (1 << SOFTMAX_RECIP_BITS) // s
    shift = SOFTMAX_RECIP_BITS - SOFTMAX_OUT_BITS
    y = (e * recip + (1 << (shift - 1))) >> shift
    return xp.minimum(y, (1 << SOFTMAX_OUT_BITS) - 1)


def _softmax_shape(shapes, dtypes, attrs):
    if int(attrs["axis"]) not in (-1, len(shapes[0]) - 1):
        raise GraphError("IntSoftmax: only the last axis is supported")
    return [(shapes[0], np.dtype("uint8"))]


def _softmax_ref(xs, attrs):
    y = softmax_core(
        xs[0].astype(I64),
        int(attrs["frac_bits"]),
        lambda t: t.max(axis=-1, keepdims=True),
        lambda t: t.sum(axis=-1, keepdims=True),
    )
    return [y.astype(np.uint8)]


register(
    OpDef(
        name="IntSoftmax",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int32",), doc="z * 2^F where softmax = 2^z / sum 2^z"),),
        attributes={"axis": -1, "frac_bits": 12},
        shape=_softmax_shape,
        reference=_softmax_ref,
        doc="Shiftmax: e = exp2_neg(max - x); r = floor(2^30 / sum e); "
        "Y = min(255, (e*r + 2^21) >> 22), uint8 with scale 2^-8.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntGELU (ShiftGELU)
def gelu_core(x, alpha: int, frac_bits: int, xp=fp.NUMPY):
    """ShiftGELU of int64 `x`: x * sigmoid(1.702 x) with the sigmoid from two exp2_neg terms.
    `alpha` = round(1.702 * log2(e) * s_x * 2^F). Returns int64 with scale s_x * 2^-EXP2_BITS."""
    a = x * alpha
    m = xp.maximum(a, 0)
    e1 = fp.exp2_neg(m - a, frac_bits, xp)
    e2 = fp.exp2_neg(m, frac_bits, xp)
    sig = (e1 << fp.EXP2_BITS) // (e1 + e2)
    return x * sig


def _gelu_shape(shapes, dtypes, attrs):
    return [(shapes[0], np.dtype("int32"))]


def _gelu_ref(xs, attrs):
    y = gelu_core(xs[0].astype(I64), int(attrs["alpha"]), int(attrs["frac_bits"]))
    return [y.astype(np.int32)]


register(
    OpDef(
        name="IntGELU",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8",)),),
        attributes={"alpha": 1, "frac_bits": 12},
        shape=_gelu_shape,
        reference=_gelu_ref,
        doc="ShiftGELU: a = x*alpha; m = max(a,0); e1 = exp2_neg(m-a); e2 = exp2_neg(m); "
        "sig = (e1 << 14) // (e1+e2); Y = x*sig (int32, scale s_x*2^-14).",
    )
)


# ---------------------------------------------------------------------------------------------
# IntMean
def _reduced_shape(shape: Shape, attrs: dict[str, Any]) -> Shape:
    axes = {int(a) % len(shape) for a in attrs["axes"]}
    if attrs["keepdims"]:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _mean_shape(shapes, dtypes, attrs):
    if not attrs["axes"]:
        raise GraphError("IntMean: axes must be given")
    return [(_reduced_shape(shapes[0], attrs), np.dtype("int32"))]


def _mean_ref(xs, attrs):
    x = xs[0].astype(I64)
    axes = tuple(int(a) % x.ndim for a in attrs["axes"])
    n = int(np.prod([x.shape[a] for a in axes]))
    y = fp.div_round(x.sum(axis=axes, keepdims=bool(attrs["keepdims"])), n)
    return [y.astype(np.int32)]


register(
    OpDef(
        name="IntMean",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "int16", "int32")),),
        attributes={"axes": [], "keepdims": 1},
        shape=_mean_shape,
        reference=_mean_ref,
        doc="Y = div_round(sum of X over axes, count) (int32, same scale as X); int64 sum.",
    )
)
