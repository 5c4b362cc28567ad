"""Log2 attention (RepQ-ViT's log2 quantizer for attention probabilities, at inference).

Probabilities are stored as exponent codes k (uint8): p ~= 2^-k, so the attention-times-values
product needs shifts instead of multiplies. With B code bits, Z = 2^B - 1 is the zero code
(p below 2^-(Z - 1/2) is dropped) and every other code k in [0, Z-1] stands for 2^-k.

IntSoftmaxLog2 (int32 exponent z * 2^F in, uint8 codes out):
    e = exp2_neg(max(z) - z)            (as Shiftmax, EXP2_BITS fraction bits)
    p = e * floor(2^30 / sum e)          (p ~= prob * 2^30, 0 <= p <= 2^30)
    m = floor(log2 p) = sum_{j=1..30} [p >= 2^j]
    r = m + [p^2 >= 2^(2m+1)]            (log2 rounded to nearest, exactly, in integers)
    k = Z if p == 0 else min(30 - r, Z)
IntLog2MatMul (codes A[..., M, T] uint8, values V[..., T, N] int8 -> int32):
    Y[..., m, n] = sum_t (A < Z ? V[t, n] << (Z - 1 - A) : 0)       at scale s_V * 2^-(Z-1).
    The shape rule requires T * 127 * 2^(Z-1) < 2^31, so int32 never overflows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from intq.errors import GraphError
from intq.ir import INTQ_DOMAIN
from intq.ops import fixedpoint as fp
from intq.ops.core import SOFTMAX_RECIP_BITS
from intq.ops.registry import InputSpec, OpDef, register

I64 = np.int64
LOG2_CODE_BITS = (3, 4)


def zero_code(bits: int) -> int:
    if bits not in LOG2_CODE_BITS:
        raise GraphError(f"log2 attention: code bits must be one of {LOG2_CODE_BITS}, got {bits}")
    return (1 << bits) - 1


def ilog2_floor30(v: Any, xp: Any = fp.NUMPY) -> Any:
    """floor(log2 v) for 1 <= v <= 2^30 (0 for v <= 1), as a sum of comparisons."""
    m = xp.where(v >= 2, 1, 0)
    for j in range(2, SOFTMAX_RECIP_BITS + 1):
        m = m + xp.where(v >= (1 << j), 1, 0)
    return m


def log2_code(p: Any, bits: int, xp: Any = fp.NUMPY) -> Any:
    """Exponent code of the fixed-point probability p (p ~= prob * 2^30), see module doc."""
    z = zero_code(bits)
    m = ilog2_floor30(p, xp)
    r = m + xp.where(p * p >= (xp.i64(1) << (2 * m + 1)), 1, 0)
    return xp.where(p == 0, z, xp.minimum(SOFTMAX_RECIP_BITS - r, z))


def softmax_log2_probs(x, frac_bits: int, reduce_max, reduce_sum, xp=fp.NUMPY):
    """p = e * floor(2^30 / sum e), the fixed-point probability IntSoftmaxLog2 encodes."""
    e = fp.exp2_neg(reduce_max(x) - x, frac_bits, xp)
    return e * ((1 << SOFTMAX_RECIP_BITS) // reduce_sum(e))


def _softmax_log2_shape(shapes, dtypes, attrs):
    zero_code(int(attrs["bits"]))
    if int(attrs["axis"]) not in (-1, len(shapes[0]) - 1):
        raise GraphError("IntSoftmaxLog2: only the last axis is supported")
    return [(shapes[0], np.dtype("uint8"))]


def _softmax_log2_ref(xs, attrs):
    p = softmax_log2_probs(
        xs[0].astype(I64),
        int(attrs["frac_bits"]),
        lambda t: t.max(axis=-1, keepdims=True),
        lambda t: t.sum(axis=-1, keepdims=True),
    )
    return [log2_code(p, int(attrs["bits"])).astype(np.uint8)]


register(
    OpDef(
        name="IntSoftmaxLog2",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int32",), doc="z * 2^F where softmax = 2^z / sum 2^z"),),
        attributes={"axis": -1, "frac_bits": 12, "bits": 4},
        shape=_softmax_log2_shape,
        reference=_softmax_log2_ref,
        doc="Softmax with log2-coded output: k = round(-log2 p) in [0, 2^bits - 2], "
        "2^bits - 1 for p ~ 0 (uint8 codes).",
    )
)


def log2_matmul_max_tokens(bits: int) -> int:
    """Largest reduction length T with T * 127 * 2^(Z-1) < 2^31."""
    return ((1 << 31) - 1) // (127 << (zero_code(bits) - 1))


def _log2_mm_shape(shapes, dtypes, attrs):
    a, b = shapes
    bits = int(attrs["bits"])
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        raise GraphError(f"IntLog2MatMul: incompatible shapes {list(a)} x {list(b)}")
    if a[-1] > log2_matmul_max_tokens(bits):
        raise GraphError(
            f"IntLog2MatMul: reduction length {a[-1]} exceeds {log2_matmul_max_tokens(bits)} "
            f"(int32 accumulation bound at {bits} code bits)"
        )
    lead = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return [((*lead, a[-2], b[-1]), np.dtype("int32"))]


def _log2_mm_ref(xs, attrs):
    codes, v = xs[0].astype(I64), xs[1].astype(I64)
    z = zero_code(int(attrs["bits"]))
    weight = np.where(codes < z, np.left_shift(1, np.maximum(z - 1 - codes, 0)), 0)
    return [np.matmul(weight, v).astype(np.int32)]


register(
    OpDef(
        name="IntLog2MatMul",
        domain=INTQ_DOMAIN,
        inputs=(
            InputSpec("A", ("uint8",), doc="log2 codes"),
            InputSpec("V", ("int8",), doc="values"),
        ),
        attributes={"bits": 4},
        shape=_log2_mm_shape,
        reference=_log2_mm_ref,
        doc="Y = sum_t (A < Z ? V << (Z - 1 - A) : 0), int32, Z = 2^bits - 1.",
    )
)
