"""The numpy reference interpreter: runs an integer ONNX graph with each op's registered
semantics. It defines what every target must reproduce bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from intq import boundary
from intq.errors import GraphError, IntqError
from intq.ir import topo_sort
from intq.ops import lookup


def load_signature(model: onnx.ModelProto) -> boundary.Signature:
    for p in model.metadata_props:
        if p.key == boundary.METADATA_KEY:
            return boundary.Signature.from_json(p.value)
    raise GraphError("model has no intq metadata: is it an integer graph made by intq.compile?")


class ReferenceInterpreter:
    """Executes an integer graph node by node with numpy. Checks every input dtype against the
    op's schema, so a malformed graph fails naming the node."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.order = topo_sort(g)
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.defs = [lookup(n) for n in self.order]
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.consts]

    def run(self, feeds: dict[str, np.ndarray], keep_all: bool = False) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self.consts)
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise GraphError(f"reference: missing graph inputs {missing}")
        env.update(feeds)
        for node, op in zip(self.order, self.defs, strict=True):
            xs = [env[i] if i else None for i in node.input]
            op.check_inputs(node, [x.dtype if x is not None else None for x in xs])
            try:
                ys = op.reference(xs, op.attrs_of(node))
            except IntqError:
                raise
            except Exception as e:  # numpy errors: name the node
                raise GraphError(
                    f"reference: node {node.name!r} ({node.op_type}) failed: {e}"
                ) from e
            for name, y in zip(node.output, ys, strict=False):
                env[name] = y
        return env if keep_all else {k: env[k] for k in self.outputs}


def _shape_env(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every tensor of the graph as an array of its dtype and shape: ops with a shape rule get
    zeros of the shape their rule gives (their arithmetic is not run); data-movement ops (no
    shape rule) run their reference on those arrays (cheap copies/views)."""
    interp = ReferenceInterpreter(model)
    env: dict[str, Any] = dict(interp.consts)
    env.update(feeds)
    for node, op in zip(interp.order, interp.defs, strict=True):
        xs = [env[i] if i else None for i in node.input]
        op.check_inputs(node, [x.dtype if x is not None else None for x in xs])
        attrs = op.attrs_of(node)
        try:
            if op.shape is None:
                ys = op.reference(xs, attrs)
            else:
                shapes = [tuple(x.shape) if x is not None else None for x in xs]
                dtypes = [x.dtype if x is not None else None for x in xs]
                ys = [np.zeros(shape, dt) for shape, dt in op.shape(shapes, dtypes, attrs)]
        except IntqError:
            raise
        except Exception as e:  # numpy errors: name the node
            raise GraphError(f"shapes: node {node.name!r} ({node.op_type}) failed: {e}") from e
        for name, y in zip(node.output, ys, strict=False):
            env[name] = y
    return env


def infer_integer_shapes(model: onnx.ModelProto, batch_feeds: dict[str, np.ndarray]) -> None:
    """Annotate value_info with the dtype and shape of every intermediate tensor: each op's shape
    rule, or for data movement its reference run on arrays of the given feeds' shapes (e.g.
    zeros). Replaces existing value_info."""
    env = _shape_env(model, batch_feeds)
    g = model.graph
    known = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    del g.value_info[:]
    for n in g.node:
        for o in n.output:
            if o and o not in known:
                y = env[o]
                g.value_info.append(
                    onnx.helper.make_tensor_value_info(
                        o, onnx.helper.np_dtype_to_tensor_dtype(y.dtype), list(y.shape)
                    )
                )
    for o in g.output:
        y = env[o.name]
        o.type.CopyFrom(
            onnx.helper.make_tensor_type_proto(
                onnx.helper.np_dtype_to_tensor_dtype(y.dtype), list(y.shape)
            )
        )


def reference_run(integer_onnx: onnx.ModelProto, *inputs: Any) -> np.ndarray | list[np.ndarray]:
    """Run the integer graph on the same float inputs `CompiledModel.run` takes: same input
    checks, same boundary quantizer, same batching. Returns the integer outputs."""
    sig = load_signature(integer_onnx)
    arrays = boundary.check_batch_inputs(sig.inputs, inputs)
    interp = ReferenceInterpreter(integer_onnx)
    names = [s.name for s in sig.inputs]

    def fixed_batch(chunk: list[np.ndarray]) -> list[np.ndarray]:
        q = boundary.quantize_inputs(sig.inputs, chunk)
        out = interp.run(dict(zip(names, q, strict=True)))
        return [out[o.name] for o in sig.outputs]

    return boundary.pack_outputs(boundary.run_in_batches(fixed_batch, arrays, sig.batch))
