"""Lowerings of the log2-attention ops (intq/ops/log2attn.py): the same formulas over TE."""

from __future__ import annotations

from tvm import te, tirx

from intq.codegen import te_ops
from intq.codegen.lower import LowerCtx, lowering
from intq.ops import log2attn
from intq.ops.core import SOFTMAX_RECIP_BITS


def int_softmax_log2(x: te.Tensor, *, frac_bits: int, bits: int) -> te.Tensor:
    mx = te_ops._row_reduce(x, lambda r, k: te_ops._i64(x(*r, k)), "l2sm_max", kind="max")
    e = te.compute(
        x.shape,
        lambda *i: te_ops.fp.exp2_neg(mx(*i[:-1], 0) - te_ops._i64(x(*i)), frac_bits, te_ops.TE),
        name="l2sm_exp",
    )
    s = te_ops._row_reduce(e, lambda r, k: e(*r, k), "l2sm_sum")
    recip = te.compute(s.shape, lambda *i: (1 << SOFTMAX_RECIP_BITS) // s(*i), name="l2sm_rcp")
    p = te.compute(x.shape, lambda *i: e(*i) * recip(*i[:-1], 0), name="l2sm_p")
    return te.compute(
        x.shape,
        lambda *i: log2attn.log2_code(p(*i), bits, te_ops.TE).astype("uint8"),
        name="int_softmax_log2",
    )


def int_log2_matmul(a: te.Tensor, v: te.Tensor, *, bits: int) -> te.Tensor:
    """Y = sum_t (A < Z ? V << (Z - 1 - A) : 0): shifts and adds, int32."""
    z = log2attn.zero_code(bits)
    t_len, n = a.shape[-1], v.shape[-1]
    la, lv = list(a.shape[:-2]), list(v.shape[:-2])
    nb = max(len(la), len(lv))
    la, lv = [1] * (nb - len(la)) + la, [1] * (nb - len(lv)) + lv
    batch = [x if int(x) != 1 else y for x, y in zip(la, lv, strict=True)]
    t = te.reduce_axis((0, t_len), name="t")

    def lead(dims, ndim, bi):
        idx = [0 if int(d) == 1 else bi[j] for j, d in enumerate(dims)]
        return idx[nb - (ndim - 2) :]

    def f(*i):
        bi, mi, ni = i[:-2], i[-2], i[-1]
        code = a(*lead(la, len(a.shape), bi), mi, t).astype("int32")
        val = v(*lead(lv, len(v.shape), bi), t, ni).astype("int32")
        shifted = tirx.Select(code < z, val << (z - 1 - tirx.min(code, z - 1)), 0)
        return te.sum(shifted, axis=t)

    return te.compute((*batch, a.shape[-2], n), f, name="int_log2_matmul")


@lowering("IntSoftmaxLog2")
def _int_softmax_log2(ctx: LowerCtx, node, attrs):
    return ctx.emit_te(
        lambda x: int_softmax_log2(x, frac_bits=int(attrs["frac_bits"]), bits=int(attrs["bits"])),
        ctx.value(node.input[0]),
        name="int_softmax_log2",
    )


@lowering("IntLog2MatMul")
def _int_log2_matmul(ctx: LowerCtx, node, attrs):
    return ctx.bb.emit_te(
        lambda a, v: int_log2_matmul(a, v, bits=int(attrs["bits"])),
        ctx.value(node.input[0]),
        ctx.value(node.input[1]),
        primfunc_name_hint="int_log2_matmul",
    )
