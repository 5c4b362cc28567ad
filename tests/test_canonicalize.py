"""Canonicalisation passes: tiny onnx.helper graphs per pass (fires / must not fire), and
torch-exported blocks through `canonicalize` checked against torch in onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.frontend import (
    ConstantToInitializer,
    EliminateIdentity,
    FoldConstants,
    FoldScalarIntoMatMul,
    FuseGelu,
    FuseLayerNorm,
    GatherBeforeRowwise,
    GemmToMatMulAdd,
    canonicalize,
    infer_shapes,
    to_onnx,
)
from intq.passes.base import Pass, PassResult

F32 = np.float32
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ helpers
def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: list[str],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    typed = onnx.shape_inference.infer_shapes(m)  # give the outputs their inferred types
    vis = {vi.name: vi for vi in [*typed.graph.value_info, *typed.graph.output]}
    for o in m.graph.output:
        o.CopyFrom(vis[o.name])
    onnx.checker.check_model(m)
    return m


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    init = {t.name for t in model.graph.initializer}
    return {
        i.name: RNG.standard_normal(
            [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]
        ).astype(F32)
        for i in model.graph.input
        if i.name not in init
    }


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def apply(p: Pass, model: onnx.ModelProto, tol: float = 1e-5) -> PassResult:
    """Run pass `p` on a copy; check the result is valid and numerically unchanged."""
    feeds = feeds_for(model)
    before = run_ort(model, feeds)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    res = p(m)
    onnx.checker.check_model(res.model, full_check=True)
    for a, b in zip(before, run_ort(res.model, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    return res


def assert_unchanged(p: Pass, model: onnx.ModelProto, reason: str) -> PassResult:
    res = apply(p, model)
    assert ops(res.model) == ops(model)
    assert not res.modified and not res.rewrites
    assert any(reason in s for s in res.skipped), res.skipped
    return res


def mk(op: str, ins: list[str], out: str, **kw: object) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=f"n_{out}", **kw)


# ------------------------------------------------------------------- ConstantToInitializer
def test_constant_to_initializer() -> None:
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, F32)))
    m = make_model([c, mk("Add", ["x", "c"], "y")], {"x": [2, 4]}, ["y"])
    res = apply(ConstantToInitializer(), m)
    assert ops(res.model) == ["Add"]
    assert [t.name for t in res.model.graph.initializer] == ["c"]


def test_constant_to_initializer_keeps_graph_output() -> None:
    c = helper.make_node("Constant", [], ["y"], value_float=2.0)
    m = make_model([mk("Relu", ["x"], "r"), c], {"x": [2]}, ["r", "y"])
    assert_unchanged(ConstantToInitializer(), m, "graph output")


# ------------------------------------------------------------------------ EliminateIdentity
def test_eliminate_identity_and_dropout() -> None:
    nodes = [
        mk("Relu", ["x"], "a"),
        mk("Identity", ["a"], "b"),
        helper.make_node("Dropout", ["b", "ratio"], ["c"], name="drop"),
        mk("Add", ["c", "x"], "d"),
        mk("Identity", ["d"], "y"),  # graph output: Add is renamed to write y
    ]
    m = make_model(nodes, {"x": [2, 3]}, ["y"], {"ratio": np.array(0.1, F32)})
    res = apply(EliminateIdentity(), m)
    assert ops(res.model) == ["Relu", "Add"]
    assert res.model.graph.node[1].output[0] == "y"


def test_eliminate_identity_must_not_fire() -> None:
    drop = helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop")
    inits = {"ratio": np.array(0.5, F32), "train": np.array(True)}
    m = make_model([drop], {"x": [2, 3]}, ["y"], inits)
    # ORT would drop at random in training mode: check the pass only
    res = EliminateIdentity()(m)
    assert ops(res.model) == ["Dropout"] and not res.modified
    assert any("training_mode is true" in s for s in res.skipped)
    m = make_model([mk("Identity", ["x"], "y")], {"x": [2]}, ["y"])
    assert_unchanged(EliminateIdentity(), m, "graph output")


# ---------------------------------------------------------------------------- FoldConstants
def test_fold_constants_reshape_target_and_arithmetic() -> None:
    nodes = [
        mk("Shape", ["x"], "s"),
        mk("Gather", ["s", "i0"], "b"),
        mk("Unsqueeze", ["b", "ax0"], "bu"),
        mk("Concat", ["bu", "m1"], "tgt", axis=0),
        mk("Reshape", ["x", "tgt"], "r"),
        mk("Add", ["c1", "c2"], "w"),
        mk("Mul", ["r", "w"], "y"),
    ]
    inits = {
        "i0": np.array(0, np.int64),
        "ax0": np.array([0], np.int64),
        "m1": np.array([-1], np.int64),
        "c1": np.array(1.5, F32),
        "c2": np.array(0.5, F32),
    }
    m = make_model(nodes, {"x": [2, 3, 4]}, ["y"], inits)
    res = apply(FoldConstants(), m)
    assert ops(res.model) == ["Reshape", "Mul"]
    init = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert list(init[res.model.graph.node[0].input[1]]) == [2, -1]
    assert float(init["w"]) == 2.0


def test_fold_constants_must_not_fire() -> None:
    m = make_model(
        [mk("Add", ["c1", "c2"], "y"), mk("Relu", ["x"], "r")],
        {"x": [2]},
        ["y", "r"],
        {"c1": np.array(1.0, F32), "c2": np.array(2.0, F32)},
    )
    assert_unchanged(FoldConstants(), m, "graph output")
    m = make_model(
        [mk("Shape", ["x"], "s"), mk("Reshape", ["x", "s"], "y")], {"x": ["N", 3]}, ["y"]
    )
    assert_unchanged(FoldConstants(), m, "not static")


# -------------------------------------------------------------------------- GemmToMatMulAdd
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_to_matmul_add(trans_b: int) -> None:
    w = RNG.standard_normal((5, 4) if trans_b else (4, 5)).astype(F32)
    gemm = mk("Gemm", ["x", "w", "b"], "y", transB=trans_b, alpha=1.0, beta=1.0)
    m = make_model([gemm], {"x": [3, 4]}, ["y"], {"w": w, "b": np.ones(5, F32)})
    res = apply(GemmToMatMulAdd(), m)
    assert ops(res.model) == ["MatMul", "Add"]
    assert res.model.graph.node[-1].output[0] == "y"


def test_gemm_without_bias() -> None:
    m = make_model([mk("Gemm", ["x", "w"], "y")], {"x": [3, 4]}, ["y"], {"w": np.ones((4, 2), F32)})
    assert ops(apply(GemmToMatMulAdd(), m).model) == ["MatMul"]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"alpha": 0.5}, "alpha"),
        ({"beta": 2.0}, "beta"),
        ({"transA": 1}, "transA"),
        ({}, "not a constant"),
    ],
)
def test_gemm_must_not_fire(kw: dict, reason: str) -> None:
    inputs: dict[str, list] = {"x": [4, 4] if kw.get("transA") else [3, 4]}
    inits = {"w": np.ones((4, 5), F32), "b": np.ones(5, F32)}
    if not kw:
        inputs["w"] = [4, 5]
        del inits["w"]
    m = make_model([mk("Gemm", ["x", "w", "b"], "y", **kw)], inputs, ["y"], inits)
    assert_unchanged(GemmToMatMulAdd(), m, reason)


# ---------------------------------------------------------------------------- FuseLayerNorm
def ln_nodes(
    opset: int, square: str = "pow", recip: bool = False, axes: int = -1, affine: bool = True
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    inits: dict[str, np.ndarray] = {"two": np.array(2.0, F32), "eps": np.array(1e-5, F32)}
    if opset >= 18:
        inits["axes"] = np.array([axes], np.int64)
        rm = [lambda i, o: mk("ReduceMean", [i, "axes"], o)]
    else:
        rm = [lambda i, o: mk("ReduceMean", [i], o, axes=[axes])]
    nodes = [
        rm[0]("x", "mean"),
        mk("Sub", ["x", "mean"], "d"),
        mk("Pow", ["d", "two"], "sq") if square == "pow" else mk("Mul", ["d", "d"], "sq"),
        rm[0]("sq", "var"),
        mk("Add", ["eps", "var"], "ve"),
        mk("Sqrt", ["ve"], "std"),
    ]
    last = "y" if not affine else "n"
    if recip:
        nodes += [mk("Reciprocal", ["std"], "r"), mk("Mul", ["r", "d"], last)]
    else:
        nodes.append(mk("Div", ["d", "std"], last))
    if affine:
        inits["g"] = RNG.standard_normal(8).astype(F32)
        inits["b"] = RNG.standard_normal((1, 1, 8)).astype(F32)
        nodes += [mk("Mul", ["g", "n"], "ng"), mk("Add", ["ng", "b"], "y")]
    return nodes, inits


@pytest.mark.parametrize(
    ("opset", "square", "recip", "affine"),
    [
        (18, "pow", False, True),
        (17, "mul", True, False),
        (17, "pow", False, True),
        (18, "mul", True, True),
    ],
)
def test_fuse_layernorm(opset: int, square: str, recip: bool, affine: bool) -> None:
    nodes, inits = ln_nodes(opset, square, recip, affine=affine)
    m = make_model(nodes, {"x": [2, 3, 8]}, ["y"], inits, opset=opset)
    res = apply(FuseLayerNorm(), m)
    assert ops(res.model) == ["LayerNormalization"]
    ln = res.model.graph.node[0]
    assert ln.output[0] == "y" and helper.get_attribute_value(ln.attribute[0]) == -1
    assert len(ln.input) == (3 if affine else 2)


def test_fuse_layernorm_must_not_fire() -> None:
    nodes, inits = ln_nodes(18, axes=1)
    m = make_model(nodes, {"x": [2, 3, 8]}, ["y"], inits)
    assert_unchanged(FuseLayerNorm(), m, "not the last axis")
    nodes, inits = ln_nodes(18)
    m = make_model(nodes + [mk("Relu", ["std"], "z")], {"x": [2, 3, 8]}, ["y", "z"], inits)
    assert_unchanged(FuseLayerNorm(), m, "consumers outside the pattern")


# --------------------------------------------------------------------------------- FuseGelu
def erf_nodes(pre: str, order: str, scale: float | None = None):
    inits = {"one": np.array(1.0, F32), "half": np.array(0.5, F32)}
    if pre == "div":
        inits["c"] = np.array(scale or math.sqrt(2), F32)
        nodes = [mk("Div", ["x", "c"], "u")]
    else:
        inits["c"] = np.array(scale or 1 / math.sqrt(2), F32)
        nodes = [mk("Mul", ["c", "x"], "u")]
    nodes += [mk("Erf", ["u"], "e"), mk("Add", ["one", "e"], "s")]
    nodes += {
        "s_half_x": [mk("Mul", ["s", "half"], "t"), mk("Mul", ["x", "t"], "y")],
        "s_x_half": [mk("Mul", ["x", "s"], "t"), mk("Mul", ["t", "half"], "y")],
        "x_half_s": [mk("Mul", ["half", "x"], "t"), mk("Mul", ["s", "t"], "y")],
    }[order]
    return nodes, inits


def tanh_nodes(cube: str):
    inits = {
        "three": np.array(3.0, F32),
        "c": np.array(0.044715, F32),
        "k": np.array(math.sqrt(2 / math.pi), F32),
        "one": np.array(1.0, F32),
        "half": np.array(0.5, F32),
    }
    if cube == "pow":
        nodes = [mk("Pow", ["x", "three"], "x3")]
    else:
        nodes = [mk("Mul", ["x", "x"], "x2"), mk("Mul", ["x2", "x"], "x3")]
    nodes += [
        mk("Mul", ["c", "x3"], "cx3"),
        mk("Add", ["x", "cx3"], "inner"),
        mk("Mul", ["inner", "k"], "v"),
        mk("Tanh", ["v"], "th"),
        mk("Add", ["th", "one"], "s"),
        mk("Mul", ["half", "s"], "t"),
        mk("Mul", ["x", "t"], "y"),
    ]
    return nodes, inits


def check_gelu(m: onnx.ModelProto, approx: str) -> None:
    res = apply(FuseGelu(), m)
    assert ops(res.model) == ["Gelu"]
    assert helper.get_attribute_value(res.model.graph.node[0].attribute[0]).decode() == approx
    assert res.model.opset_import[0].version == 20


@pytest.mark.parametrize("order", ["s_half_x", "s_x_half", "x_half_s"])
@pytest.mark.parametrize("pre", ["div", "mul"])
def test_fuse_gelu_erf(pre: str, order: str) -> None:
    nodes, inits = erf_nodes(pre, order)
    check_gelu(make_model(nodes, {"x": [2, 8]}, ["y"], inits), "none")


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_fuse_gelu_tanh(cube: str) -> None:
    nodes, inits = tanh_nodes(cube)
    check_gelu(make_model(nodes, {"x": [2, 8]}, ["y"], inits), "tanh")


def test_fuse_gelu_must_not_fire() -> None:
    nodes, inits = erf_nodes("div", "s_half_x", scale=2.0)
    assert_unchanged(FuseGelu(), make_model(nodes, {"x": [2, 8]}, ["y"], inits), "expected 1.41")
    nodes, inits = erf_nodes("mul", "s_x_half")
    inits["half"] = np.array(0.52, F32)
    assert_unchanged(FuseGelu(), make_model(nodes, {"x": [2, 8]}, ["y"], inits), "not 0.5")
    nodes, inits = tanh_nodes("pow")
    inits["k"] = np.array(0.75, F32)
    assert_unchanged(FuseGelu(), make_model(nodes, {"x": [2, 8]}, ["y"], inits), "sqrt(2/pi)")
    nodes, inits = erf_nodes("div", "s_half_x")
    m = make_model(nodes, {"x": [2, 8]}, ["y", "e"], inits)
    assert_unchanged(FuseGelu(), m, "consumers outside the pattern")
    dft = helper.make_node("DFT", ["z"], ["zf"], name="dft", axis=1)  # changed by opset 20
    m = make_model([*nodes, dft], {"x": [2, 8], "z": [1, 8, 1]}, ["y", "zf"], inits)
    assert_unchanged(FuseGelu(), m, "would change ['DFT']")


# --------------------------------------------------------------------- FoldScalarIntoMatMul
ATT_IN = {"q": [1, 2, 4, 8], "kt": [1, 2, 8, 4]}


def test_fold_scalar_sdpa_form() -> None:
    s = np.array([8**-0.25], F32)
    nodes = [
        mk("Mul", ["q", "s"], "qs"),
        mk("Mul", ["s", "kt"], "ks"),
        mk("MatMul", ["qs", "ks"], "a"),
        mk("Softmax", ["a"], "y", axis=-1),
    ]
    res = apply(FoldScalarIntoMatMul(), make_model(nodes, ATT_IN, ["y"], {"s": s}))
    assert ops(res.model) == ["MatMul", "Mul", "Softmax"]
    c = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert c[res.model.graph.node[1].input[1]] == pytest.approx(8**-0.5, rel=1e-6)


def test_fold_scalar_div_merges_and_output_div_becomes_mul() -> None:
    nodes = [
        mk("Div", ["q", "c"], "qs"),
        mk("MatMul", ["qs", "kt"], "a"),
        mk("Div", ["a", "c2"], "as"),
        mk("Softmax", ["as"], "y", axis=-1),
    ]
    inits = {"c": np.array(2.0, F32), "c2": np.array(4.0, F32)}
    res = apply(FoldScalarIntoMatMul(), make_model(nodes, ATT_IN, ["y"], inits))
    assert ops(res.model) == ["MatMul", "Mul", "Softmax"]
    c = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert c[res.model.graph.node[1].input[1]] == pytest.approx(0.125)
    nodes = [
        mk("MatMul", ["q", "kt"], "a"),
        mk("Div", ["a", "c2"], "as"),
        mk("Softmax", ["as"], "y", axis=-1),
    ]
    res = apply(FoldScalarIntoMatMul(), make_model(nodes, ATT_IN, ["y"], inits))
    assert ops(res.model) == ["MatMul", "Mul", "Softmax"]


@pytest.mark.parametrize(
    ("value", "extra_use", "reason"),
    [
        (np.array(-0.5, F32), False, "not positive"),
        (np.full(8, 0.5, F32), False, "not a float scalar"),
        (np.array(0.5, F32), True, "other consumers"),
    ],
)
def test_fold_scalar_must_not_fire(value: np.ndarray, extra_use: bool, reason: str) -> None:
    nodes = [
        mk("Mul", ["q", "s"], "qs"),
        mk("MatMul", ["qs", "kt"], "a"),
        mk("Softmax", ["a"], "y", axis=-1),
    ]
    outs = ["y", "qs"] if extra_use else ["y"]
    assert_unchanged(FoldScalarIntoMatMul(), make_model(nodes, ATT_IN, outs, {"s": value}), reason)


def test_fold_scalar_ignores_linear_layers() -> None:
    nodes = [mk("Mul", ["x", "s"], "xs"), mk("MatMul", ["xs", "w"], "y")]
    inits = {"s": np.array(0.5, F32), "w": np.ones((8, 3), F32)}
    res = apply(FoldScalarIntoMatMul(), make_model(nodes, {"x": [2, 8]}, ["y"], inits))
    assert ops(res.model) == ["Mul", "MatMul"] and not res.skipped


# ------------------------------------------------------------------ canonicalize end to end
torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class ManualLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x):
        m = x.mean(-1, keepdim=True)
        v = ((x - m) ** 2).mean(-1, keepdim=True)
        return (x - m) / torch.sqrt(v + 1e-5) * self.g + self.b


class ManualAttention(nn.Module):
    def forward(self, q, k, v):
        a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        return a.softmax(-1) @ v


class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


FORBIDDEN = {"Erf", "Tanh", "Pow", "Sqrt", "ReduceMean", "Gemm", "Constant", "Identity"}
QKV = (1, 2, 5, 8)
CASES = {
    "layernorm": (lambda: nn.LayerNorm(16), [(2, 5, 16)], {"LayerNormalization"}),
    "manual_layernorm": (ManualLN, [(2, 5, 16)], {"LayerNormalization"}),
    "gelu": (nn.GELU, [(4, 16)], {"Gelu"}),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), [(4, 16)], {"Gelu"}),
    "attention": (ManualAttention, [QKV] * 3, {"MatMul", "Mul", "Softmax"}),
    "sdpa": (SDPA, [QKV] * 3, {"MatMul", "Mul", "Softmax"}),
    "linear_2d": (lambda: nn.Linear(16, 8), [(4, 16)], {"MatMul", "Add"}),
    "linear_3d": (lambda: nn.Linear(16, 8), [(2, 4, 16)], {"MatMul", "Add"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_canonicalize_torch_blocks(case: str) -> None:
    make, shapes, expected = CASES[case]
    torch.manual_seed(0)
    module = make().eval()
    xs = tuple(torch.randn(s) for s in shapes)
    res = canonicalize(infer_shapes(to_onnx(module, xs)))
    kinds = set(ops(res.model))
    assert expected <= kinds and not kinds & FORBIDDEN, ops(res.model)
    if "Softmax" in expected:  # canonical attention: MatMul -> Mul(c > 0) -> Softmax
        nodes = {o: n for n in res.model.graph.node for o in n.output}
        sm = next(n for n in res.model.graph.node if n.op_type == "Softmax")
        mul = nodes[sm.input[0]]
        assert mul.op_type == "Mul" and nodes[mul.input[0]].op_type == "MatMul"
        c = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
        assert float(c[mul.input[1]]) == pytest.approx(8**-0.5, rel=1e-6)
    names = [i.name for i in res.model.graph.input]
    got = run_ort(res.model, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0]
    with torch.no_grad():
        want = module(*xs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not canonicalize(res.model).rewrites  # a fixpoint


def test_canonicalize_shapes_and_skips() -> None:
    """Every tensor gets a static shape; an unfusable GELU-like pattern is reported."""
    nodes, inits = erf_nodes("div", "s_half_x", scale=2.0)
    nodes.insert(0, helper.make_node("Identity", ["x"], ["x0"], name="id"))
    nodes[1].input[0] = "x0"
    m = make_model(nodes, {"x": [2, 8]}, ["y"], inits)
    res = canonicalize(m)
    assert "Identity" not in ops(res.model) and "Erf" in ops(res.model)
    assert any("FuseGelu" in s and "expected 1.41" in s for s in res.skipped)
    shaped = {
        vi.name
        for vi in [*res.model.graph.value_info, *res.model.graph.output]
        if all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
    }
    assert {o for n in res.model.graph.node for o in n.output} <= shaped


# ------------------------------------------------------------------- GatherBeforeRowwise
def cls_head_model(select_axis: int = 1, extra_output: str | None = None) -> onnx.ModelProto:
    """x [2, 5, 8] -> LN -> fc1 + b -> Gelu -> fc2 + b -> + x -> LN -> Gather(axis, 0) -> head:
    a transformer block's MLP half under a one-token classifier."""
    w = lambda *s: (RNG.standard_normal(s) * 0.3).astype(F32)  # noqa: E731
    inits = {
        "g": w(8), "be": w(8), "w1": w(8, 16), "b1": w(16), "w2": w(16, 8), "b2": w(8),
        "g2": w(8), "be2": w(8), "wh": w(8 if select_axis == 1 else 5, 3),
        "i0": np.array(0, np.int64),
    }  # fmt: skip
    nodes = [
        mk("LayerNormalization", ["x", "g", "be"], "h", axis=-1),
        mk("MatMul", ["h", "w1"], "m1"),
        mk("Add", ["m1", "b1"], "a1"),
        mk("Gelu", ["a1"], "ge"),
        mk("MatMul", ["ge", "w2"], "m2"),
        mk("Add", ["m2", "b2"], "a2"),
        mk("Add", ["x", "a2"], "r"),
        mk("LayerNormalization", ["r", "g2", "be2"], "n", axis=-1),
        mk("Gather", ["n", "i0"], "cls", axis=select_axis),
        mk("MatMul", ["cls", "wh"], "y"),
    ]
    outs = ["y"] + ([extra_output] if extra_output else [])
    return make_model(nodes, {"x": [2, 5, 8]}, outs, inits, opset=20)


def test_gather_before_rowwise_computes_one_row() -> None:
    """The token select climbs above both LayerNorms, the MLP and the residual add: every op
    after it works on [2, 8] rows, the float outputs unchanged."""
    res = apply(GatherBeforeRowwise(), cls_head_model())
    g = res.model.graph
    assert ops(res.model)[0] == "Gather" and ops(res.model).count("Gather") == 1
    assert g.node[0].input[0] == "x"  # the model's input row, before everything else
    typed = infer_shapes(res.model).graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*typed.value_info, *typed.output]}  # fmt: skip
    for n in g.node[1:]:
        assert len(shapes[n.output[0]]) == 2 and shapes[n.output[0]][0] == 2, n.output[0]
    assert any("merged" in r for r in res.rewrites)  # x's two Gathers (residual, LN) -> one


@pytest.mark.parametrize(
    ("axis", "extra", "reason"),
    [
        (2, None, "normalizes over axis 2"),  # a feature of the LayerNorm's output
        (1, "n", "read by more than this Gather"),  # the full rows are a graph output
    ],
)
def test_gather_before_rowwise_must_not_fire(axis: int, extra: str | None, reason: str) -> None:
    assert_unchanged(GatherBeforeRowwise(), cls_head_model(axis, extra), reason)


def test_gather_before_rowwise_lower_rank_operand_and_constant_index() -> None:
    """Y = X[2, 4, 4] + P[4, 4], Gather(Y, 0, axis=1): P is gathered on its own axis 0 (right-
    aligned), and an index from a Constant node placed after the Add still yields a sorted
    graph (the new Gather reads an initializer copy of it)."""
    nodes = [
        mk("Add", ["x", "p"], "y"),
        helper.make_node("Constant", [], ["i0"], value=numpy_helper.from_array(np.array(0))),
        mk("Gather", ["y", "i0"], "z", axis=1),
    ]
    res = apply(GatherBeforeRowwise(), make_model(nodes, {"x": [2, 4, 4], "p": [4, 4]}, ["z"]))
    gathers = [n for n in res.model.graph.node if n.op_type == "Gather"]
    assert sorted(helper.get_attribute_value(n.attribute[0]) for n in gathers) == [0, 1]
