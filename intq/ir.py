"""Small helpers over onnx.ModelProto graphs shared by the frontend, the passes and codegen."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from intq.errors import GraphError

INTQ_DOMAIN = "ai.intq"
INTQ_OPSET = 1


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Map each tensor name to the node that writes it."""
    return {out: n for n in graph.node for out in n.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Map each tensor name to the nodes that read it."""
    uses: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            if name:
                uses[name].append(n)
    return uses


def graph_output_names(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def get_constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of `name` if it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, dtype=np.float32)
                if a.name == "value_int":
                    return np.array(a.i, dtype=np.int64)
                if a.name == "value_floats":
                    return np.array(list(a.floats), dtype=np.float32)
                if a.name == "value_ints":
                    return np.array(list(a.ints), dtype=np.int64)
            raise GraphError(f"Constant node {n.name!r} has no supported value attribute")
    return None


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def topo_sort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read."""
    avail = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in avail})
            raise GraphError(f"graph has a cycle or undefined inputs: {missing[:5]}")
        pending = rest
    return ordered


class NameGen:
    """Fresh tensor and node names that do not clash with any name in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken: set[str] = set()
        for n in graph.node:
            self.taken.update(n.output)
            self.taken.update(n.input)
            self.taken.add(n.name)
        self.taken.update(i.name for i in graph.input)
        self.taken.update(o.name for o in graph.output)
        self.taken.update(t.name for t in graph.initializer)

    def __call__(self, base: str) -> str:
        base = base or "t"
        if base not in self.taken:
            self.taken.add(base)
            return base
        for k in itertools.count(1):
            cand = f"{base}_{k}"
            if cand not in self.taken:
                self.taken.add(cand)
                return cand
        raise AssertionError("unreachable")


def remove_unused(graph: onnx.GraphProto) -> int:
    """Drop nodes and initializers whose outputs nothing reads. Returns how many were removed."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | graph_output_names(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
    used = {i for n in graph.node for i in n.input} | graph_output_names(graph)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return removed


def replace_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rewire every reader of tensor `old` (nodes and graph outputs) to read `new`."""
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
    for o in graph.output:
        if o.name == old:
            o.name = new


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor onnx shape inference can type."""
    g = model.graph
    out: dict[str, int] = {}
    for vi in itertools.chain(g.input, g.output, g.value_info):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        out[t.name] = t.data_type
    return out


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of tensors whose every dimension is a known integer."""
    g = model.graph
    out: dict[str, tuple[int, ...]] = {}
    for vi in itertools.chain(g.input, g.output, g.value_info):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in g.initializer:
        out[t.name] = tuple(int(d) for d in t.dims)
    return out


def iter_ops(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    return [n.op_type for n in nodes]
