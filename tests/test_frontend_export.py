"""Model intake: to_onnx for torch modules, ModelProtos and paths; infer_shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.errors import GraphError
from intq.frontend import infer_shapes, to_onnx
from intq.frontend.export import default_opset

torch = pytest.importorskip("torch")
nn = torch.nn


class TwoIn(nn.Module):
    def forward(self, x, y):
        return x * 2 + y


class VarArgs(nn.Module):
    def forward(self, *args):
        return args[0] - args[1]


class Branchy(nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1  # data-dependent control flow: not exportable


def small_model(opset: int = 18, batch: int | str = 2) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def static_dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    dims = vi.type.tensor_type.shape.dim
    return [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None


def test_torch_module_names_shapes_and_mode(capsys: pytest.CaptureFixture[str]) -> None:
    m = TwoIn().train()
    x, y = torch.randn(2, 3), np.ones((2, 3), np.float32)  # tensors and arrays mix
    model = to_onnx(m, (x, y))
    assert m.training  # the caller's mode is restored
    assert [i.name for i in model.graph.input] == ["x", "y"]
    assert all(static_dims(i) == [2, 3] for i in model.graph.input)
    assert default_opset(model) == 18
    out = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy(), "y": y})
    np.testing.assert_allclose(out[0], x.numpy() * 2 + y, rtol=1e-6)
    assert capsys.readouterr().out == ""  # exporter chatter is suppressed


def test_torch_module_single_tensor_and_varargs() -> None:
    model = to_onnx(nn.Linear(4, 3), torch.randn(5, 4))
    assert [static_dims(i) for i in model.graph.input] == [[5, 4]]
    model = to_onnx(VarArgs(), (torch.randn(2), torch.randn(2)))
    assert [i.name for i in model.graph.input] == ["input_0", "input_1"]


def test_modelproto_is_copied_and_upgraded() -> None:
    src = small_model(opset=17)
    model = to_onnx(src)
    assert model is not src and default_opset(src) == 17 and default_opset(model) == 18
    assert default_opset(to_onnx(small_model(19))) == 19  # never downgraded


def test_example_inputs_pin_symbolic_dims() -> None:
    model = infer_shapes(to_onnx(small_model(batch="N"), np.zeros((5, 3), np.float32)))
    assert static_dims(model.graph.input[0]) == [5, 3]
    assert static_dims(model.graph.output[0]) == [5, 3]
    with pytest.raises(GraphError, match="does not fit input 'x'"):
        to_onnx(small_model(batch="N"), np.zeros((5, 4), np.float32))


def test_path(tmp_path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(small_model(), p)
    assert [n.op_type for n in to_onnx(p).graph.node] == ["Relu"]
    assert to_onnx(str(p)).graph.output[0].name == "y"


def test_bad_inputs_raise_graph_error(tmp_path) -> None:
    with pytest.raises(GraphError, match="no such file"):
        to_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model\xff" * 10)
    with pytest.raises(GraphError, match="junk.onnx") as e:
        to_onnx(junk)
    assert e.value.__cause__ is not None
    with pytest.raises(GraphError, match="got int"):
        to_onnx(42)
    with pytest.raises(GraphError, match="example input 0"):
        to_onnx(nn.ReLU(), "not a tensor")
    with pytest.raises(GraphError, match="failed for Branchy") as e:
        to_onnx(Branchy(), torch.randn(4))
    assert e.value.__cause__ is not None


def test_infer_shapes_gives_every_tensor_a_static_shape() -> None:
    model = infer_shapes(to_onnx(nn.Sequential(nn.Linear(4, 8), nn.GELU()), torch.randn(3, 4)))
    g = model.graph
    shaped = {vi.name: static_dims(vi) for vi in [*g.value_info, *g.output]}
    for n in g.node:
        for o in n.output:
            assert shaped.get(o) is not None, o
    assert shaped[g.output[0].name] == [3, 8]


def measured_model(node: onnx.NodeProto, extra: list[onnx.NodeProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"), node, *extra]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0], np.int64), "zero")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def test_infer_shapes_measures_what_inference_cannot() -> None:
    # ReduceProd of a shape is beyond onnx data propagation: measured in onnxruntime
    m = measured_model(
        helper.make_node("ReduceProd", ["s", "zero"], ["n"], name="prod", keepdims=1),
        [helper.make_node("Reshape", ["x", "n"], ["y"], name="flat")],
    )
    out = infer_shapes(m)
    assert static_dims(out.graph.output[0]) == [24]


def test_infer_shapes_rejects_data_dependent_shapes() -> None:
    m = measured_model(
        helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
        [helper.make_node("Cast", ["nz"], ["y"], name="cast", to=TensorProto.FLOAT)],
    )
    with pytest.raises(GraphError, match="data-dependent"):
        infer_shapes(m)
