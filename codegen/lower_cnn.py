"""Relax lowerings of the CNN pooling ops (IntMaxPool, IntAvgPool) as TE computes.

Max pooling reads a padded window with the dtype's minimum outside the input (as the reference
pads), so padding never wins. Average pooling sums the window in int64 and divides by the
window count with `fixedpoint.div_round` (round half up); the count with count_include_pad=0 is
`intq.ops.cnn.window_count` evaluated over TE expressions, the reference's formula.
"""

from __future__ import annotations

from tvm import te, tirx

from intq.codegen.lower import LowerCtx, lowering
from intq.codegen.te_ops import TE
from intq.ops import cnn
from intq.ops import fixedpoint as fp


def _window_reader(x: te.Tensor, k, s, p, fill: int):
    """(ri, rj, read) with read(b, c, oy, ox) = x at tap (ri, rj) of window (oy, ox), or
    `fill` outside the input."""
    h, w = int(x.shape[2]), int(x.shape[3])
    ri = te.reduce_axis((0, k[0]), name="pool_i")
    rj = te.reduce_axis((0, k[1]), name="pool_j")

    def read(b, c, oy, ox):
        y = oy * s[0] + ri - p[0]
        xx = ox * s[1] + rj - p[1]
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
        yc = tirx.max(tirx.min(y, h - 1), 0)
        xc = tirx.max(tirx.min(xx, w - 1), 0)
        return tirx.if_then_else(inside, x[b, c, yc, xc], tirx.const(fill, str(x.dtype)))

    return ri, rj, read


def int_maxpool(x: te.Tensor, attrs: dict, out_shape) -> te.Tensor:
    k, s, p = cnn.pool_params(attrs)
    lo, _ = fp.dtype_bounds(str(x.dtype))
    ri, rj, read = _window_reader(x, k, s, p, lo)
    return te.compute(
        tuple(out_shape),
        lambda b, c, oy, ox: te.max(read(b, c, oy, ox), axis=[ri, rj]),
        name="int_maxpool",
    )


def int_avgpool(x: te.Tensor, attrs: dict, out_shape) -> te.Tensor:
    k, s, p = cnn.pool_params(attrs)
    h, w = int(x.shape[2]), int(x.shape[3])
    ri, rj, read = _window_reader(x, k, s, p, 0)
    total = te.compute(
        tuple(out_shape),
        lambda b, c, oy, ox: te.sum(read(b, c, oy, ox).astype("int64"), axis=[ri, rj]),
        name="avgpool_sum",
    )
    include_pad = int(attrs["count_include_pad"])

    def count(oy, ox):
        if include_pad:
            return tirx.const(k[0] * k[1], "int64")
        cy = cnn.window_count(oy.astype("int64"), k[0], s[0], p[0], h, TE)
        cx = cnn.window_count(ox.astype("int64"), k[1], s[1], p[1], w, TE)
        return cy * cx

    return te.compute(
        total.shape,
        lambda b, c, oy, ox: fp.div_round(total[b, c, oy, ox], count(oy, ox)).astype("int32"),
        name="int_avgpool",
    )


@lowering("IntMaxPool")
def _int_maxpool(ctx: LowerCtx, node, attrs):
    out_shape = ctx.shapes[node.output[0]]
    return ctx.emit_te(
        lambda x: int_maxpool(x, attrs, out_shape), ctx.value(node.input[0]), name="int_maxpool"
    )


@lowering("IntAvgPool")
def _int_avgpool(ctx: LowerCtx, node, attrs):
    out_shape = ctx.shapes[node.output[0]]
    return ctx.emit_te(
        lambda x: int_avgpool(x, attrs, out_shape), ctx.value(node.input[0]), name="int_avgpool"
    )
