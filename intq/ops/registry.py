"""One registry of every op an integer graph may hold: schema, shape rule, numpy semantics.

An intq op (domain ``ai.intq``) and each standard ONNX op allowed on integer tensors is
registered once here. The quantizer builds nodes with `make_node`, the reference interpreter
calls `OpDef.reference`, the integer-only check consults `is_allowed`, and codegen registers a
lowering per op name against the same definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from intq.errors import GraphError, UnsupportedOpError
from intq.ir import INTQ_DOMAIN

Shape = tuple[int, ...]
ShapeFn = Callable[[list[Shape], list[np.dtype], dict[str, Any]], list[tuple[Shape, np.dtype]]]
RefFn = Callable[[list[np.ndarray], dict[str, Any]], list[np.ndarray]]

INT_DTYPES = ("int8", "uint8", "int16", "int32", "int64")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtypes: tuple[str, ...]
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class OpDef:
    """The single definition of an op: its schema, shape rule and exact numpy semantics."""

    name: str
    domain: str
    inputs: tuple[InputSpec, ...]
    attributes: dict[str, Any]
    shape: ShapeFn
    reference: RefFn
    doc: str
    variadic: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)

    def attrs_of(self, node: onnx.NodeProto) -> dict[str, Any]:
        """The node's attributes with this op's defaults filled in."""
        out = dict(self.attributes)
        for a in node.attribute:
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def check_inputs(self, node: onnx.NodeProto, dtypes: Sequence[np.dtype | None]) -> None:
        """Raise GraphError naming the node if an input's dtype is not allowed."""
        specs = self.inputs if not self.variadic else self.inputs * max(1, len(dtypes))
        for k, dt in enumerate(dtypes):
            if dt is None or k >= len(specs):
                continue
            if np.dtype(dt).name not in specs[k].dtypes:
                raise GraphError(
                    f"node {node.name!r} ({self.name}): input {k} ({specs[k].name}) has dtype "
                    f"{np.dtype(dt).name}, expected one of {specs[k].dtypes}"
                )


_REGISTRY: dict[tuple[str, str], OpDef] = {}


def register(op: OpDef) -> OpDef:
    key = (op.domain, op.name)
    if key in _REGISTRY:
        raise AssertionError(f"op {key} registered twice")
    _REGISTRY[key] = op
    return op


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def lookup(node: onnx.NodeProto) -> OpDef:
    """The definition of `node`'s op; UnsupportedOpError naming node and op when there is none."""
    op = _REGISTRY.get((_norm_domain(node.domain), node.op_type))
    if op is None:
        raise UnsupportedOpError(
            node.op_type, node.name, f"not an op an integer graph may hold (domain {node.domain!r})"
        )
    return op


def is_allowed(node: onnx.NodeProto) -> bool:
    return (_norm_domain(node.domain), node.op_type) in _REGISTRY


def all_ops() -> list[OpDef]:
    return list(_REGISTRY.values())


def intq_op(name: str) -> OpDef:
    return _REGISTRY[(INTQ_DOMAIN, name)]


def make_node(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any
) -> onnx.NodeProto:
    """Build a node of a registered op (intq ops get the intq domain); unknown attrs rejected."""
    op = _REGISTRY.get((INTQ_DOMAIN, op_type)) or _REGISTRY.get(("", op_type))
    if op is None:
        raise AssertionError(f"make_node: {op_type!r} is not registered")
    unknown = set(attrs) - set(op.attributes)
    if unknown:
        raise AssertionError(f"make_node: {op_type} has no attributes {sorted(unknown)}")
    return onnx.helper.make_node(
        op_type, list(inputs), list(outputs), name=name, domain=op.domain or None, **attrs
    )
