"""intq ops for BERT-style encoders: embedding lookup from per-row int8 tables, key-masked
softmax (I-ViT Shiftmax and I-BERT's i-exp softmax), I-BERT's i-GELU, masked mean pooling and
L2 normalisation with the integer square root. The numpy functions here ARE the semantics
(docs/OPS.md restates them); `codegen/lower_bert.py` evaluates the same `*_core` formulas over
TE expressions.

All arithmetic is int64; outputs are saturated to their dtype, never wrapped.
"""

from __future__ import annotations

import numpy as np
import onnx

from intq.errors import GraphError
from intq.ir import INTQ_DOMAIN
from intq.ops import fixedpoint as fp
from intq.ops.core import OUT_DTYPES, SOFTMAX_OUT_BITS, SOFTMAX_RECIP_BITS
from intq.ops.registry import InputSpec, OpDef, register

I64 = np.int64
# "no key is kept" sentinel below every int32 score (int64 arithmetic)
MASKED_SCORE = -(2**31) - 1
# I-BERT softmax: e < 2^27 and sum e < 2^(27 + log2 S); reciprocal numerator 2^IBERT_RECIP_BITS
IBERT_RECIP_BITS = 56
# I-BERT i-exp polynomial exp(p) ~ A (p + B)^2 + C on p in (-ln 2, 0] (Kim et al. 2021)
IEXP_A, IEXP_B, IEXP_C = 0.3585, 1.353, 0.344
# I-BERT i-erf polynomial erf(u) ~ sign(u) (1 - A (min(|u|, B) - B)^2)
IERF_A, IERF_B = 0.2888, 1.769
L2_MAX_DIM = 1023  # D * 32767^2 < 2^40 (isqrt_newton's exact domain) for int16 inputs


# ---------------------------------------------------------------------------------------------
# IntEmbedding
def embedding_core(table_val, mult_val, shift: int, lo: int, hi: int, xp=fp.NUMPY):
    """Row value * its row multiplier, shifted (round half up) and saturated: int64."""
    return fp.requantize_dyadic(table_val, mult_val, shift, lo, hi, xp)


def _emb_shape(shapes, dtypes, attrs):
    ids, table, mult = shapes
    if len(table) != 2 or mult != (table[0],):
        raise GraphError(f"IntEmbedding: table {table} must be [V, D] and multipliers [V]")
    return [((*ids, table[1]), OUT_DTYPES[int(attrs["to"])])]


def _emb_ref(xs, attrs):
    ids, table, mult = xs[0].astype(I64), xs[1], xs[2]
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise GraphError(f"IntEmbedding: index {bad} outside the table's {v} rows")
    dt = OUT_DTYPES[int(attrs["to"])]
    lo, hi = fp.dtype_bounds(dt)
    y = embedding_core(
        table[ids].astype(I64), mult[ids].astype(I64)[..., None], int(attrs["shift"]), lo, hi
    )
    return [y.astype(dt)]


register(
    OpDef(
        name="IntEmbedding",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("ids", ("int64", "int32"), doc="[...], 0 <= id < V"),
            InputSpec("table", ("int8",), doc="[V, D], row v at scale s_v"),
            InputSpec("multiplier", ("int32",), doc="[V]: round(s_v / s_out * 2^shift)"),
        ),
        attributes={"shift": 0, "to": onnx.TensorProto.INT16},
        shape=_emb_shape,
        reference=_emb_ref,
        doc="Y[..., d] = clip(round_shift(table[id, d] * multiplier[id], shift)) (per-row int8 "
        "table lookup to one common output scale).",
    )
)


# ---------------------------------------------------------------------------------------------
# key-masked softmax, both kernels
def masked_max(x, keep, reduce_max, xp=fp.NUMPY):
    """max over the kept keys (MASKED_SCORE when none is kept)."""
    return reduce_max(xp.where(keep, x, MASKED_SCORE))


def shiftmax_exp(x, mx, keep, frac_bits: int, xp=fp.NUMPY):
    """Shiftmax's exponential of a kept key: exp2_neg(max - x) (14 fraction bits); 0 if masked."""
    return xp.where(keep, fp.exp2_neg(xp.maximum(mx - x, 0), frac_bits, xp), xp.i64(0))


def iexp_neg(d, ln2: int, poly_b: int, poly_c: int, frac_bits: int, xp=fp.NUMPY):
    """I-BERT's i-exp of -d / 2^F for d >= 0: exp(-d) = 2^-z exp(p), z = floor(d / ln2),
    p = -(d - z ln2) in (-ln2, 0]; exp(p) ~ (p + b)^2 + c (scale IEXP_A * 2^-2F); then >> z.
    `ln2` = round(ln 2 * 2^F), `poly_b` = floor(1.353 * 2^F), `poly_c` = floor(0.344/0.3585 *
    2^2F). The shift is capped at 2F + 4 (the value is already 0 there)."""
    z = d // ln2
    p = z * ln2 - d
    v = (p + poly_b) * (p + poly_b) + poly_c
    return v >> xp.minimum(z, 2 * frac_bits + 4)


def ibert_exp(x, mx, keep, frac_bits: int, ln2: int, poly_b: int, poly_c: int, xp=fp.NUMPY):
    """I-BERT softmax's exponential of a kept key: iexp_neg(max - x); 0 if masked."""
    d = xp.maximum(mx - x, 0)
    return xp.where(keep, iexp_neg(d, ln2, poly_b, poly_c, frac_bits, xp), xp.i64(0))


def normalise(e, total, recip_bits: int, xp=fp.NUMPY):
    """e / total as uint8 probabilities (scale 2^-8): r = floor(2^R / max(total, 1)),
    min(255, (e r + 2^(R-9)) >> (R-8))."""
    recip = (1 << recip_bits) // xp.maximum(total, 1)
    shift = recip_bits - SOFTMAX_OUT_BITS
    return xp.minimum((e * recip + (1 << (shift - 1))) >> shift, (1 << SOFTMAX_OUT_BITS) - 1)


def _keep(xs, x):
    if len(xs) > 1 and xs[1] is not None:
        return np.broadcast_to(xs[1] != 0, x.shape)
    return np.ones(x.shape, dtype=bool)


def _softmax_shape(shapes, dtypes, attrs):
    x = shapes[0]
    if len(shapes) > 1 and shapes[1] is not None:
        m = shapes[1]
        try:
            if np.broadcast_shapes(x, m) != tuple(x):
                raise ValueError
        except ValueError as e:
            raise GraphError(f"masked softmax: mask {m} does not broadcast to scores {x}") from e
    return [(x, np.dtype("uint8"))]


def _rowmax(t):
    return t.max(axis=-1, keepdims=True)


def _rowsum(t):
    return t.sum(axis=-1, keepdims=True)


def _masked_shiftmax_ref(xs, attrs):
    x = xs[0].astype(I64)
    keep = _keep(xs, x)
    e = shiftmax_exp(x, masked_max(x, keep, _rowmax), keep, int(attrs["frac_bits"]))
    return [normalise(e, _rowsum(e), SOFTMAX_RECIP_BITS).astype(np.uint8)]


def _ibert_softmax_ref(xs, attrs):
    x = xs[0].astype(I64)
    keep = _keep(xs, x)
    a = {k: int(attrs[k]) for k in ("frac_bits", "ln2", "poly_b", "poly_c")}
    e = ibert_exp(x, masked_max(x, keep, _rowmax), keep, **a)
    return [normalise(e, _rowsum(e), IBERT_RECIP_BITS).astype(np.uint8)]


_MASK = InputSpec("mask", ("int64", "int32", "int8", "uint8"), doc="broadcasts to X; != 0 keeps")

register(
    OpDef(
        name="IntMaskedSoftmax",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int32",), doc="base-2 exponent, F fraction bits"), _MASK),
        attributes={"frac_bits": 12},
        shape=_softmax_shape,
        reference=_masked_shiftmax_ref,
        doc="Shiftmax over the keys with mask != 0; masked keys get 0; uint8 (2^-8).",
    )
)
register(
    OpDef(
        name="IBertSoftmax",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int32",), doc="natural exponent, F fraction bits"),
            InputSpec("mask", _MASK.dtypes, optional=True, doc=_MASK.doc),
        ),
        attributes={"frac_bits": 12, "ln2": 2839, "poly_b": 5541, "poly_c": 16099},
        shape=_softmax_shape,
        reference=_ibert_softmax_ref,
        doc="I-BERT softmax: i-exp (ln2 decomposition + 2nd-order polynomial) over the kept "
        "keys, e * floor(2^56 / sum e) >> 48; uint8 (2^-8).",
    )
)


# ---------------------------------------------------------------------------------------------
# IBertGELU
def ibert_gelu_core(q, clip_b: int, poly_c: int, out_shift: int, xp=fp.NUMPY):
    """i-GELU: x (1 + erf(x / sqrt 2)) / 2 with I-BERT's i-erf. For x = q s, u = x / sqrt 2:
    t = min(|q|, B) - B, erf = sign(q) (C - t^2) / C (B = round(1.769 sqrt2 / s),
    C = round(2 / (0.2888 s^2))); Y = round_shift(q (C + sign(q) (C - t^2)), out_shift),
    scale s / (2 C) * 2^out_shift."""
    a = xp.maximum(q, -q)
    t = xp.minimum(a, clip_b) - clip_b
    erf = poly_c - t * t
    signed = xp.where(q < 0, -erf, erf)
    return fp.round_shift(q * (poly_c + signed), out_shift, xp)


def _gelu_shape(shapes, dtypes, attrs):
    return [(shapes[0], np.dtype("int32"))]


def _ibert_gelu_ref(xs, attrs):
    y = ibert_gelu_core(
        xs[0].astype(I64), int(attrs["clip_b"]), int(attrs["poly_c"]), int(attrs["out_shift"])
    )
    lo, hi = fp.dtype_bounds("int32")
    return [np.clip(y, lo, hi).astype(np.int32)]


register(
    OpDef(
        name="IBertGELU",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "int16")),),
        attributes={"clip_b": 1, "poly_c": 1, "out_shift": 0},
        shape=_gelu_shape,
        reference=_ibert_gelu_ref,
        doc="i-GELU: t = min(|x|, B) - B; erf = sign(x) (C - t^2); "
        "Y = round_shift(x (C + erf), out_shift), int32 at s / (2C) * 2^out_shift.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntMaskedMean
def _mmean_shape(shapes, dtypes, attrs):
    x, m = shapes
    if len(x) != 3 or tuple(m[:2]) != tuple(x[:2]) or len(m) not in (2, 3):
        raise GraphError(f"IntMaskedMean: X {x} must be [B, S, D] and mask [B, S] or [B, S, 1]")
    if len(m) == 3 and m[2] != 1:
        raise GraphError(f"IntMaskedMean: mask {m} must be [B, S] or [B, S, 1]")
    return [((x[0], x[2]), np.dtype("int32"))]


def _mmean_ref(xs, attrs):
    x = xs[0].astype(I64)
    m = xs[1].astype(I64).reshape(x.shape[0], x.shape[1], 1)
    total = (x * m).sum(axis=1)
    count = np.maximum(m.sum(axis=1), 1)
    lo, hi = fp.dtype_bounds("int32")
    return [np.clip(fp.div_round(total, count), lo, hi).astype(np.int32)]


register(
    OpDef(
        name="IntMaskedMean",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int8", "int16", "int32"), doc="[B, S, D]"),
            InputSpec("mask", ("int64", "int32", "int8", "uint8"), doc="[B, S] or [B, S, 1]"),
        ),
        attributes={},
        shape=_mmean_shape,
        reference=_mmean_ref,
        doc="Y[b, d] = div_round(sum_s X[b,s,d] M[b,s], max(sum_s M[b,s], 1)); int32, scale of X.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntL2Normalize
def l2_normalize_core(x, sumsq, frac_bits: int, xp=fp.NUMPY):
    """x / ||x|| with `frac_bits` fraction bits: norm = max(isqrt_newton(max(sumsq, 1)), 1)."""
    norm = xp.maximum(fp.isqrt_newton(xp.maximum(sumsq, 1), xp), 1)
    return fp.div_round(x << frac_bits, norm)


def _l2_shape(shapes, dtypes, attrs):
    x = shapes[0]
    if x[-1] > L2_MAX_DIM:
        raise GraphError(f"IntL2Normalize: last axis {x[-1]} > {L2_MAX_DIM} (isqrt domain)")
    return [(x, np.dtype("int32"))]


def _l2_ref(xs, attrs):
    x = xs[0].astype(I64)
    y = l2_normalize_core(x, (x * x).sum(axis=-1, keepdims=True), int(attrs["frac_bits"]))
    return [y.astype(np.int32)]


register(
    OpDef(
        name="IntL2Normalize",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "int16"), doc="[..., D], D <= 1023"),),
        attributes={"frac_bits": 14},
        shape=_l2_shape,
        reference=_l2_ref,
        doc="norm = max(isqrt_newton(max(sum x^2, 1)), 1); Y = div_round(x << k, norm) "
        "(int32, scale 2^-k).",
    )
)


# ---------------------------------------------------------------------------------------------
# Deferred softmax normalisation: IntSoftmaxNumerator + IntRowNormalize
NUMERATOR_MAX = 255  # default: uint8 numerators


def numerator_dtype(nmax: int) -> np.dtype:
    """uint8 numerators up to 255, int16 above (nmax <= 32767)."""
    return np.dtype("uint8") if nmax <= 255 else np.dtype("int16")


def exp_at_zero(kernel: str, poly_b: int, poly_c: int) -> int:
    """The kernel's exponential of 0 (the largest value it produces): E0."""
    return (1 << fp.EXP2_BITS) if kernel == "shiftmax" else poly_b * poly_b + poly_c


def numerator_core(e, e0: int, xp=fp.NUMPY, nmax: int = NUMERATOR_MAX):
    """e / E0 at scale 1/nmax: min(nmax, div_round(nmax e, E0))."""
    return xp.minimum(fp.div_round(e * nmax, e0), nmax)


def _numerator_ref(xs, attrs):
    x = xs[0].astype(I64)
    keep = _keep(xs, x)
    mx = masked_max(x, keep, _rowmax)
    f = int(attrs["frac_bits"])
    if attrs["kernel"] == "shiftmax":
        e = shiftmax_exp(x, mx, keep, f)
    else:
        e = ibert_exp(x, mx, keep, f, int(attrs["ln2"]), int(attrs["poly_b"]), int(attrs["poly_c"]))
    e0 = exp_at_zero(attrs["kernel"], int(attrs["poly_b"]), int(attrs["poly_c"]))
    nmax = int(attrs["nmax"])
    return [numerator_core(e, e0, nmax=nmax).astype(numerator_dtype(nmax))]


def _numerator_shape(shapes, dtypes, attrs):
    if attrs["kernel"] not in ("shiftmax", "ibert"):
        raise GraphError(f"IntSoftmaxNumerator: kernel {attrs['kernel']!r} is not shiftmax/ibert")
    if not 1 <= int(attrs["nmax"]) <= 32767:
        raise GraphError(f"IntSoftmaxNumerator: nmax {attrs['nmax']} is not in [1, 32767]")
    ((shape, _),) = _softmax_shape(shapes, dtypes, attrs)
    return [(shape, numerator_dtype(int(attrs["nmax"])))]


register(
    OpDef(
        name="IntSoftmaxNumerator",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("X", ("int32",), doc="exponent (base 2 for shiftmax, e for ibert)"),
            InputSpec("mask", _MASK.dtypes, optional=True, doc=_MASK.doc),
        ),
        attributes={
            "kernel": "shiftmax",
            "frac_bits": 12,
            "ln2": 2839,
            "poly_b": 5541,
            "poly_c": 16099,
            "nmax": NUMERATOR_MAX,
        },
        shape=_numerator_shape,
        reference=_numerator_ref,
        doc="Unnormalised softmax: e = the kernel's exp of (x - max) over kept keys; "
        "Y = min(nmax, div_round(nmax e, E0)) (e / e(0) at scale 1/nmax; uint8 for "
        "nmax <= 255, else int16).",
    )
)


def row_normalize_core(a, total, frac_bits: int, xp=fp.NUMPY):
    """div_round(a << k, max(total, 1))."""
    return fp.div_round(a << frac_bits, xp.maximum(total, 1))


def _rownorm_shape(shapes, dtypes, attrs):
    a, e = shapes
    if tuple(a[:-1]) != tuple(e[:-1]):
        raise GraphError(f"IntRowNormalize: rows of A {a} and E {e} differ")
    return [(a, np.dtype("int32"))]


def _rownorm_ref(xs, attrs):
    total = xs[1].astype(I64).sum(axis=-1, keepdims=True)
    y = row_normalize_core(xs[0].astype(I64), total, int(attrs["frac_bits"]))
    lo, hi = fp.dtype_bounds("int32")
    return [np.clip(y, lo, hi).astype(np.int32)]


register(
    OpDef(
        name="IntRowNormalize",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("A", ("int32",), doc="[..., M, N] = E @ V"),
            InputSpec("E", ("uint8", "int16"), doc="[..., M, K] softmax numerators"),
        ),
        attributes={"frac_bits": 8},
        shape=_rownorm_shape,
        reference=_rownorm_ref,
        doc="Y = div_round(A << k, max(sum_K E, 1)) (int32): attention (E @ V) / sum E.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntPolyGELU: erf-GELU with erf from a degree-n polynomial (Horner in fixed point)
POLY_ONE_BITS = 30  # erf values in Q30
POLY_U_BITS = 16  # the polynomial's argument u = |x| s / sqrt 2 in Q16


def poly_gelu_core(q, mult: int, shift: int, clip: int, coeffs, out_shift: int, xp=fp.NUMPY):
    """u = min(round_shift(|q| mult, shift), clip) (Q16); erf = Horner(coeffs, u) clamped to
    [0, 2^30] (coeffs in Q30, highest degree first; acc = (acc u >> 16) + c);
    Y = round_shift(q (2^30 + sign(q) erf), out_shift)."""
    a = xp.maximum(q, -q)
    u = xp.minimum(fp.round_shift(a * mult, shift, xp), clip)
    acc = q * 0 + int(coeffs[0])
    for c in coeffs[1:]:
        acc = ((acc * u) >> POLY_U_BITS) + int(c)
    erf = xp.minimum(xp.maximum(acc, 0), 1 << POLY_ONE_BITS)
    signed = xp.where(q < 0, -erf, erf)
    return fp.round_shift(q * ((1 << POLY_ONE_BITS) + signed), out_shift, xp)


def _poly_gelu_ref(xs, attrs):
    y = poly_gelu_core(
        xs[0].astype(I64),
        int(attrs["mult"]),
        int(attrs["shift"]),
        int(attrs["clip"]),
        [int(c) for c in attrs["coeffs"]],
        int(attrs["out_shift"]),
    )
    lo, hi = fp.dtype_bounds("int32")
    return [np.clip(y, lo, hi).astype(np.int32)]


def _poly_gelu_shape(shapes, dtypes, attrs):
    if not attrs["coeffs"]:
        raise GraphError("IntPolyGELU: coeffs must be given")
    return [(shapes[0], np.dtype("int32"))]


register(
    OpDef(
        name="IntPolyGELU",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "int16")),),
        attributes={"mult": 1, "shift": 0, "clip": 1, "coeffs": [], "out_shift": 0},
        shape=_poly_gelu_shape,
        reference=_poly_gelu_ref,
        doc="erf-GELU: u = min(round_shift(|x| mult, shift), clip) (Q16); erf = Horner(coeffs, "
        "u) (Q30, clamped to [0, 2^30]); Y = round_shift(x (2^30 + sign(x) erf), out_shift).",
    )
)
