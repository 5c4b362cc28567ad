"""TE compute definitions of the intq ops. The arithmetic is `intq.ops.fixedpoint` itself,
evaluated over TE expressions (`TE` below), so the compiled kernels and the numpy reference
share one formula. Every intermediate is int64, exactly as in the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from intq.ops import core
from intq.ops import fixedpoint as fp


class _TENamespace:
    """fixedpoint's integer namespace over TE/TIR expressions."""

    maximum = staticmethod(tirx.max)
    minimum = staticmethod(tirx.min)

    @staticmethod
    def where(cond, a, b):
        return tirx.Select(cond, a, b)

    @staticmethod
    def i64(x):
        return tirx.const(x, "int64") if isinstance(x, int) else x.astype("int64")

    @staticmethod
    def div_pos(a, b):
        """floor(a / b) for int64 a >= 0, b > 0: a 32-bit division when both fit in 31 bits
        (the common case of a row statistic; a GPU's 64-bit division is a long software
        routine), else the 64-bit one. Truncating and flooring division agree here."""
        small = tirx.all(a < (1 << 31), b < (1 << 31))
        narrow = tirx.truncdiv(a.astype("int32"), b.astype("int32")).astype("int64")
        return tirx.if_then_else(small, narrow, tirx.truncdiv(a, b))

    @staticmethod
    def bit_length(n, bits: int):
        """min(bitlen(n), bits) for int64 n >= 0: 64 - clz(n) (one instruction, where the
        reference counts comparisons); n == 0 selected apart (LLVM's ctlz(0) is poison)."""
        n = n.astype("int64")
        width = 64 - tirx.clz(n).astype("int64")
        return tirx.Select(n > 0, tirx.min(width, bits), tirx.const(0, "int64"))


TE = _TENamespace()


def _i64(x):
    return x.astype("int64")


def requant_expr(v, b, c, lo: int, hi: int, dtype: str, ch=None):
    """Requantize of one int expression `v` (fixedpoint.requantize_dyadic): `b`, `c` python ints,
    or te.Tensors / TIR buffers indexed by `ch` (a channel index or a full index tuple)."""
    indexed = (te.Tensor, tirx.Buffer)

    def at(t):  # ch: one channel index, or a full index tuple (a broadcast multiplier)
        return t(*ch) if isinstance(t, te.Tensor) and isinstance(ch, tuple) else t[ch]

    if int(lo) > int(hi):  # clip(v, lo, hi) = hi for every v; its cast folded here (TVM cannot
        return tirx.const(int(np.array(hi).astype(dtype)), dtype)  # fold an out-of-range cast)
    bb = _i64(at(b)) if isinstance(b, indexed) else tirx.const(int(b), "int64")
    cc = _i64(at(c)) if isinstance(c, indexed) else tirx.const(int(c), "int64")
    return fp.requantize_dyadic(_i64(v), bb, cc, lo, hi, TE).astype(dtype)


def hi32_clip_ok(lo: int, hi: int) -> bool:
    """Whether requant_hi32_lanes can apply a clip to [lo, hi]: it clamps in int32 lanes, so
    both bounds must be int32 values (a Requantize's clip_min may lie above its dtype), and
    lo <= hi (else the result is the constant hi, which requant_expr folds)."""
    i32_lo, i32_hi = fp.dtype_bounds("int32")
    return i32_lo <= int(lo) <= int(hi) <= i32_hi


def hi32_ok(rqs) -> bool:
    """Whether every Requantize stage (b, c, lo, hi, dtype) of `rqs` (b, c ints or per-channel
    arrays) runs in requant_hi32_lanes: fixedpoint.hi32_applies(b, c), hi32_clip_ok(lo, hi)."""
    return bool(rqs) and all(
        fp.hi32_applies(b, c) and hi32_clip_ok(lo, hi) for b, c, lo, hi, _ in rqs
    )


def hi32_sh(b, c):
    """The shift requant_hi32_lanes takes for multiplier(s) b / 2^c: hi32_shift(b, c) - 32 (an
    int for ints, else an int32 array)."""
    sh = fp.hi32_shift(b, c) - 32
    return int(sh) if sh.ndim == 0 else sh.astype(np.int32)


def requant_arrays(b, c, n: int, hi32: bool, size: int | None = None) -> list[np.ndarray]:
    """A per-channel Requantize's parameters as a kernel takes them, int32: b and c [n]; with
    `hi32` b and hi32_sh(b, c) (an array, so that TVM's bound analysis sees a plain load, see
    requant_hi32_lanes), zero padded to `size` (b = 0, shift 1: those lanes compute 0)."""
    b, c = (np.broadcast_to(np.asarray(v, np.int64), (n,)) for v in (b, c))
    if not hi32:
        return [b.astype(np.int32), c.astype(np.int32)]
    bp, shp = np.zeros(size or n, np.int32), np.ones(size or n, np.int32)
    bp[:n], shp[:n] = b, hi32_sh(b, c)
    return [bp, shp]


def requant_hi32_lanes(x, b, sh, lo: int, hi: int, n: int):
    """fixedpoint.requantize_dyadic_hi32 on an int32 vector `x` of n lanes (n even; TIR), the
    result int32 (clamped to [lo, hi]); `b` and `sh` = c - 32: python ints or int32 vectors of n
    lanes, where fixedpoint.hi32_applies(b, c) and hi32_clip_ok(lo, hi). A vector `sh` must be
    a load, not an expression c - 32: TVM 0.27 bounds an int32 x >> (c - k) as [-1, 0] and
    then drops the clamp.
    The products are int64 lanes whose operands are int32 sign-extended in place (x86: vpmuldq
    of the even int32 lanes, then of the odd ones shifted down), their high halves picked by one
    two-source shuffle (vpermt2d); every step after that is in int32 lanes, where the int64
    formula (requant_expr) widens x to int64 and narrows the results back (on Sapphire Rapids
    about twice the shuffle-port work)."""
    half = n // 2
    s32 = tirx.Broadcast(tirx.const(32, "int64"), half)

    def lanes(v):
        return v if not isinstance(v, int) else tirx.Broadcast(tirx.const(v, "int32"), n)

    def even_odd(v):  # the even / odd int32 lanes sign-extended into int64 lanes
        w = tirx.reinterpret(f"int64x{half}", v)
        return (w << s32) >> s32, w >> s32

    (xe, xo), (be, bo) = even_odd(x), even_odd(lanes(b))
    pe, po = (tirx.reinterpret(f"int32x{n}", p) for p in (xe * be, xo * bo))
    h = tirx.Shuffle([pe, po], [tirx.const(i // 2 * 2 + 1 + i % 2 * n, "int32") for i in range(n)])
    rnd = lanes(1 << (sh - 1)) if isinstance(sh, int) else (lanes(1) << sh) >> lanes(1)
    v = (h + rnd) >> lanes(sh)
    return tirx.min(tirx.max(v, lanes(lo)), lanes(hi))  # the reference's order (lo > hi: hi)


def requantize(
    x: te.Tensor, b, c, *, axis: int, dtype: str, lo: int, hi: int, shape=None, index=None
) -> te.Tensor:
    """`b`, `c`: python ints (per-tensor), 1-D te.Tensors indexed along `axis`, or te.Tensors of
    the output's rank broadcasting to it. With `shape` and `index` (out index -> index into
    `x`), the input is read through that map (a data movement folded into this kernel)."""
    out_shape = tuple(shape) if shape is not None else x.shape
    nd = len(out_shape)
    ax = axis % nd if nd else 0
    full = isinstance(b, te.Tensor) and len(b.shape) == nd and nd > 1

    def f(*idx):
        v = x(*index(list(idx))) if index is not None else x(*idx)
        if full:  # broadcast: size-1 dims of b / c read index 0
            ch = tuple(i if int(d) > 1 else 0 for i, d in zip(idx, b.shape, strict=True))
        else:
            ch = idx[ax] if nd else None
        return requant_expr(v, b, c, lo, hi, dtype, ch=ch)

    return te.compute(out_shape, f, name="requantize")


def quantize_float_bits(x: te.Tensor, b: int, c: int, *, lo: int, hi: int, dtype: str):
    """The input quantizer (fixedpoint.quantize_float_bits) over int32 float32-bit patterns."""
    return te.compute(
        x.shape,
        lambda *i: fp.quantize_float_bits(x(*i), b, c, lo, hi, TE).astype(dtype),
        name="quantize_float_bits",
    )


def int_add(
    a: te.Tensor,
    b: te.Tensor,
    out_shape: Sequence[int],
    dtype: str,
    lo: int,
    hi: int,
    rq_a=None,
    rq_b=None,
    name: str = "int_add",
):
    """saturate(A + B) with numpy broadcasting; `rq_a` / `rq_b` = (b, c, lo, hi, dtype): that
    operand is Requantize(t) of the tensor given, applied here (per-tensor)."""

    def index(t: te.Tensor, idx):
        off = len(idx) - len(t.shape)
        return [0 if int(t.shape[k]) == 1 else idx[off + k] for k in range(len(t.shape))]

    return te.compute(
        tuple(out_shape),
        lambda *i: int_add_expr(a(*index(a, i)), b(*index(b, i)), lo, hi, dtype, rq_a, rq_b),
        name=name,
    )


@dataclass(frozen=True)
class RowAdd:
    """A residual IntAdd fused into the LayerNorm reading it (`int_add` computes it in the TE
    kernel; a kernel library's row kernel reads these): per operand an optional per-tensor
    Requantize (b, c, lo, hi, dtype) applied first, the sum saturated to [lo, hi] in `dtype`."""

    rqs: tuple
    dtype: str
    lo: int
    hi: int


def int_add_expr(x, y, lo: int, hi: int, dtype: str, rq_a=None, rq_b=None):
    """IntAdd of two int expressions: saturate(x' + y') to [lo, hi] in int64, x' = Requantize(x)
    when `rq_a` = (b, c, lo, hi, dtype) is given (per-tensor), likewise y'."""

    def operand(v, rq):
        return _i64(requant_expr(v, *rq) if rq is not None else v)

    return tirx.min(tirx.max(operand(x, rq_a) + operand(y, rq_b), lo), hi).astype(dtype)


def _row_reduce(x: te.Tensor, body, name: str, kind: str = "sum") -> te.Tensor:
    """Reduce over the last axis keeping it (shape [..., 1]); body(idx, k) -> int64 expr."""
    n = x.shape[-1]
    k = te.reduce_axis((0, n), name=f"k_{name}")
    red = te.sum if kind == "sum" else te.max
    return te.compute((*x.shape[:-1], 1), lambda *i: red(body(i[:-1], k), axis=k), name=name)


def isqrt_stage(root: te.Tensor, prev: te.Tensor | None, n: te.Tensor):
    """One Newton stage of fixedpoint.isqrt_newton: isqrt_step(root, n), skipped (root kept,
    no division run) once the sequence has stopped moving (root == prev): a fixed point of the
    step stays one, so every later step would return it unchanged."""

    def f(*i):
        step = fp.isqrt_step(root(*i), n(*i), TE)
        if prev is None:
            return step
        return tirx.if_then_else(root(*i) == prev(*i), root(*i), step)

    return f


def layernorm_in_bits(dtype: str) -> int:
    """The `in_bits` of core.layernorm_core for a LayerNorm input of `dtype` (8 per byte, as the
    reference takes it from the input's itemsize)."""
    return 8 * (tvm.DataType(dtype).bits // 8)


def int_layernorm(
    x: te.Tensor,
    gamma: te.Tensor,
    beta: te.Tensor,
    *,
    eps: int,
    frac_bits: int,
    rq=None,
    narrow: bool = False,
):
    """core.layernorm_row_stats as row stages (sum, mean, centred sum of squares, variance, the
    isqrt Newton steps, std), the row's magic divisor (fixedpoint.row_magic), then
    core.layernorm_normalise per element, saturated to int32; `rq` = (b, c, lo, hi, dtype)
    (per-tensor ints, or per-channel te.Tensors) applies a following Requantize in that stage.
    `narrow`: the element loop in 32-bit lanes (`_layernorm_normalise_i32`, the same values),
    the kernel library's choice: on the H200 LayerNorm went 29.9 -> 25.3 us with it, on the
    AVX-512 Xeon 54 -> 51 us; on a 2-core AVX2 CPU it was slower (benchmarks/cpu_rows.py), so
    cpu-int8 uses it on AVX-512 targets only."""
    n = int(x.shape[-1])
    in_bits = layernorm_in_bits(x.dtype)
    # 32-bit lanes where exact: the row sum while n * 2^(in_bits - 1) < 2^31; the square of
    # x - mean while |x - mean| < 2^in_bits <= 2^16, as a uint32 product (< 2^32; modular
    # uint32 arithmetic gives it exactly), widened to int64 for the row's sum
    narrow_sum = in_bits - 1 + max(n - 1, 1).bit_length() < 31
    acc = "int32" if narrow_sum else "int64"
    s1 = _row_reduce(x, lambda r, k: x(*r, k).astype(acc), "ln_sum")
    mean = te.compute(s1.shape, lambda *i: fp.div_round(_i64(s1(*i)), n), name="ln_mean")

    def square(r, k):
        if in_bits <= 16:
            d = x(*r, k).astype("uint32") - mean(*r, 0).astype("uint32")
            return (d * d).astype("int64")
        d = _i64(x(*r, k)) - mean(*r, 0)
        return d * d

    s2 = _row_reduce(x, square, "ln_sq")
    var = te.compute(s2.shape, lambda *i: tirx.max(fp.div_round(s2(*i), n) + eps, 1), name="ln_var")
    # isqrt_newton, one stage per step (an expression tree would double in size every step)
    root = te.compute(var.shape, lambda *i: fp.isqrt_init(var(*i), TE), name="ln_sqrt0")

    prev = None
    for step in range(fp.ISQRT_ITERS):
        nxt = te.compute(var.shape, isqrt_stage(root, prev, var), name=f"ln_sqrt{step + 1}")
        root, prev = nxt, root
    std = te.compute(var.shape, lambda *i: tirx.max(root(*i), 1), name="ln_std")
    a_bits = in_bits + frac_bits
    magic = None
    if fp.row_div_bits(a_bits, core.LN_STD_BITS) is not None:

        def part(w: int):
            return lambda *i: fp.row_magic(std(*i), a_bits, core.LN_STD_BITS, TE)[w]

        magic = [te.compute(var.shape, part(w), name=f"ln_magic{w}") for w in (0, 1)]
    lo, hi = fp.dtype_bounds("int32")

    def out(*i):
        r = i[:-1]
        mg = None if magic is None else (magic[0](*r, 0), magic[1](*r, 0))
        if mg is not None and narrow:
            v = _layernorm_normalise_i32(
                x(*i), mean(*r, 0), std(*r, 0), gamma[i[-1]], beta[i[-1]], frac_bits, mg
            )
        else:
            v = core.layernorm_normalise(
                _i64(x(*i)),
                mean(*r, 0),
                std(*r, 0),
                _i64(gamma[i[-1]]),
                _i64(beta[i[-1]]),
                frac_bits,
                in_bits,
                TE,
                mg,
            )
        y = tirx.min(tirx.max(v, lo), hi).astype("int32")
        if rq is None:
            return y
        b, c, rlo, rhi, dt = rq
        return requant_expr(y, b, c, rlo, rhi, dt, ch=i[-1])

    return te.compute(x.shape, out, name="int_layernorm")


def _layernorm_normalise_i32(
    x, mean, std, gamma, beta, frac_bits: int, magic, affine_i32: bool = False
):
    """core.layernorm_normalise with its per-row magic division, evaluated where it fits in
    32-bit lanes (the same values: every narrowing below is exact by its bound). With the magic
    path taken (fixedpoint.row_div_bits(in_bits + frac_bits, LN_STD_BITS) = N <= 30):
      n = 2 (x - mean) << frac_bits + std, |n| < 2^N: int32;
      u = n ^ (n >> 31) in [0, 2^30), m < 2^32: u * m is one 32 x 32 -> 64-bit unsigned multiply,
      (u * m) >> s = floor(u / 2 std) < 2^30: int32, ^ sign restores floor(n / 2 std);
      q * gamma + beta: a 32 x 32 -> 64-bit signed multiply plus a widened add (int64 result,
      saturated to int32 by the caller); with `affine_i32` (the caller proved it fits:
      core.layernorm_affine_fits_int32) an int32 multiply-add, the result int32. A GPU runs
      each 64-bit op of the int64 form as several 32-bit instructions; this element loop is
      what bounds LayerNorm there."""
    m, s = magic
    n = ((x.astype("int32") - mean.astype("int32")) << (frac_bits + 1)) + std.astype("int32")
    sign = n >> 31
    u = (n ^ sign).astype("uint32").astype("uint64")
    q = ((u * m.astype("uint32").astype("uint64")) >> s.astype("uint64")).astype("int32") ^ sign
    if affine_i32:
        return q * gamma.astype("int32") + beta.astype("int32")
    return q.astype("int64") * _i64(gamma) + _i64(beta)


def softmax_narrow(n: int, frac_bits: int) -> bool:
    """Whether Shiftmax over rows of n runs its per-element work in int32 (the same values as
    int64, see `int_softmax`)."""
    return frac_bits <= fp.EXP2_I32_MAX_FRAC and n < (1 << (31 - fp.EXP2_BITS - 1))


def softmax_exp_expr(x, mx, frac_bits: int, narrow: bool, x_dtype: str):
    """exp2(-(max - x)) of one element of a Shiftmax row (core.softmax_core): `x` and the row
    max `mx` as expressions of dtype `x_dtype`; int32 when `narrow`, else int64."""
    if not narrow:
        return fp.exp2_neg(_i64(mx) - _i64(x), frac_bits, TE)
    if tvm.DataType(x_dtype).bits <= 32:
        # 0 <= max - x < 2^32: exact as a uint32 difference, capped (< 2^31) in uint32
        d = mx.astype("uint32") - x.astype("uint32")
        d = fp.exp2_neg_arg(d, frac_bits, TE).astype("int32")
    else:
        d = fp.exp2_neg_arg(_i64(mx) - _i64(x), frac_bits, TE).astype("int32")
    return fp.exp2_neg(d, frac_bits, TE).astype("int32")


def softmax_recip_expr(row_sum, acc: str):
    """The row's reciprocal 2^SOFTMAX_RECIP_BITS // sum."""
    return tirx.const(1 << core.SOFTMAX_RECIP_BITS, acc) // row_sum


def softmax_out_expr(e, recip):
    """One uint8 probability from its exponential and the row's reciprocal."""
    shift = core.SOFTMAX_RECIP_BITS - core.SOFTMAX_OUT_BITS
    return tirx.min(
        (e * recip + (1 << (shift - 1))) >> shift, (1 << core.SOFTMAX_OUT_BITS) - 1
    ).astype("uint8")


def int_softmax(x: te.Tensor, *, frac_bits: int, pad_to: int | None = None) -> te.Tensor:
    """core.softmax_core per row. When frac_bits <= SOFTMAX_I32_MAX_FRAC the per-element work
    runs in int32 (exactly the int64 values, see fixedpoint.exp2_neg_arg): d = max - x is
    formed as a uint32 difference (int64 for 64-bit x) and capped, then exp2_neg, the row sum
    (< 2^31 for rows < 2^17) and e * recip + 2^21 (<= 2^30 + 2^21) all fit in int32. With
    `pad_to` (>= the row length) the rows are written `pad_to` long, zeros after the row
    (aligned rows for a GEMM reading them). The element expressions (`softmax_exp_expr`,
    `softmax_recip_expr`, `softmax_out_expr`) are shared with the AMX kernel's fused form."""
    n = int(x.shape[-1])
    # the row max in x's own dtype (exact), widened where it is used
    mx_x = _row_reduce(x, lambda r, k: x(*r, k), "sm_max", kind="max")
    narrow = softmax_narrow(n, frac_bits)
    acc = "int32" if narrow else "int64"
    # the exponentials once, kept per row (a "_row" stage: schedule_rows computes it inside the
    # row loop instead of inlining it into both readers)
    e = te.compute(
        x.shape,
        lambda *i: softmax_exp_expr(x(*i), mx_x(*i[:-1], 0), frac_bits, narrow, x.dtype).astype(
            acc
        ),
        name="sm_exp_row",
    )
    k = te.reduce_axis((0, n), name="k_sm_sum")
    s = te.compute(
        (*x.shape[:-1], 1),
        lambda *i: te.sum(e(*i[:-1], k), axis=k),
        name="sm_sum",
    )
    recip = te.compute(s.shape, lambda *i: softmax_recip_expr(s(*i), acc), name="sm_rcp")

    def out(*i):
        return softmax_out_expr(e(*i), recip(*i[:-1], 0))

    if pad_to is None or pad_to == n:
        return te.compute(x.shape, out, name="int_softmax")
    zero = tirx.const(0, "uint8")
    return te.compute(
        (*x.shape[:-1], pad_to),
        lambda *i: tirx.if_then_else(i[-1] < n, out(*i[:-1], tirx.min(i[-1], n - 1)), zero),
        name="int_softmax",
    )


def int_gelu(x: te.Tensor, *, alpha: int, frac_bits: int) -> te.Tensor:
    return te.compute(
        x.shape,
        lambda *i: core.gelu_core(_i64(x(*i)), alpha, frac_bits, TE).astype("int32"),
        name="int_gelu",
    )


def table_lookup(x: te.Tensor, table: te.Tensor, offset: int, dtype: str | None = None):
    """y = table[x + offset] (cast to `dtype`): an elementwise function of a narrow integer
    input, tabulated at compile time over every input value by the op's own reference formula.
    An int32 table with a narrower `dtype` lets LLVM gather 32-bit entries in vectors (byte
    entries are gathered one by one)."""
    return te.compute(
        x.shape,
        lambda *i: table[x(*i).astype("int32") + offset].astype(dtype or table.dtype),
        name="table_lookup",
    )


def int_matmul(a: te.Tensor, b: te.Tensor, bias: te.Tensor | None = None) -> te.Tensor:
    """Batched matmul with numpy broadcasting of the batch dims; int32 accumulation."""
    m, k_len = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    ba, bb = list(a.shape[:-2]), list(b.shape[:-2])
    nb = max(len(ba), len(bb))
    ba, bb = [1] * (nb - len(ba)) + ba, [1] * (nb - len(bb)) + bb
    batch = [x if int(x) != 1 else y for x, y in zip(ba, bb, strict=True)]
    k = te.reduce_axis((0, k_len), name="k")

    def idx(t_batch, t, bi):
        lead = [0 if int(d) == 1 else bi[j] for j, d in enumerate(t_batch)]
        return lead[nb - (len(t.shape) - 2) :]  # t's own (trailing) batch dims

    def f(*i):
        bi, mi, ni = i[:-2], i[-2], i[-1]
        av = a(*idx(ba, a, bi), mi, k).astype("int32")
        bv = b(*idx(bb, b, bi), k, ni).astype("int32")
        return te.sum(av * bv, axis=k)

    acc = te.compute((*batch, m, n), f, name="int_matmul")
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i) + bias[i[-1]], name="int_matmul_bias")


def int_mean(x: te.Tensor, *, axes: Sequence[int], keepdims: bool) -> te.Tensor:
    nd = len(x.shape)
    red = sorted(int(a) % nd for a in axes)
    count = 1
    for a in red:
        count *= int(x.shape[a])
    raxes = {a: te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in red}
    out_shape = (
        [1 if i in raxes else x.shape[i] for i in range(nd)]
        if keepdims
        else [x.shape[i] for i in range(nd) if i not in raxes]
    )

    def total(*o):
        it = iter(o)
        idx = []
        for i in range(nd):
            if i in raxes:
                if keepdims:
                    next(it)
                idx.append(raxes[i])
            else:
                idx.append(next(it))
        return te.sum(_i64(x(*idx)), axis=list(raxes.values()))

    s = te.compute(tuple(out_shape), total, name="mean_sum")
    return te.compute(
        s.shape, lambda *i: fp.div_round(s(*i), count).astype("int32"), name="int_mean"
    )
