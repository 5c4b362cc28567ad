"""The integer-only check over an ONNX graph: no float tensor, no float op, anywhere between the
graph inputs (already quantized) and its outputs."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from intq.ir import elem_types
from intq.ops import is_allowed

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    *(getattr(onnx.TensorProto, n) for n in dir(onnx.TensorProto) if n.startswith("FLOAT8")),
}


@dataclass(frozen=True)
class Offense:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


def check_integer_only(model: onnx.ModelProto) -> list[Offense]:
    """Nodes (and graph inputs/outputs/initializers) that break integer-only; [] when clean.

    A node offends if its op is not one intq defines for integer graphs (every float op, e.g.
    Erf, Softmax, QuantizeLinear, Cast to float), if any tensor it reads or writes is float, or
    if a tensor's type is unknown (untyped tensors could hide floats)."""
    g = model.graph
    types = elem_types(model)
    bad: list[Offense] = []
    for vi in list(g.input) + list(g.output):
        if types.get(vi.name) in FLOAT_TYPES:
            bad.append(Offense(vi.name, "<graph io>", f"graph input/output {vi.name!r} is float"))
    for t in g.initializer:
        if t.data_type in FLOAT_TYPES:
            bad.append(Offense(t.name, "<initializer>", "float initializer"))
    for n in g.node:
        if not is_allowed(n):
            bad.append(
                Offense(
                    n.name,
                    n.op_type,
                    f"op {n.domain or 'ai.onnx'}::{n.op_type} is not an integer op",
                )
            )
            continue
        for a in n.attribute:
            if a.type in (
                onnx.AttributeProto.FLOAT,
                onnx.AttributeProto.FLOATS,
                onnx.AttributeProto.TENSOR,
            ):
                bad.append(Offense(n.name, n.op_type, f"float/tensor attribute {a.name!r}"))
        for name in list(n.input) + list(n.output):
            if not name:
                continue
            t = types.get(name)
            if t is None:
                bad.append(Offense(n.name, n.op_type, f"tensor {name!r} has no known type"))
            elif t in FLOAT_TYPES:
                bad.append(Offense(n.name, n.op_type, f"tensor {name!r} is float"))
    return bad
