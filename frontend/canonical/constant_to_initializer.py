"""ConstantToInitializer: Constant nodes become initializers."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from intq.errors import GraphError
from intq.frontend.canonical._match import DEFAULT_DOMAINS, node_label, remove_nodes
from intq.ir import get_constant, graph_output_names
from intq.passes.base import Pass, PassResult


class ConstantToInitializer(Pass):
    """Pattern: `Constant() -> y` (any value attribute but sparse_value / strings).
    Rewrite: an initializer named `y` holding the value; the node is removed.
    Skipped: `y` is a graph output, or the value kind is unsupported."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        outputs = graph_output_names(g)
        done: list[onnx.NodeProto] = []
        rewrites, skipped = [], []
        for n in g.node:
            if n.op_type != "Constant" or n.domain not in DEFAULT_DOMAINS:
                continue
            if n.output[0] in outputs:
                skipped.append(f"{node_label(n)}: its output is a graph output")
                continue
            try:
                value = get_constant(g, n.output[0])
            except GraphError as e:
                skipped.append(f"{node_label(n)}: {e}")
                continue
            assert value is not None
            g.initializer.append(numpy_helper.from_array(value, n.output[0]))
            done.append(n)
            rewrites.append(f"{node_label(n)} -> initializer")
        remove_nodes(g, done)
        return PassResult(model, bool(done), rewrites, skipped)
