"""Lowerings of the BERT-family intq ops (intq/ops/bert.py) to TE computes. Each kernel calls
the op's stage formulas (`shiftmax_exp`, `ibert_exp`, `normalise`, `ibert_gelu_core`, ...) over
TE expressions, so it is the numpy reference's arithmetic; the Newton square root runs one TE
stage per step."""

from __future__ import annotations

from tvm import te, tirx

from intq.codegen.lower import LowerCtx, lowering
from intq.codegen.te_ops import TE, _i64, _row_reduce, isqrt_stage
from intq.ops import bert
from intq.ops import fixedpoint as fp
from intq.ops.core import OUT_DTYPES, SOFTMAX_RECIP_BITS


def _broadcast_index(t: te.Tensor, idx) -> list:
    """Index into `t` numpy-broadcast against a tensor indexed by `idx`."""
    off = len(idx) - len(t.shape)
    return [0 if int(t.shape[k]) == 1 else idx[off + k] for k in range(len(t.shape))]


# ------------------------------------------------------------------ TE kernels
def int_embedding(ids: te.Tensor, table: te.Tensor, mult: te.Tensor, *, shift: int, dtype: str):
    lo, hi = fp.dtype_bounds(dtype)
    rows = int(table.shape[0])

    def f(*i):
        row = tirx.min(tirx.max(_i64(ids(*i[:-1])), 0), rows - 1)  # ids are range-checked
        v = bert.embedding_core(_i64(table[row, i[-1]]), _i64(mult[row]), shift, lo, hi, TE)
        return v.astype(dtype)

    return te.compute((*ids.shape, table.shape[1]), f, name="int_embedding")


def masked_softmax(x: te.Tensor, mask: te.Tensor | None, exp_fn, recip_bits: int, name: str):
    """max over kept keys -> exp_fn(x, max, keep) -> row sum -> normalise (uint8)."""

    def keep(i):
        if mask is None:
            return tirx.const(True, "bool")
        return mask(*_broadcast_index(mask, i)) != tirx.const(0, mask.dtype)

    mx = _row_reduce(
        x,
        lambda r, k: TE.where(keep((*r, k)), _i64(x(*r, k)), TE.i64(bert.MASKED_SCORE)),
        f"{name}_max",
        kind="max",
    )
    e = te.compute(
        x.shape, lambda *i: exp_fn(_i64(x(*i)), mx(*i[:-1], 0), keep(i)), name=f"{name}_exp"
    )
    s = _row_reduce(e, lambda r, k: e(*r, k), f"{name}_sum")
    return te.compute(
        x.shape,
        lambda *i: bert.normalise(e(*i), s(*i[:-1], 0), recip_bits, TE).astype("uint8"),
        name=name,
    )


def ibert_gelu(x: te.Tensor, *, clip_b: int, poly_c: int, out_shift: int) -> te.Tensor:
    lo, hi = fp.dtype_bounds("int32")

    def f(*i):
        y = bert.ibert_gelu_core(_i64(x(*i)), clip_b, poly_c, out_shift, TE)
        return tirx.min(tirx.max(y, lo), hi).astype("int32")

    return te.compute(x.shape, f, name="ibert_gelu")


def int_masked_mean(x: te.Tensor, mask: te.Tensor) -> te.Tensor:
    b, s, d = (int(v) for v in x.shape)

    def m(bi, si):
        return _i64(mask(bi, si, 0) if len(mask.shape) == 3 else mask(bi, si))

    k = te.reduce_axis((0, s), name="k_mm")
    total = te.compute((b, d), lambda i, j: te.sum(_i64(x(i, k, j)) * m(i, k), axis=k), "mm_sum")
    k2 = te.reduce_axis((0, s), name="k_mc")
    count = te.compute((b,), lambda i: te.sum(m(i, k2), axis=k2), name="mm_count")
    lo, hi = fp.dtype_bounds("int32")
    return te.compute(
        (b, d),
        lambda i, j: tirx.min(
            tirx.max(fp.div_round(total(i, j), tirx.max(count(i), 1)), lo), hi
        ).astype("int32"),
        name="int_masked_mean",
    )


def int_l2_normalize(x: te.Tensor, *, frac_bits: int) -> te.Tensor:
    sq = _row_reduce(x, lambda r, k: _i64(x(*r, k)) * _i64(x(*r, k)), "l2_sumsq")
    n = te.compute(sq.shape, lambda *i: tirx.max(sq(*i), 1), name="l2_n")
    root = te.compute(n.shape, lambda *i: fp.isqrt_init(n(*i), TE), name="l2_sqrt0")

    prev = None
    for step in range(fp.ISQRT_ITERS):
        nxt = te.compute(n.shape, isqrt_stage(root, prev, n), name=f"l2_sqrt{step + 1}")
        root, prev = nxt, root
    norm = te.compute(n.shape, lambda *i: tirx.max(root(*i), 1), name="l2_norm")
    return te.compute(
        x.shape,
        lambda *i: fp.div_round(_i64(x(*i)) << frac_bits, norm(*i[:-1], 0)).astype("int32"),
        name="int_l2_normalize",
    )


# ------------------------------------------------------------------ lowerings
@lowering("IntEmbedding")
def _int_embedding(ctx: LowerCtx, node, attrs):
    dt = OUT_DTYPES[int(attrs["to"])].name
    return ctx.emit_te(
        lambda i, t, m: int_embedding(i, t, m, shift=int(attrs["shift"]), dtype=dt),
        *(ctx.value(n) for n in node.input),
        name="int_embedding",
    )


def _softmax_args(ctx: LowerCtx, node):
    return [ctx.value(n) for n in node.input if n]


@lowering("IntMaskedSoftmax")
def _int_masked_softmax(ctx: LowerCtx, node, attrs):
    f = int(attrs["frac_bits"])

    def exp_fn(x, mx, keep):
        return bert.shiftmax_exp(x, mx, keep, f, TE)

    return ctx.emit_te(
        lambda x, m: masked_softmax(x, m, exp_fn, SOFTMAX_RECIP_BITS, "int_masked_softmax"),
        *_softmax_args(ctx, node),
        name="int_masked_softmax",
    )


@lowering("IBertSoftmax")
def _ibert_softmax(ctx: LowerCtx, node, attrs):
    a = {k: int(attrs[k]) for k in ("frac_bits", "ln2", "poly_b", "poly_c")}

    def exp_fn(x, mx, keep):
        return bert.ibert_exp(x, mx, keep, **a, xp=TE)

    args = _softmax_args(ctx, node)
    if len(args) == 1:
        return ctx.emit_te(
            lambda x: masked_softmax(x, None, exp_fn, bert.IBERT_RECIP_BITS, "ibert_softmax"),
            *args,
            name="ibert_softmax",
        )
    return ctx.emit_te(
        lambda x, m: masked_softmax(x, m, exp_fn, bert.IBERT_RECIP_BITS, "ibert_softmax"),
        *args,
        name="ibert_softmax",
    )


@lowering("IBertGELU")
def _ibert_gelu(ctx: LowerCtx, node, attrs):
    kw = {k: int(attrs[k]) for k in ("clip_b", "poly_c", "out_shift")}
    return ctx.emit_te(lambda x: ibert_gelu(x, **kw), ctx.value(node.input[0]), name="ibert_gelu")


@lowering("IntMaskedMean")
def _int_masked_mean(ctx: LowerCtx, node, attrs):
    return ctx.emit_te(int_masked_mean, *(ctx.value(n) for n in node.input), name="int_masked_mean")


@lowering("IntL2Normalize")
def _int_l2_normalize(ctx: LowerCtx, node, attrs):
    return ctx.emit_te(
        lambda x: int_l2_normalize(x, frac_bits=int(attrs["frac_bits"])),
        ctx.value(node.input[0]),
        name="int_l2_normalize",
    )


def softmax_numerator(
    x: te.Tensor, mask: te.Tensor | None, exp_fn, e0: int, nmax: int = bert.NUMERATOR_MAX
) -> te.Tensor:
    def keep(i):
        if mask is None:
            return tirx.const(True, "bool")
        return mask(*_broadcast_index(mask, i)) != tirx.const(0, mask.dtype)

    mx = _row_reduce(
        x,
        lambda r, k: TE.where(keep((*r, k)), _i64(x(*r, k)), TE.i64(bert.MASKED_SCORE)),
        "num_max",
        kind="max",
    )
    return te.compute(
        x.shape,
        lambda *i: bert.numerator_core(
            exp_fn(_i64(x(*i)), mx(*i[:-1], 0), keep(i)), e0, TE, nmax
        ).astype(str(bert.numerator_dtype(nmax))),
        name="int_softmax_numerator",
    )


@lowering("IntSoftmaxNumerator")
def _int_softmax_numerator(ctx: LowerCtx, node, attrs):
    f = int(attrs["frac_bits"])
    a = {k: int(attrs[k]) for k in ("ln2", "poly_b", "poly_c")}
    kernel = attrs["kernel"]
    e0 = bert.exp_at_zero(kernel, a["poly_b"], a["poly_c"])
    nmax = int(attrs["nmax"])

    def exp_fn(x, mx, keep):
        if kernel == "shiftmax":
            return bert.shiftmax_exp(x, mx, keep, f, TE)
        return bert.ibert_exp(x, mx, keep, f, **a, xp=TE)

    args = _softmax_args(ctx, node)
    if len(args) == 1:
        return ctx.emit_te(
            lambda x: softmax_numerator(x, None, exp_fn, e0, nmax), *args, name="softmax_numerator"
        )
    return ctx.emit_te(
        lambda x, m: softmax_numerator(x, m, exp_fn, e0, nmax), *args, name="softmax_numerator"
    )


def int_row_normalize(a: te.Tensor, e: te.Tensor, *, frac_bits: int) -> te.Tensor:
    total = _row_reduce(e, lambda r, k: _i64(e(*r, k)), "rn_sum")
    lo, hi = fp.dtype_bounds("int32")
    return te.compute(
        a.shape,
        lambda *i: tirx.min(
            tirx.max(bert.row_normalize_core(_i64(a(*i)), total(*i[:-1], 0), frac_bits, TE), lo),
            hi,
        ).astype("int32"),
        name="int_row_normalize",
    )


@lowering("IntRowNormalize")
def _int_row_normalize(ctx: LowerCtx, node, attrs):
    return ctx.emit_te(
        lambda a, e: int_row_normalize(a, e, frac_bits=int(attrs["frac_bits"])),
        *(ctx.value(n) for n in node.input),
        name="int_row_normalize",
    )


@lowering("IntPolyGELU")
def _int_poly_gelu(ctx: LowerCtx, node, attrs):
    kw = {k: int(attrs[k]) for k in ("mult", "shift", "clip", "out_shift")}
    coeffs = [int(c) for c in attrs["coeffs"]]
    lo, hi = fp.dtype_bounds("int32")

    def kernel(x: te.Tensor) -> te.Tensor:
        def f(*i):
            y = bert.poly_gelu_core(
                _i64(x(*i)), kw["mult"], kw["shift"], kw["clip"], coeffs, kw["out_shift"], TE
            )
            return tirx.min(tirx.max(y, lo), hi).astype("int32")

        return te.compute(x.shape, f, name="int_poly_gelu")

    return ctx.emit_te(kernel, ctx.value(node.input[0]), name="int_poly_gelu")
