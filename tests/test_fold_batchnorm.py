"""FoldBatchNormPass: tiny onnx.helper graphs (fires / must not fire) checked in onnxruntime,
and a torch Conv-BN stack checked against torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.passes.base import PassResult
from intq.passes.fold_batchnorm import FoldBatchNormPass

F32 = np.float32
RNG = np.random.default_rng(0)
TOL = 1e-5


# ------------------------------------------------------------------------------ helpers
def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: list[str],
    inits: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    typed = onnx.shape_inference.infer_shapes(m)
    vis = {vi.name: vi for vi in [*typed.graph.value_info, *typed.graph.output]}
    for o in m.graph.output:
        o.CopyFrom(vis[o.name])
    onnx.checker.check_model(m)
    return m


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def apply(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> PassResult:
    """Run the pass on a copy; check the result is valid and numerically unchanged."""
    before = run_ort(model, feeds)
    res = FoldBatchNormPass()(copy(model))
    onnx.checker.check_model(res.model, full_check=True)
    for a, b in zip(before, run_ort(res.model, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=TOL, atol=TOL)
    return res


def bn_params(c: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}scale": RNG.uniform(0.5, 2.0, c).astype(F32),
        f"{prefix}B": RNG.standard_normal(c).astype(F32),
        f"{prefix}mean": RNG.standard_normal(c).astype(F32),
        f"{prefix}var": RNG.uniform(0.1, 3.0, c).astype(F32),
    }


def bn(x: str, y: str, prefix: str = "", eps: float = 1e-3, **kw: object) -> onnx.NodeProto:
    ins = [x] + [f"{prefix}{k}" for k in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=f"bn_{y}", epsilon=eps, **kw)


def conv_bn_model(
    *, bias: bool, group: int = 1, outputs: tuple[str, ...] = ("y",), extra=()
) -> onnx.ModelProto:
    cin, cout = 4, 6
    inits = {"W": RNG.standard_normal((cout, cin // group, 3, 3)).astype(F32), **bn_params(cout)}
    ins = ["x", "W"]
    if bias:
        inits["b"] = RNG.standard_normal(cout).astype(F32)
        ins.append("b")
    nodes = [
        helper.make_node("Conv", ins, ["t"], name="conv", group=group, pads=[1, 1, 1, 1]),
        bn("t", "y"),
        *extra,
    ]
    return make_model(nodes, {"x": [2, cin, 5, 5]}, list(outputs), inits)


def feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 4, 5, 5)).astype(F32)}


# ------------------------------------------------------------------------------ fires
@pytest.mark.parametrize(("bias", "group"), [(True, 1), (False, 1), (False, 2), (True, 2)])
def test_fold_conv_bn(bias: bool, group: int) -> None:
    m = conv_bn_model(bias=bias, group=group)
    assert ops(m) == ["Conv", "BatchNormalization"]
    res = apply(m, feeds())
    assert res.modified and len(res.rewrites) == 1 and not res.skipped
    assert ops(res.model) == ["Conv"]
    conv = res.model.graph.node[0]
    assert conv.output[0] == "y"
    assert conv.input[1] != "W" and len(conv.input) == 3
    # old parameters are gone; the new ones have fresh names
    assert {t.name for t in res.model.graph.initializer} == set(conv.input[1:])


def test_fold_keeps_shared_weight() -> None:
    """A weight also read by another Conv stays; the folded Conv gets its own copy."""
    other = helper.make_node("Conv", ["x", "W"], ["z"], name="conv2", pads=[1, 1, 1, 1])
    m = conv_bn_model(bias=True, outputs=("y", "z"), extra=[other])
    res = apply(m, feeds())
    assert ops(res.model) == ["Conv", "Conv"]
    names = {t.name for t in res.model.graph.initializer}
    assert "W" in names and res.model.graph.node[0].input[1] in names


# ------------------------------------------------------------------------ must not fire
def assert_unchanged(m: onnx.ModelProto, reason: str, feeds_: dict | None = None) -> None:
    res = apply(m, feeds_ or feeds())
    assert ops(res.model) == ops(m)
    assert not res.modified and not res.rewrites
    assert any(reason in s for s in res.skipped), res.skipped


def test_not_when_conv_output_is_graph_output() -> None:
    assert_unchanged(conv_bn_model(bias=True, outputs=("y", "t")), "is a graph output")


def test_not_when_conv_output_has_other_readers() -> None:
    relu = helper.make_node("Relu", ["t"], ["r"], name="relu")
    m = conv_bn_model(bias=True, outputs=("y", "r"), extra=[relu])
    assert_unchanged(m, "other readers")


def test_not_when_mean_is_not_constant() -> None:
    p = bn_params(6)
    del p["mean"]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["t"], name="conv", pads=[1, 1, 1, 1]),
        bn("t", "y"),
    ]
    inits = {"W": RNG.standard_normal((6, 4, 3, 3)).astype(F32), **p}
    m = make_model(nodes, {"x": [2, 4, 5, 5], "mean": [6]}, ["y"], inits)
    assert_unchanged(m, "mean 'mean' is not a constant", {**feeds(), "mean": np.ones(6, F32)})


def test_not_when_producer_is_not_conv() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"), bn("t", "y", prefix="p")]
    m = make_model(nodes, {"x": [2, 4, 5, 5]}, ["y"], bn_params(4, "p"))
    assert_unchanged(m, "not a Conv")


def test_not_in_training_mode() -> None:
    # onnxruntime cannot run training-mode BN for inference, so only check the pass's verdict
    m = conv_bn_model(bias=True)
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    res = FoldBatchNormPass()(copy(m))
    assert ops(res.model) == ["Conv", "BatchNormalization"] and not res.modified
    assert any("training_mode=1" in s for s in res.skipped), res.skipped


# ------------------------------------------------------------------------------- torch
@pytest.fixture(scope="module")
def torch_model():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.BatchNorm2d(4),
    ).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(4))
                m.running_var.copy_(torch.rand(4) * 2 + 0.2)
                m.weight.copy_(torch.randn(4))
                m.bias.copy_(torch.randn(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    return model, x, ref


def test_torch_default_export_already_folds_bn(torch_model) -> None:
    """The dynamo exporter (optimize=True, as `to_onnx` uses it) fuses Conv+BN itself, so the
    pass has nothing to do; the output still matches torch."""
    from intq.frontend import infer_shapes, to_onnx

    model, x, ref = torch_model
    proto = infer_shapes(to_onnx(model, (x,)))
    assert "BatchNormalization" not in ops(proto)
    res = FoldBatchNormPass()(proto)
    assert not res.modified and not res.rewrites and not res.skipped
    assert "BatchNormalization" not in ops(res.model)
    (out,) = run_ort(res.model, {res.model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL)


def test_torch_unoptimized_export_is_folded(torch_model) -> None:
    """With the exporter's optimizer off the BNs are in the graph and the pass folds both."""
    import torch

    from intq.frontend import infer_shapes, to_onnx

    model, x, ref = torch_model
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    proto = infer_shapes(to_onnx(program.model_proto, (x,)))
    assert ops(proto).count("BatchNormalization") == 2
    res = FoldBatchNormPass()(proto)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.modified and len(res.rewrites) == 2 and not res.skipped
    assert ops(res.model) == ["Conv", "Relu", "Conv"]
    (out,) = run_ort(res.model, {res.model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------ linear layers (BN1d)
def linear_bn_model(kind: str, outputs: tuple[str, ...] = ("y",), extra=()) -> onnx.ModelProto:
    k, m = 5, 7
    inits = {"W": RNG.standard_normal((k, m)).astype(F32), **bn_params(m)}
    if kind == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm")]
    elif kind == "matmul_add":
        inits["b"] = RNG.standard_normal(m).astype(F32)
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["u"], name="mm"),
            helper.make_node("Add", ["b", "u"], ["t"], name="bias"),  # bias first: either order
        ]
    else:  # gemm, transB=1
        inits["W"] = np.ascontiguousarray(inits["W"].T)
        inits["b"] = RNG.standard_normal(m).astype(F32)
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["t"], name="gemm", transB=1)]
    nodes += [bn("t", "y"), *extra]
    return make_model(nodes, {"x": [3, k]}, list(outputs), inits)


@pytest.mark.parametrize(
    ("kind", "after"),
    [("matmul", ["MatMul", "Add"]), ("matmul_add", ["MatMul", "Add"]), ("gemm", ["Gemm"])],
)
def test_fold_linear_bn(kind: str, after: list[str]) -> None:
    m = linear_bn_model(kind)
    assert ops(m)[-1] == "BatchNormalization"
    res = apply(m, {"x": RNG.standard_normal((3, 5)).astype(F32)})
    assert res.modified and not res.skipped, res.skipped
    assert ops(res.model) == after
    assert res.model.graph.node[-1].output[0] == "y"


def test_not_linear_when_rank_is_not_2() -> None:
    """BN over axis 1 of [N, L, M] is not the linear layer's feature axis: no fold."""
    inits = {"W": RNG.standard_normal((5, 4)).astype(F32), **bn_params(3)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"), bn("t", "y")]
    m = make_model(nodes, {"x": [2, 3, 5]}, ["y"], inits)
    assert_unchanged(m, "has rank 3", {"x": RNG.standard_normal((2, 3, 5)).astype(F32)})


def test_not_linear_when_matmul_output_has_other_readers() -> None:
    relu = helper.make_node("Relu", ["u"], ["r"], name="relu")
    m = linear_bn_model("matmul_add", outputs=("y", "r"), extra=[relu])
    assert_unchanged(m, "other readers", {"x": RNG.standard_normal((3, 5)).astype(F32)})


def test_torch_linear_bn1d_unoptimized_export_is_folded() -> None:
    """nn.Linear -> BatchNorm1d (trained statistics) exported without the exporter's optimizer:
    the BN is in the graph, the pass folds it, outputs match torch to 1e-5 relative."""
    import torch

    from intq.frontend import canonicalize, infer_shapes, to_onnx

    nn = torch.nn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    with torch.no_grad():  # real running statistics from a few train-mode batches
        for _ in range(5):
            model(torch.randn(16, 6) * 3 + 1)
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        ref = model(x).numpy()
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    proto = canonicalize(infer_shapes(to_onnx(program.model_proto, (x,)))).model
    assert "BatchNormalization" in ops(proto)
    res = FoldBatchNormPass()(proto)
    assert res.modified and not res.skipped, res.skipped
    assert "BatchNormalization" not in ops(res.model)
    (out,) = run_ort(res.model, {res.model.graph.input[0].name: x.numpy()})
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()
