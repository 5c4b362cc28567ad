"""cpu-int8 LayerNorm row kernel: an optional residual IntAdd, IntLayerNorm and its following
Requantize in two passes over each row, in 16-lane int32 vectors.

The values are the reference's (`core.layernorm_row_stats`, `core.layernorm_normalise`,
`fixedpoint.requantize_dyadic`); what differs from the TE kernel (`te_ops.int_layernorm`, three
passes, every product widened to int64) is only how they are computed:

    pass 1, per 16 lanes:  s = clip(a' + b', lo, hi)    a' = Requantize(a) in int32
                           (fixedpoint.requantize_dyadic_split16; int64 where it does not apply)
                           store s (the IntAdd's output, or a row buffer); S1 += s; S2 += s * s
    per row (scalars):     mean = div_round(S1, n); sum (s - mean)^2 = S2 - 2 mean S1 + n mean^2
                           (an integer identity: the reference's value), var, std by the Newton
                           steps of fixedpoint.isqrt_newton (stopping once a step changes
                           nothing: every later step would return the same), the row's magic
                           divisor (fixedpoint.row_magic)
    pass 2, per 16 lanes:  q = div_round((s - mean) << f, std) (te_ops._layernorm_normalise_i32)
                           v = q * gamma + beta: int32 where core.layernorm_affine_fits_int32
                           proves it fits, else int64 saturated to int32
                           y = Requantize(v): fixedpoint.requantize_dyadic_hi32 on 16 lanes
                           (te_ops.requant_hi32_lanes) where its shifts allow, else int64

Applies (`applies`) to rows of n % 16 == 0 values of at most 16 bits (int8 / int16), operands of
the add of the output's shape with per-tensor Requantizes into 16 bits, and a per-tensor or
per-channel Requantize after; otherwise the TE kernel runs. The kernel is plain TIR (no target
intrinsics): it runs, and is tested against the reference, on any CPU.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from intq.codegen import te_ops
from intq.codegen.te_ops import RowAdd
from intq.ops import core
from intq.ops import fixedpoint as fp

VEC = 16  # int32 lanes per vector
MAX_BITS = 16  # element width the kernel handles: |s| <= 2^15, so s * s <= 2^30 fits int32
MAX_ROW = 1 << 20  # a lane's share of the row sum, n / 16 values of |s| <= 2^15, fits int32


def _within16(lo: int, hi: int) -> bool:
    return -(1 << 15) <= lo and hi < (1 << 15)


def _operand_fits(dtype: str, rq) -> bool:
    """An add operand whose value (after its Requantize) lies within [-2^15, 2^15): its dtype's
    range, or its Requantize's: the output dtype's range, or both clip bounds inside (a clip
    with lo > hi gives hi)."""
    if rq is None:
        return _within16(*fp.dtype_bounds(dtype))
    lo, hi, out = int(rq[2]), int(rq[3]), rq[4]
    return _within16(*fp.dtype_bounds(out)) or _within16(min(lo, hi), max(lo, hi))


def _numerator_bits(sum_dtype: str, frac_bits: int) -> int:
    """The bits of the numerators (x - mean) << frac_bits that the row's magic divisor takes."""
    return te_ops.layernorm_in_bits(sum_dtype) + frac_bits


def applies(
    n: int, x_dtypes: list[str], add: RowAdd | None, sum_dtype: str, frac_bits: int
) -> bool:
    """Whether `layernorm_rows_func` handles this LayerNorm (else the TE kernel)."""
    if n % VEC or n >= MAX_ROW or not _within16(*fp.dtype_bounds(sum_dtype)):
        return False
    if fp.row_div_bits(_numerator_bits(sum_dtype, frac_bits), core.LN_STD_BITS) is None:
        return False  # no per-row magic divisor
    if add is None:
        return len(x_dtypes) == 1
    return len(x_dtypes) == 2 and all(
        _operand_fits(dt, rq) for dt, rq in zip(x_dtypes, add.rqs, strict=True)
    )


def _operand(v, dtype: str, rq):
    """One add operand (of `dtype`) as int32: its Requantize in int32 arithmetic where split16
    applies (an int8 / int16 operand: |v| <= 2^15) and the clip is an int32 range inside the
    Requantize's dtype (so the reference's cast to that dtype changes nothing), else the
    reference's int64 form and cast (te_ops.requant_expr)."""
    if rq is None:
        return v.astype("int32")
    b, c, lo, hi, out = rq
    out_lo, out_hi = fp.dtype_bounds(out)
    if (
        _within16(*fp.dtype_bounds(dtype))
        and fp.split16_applies(b, c)
        and te_ops.hi32_clip_ok(lo, hi)
        and out_lo <= lo <= hi <= out_hi
    ):
        return fp.requantize_dyadic_split16(v.astype("int32"), int(b), int(c), lo, hi, te_ops.TE)
    return te_ops.requant_expr(v, b, c, lo, hi, out).astype("int32")


def layernorm_rows_func(
    rows: int,
    n: int,
    x_dtypes: list[str],
    sum_dtype: str,
    *,
    eps: int,
    frac_bits: int,
    add: RowAdd | None = None,
    keep_sum: bool = True,
    affine_i32: bool = False,
    rq=None,
    name: str = "int_layernorm_rows",
) -> tirx.PrimFunc:
    """PrimFunc(x..., gamma: int32[n], beta: int32[n], [rq_b, rq_c], [sum], y) over flat
    [rows * n] buffers: x = the add's operands (or the LayerNorm's input), sum (with `add` and
    `keep_sum`) the IntAdd's output, y the LayerNorm's (int32), or its Requantize's when `rq` =
    (b, c, lo, hi, dtype) is given: b, c python ints (per tensor) or int32 arrays [n] (per
    channel: rq_b, rq_c = `rq_arrays(rq, n)` are parameters). The Requantize runs in int32 lanes
    where te_ops.hi32_ok. `affine_i32`: the caller proved q * gamma + beta fits in int32
    (core.layernorm_affine_fits_int32)."""
    a_bits = _numerator_bits(sum_dtype, frac_bits)
    if fp.row_div_bits(a_bits, core.LN_STD_BITS) is None:
        raise ValueError(f"{name}: no row magic divisor for {a_bits}-bit numerators")
    size = rows * n
    y_dtype = rq[4] if rq is not None else "int32"
    per_channel = rq is not None and isinstance(rq[0], np.ndarray)
    hi32 = rq is not None and te_ops.hi32_ok([rq])
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xs = [T.arg(f"x{i}", T.buffer((size,), dt)) for i, dt in enumerate(x_dtypes)]
            gamma = T.arg("gamma", T.buffer((n,), "int32"))
            beta = T.arg("beta", T.buffer((n,), "int32"))
            rq_b = T.arg("rq_b", T.buffer((n,), "int32")) if per_channel else None
            rq_c = T.arg("rq_c", T.buffer((n,), "int32")) if per_channel else None
            s_out = T.arg("sum", T.buffer((size,), sum_dtype)) if add and keep_sum else None
            y = T.arg("y", T.buffer((size,), y_dtype))
            with T.parallel(0, rows) as r:
                row, at = s_out, r * n
                if add is not None and s_out is None:  # the sum kept for pass 2 only
                    row, at = T.alloc_buffer((n,), sum_dtype, align=64), 0
                acc1 = T.alloc_buffer((VEC,), "int32", align=64)
                acc2 = T.alloc_buffer((VEC,), "int64", align=64)
                # mean, var (then std), magic m, magic s, Newton's root and previous root
                st = T.alloc_buffer((6,), "int64")
                vbuf = T.alloc_buffer((VEC,), "int32", align=64)
                with T.vectorized(0, VEC) as j:
                    T.buffer_store(acc1, tirx.const(0, "int32"), [j])
                    T.buffer_store(acc2, tirx.const(0, "int64"), [j])
                # pass 1: the add (or the input), its row sums
                with T.serial(0, n // VEC) as jo:
                    with T.vectorized(0, VEC) as j:
                        e = r * n + jo * VEC + j
                        if add is None:
                            s = xs[0][e].astype("int32")
                        else:
                            a, b = (
                                _operand(x[e], dt, q)
                                for x, dt, q in zip(xs, x_dtypes, add.rqs, strict=True)
                            )
                            s = tirx.min(tirx.max(a + b, add.lo), add.hi)
                            T.buffer_store(row, s.astype(sum_dtype), [at + jo * VEC + j])
                        T.buffer_store(acc1, acc1[j] + s, [j])
                        T.buffer_store(acc2, acc2[j] + (s * s).astype("int64"), [j])
                _row_stats(st, acc1, acc2, n, eps, a_bits)
                src, src_at = (row, at) if add is not None else (xs[0], r * n)
                # pass 2: normalise, the affine, the Requantize
                with T.serial(0, n // VEC) as jo:
                    _normalise(
                        y, src, src_at, r * n, jo * VEC, st, gamma, beta, frac_bits,
                        affine_i32, rq, rq_b, rq_c, hi32, vbuf,
                    )  # fmt: skip
    return ib.get()


def _row_stats(st, acc1, acc2, n: int, eps: int, a_bits: int) -> None:
    """st = [mean, std, magic m, magic s, ...] of the row from its lane sums."""
    s1 = tirx.const(0, "int64")
    s2 = tirx.const(0, "int64")
    for j in range(VEC):
        s1 = s1 + acc1[j].astype("int64")
        s2 = s2 + acc2[j]
    mean = fp.div_round(s1, n)
    T.buffer_store(st, mean, [0])
    m = st[0]
    centred = s2 - 2 * m * s1 + n * m * m  # sum (x - mean)^2, exactly
    var = tirx.max(fp.div_round(centred, n) + eps, 1)
    T.buffer_store(st, var, [1])
    T.buffer_store(st, fp.isqrt_init(st[1], te_ops.TE), [4])
    T.buffer_store(st, tirx.const(0, "int64"), [5])
    with T.serial(0, fp.ISQRT_ITERS):
        with T.If(st[4] != st[5]):  # a step that changed nothing: every later one is the same
            with T.Then():
                T.buffer_store(st, st[4], [5])
                T.buffer_store(st, fp.isqrt_step(st[4], st[1], te_ops.TE), [4])
    T.buffer_store(st, tirx.max(st[4], 1), [1])
    mg = fp.row_magic(st[1], a_bits, core.LN_STD_BITS, te_ops.TE)
    T.buffer_store(st, mg[0], [2])
    T.buffer_store(st, mg[1], [3])


def _normalise(
    y, src, src_at, y_at, j0, st, gamma, beta, frac_bits, affine_i32, rq, rq_b, rq_c, hi32, vbuf
) -> None:
    """y[y_at + j0 : +16] from src[src_at + j0 : +16] and the row's statistics (`vbuf`: 16
    int32 of scratch)."""
    i32_lo, i32_hi = fp.dtype_bounds("int32")
    with T.vectorized(0, VEC) as j:
        c = j0 + j
        v = te_ops._layernorm_normalise_i32(
            src[src_at + c], st[0], st[1], gamma[c], beta[c], frac_bits, (st[2], st[3]),
            affine_i32=affine_i32,
        )  # fmt: skip
        if not affine_i32:  # int64: the reference's saturation to int32
            v = tirx.min(tirx.max(v, i32_lo), i32_hi).astype("int32")
        if rq is None:
            T.buffer_store(y, v, [y_at + c])
        elif not hi32:
            rb, rc = (rq_b, rq_c) if rq_b is not None else rq[:2]
            T.buffer_store(y, te_ops.requant_expr(v, rb, rc, *rq[2:], ch=c), [y_at + c])
        else:
            T.buffer_store(vbuf, v, [j])
    if rq is not None and hi32:
        lanes = tirx.Ramp(j0, 1, VEC)
        if rq_b is not None:  # rq_c holds the shifts (a load: see te_ops.requant_hi32_lanes)
            bv, sh = rq_b[lanes], rq_c[lanes]
        else:
            bv, sh = int(rq[0]), te_ops.hi32_sh(rq[0], rq[1])
        v = te_ops.requant_hi32_lanes(vbuf[tirx.Ramp(0, 1, VEC)], bv, sh, rq[2], rq[3], VEC)
        T.buffer_store(y, v.astype(f"{rq[4]}x{VEC}"), [tirx.Ramp(y_at + j0, 1, VEC)])


def rq_arrays(rq, n: int) -> list[np.ndarray]:
    """The parameters rq_b, rq_c of a per-channel Requantize rq (te_ops.requant_arrays, in the
    form the kernel applies it in); none for a per-tensor one."""
    if not isinstance(rq[0], np.ndarray):
        return []
    return te_ops.requant_arrays(rq[0], rq[1], n, te_ops.hi32_ok([rq]))
