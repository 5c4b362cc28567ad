"""RepQLayerNormPass: the float function is unchanged, per-tensor quantization gets better,
and the pass declines LayerNorms whose readers cannot absorb per-channel scales."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.config import CompileConfig
from intq.frontend import canonicalize, infer_shapes, to_onnx
from intq.ir import iter_ops
from intq.models.vit import VisionTransformer, ViTConfig, spread_layernorm_channels
from intq.passes.calibration import channel_ranges
from intq.passes.repq_reparam import RepQLayerNormPass
from intq.report import sqnr_db

CFG = ViTConfig(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
)


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(n)]


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _spread_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(CFG).eval()
    spread_layernorm_channels(model, spread=4.0, seed=seed)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_fold_keeps_the_float_function_and_rewrites_every_layernorm(seed):
    model = _spread_vit(seed)
    data = _data()
    fm = canonicalize(infer_shapes(to_onnx(model, data[0]))).model
    before = iter_ops(fm.graph.node)
    x = data[0].numpy()
    want = _ort(fm, x)
    names = RepQLayerNormPass.candidates(fm)
    assert len(names) == 2 * CFG.depth + 1
    res = RepQLayerNormPass(channel_ranges(fm, data, names)).run(fm)
    assert res.modified and len(res.rewrites) == len(names) and not res.skipped
    after = iter_ops(res.model.graph.node)
    # only constants change, plus a bias Add for a linear that had none (the head here)
    assert [o for o in after if o != "Add"] == [o for o in before if o != "Add"]
    assert after.count("Add") - before.count("Add") in (0, 1)
    onnx.checker.check_model(res.model)
    got = _ort(res.model, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    # the post-LN channel ranges are now equal
    r2 = channel_ranges(res.model, data, names)
    for n in names:
        lo, hi = r2[n]
        assert np.allclose(hi - lo, (hi - lo).mean(), rtol=1e-3)
        assert np.allclose(hi + lo, 0.0, atol=1e-3 * (hi - lo).max())


def _ln_graph(reader: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 4
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 3, c).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(c, 3)).astype(np.float32), "w"),
    ]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], "ln", axis=-1)]
    if reader == "matmul":  # no bias: the pass must insert one
        nodes.append(helper.make_node("MatMul", ["y", "w"], ["out"], "mm"))
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 3])
    else:  # a residual add reads the LN output: cannot absorb per-channel scales
        nodes.append(helper.make_node("Add", ["y", "x"], ["out"], "res"))
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, c])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, c])
    m = helper.make_model(
        helper.make_graph(nodes, "g", [x], [out], inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    m.ir_version = 9
    return infer_shapes(m)


def test_fold_inserts_the_bias_a_bare_matmul_needs():
    m = _ln_graph("matmul")
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32)
    want = _ort(m, x)
    res = RepQLayerNormPass(channel_ranges(m, [x], ["y"])).run(m)
    assert res.modified
    assert iter_ops(res.model.graph.node) == ["LayerNormalization", "MatMul", "Add"]
    np.testing.assert_allclose(_ort(res.model, x), want, rtol=1e-5, atol=1e-5)


def test_must_not_fire_when_a_residual_reads_the_layernorm():
    m = _ln_graph("residual")
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32)
    res = RepQLayerNormPass(channel_ranges(m, [x], ["y"])).run(m)
    assert not res.modified
    assert "Add" in res.skipped[0] and "cannot absorb" in res.skipped[0]
    res = RepQLayerNormPass({}).run(_ln_graph("matmul"))
    assert not res.modified and "no per-channel calibration ranges" in res.skipped[0]


def test_repq_raises_end_to_end_sqnr_on_channel_spread_vit():
    model = _spread_vit(0)
    data = _data(8)
    x = torch.cat(_data(2, seed=7))
    with torch.no_grad():
        ref = model(x).numpy()
    out = {}
    for reparam in ("none", "repq"):
        lib = intq.compile(
            model,
            data[0],
            calibration=data,
            config=CompileConfig(reparam=reparam, calibration="minmax"),
        )
        out[reparam] = sqnr_db(ref, lib.dequantize(lib.run(x.numpy())))
        if reparam == "repq":
            assert np.array_equal(
                lib.run(x.numpy()), intq.reference_run(lib.integer_onnx, x.numpy())
            )
    assert out["repq"] > out["none"] + 3.0, out
