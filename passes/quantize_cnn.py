"""Integer rules for the CNN ops: MaxPool, AveragePool, GlobalAveragePool.

Pooling needs no requantization: for a positive scale s (per tensor, or per channel on axis 1)
max_i(q_i * s) = s * max_i(q_i) and mean_i(q_i * s) = s * mean_i(q_i), so each rule keeps the
input's integer form and scale:
  * MaxPool -> IntMaxPool: same dtype and scale as the input (int8 stays int8);
  * AveragePool -> IntAvgPool: int32, div_round(window sum, count) (round half up);
  * GlobalAveragePool -> IntMean over axes (2, 3), keepdims: int32, same rounding.
A per-channel scale on any axis other than 1 is first made per-tensor (`materialize`).
ReLU / Clip after a conv are not rules here: they already fold into the Requantize's
saturation bounds (`QuantizePass._clipped`), and residual Adds are `IntAdd`.
"""

from __future__ import annotations

import onnx

from intq.errors import UnsupportedOpError
from intq.ir import attrs
from intq.passes.quantize import QTensor, QuantizePass, _base, quant_rule


def _pool_input(qp: QuantizePass, node: onnx.NodeProto) -> QTensor:
    """The input's integer form with a scale pooling commutes with (per tensor or axis 1)."""
    qt = qp._get(node.input[0])
    shape = qp.shapes.get(node.input[0])
    if shape is not None and len(shape) != 4:
        raise UnsupportedOpError(node.op_type, node.name, f"only 2-D pooling, got input {shape}")
    if qt.per_tensor or (qt.axis is not None and qt.axis % 4 == 1):
        return qt
    return qp.materialize(node.input[0])


def _pool_attrs(node: onnx.NodeProto, allowed: tuple[str, ...]) -> dict:
    a = attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedOpError(node.op_type, node.name, "auto_pad is not supported; use pads")
    if int(a.get("ceil_mode", 0)):
        raise UnsupportedOpError(node.op_type, node.name, "ceil_mode=1 is not supported")
    dil = a.get("dilations")
    if dil is not None and any(int(d) != 1 for d in dil):
        raise UnsupportedOpError(node.op_type, node.name, f"dilations {list(dil)} (need 1)")
    if int(a.get("storage_order", 0)):
        raise UnsupportedOpError(node.op_type, node.name, "storage_order=1 is not supported")
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedOpError(node.op_type, node.name, "the Indices output is not supported")
    return {k: a[k] for k in allowed if k in a}


@quant_rule("MaxPool")
def maxpool(qp: QuantizePass, node: onnx.NodeProto) -> None:
    qt = _pool_input(qp, node)
    kw = _pool_attrs(node, ("kernel_shape", "strides", "pads"))
    base = _base(node.name or node.output[0])
    y = qp._emit("IntMaxPool", [qt.name], f"{base}_{qt.dtype}", base, **kw)
    qp.q[node.output[0]] = QTensor(y, qt.dtype, qt.scale, qt.axis)


@quant_rule("AveragePool")
def averagepool(qp: QuantizePass, node: onnx.NodeProto) -> None:
    qt = _pool_input(qp, node)
    kw = _pool_attrs(node, ("kernel_shape", "strides", "pads", "count_include_pad"))
    base = _base(node.name or node.output[0])
    y = qp._emit("IntAvgPool", [qt.name], f"{base}_i32", base, **kw)
    qp.q[node.output[0]] = QTensor(y, "int32", qt.scale, qt.axis)


@quant_rule("GlobalAveragePool")
def global_averagepool(qp: QuantizePass, node: onnx.NodeProto) -> None:
    qt = _pool_input(qp, node)
    base = _base(node.name or node.output[0])
    y = qp._emit("IntMean", [qt.name], f"{base}_i32", base, axes=[2, 3], keepdims=1)
    qp.q[node.output[0]] = QTensor(y, "int32", qt.scale, qt.axis)
