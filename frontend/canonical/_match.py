"""Pattern-matching helpers shared by the canonicalisation passes."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.errors import GraphError
from intq.ir import consumers, get_constant, graph_output_names, initializer_map, producers
from intq.passes.base import Pass, PassResult

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Skip:
    """A candidate matched the pattern but failed a check."""

    reason: str


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shape (None for unknown dims) of every tensor whose rank onnx shape inference knows.

    Inference runs on a light copy: no old value_info (stale entries cannot interfere), and
    initializers of more than 64 elements turned into typed inputs (no weight is copied)."""
    g = model.graph
    small = [t for t in g.initializer if np.prod(t.dims) <= 64]
    keep = {t.name for t in small}
    big = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in g.initializer
        if t.name not in keep
    ]
    inputs = [i for i in g.input if i.name not in {b.name for b in big}]
    light = helper.make_model(
        helper.make_graph(g.node, g.name, [*inputs, *big], g.output, small),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    light.functions.extend(model.functions)
    try:
        m = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shapes are a help for the checks, not a requirement
        m = model
    g = m.graph
    out: dict[str, tuple[int | None, ...]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
            )
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out


class Ctx:
    """Indexes over one graph: producers, readers, constants and (optionally) shapes."""

    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None) -> None:
        self.model = model
        self.g = model.graph
        self.prods = producers(self.g)
        self.uses = consumers(self.g)
        self.inits = initializer_map(self.g)
        self.outputs = graph_output_names(self.g)
        self.shapes = shapes or {}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.prods.get(name)
        if p is not None and p.op_type == "Constant" and p.domain in DEFAULT_DOMAINS:
            return get_constant(self.g, name)
        return None

    def is_const(self, name: str) -> bool:
        return name in self.inits or (name in self.prods and self.prods[name].op_type == "Constant")

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def scalar(self, name: str, like: str | None = None) -> float | None:
        """The value of a one-element real constant that does not broadcast `like` to a
        higher rank (any rank <= 1 when `like`'s rank is unknown), else None."""
        c = self.const(name)
        if c is None or c.size != 1 or c.dtype.kind not in "fiu":
            return None
        r = self.rank(like) if like is not None else None
        if c.ndim > (1 if r is None else max(r, 1)):
            return None
        return float(c.reshape(()))

    def readers(self, name: str) -> list[onnx.NodeProto]:
        """Distinct nodes reading `name` (a node reading it twice counts once)."""
        seen: list[onnx.NodeProto] = []
        for n in self.uses.get(name, []):
            if not any(n is s for s in seen):
                seen.append(n)
        return seen

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`, when `name` is read by exactly one node and is not a
        graph output; else None."""
        r = self.readers(name)
        return r[0] if len(r) == 1 and name not in self.outputs else None

    def producer(self, name: str, op: str | tuple[str, ...]) -> onnx.NodeProto | None:
        ops = (op,) if isinstance(op, str) else op
        p = self.prods.get(name)
        return p if p is not None and p.op_type in ops and p.domain in DEFAULT_DOMAINS else None


def other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node one of whose inputs is `name`."""
    a, b = node.input[0], node.input[1]
    return b if a == name else a if b == name else None


def split_const(ctx: Ctx, node: onnx.NodeProto) -> tuple[str, float] | None:
    """For a binary node with one scalar-constant input: (the other input, the scalar)."""
    for k in (0, 1):
        c = ctx.scalar(node.input[k], like=node.input[1 - k])
        if c is not None and not ctx.is_const(node.input[1 - k]):
            return node.input[1 - k], c
    return None


def close(value: float, ref: float, rtol: float = 1e-3) -> bool:
    return abs(value - ref) <= rtol * abs(ref)


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def remove_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Delete `nodes` (by identity) in place; references to the other nodes stay valid."""
    ids = {id(n) for n in nodes}
    for k in reversed(range(len(graph.node))):
        if id(graph.node[k]) in ids:
            del graph.node[k]


def insert_before(
    graph: onnx.GraphProto, anchor: onnx.NodeProto, new: list[onnx.NodeProto]
) -> None:
    """Insert `new` right before `anchor` (keeps a topologically sorted graph sorted when
    `anchor` is the first reader of what `new` produces)."""
    idx = next(k for k, m in enumerate(graph.node) if m is anchor)
    for off, n in enumerate(new):
        graph.node.insert(idx + off, n)


class PatternPass(Pass):
    """A pass that rewrites one match at a time: `apply` is called for every node whose op is
    in `anchors` and returns None (no pattern), a `Skip` (pattern matched, a check failed) or
    a description of the rewrite it made, after which the indexes are rebuilt and the scan
    restarts. Skip reasons are reported once each."""

    anchors: tuple[str, ...] = ()
    needs_shapes: bool = False
    max_rewrites: int = 100_000

    @abstractmethod
    def apply(self, ctx: Ctx, node: onnx.NodeProto) -> str | Skip | None: ...

    def run(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(model) if self.needs_shapes else {}
        rewrites: list[str] = []
        skipped: dict[str, None] = {}
        for _ in range(self.max_rewrites + 1):
            ctx = Ctx(model, shapes)
            for node in list(model.graph.node):
                if node.op_type not in self.anchors or node.domain not in DEFAULT_DOMAINS:
                    continue
                res = self.apply(ctx, node)
                if isinstance(res, Skip):
                    skipped[f"{node_label(node)}: {res.reason}"] = None
                elif res is not None:
                    rewrites.append(res)
                    break
            else:
                return PassResult(model, bool(rewrites), rewrites, list(skipped))
        raise GraphError(f"{self.name} did not converge after {self.max_rewrites} rewrites")
