"""FoldConstants: evaluate nodes whose inputs are all constants, and Shape/Size of static shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from intq.frontend.canonical._match import DEFAULT_DOMAINS, node_label, remove_nodes, tensor_shapes
from intq.ir import get_constant, graph_output_names, initializer_map, producers, topo_sort
from intq.passes.base import Pass, PassResult

NOT_FOLDED = {
    "Constant",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


class FoldConstants(Pass):
    """Pattern: a default-domain, deterministic node without subgraphs whose inputs are all
    initializers / Constant outputs; or `Shape` / `Size` of a tensor with a static shape.
    Rewrite: its outputs become initializers (computed by onnx.reference at the model's opset),
    the node is removed. Chains fold in one run (Shape -> Gather -> Concat -> Reshape target).
    Skipped: an output is a graph output, an output has more than `max_elements` elements, or
    the reference evaluator fails."""

    max_elements = 1 << 24

    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        shapes = tensor_shapes(model)
        outputs = graph_output_names(g)
        inits = initializer_map(g)
        prods = producers(g)
        opsets = {
            (o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import
        }
        cache: dict[str, np.ndarray] = {}

        def const(name: str) -> np.ndarray | None:
            if name not in cache:
                if name in inits:
                    cache[name] = numpy_helper.to_array(inits[name])
                elif name in prods and prods[name].op_type == "Constant":
                    v = get_constant(g, name)
                    if v is None:
                        return None
                    cache[name] = v
                else:
                    return None
            return cache[name]

        folded: list[onnx.NodeProto] = []
        rewrites, skipped = [], []
        for n in topo_sort(g):
            if (
                n.domain not in DEFAULT_DOMAINS
                or n.op_type in NOT_FOLDED
                or any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in n.attribute
                )
            ):
                continue
            values = self._fold(n, const, shapes, opsets)
            if values is None:
                continue
            if isinstance(values, str):
                skipped.append(f"{node_label(n)}: {values}")
                continue
            if any(o in outputs for o in n.output):
                skipped.append(f"{node_label(n)}: an output is a graph output")
                continue
            if any(v.size > self.max_elements for v in values):
                skipped.append(f"{node_label(n)}: output larger than {self.max_elements} elements")
                continue
            for name, v in zip(n.output, values, strict=True):
                if name:
                    t = numpy_helper.from_array(v, name)
                    g.initializer.append(t)
                    inits[name] = t
                    cache[name] = v
            folded.append(n)
            rewrites.append(f"{node_label(n)} -> initializer")
        remove_nodes(g, folded)
        return PassResult(model, bool(folded), rewrites, skipped)

    @staticmethod
    def _fold(
        n: onnx.NodeProto,
        const: Callable[[str], np.ndarray | None],
        shapes: dict[str, tuple[int | None, ...]],
        opsets: dict[str, int],
    ) -> list[np.ndarray] | str | None:
        """The node's output values, a reason it cannot fold, or None (not all-constant)."""
        if n.op_type in ("Shape", "Size"):
            shape = shapes.get(n.input[0])
            if shape is None or None in shape:
                return f"the shape of {n.input[0]!r} is not static"
            if n.op_type == "Size":
                return [np.array(int(np.prod(shape)), dtype=np.int64)]
            a = {x.name: x.i for x in n.attribute}
            return [np.array(shape[a.get("start", 0) : a.get("end", None)], dtype=np.int64)]
        names = [i for i in n.input if i]
        if not names:
            return None
        feeds = {}
        for i in names:
            v = const(i)
            if v is None:
                return None
            feeds[i] = v
        try:
            res = ReferenceEvaluator(n, opsets=opsets).run(None, feeds)
        except Exception as e:
            try:  # onnx.reference has gaps (e.g. GatherElements with a broadcast index)
                res = _run_in_onnxruntime(n, feeds, opsets)
            except Exception as e2:
                return (
                    f"reference evaluation failed: {type(e).__name__}: {e}; "
                    f"onnxruntime: {type(e2).__name__}: {e2}"
                )
        return [np.asarray(v) for v in res]


def _run_in_onnxruntime(
    n: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets: dict[str, int]
) -> list[np.ndarray]:
    """Evaluate one node on constant inputs in onnxruntime (the fallback evaluator)."""
    import onnxruntime as ort
    from onnx import helper

    ins = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in feeds.items()
    ]
    outs = [helper.make_empty_tensor_value_info(o) for o in n.output if o]
    graph = helper.make_graph([n], "fold", ins, outs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
