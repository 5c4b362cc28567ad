"""Fixed-point primitives: the single definition of intq's integer arithmetic.

Every function here is written against a tiny integer "namespace" `xp` (operators
``+ - * // >> << &`` plus ``xp.maximum / minimum / where / i64 / div_pos / bit_length``). The
numpy reference passes `NUMPY`; the TVM lowering passes a namespace over TE expressions, so the
reference and the compiled kernels evaluate literally the same formula. All intermediate values
are int64; every shift amount is in [0, 62], so no shift is undefined on any target.

Rounding is *round half up* everywhere: ``round_shift(x, c) = floor((x + 2^(c-1)) / 2^c)`` and
``div_round(a, b) = floor((2a + b) / (2b))`` for b > 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from intq.boundary import DTYPE_BOUNDS
from intq.errors import ConfigError

# Fixed-point bits of the exp2 approximation's output: 2^0 == 1 is represented by 1 << EXP2_BITS.
EXP2_BITS = 14
# Largest shift applied to an exp2 mantissa (anything >= EXP2_BITS + 1 already yields 0).
EXP2_MAX_SHIFT = 31
# Integer square root: Newton iterations from 2^ceil(bitlen(n)/2) (isqrt_init, >= sqrt(n) and
# < 2 sqrt(n) + 1), exact for 1 <= n < 2^ISQRT_DOMAIN_BITS; 5 steps always reach floor(sqrt(n))
# there (measured over the test domain), ISQRT_ITERS keeps a margin of 2 (further steps are
# no-ops). The start never exceeds 2^(ISQRT_DOMAIN_BITS/2), nor does the result.
ISQRT_DOMAIN_BITS = 40
ISQRT_INIT = 1 << (ISQRT_DOMAIN_BITS // 2)
ISQRT_ITERS = 7
# Dyadic multipliers M = b / 2^c: b < 2^31 (a 31-bit mantissa), 0 <= c <= 62.
MANTISSA_BITS = 31
MAX_SHIFT = 62


class _NumpyNS:
    """The numpy integer namespace (int64 arithmetic)."""

    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    where = staticmethod(np.where)

    @staticmethod
    def i64(x: Any) -> np.ndarray:
        return np.asarray(x).astype(np.int64)

    @staticmethod
    def div_pos(a: Any, b: Any) -> Any:
        """floor(a / b) for a >= 0, b > 0."""
        return a // b

    @staticmethod
    def bit_length(n: Any, bits: int) -> Any:
        """The number of k in [0, bits) with 2^k <= n (min(bitlen(n), bits) for n >= 0)."""
        count = np.zeros(np.shape(n), dtype=np.int64)
        for k in range(bits):
            count += np.asarray(n >= (1 << k), dtype=np.int64)
        return count


NUMPY = _NumpyNS()


def dtype_bounds(dtype: Any) -> tuple[int, int]:
    name = np.dtype(dtype).name
    if name not in DTYPE_BOUNDS:
        raise ConfigError(f"no integer bounds for dtype {name!r}")
    return DTYPE_BOUNDS[name]


def quantize_multiplier(m: float) -> tuple[int, int]:
    """Dyadic form of a positive real multiplier: M ~= b / 2^c, b in [2^30, 2^31), 0 <= c <= 62.

    b is M's 31-bit mantissa rounded to nearest. Multipliers below 2^-32 lose mantissa bits
    (c is capped at 62); M >= 2^31 is rejected. M == 0 gives (0, 0).
    """
    if not math.isfinite(m) or m < 0:
        raise ConfigError(f"requantization multiplier must be finite and >= 0, got {m!r}")
    if m == 0.0:
        return 0, 0
    frac, exp = math.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    c = MANTISSA_BITS - exp
    if c < 0:
        raise ConfigError(f"requantization multiplier {m!r} is too large (>= 2^31)")
    if c > MAX_SHIFT:
        c = MAX_SHIFT
        b = round(m * 2.0**c)
    else:
        b = round(frac * 2.0**MANTISSA_BITS)
        if b == 1 << MANTISSA_BITS:  # rounding carried into bit 31
            b >>= 1
            c -= 1
    return int(b), int(c)


def round_shift(x: Any, c: Any, xp: Any = NUMPY) -> Any:
    """floor((x + 2^(c-1)) / 2^c) for c >= 0 (x unchanged when c == 0). Round half up."""
    rnd = (xp.i64(1) << c) >> 1  # 2^(c-1), or 0 when c == 0
    return (x + rnd) >> c


def requantize_dyadic(x: Any, b: Any, c: Any, lo: int, hi: int, xp: Any = NUMPY) -> Any:
    """y = clip(round_shift(x * b, c), lo, hi) in int64: x * b / 2^c, round half up, saturate."""
    return xp.minimum(xp.maximum(round_shift(x * b, c, xp), lo), hi)


# The same requantization from the product's high 32 bits, for int32 x and b and 33 <= c <= 62
# (a lowering's fast path; tests check it against requantize_dyadic). With P = x * b = h 2^32 + l,
# h = floor(P / 2^32), 0 <= l < 2^32 and c - 1 >= 32, P + 2^(c-1) = (h + 2^(c-33)) 2^32 + l, so
# round_shift(P, c) = floor((h + 2^(c-33) + l / 2^32) / 2^(c-32)) = (h + 2^(c-33)) >> (c - 32):
# an integer plus a fraction below 1, divided by an integer. |P| <= 2^62 gives |h| <= 2^30 and
# 2^(c-33) <= 2^29: every step after the product fits in int32.
HI32_MIN_SHIFT = 33


def hi32_shift(b: Any, c: Any) -> np.ndarray:
    """The shifts the high-half form uses: c, or HI32_MIN_SHIFT where b == 0 (a zero multiplier,
    e.g. a channel of zero scale, gives round_shift(0, c) = 0 for any c)."""
    b, c = np.broadcast_arrays(np.asarray(b, np.int64), np.asarray(c, np.int64))
    return np.where(b == 0, HI32_MIN_SHIFT, c)


def hi32_applies(b: Any, c: Any) -> bool:
    """Whether requantize_dyadic_hi32 equals requantize_dyadic for multiplier(s) b / 2^c (ints
    or arrays) and every int32 x: b fits in int32 and HI32_MIN_SHIFT <= hi32_shift(b, c) <=
    MAX_SHIFT."""
    b = np.asarray(b, dtype=np.int64)
    if not b.size or not np.asarray(c).size:
        return False
    s = hi32_shift(b, c)
    i32 = np.iinfo(np.int32)
    return bool(
        b.min() >= i32.min
        and b.max() <= i32.max
        and s.min() >= HI32_MIN_SHIFT
        and s.max() <= MAX_SHIFT
    )


def requantize_dyadic_hi32(x: Any, b: Any, c: Any, lo: int, hi: int) -> np.ndarray:
    """requantize_dyadic(x, b, c, lo, hi) computed as clip((h + 2^(s-33)) >> (s - 32), lo, hi),
    h = (x * b) >> 32, s = hi32_shift(b, c), each step after the product in int32 (numpy; where
    hi32_applies)."""
    h = ((np.asarray(x, np.int64) * np.asarray(b, np.int64)) >> 32).astype(np.int32)
    c32 = hi32_shift(b, c).astype(np.int32)
    v = (h + (np.int32(1) << (c32 - 33))) >> (c32 - 32)
    return np.minimum(np.maximum(v, lo), hi)


# The same requantization in int32 arithmetic for a narrow x (|x| <= 2^15: int8 / int16) and a
# per-tensor 0 <= b < 2^31, SPLIT16_MIN_SHIFT <= c <= SPLIT16_MAX_SHIFT (a lowering's fast path for
# residual adds). With b = bh 2^16 + bl (0 <= bl < 2^16) and c - 1 >= 16, x * b + 2^(c-1) =
# (x bh + 2^(c-17)) 2^16 + x bl, and floor(floor(N / 2^16) / 2^(c-16)) = floor(N / 2^c), so
# round_shift(x * b, c) = (x bh + 2^(c-17) + ((x bl) >> 16)) >> (c - 16). Bounds: |x bl| <=
# 2^15 (2^16 - 1) < 2^31, |x bh| < 2^30, 2^(c-17) <= 2^29, |(x bl) >> 16| <= 2^15, so the sum
# is below 2^30 + 2^29 + 2^15 < 2^31: every step fits in int32.
SPLIT16_MIN_SHIFT, SPLIT16_MAX_SHIFT = 17, 46
SPLIT16_MAX_ABS_X = 1 << 15


def split16_applies(b: Any, c: Any) -> bool:
    """Whether requantize_dyadic_split16 equals requantize_dyadic for the per-tensor multiplier
    b / 2^c (python ints) and every |x| <= SPLIT16_MAX_ABS_X."""
    return (
        isinstance(b, int | np.integer)
        and isinstance(c, int | np.integer)
        and 0 <= int(b) < (1 << 31)
        and SPLIT16_MIN_SHIFT <= int(c) <= SPLIT16_MAX_SHIFT
    )


def requantize_dyadic_split16(x: Any, b: int, c: int, lo: int, hi: int, xp: Any = NUMPY) -> Any:
    """requantize_dyadic(x, b, c, lo, hi) as clip((x bh + 2^(c-17) + ((x bl) >> 16)) >> (c - 16),
    lo, hi) with bh = b >> 16, bl = b & 0xFFFF: every intermediate fits in int32 (where
    split16_applies and |x| <= 2^15; `x` int32 in a lowering, any integer type in numpy)."""
    bh, bl = int(b) >> 16, int(b) & 0xFFFF
    y = (x * bh + (1 << (int(c) - 17)) + ((x * bl) >> 16)) >> (int(c) - 16)
    return xp.minimum(xp.maximum(y, lo), hi)


# IEEE-754 binary32 fields: value = (-1)^s * m * 2^(max(e, 1) - F32_BIAS), m = f + 2^23 [e > 0].
F32_MANT_BITS = 23
F32_BIAS = 150  # 127 + 23: the exponent of the integer mantissa m


def quantize_float_bits(u: Any, b: Any, c: Any, lo: int, hi: int, xp: Any = NUMPY) -> Any:
    """The input quantizer in integers: `u` holds binary32 bit patterns (int32), the result is
    clip(round_half_up(value(u) * b / 2^c), lo, hi) with b / 2^c the dyadic form of 1 / scale.
    value(u) * b / 2^c = sm * b / 2^k with sm = +-m and k = c + F32_BIAS - max(e, 1), so this is
    requantize_dyadic(sm, b, k) with k clamped to [1, MAX_SHIFT]: k < 1 means |value| >= 2^53
    (saturates either way; also inf and NaN, by their sign bit), and k > MAX_SHIFT means
    |sm * b| < 2^55 << 2^(k-1) (rounds to 0 either way). |sm * b| < 2^55: int64 is exact."""
    u = xp.i64(u) & xp.i64(0xFFFFFFFF)  # unsigned view (a TIR literal needs the explicit int64)
    e = (u >> F32_MANT_BITS) & 0xFF
    hidden = xp.where(e > 0, xp.i64(1 << F32_MANT_BITS), xp.i64(0))
    m = (u & ((1 << F32_MANT_BITS) - 1)) + hidden
    sm = xp.where((u >> 31) > 0, 0 - m, m)
    k = xp.minimum(xp.maximum(c + F32_BIAS - xp.maximum(e, 1), 1), MAX_SHIFT)
    return requantize_dyadic(sm, b, k, lo, hi, xp)


def div_round(a: Any, b: Any) -> Any:
    """a / b rounded half up, for b > 0: floor((2a + b) / (2b))."""
    return (2 * a + b) // (2 * b)


# Exact division by a divisor that is invariant along a row (Granlund & Montgomery, "Division by
# invariant integers using multiplication", 1994, Thm 4.2): with l = ceil(log2 d) and
# m = ceil(2^(N+l) / d), floor(u / d) = (u * m) >> (N + l) for every 0 <= u < 2^N. For N <= 30,
# u < 2^30 and m <= 2^31, so u * m is one 32 x 32 -> 64-bit unsigned multiply (vpmuludq).
MAGIC_MAX_BITS = 30
_LOW32 = (1 << 32) - 1


def ceil_log2(d: Any, d_bits: int, xp: Any = NUMPY) -> Any:
    """ceil(log2 d) for 1 <= d <= 2^d_bits: the number of k in [0, d_bits) with 2^k < d,
    i.e. with 2^k <= d - 1 (`xp.bit_length`)."""
    return xp.bit_length(d - 1, d_bits)


def magic_divisor(d: Any, n_bits: int, d_bits: int, xp: Any = NUMPY) -> tuple[Any, Any]:
    """(m, s) with floor(u / d) == (u * m) >> s for 0 <= u < 2^n_bits, 1 <= d <= 2^d_bits:
    s = n_bits + ceil_log2(d), m = ceil(2^s / d) (one division per divisor)."""
    s = ceil_log2(d, d_bits, xp) + n_bits
    return ((xp.i64(1) << s) + d - 1) // d, s


def div_floor_magic(n: Any, m: Any, s: Any, xp: Any = NUMPY) -> Any:
    """floor(n / d) for |n| < 2^N given (m, s) = magic_divisor(d, N, .), N <= MAGIC_MAX_BITS:
    n < 0 goes through floor(n / d) = ~floor(~n / d) (~n = -n - 1 >= 0), so only
    0 <= u < 2^N is divided: ((u * m) >> s) with u, m < 2^32 masked to 32 bits (identities within
    those bounds; they let the compiler use a 32 x 32 -> 64-bit multiply). The mask is an int64
    constant (`xp.i64`): TVM turns a bare Python 2^32 - 1 into int64 -1, a mask that does
    nothing."""
    sign = n >> 63  # 0 or -1
    u = n ^ sign
    low = xp.i64(_LOW32)
    return (((u & low) * (m & low)) >> s) ^ sign


def row_div_bits(a_bits: int, b_bits: int) -> int | None:
    """N for div_round_by_row's magic division (|2a + b| < 2^N), or None when N is too wide."""
    n_bits = max(a_bits + 1, b_bits) + 1  # |2a + b| < 2^(a_bits+1) + 2^b_bits <= 2^n_bits
    return n_bits if n_bits <= MAGIC_MAX_BITS else None


def row_magic(b: Any, a_bits: int, b_bits: int, xp: Any = NUMPY) -> tuple[Any, Any] | None:
    """The per-row (m, s) that div_round_by_row divides with, or None (plain division)."""
    n_bits = row_div_bits(a_bits, b_bits)
    if n_bits is None:
        return None
    return magic_divisor(2 * b, n_bits, b_bits + 1, xp)


def div_round_by_row(
    a: Any, b: Any, a_bits: int, b_bits: int, xp: Any = NUMPY, magic: Any = None
) -> Any:
    """div_round(a, b) for |a| < 2^a_bits, 1 <= b <= 2^b_bits, where b is shared along the row
    (one value per row, broadcast over the last axis). Equal to div_round(a, b) exactly: when
    the bounds allow (N = max(a_bits + 1, b_bits) + 1 <= MAGIC_MAX_BITS) it is computed as
    div_floor_magic(2a + b, magic_divisor(2b, N, b_bits + 1)) (one division per row, not per
    element; `magic`: that row's (m, s) = row_magic(b, ...) when already computed), else by
    div_round itself."""
    if row_div_bits(a_bits, b_bits) is None:
        return div_round(a, b)
    m, s = magic if magic is not None else row_magic(b, a_bits, b_bits, xp)
    return div_floor_magic(2 * a + b, m, s, xp)


def isqrt_step(x: Any, n: Any, xp: Any = NUMPY) -> Any:
    """One guarded Newton step for floor(sqrt(n)): min(x, floor((x + floor(n / x)) / 2)).
    (n >= 1 and x >= 1, so the division is of non-negative values: `xp.div_pos`.)"""
    return xp.minimum(x, (x + xp.div_pos(n, x)) >> 1)


def isqrt_init(n: Any, xp: Any = NUMPY) -> Any:
    """Newton's start for isqrt: 2^ceil(L / 2) with L = bitlen(n) capped at ISQRT_DOMAIN_BITS
    (xp.bit_length: the number of k in [0, 40) with 2^k <= n): >= sqrt(n) on the domain,
    <= 2^20 always."""
    bits = xp.bit_length(n, ISQRT_DOMAIN_BITS)
    return xp.i64(1) << ((bits + 1) >> 1)


def isqrt_newton(n: Any, xp: Any = NUMPY) -> Any:
    """floor(sqrt(n)) for 1 <= n < 2^40: ISQRT_ITERS `isqrt_step`s from isqrt_init(n).

    The sequence decreases to floor(sqrt(n)) and stays there. Exactness over the whole domain
    is checked in the tests. (Compiled kernels run the same steps as separate stages.)
    """
    x = isqrt_init(n, xp)
    for _ in range(ISQRT_ITERS):
        x = isqrt_step(x, n, xp)
    return x


# 2^-f ~= 1 + a f + b f^2 on [0, 1), a + b = -1/2 (exact at f = 0 and 1), b chosen to minimise
# the max relative error (0.27 %); coefficients in Q15.
EXP2_POLY_A = -21951  # round(-0.66988 * 2^15)
EXP2_POLY_B = 5567  # round(0.16988 * 2^15)


# exp2_neg(d) == exp2_neg(min(d, EXP2_CAP << F)): from q = d >> F >= EXP2_BITS + 1 on the result
# is v >> q = 0 (v < 2^15), and the cap keeps q >= 32 > EXP2_BITS. With d capped, every
# intermediate of exp2_neg is below 2^31 in magnitude for F <= EXP2_I32_MAX_FRAC, so a compiled
# kernel may evaluate it in int32 with the very same result.
EXP2_CAP = 32
EXP2_I32_MAX_FRAC = 25


def exp2_neg_arg(d: Any, frac_bits: int, xp: Any = NUMPY) -> Any:
    """min(d, EXP2_CAP << frac_bits): the same exp2_neg, an argument that fits in int32."""
    return xp.minimum(d, EXP2_CAP << frac_bits)


def exp2_neg(d: Any, frac_bits: int, xp: Any = NUMPY) -> Any:
    """2^(-d / 2^F) in fixed point with EXP2_BITS fraction bits, for d >= 0.

    Shift-and-polynomial exponential (I-ViT's ShiftExp with a second-order fraction, as in
    I-BERT's i-exp): split u = d / 2^F into q = floor(u) and f = u - q; 2^-u = 2^-q * 2^-f with
        r = d & (2^F - 1) rescaled to EXP2_BITS fraction bits (f = r / 2^14),
        v = 2^14 + (A r >> 15) + (B (r^2 >> 14) >> 15),   A, B = EXP2_POLY_A, EXP2_POLY_B,
        result = v >> min(q, 31).
    Max relative error of v against 2^-f: 0.27 % (plus truncation).
    """
    q = xp.minimum(d >> frac_bits, EXP2_MAX_SHIFT)
    r = d & ((1 << frac_bits) - 1)
    if frac_bits >= EXP2_BITS:
        r = r >> (frac_bits - EXP2_BITS)
    else:
        r = r << (EXP2_BITS - frac_bits)
    r2 = (r * r) >> EXP2_BITS
    v = (1 << EXP2_BITS) + ((EXP2_POLY_A * r) >> 15) + ((EXP2_POLY_B * r2) >> 15)
    return v >> q
