"""Standard ONNX ops an integer graph may hold: data movement only (no arithmetic), applied to
integer tensors with int64 shape/index operands. Semantics are ONNX's; the numpy here is the
reference. Their shape rule is the reference itself applied to zero-filled activations.
"""

from __future__ import annotations

import numpy as np

from intq.errors import GraphError
from intq.ops.registry import INT_DTYPES, InputSpec, OpDef, register

_ANY = INT_DTYPES
_IDX = ("int64", "int32")


def _reshape(xs, attrs):
    x, shape = xs[0], [int(v) for v in xs[1]]
    if not attrs["allowzero"]:
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    try:
        return [x.reshape(shape)]
    except ValueError as e:
        raise GraphError(f"Reshape: cannot reshape {x.shape} to {shape}") from e


def _transpose(xs, attrs):
    perm = attrs["perm"] or list(range(xs[0].ndim))[::-1]
    return [np.transpose(xs[0], perm)]


def _concat(xs, attrs):
    dts = {x.dtype for x in xs}
    if len(dts) != 1:
        raise GraphError(f"Concat: inputs have different dtypes {sorted(map(str, dts))}")
    return [np.concatenate(xs, axis=int(attrs["axis"]))]


def _gather(xs, attrs):
    return [np.take(xs[0], xs[1].astype(np.int64), axis=int(attrs["axis"]))]


def _slice(xs, attrs):
    x, starts, ends = xs[0], xs[1], xs[2]
    axes = xs[3] if len(xs) > 3 and xs[3] is not None else np.arange(len(starts))
    steps = xs[4] if len(xs) > 4 and xs[4] is not None else np.ones(len(starts), np.int64)
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        sl[int(a)] = slice(int(s), int(e), int(st))
    return [x[tuple(sl)]]


def _flatten(xs, attrs):
    x, ax = xs[0], int(attrs["axis"]) % (xs[0].ndim + 1) if xs[0].ndim else 0
    return [x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)]


def _squeeze(xs, attrs):
    axes = xs[1] if len(xs) > 1 and xs[1] is not None else None
    return [np.squeeze(xs[0], axis=None if axes is None else tuple(int(a) for a in axes))]


def _unsqueeze(xs, attrs):
    y = xs[0]
    for a in sorted(int(a) % (y.ndim + len(xs[1])) for a in xs[1]):
        y = np.expand_dims(y, a)
    return [y]


def _identity(xs, attrs):
    return [xs[0]]


def _std(name, inputs, attrs, ref, doc):
    register(OpDef(name, "", inputs, attrs, None, ref, doc, tags=frozenset({"movement"})))


_std(
    "Reshape",
    (InputSpec("data", _ANY), InputSpec("shape", ("int64",))),
    {"allowzero": 0},
    _reshape,
    "ONNX Reshape",
)
_std("Transpose", (InputSpec("data", _ANY),), {"perm": []}, _transpose, "ONNX Transpose")
_std(
    "Gather",
    (InputSpec("data", _ANY), InputSpec("indices", _IDX)),
    {"axis": 0},
    _gather,
    "ONNX Gather",
)
_std(
    "Slice",
    (
        InputSpec("data", _ANY),
        InputSpec("starts", _IDX),
        InputSpec("ends", _IDX),
        InputSpec("axes", _IDX, True),
        InputSpec("steps", _IDX, True),
    ),
    {},
    _slice,
    "ONNX Slice",
)
_std("Flatten", (InputSpec("input", _ANY),), {"axis": 1}, _flatten, "ONNX Flatten")
_std(
    "Squeeze",
    (InputSpec("data", _ANY), InputSpec("axes", ("int64",), True)),
    {},
    _squeeze,
    "ONNX Squeeze",
)
_std(
    "Unsqueeze",
    (InputSpec("data", _ANY), InputSpec("axes", ("int64",))),
    {},
    _unsqueeze,
    "ONNX Unsqueeze",
)
_std("Identity", (InputSpec("input", _ANY),), {}, _identity, "ONNX Identity")
register(
    OpDef(
        "Concat",
        "",
        (InputSpec("inputs", _ANY),),
        {"axis": 0},
        None,
        _concat,
        "ONNX Concat",
        variadic=True,
        tags=frozenset({"movement"}),
    )
)
