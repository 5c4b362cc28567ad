"""intq-domain pooling ops for convolutional networks: integer max pooling and integer average
pooling. The numpy functions here ARE the semantics; docs/OPS.md restates them.

Both ops keep the input's scale (max and mean commute with a positive per-channel scale), so
they need no requantization. Average pooling divides with `fixedpoint.div_round` (round half
up), the one integer division of intq. Window counts come from `window_count`, written against
the fixedpoint namespace so the TE kernels evaluate the same formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from intq.errors import GraphError
from intq.ir import INTQ_DOMAIN
from intq.ops import fixedpoint as fp
from intq.ops.registry import InputSpec, OpDef, Shape, register

I64 = np.int64


def pool_params(attrs: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(kernel [kh, kw], strides [sh, sw], pads [top, left, bottom, right]) of a 2-D pool."""
    k = [int(v) for v in attrs["kernel_shape"]]
    s = [int(v) for v in (attrs["strides"] or [1, 1])]
    p = [int(v) for v in (attrs["pads"] or [0, 0, 0, 0])]
    return k, s, p


def _pool_geometry(x: Shape, attrs: dict[str, Any], op: str) -> Shape:
    if len(x) != 4:
        raise GraphError(f"{op}: only 2-D pooling of [N, C, H, W] is supported, got {x}")
    k, s, p = pool_params(attrs)
    if len(k) != 2 or len(s) != 2 or len(p) != 4:
        raise GraphError(f"{op}: kernel {k} / strides {s} / pads {p} are not 2-D")
    if any(v <= 0 for v in k + s) or any(v < 0 for v in p):
        raise GraphError(f"{op}: kernel {k} and strides {s} must be > 0, pads {p} >= 0")
    if any(p[i] >= k[i % 2] for i in range(4)):
        raise GraphError(f"{op}: pads {p} must be smaller than the kernel {k}")
    out = [x[0], x[1]]
    for i in range(2):
        n = (x[2 + i] + p[i] + p[i + 2] - k[i]) // s[i] + 1
        if n <= 0:
            raise GraphError(f"{op}: input {x} is smaller than the kernel {k}")
        out.append(n)
    return tuple(out)


def _windows(x: np.ndarray, k, s, p, fill: int, out: Shape) -> np.ndarray:
    """[N, C, kh, kw, OH, OW] view of every pooling window of x, padded with `fill`."""
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])), constant_values=fill)
    oh, ow = out[2], out[3]
    cols = np.empty((*x.shape[:2], k[0], k[1], oh, ow), dtype=x.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            cols[:, :, i, j] = xp[:, :, i : i + s[0] * oh : s[0], j : j + s[1] * ow : s[1]]
    return cols


def window_count(o: Any, k: int, s: int, pad: int, size: int, xp: Any = fp.NUMPY) -> Any:
    """How many of the k taps of output position `o` along one axis fall inside [0, size):
    min(o*s - pad + k, size) - max(o*s - pad, 0)."""
    start = o * s - pad
    return xp.minimum(start + k, size) - xp.maximum(start, 0)


# ---------------------------------------------------------------------------------------------
# IntMaxPool
def _maxpool_shape(shapes, dtypes, attrs):
    if int(attrs["ceil_mode"]):
        raise GraphError("IntMaxPool: ceil_mode=1 is not supported")
    return [(_pool_geometry(shapes[0], attrs, "IntMaxPool"), dtypes[0])]


def _maxpool_ref(xs, attrs):
    x = xs[0]
    k, s, p = pool_params(attrs)
    out = _pool_geometry(x.shape, attrs, "IntMaxPool")
    lo, _ = fp.dtype_bounds(x.dtype)
    return [_windows(x, k, s, p, lo, out).max(axis=(2, 3)).astype(x.dtype)]


register(
    OpDef(
        name="IntMaxPool",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "uint8", "int16", "int32"), doc="[N, C, H, W]"),),
        attributes={"kernel_shape": [], "strides": [], "pads": [], "ceil_mode": 0},
        shape=_maxpool_shape,
        reference=_maxpool_ref,
        doc="Y = max over each window (padding never wins: it is the dtype's minimum); same "
        "dtype and scale as X.",
    )
)


# ---------------------------------------------------------------------------------------------
# IntAvgPool
def _avgpool_shape(shapes, dtypes, attrs):
    if int(attrs["ceil_mode"]):
        raise GraphError("IntAvgPool: ceil_mode=1 is not supported")
    return [(_pool_geometry(shapes[0], attrs, "IntAvgPool"), np.dtype("int32"))]


def avgpool_counts(attrs: dict[str, Any], h: int, w: int, oh: int, ow: int) -> np.ndarray:
    """[OH, OW] divisor of each window: kh*kw with count_include_pad, else the taps inside."""
    k, s, p = pool_params(attrs)
    if int(attrs["count_include_pad"]):
        return np.full((oh, ow), k[0] * k[1], dtype=I64)
    ry = window_count(np.arange(oh, dtype=I64), k[0], s[0], p[0], h)
    rx = window_count(np.arange(ow, dtype=I64), k[1], s[1], p[1], w)
    return ry[:, None] * rx[None, :]


def _avgpool_ref(xs, attrs):
    x = xs[0]
    k, s, p = pool_params(attrs)
    out = _pool_geometry(x.shape, attrs, "IntAvgPool")
    total = _windows(x.astype(I64), k, s, p, 0, out).sum(axis=(2, 3))
    cnt = avgpool_counts(attrs, x.shape[2], x.shape[3], out[2], out[3])
    return [fp.div_round(total, cnt).astype(np.int32)]


register(
    OpDef(
        name="IntAvgPool",
        domain=INTQ_DOMAIN,
        inputs=(InputSpec("X", ("int8", "uint8", "int16", "int32"), doc="[N, C, H, W]"),),
        attributes={
            "kernel_shape": [],
            "strides": [],
            "pads": [],
            "ceil_mode": 0,
            "count_include_pad": 0,
        },
        shape=_avgpool_shape,
        reference=_avgpool_ref,
        doc="Y = div_round(sum of the window in int64, count) (int32, same scale as X); count "
        "= kh*kw with count_include_pad, else the taps inside the input.",
    )
)
