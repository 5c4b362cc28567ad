"""QuantizePass and calibration on tiny float graphs built in the test: op list before/after,
numerics against the float graph, and the cases where a rule must not fire."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from intq.check import check_integer_only
from intq.errors import CalibrationError, UnsupportedOpError
from intq.passes.calibration import calibrate
from intq.passes.quantize import QuantizePass
from intq.reference import ReferenceInterpreter, load_signature, reference_run

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    """Each test sees the same random stream whatever ran before it."""
    global RNG
    RNG = np.random.default_rng(0)


def model_of(nodes, inputs, outputs, inits, opset=18):
    g = helper.make_graph(
        nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def ort_run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def quantize(m, batches, **kw):
    cal = calibrate(m, batches)
    return QuantizePass(cal, **kw).run(m).model


def linear_model(with_bias=True, bias_other_use=False):
    w = RNG.standard_normal((16, 8)).astype(np.float32) * 0.3
    b = RNG.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc")]
    out = "mm"
    if with_bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias"))
        out = "y"
    outputs = [vi(out, [4, 3, 8])]
    if bias_other_use:
        outputs.append(vi("mm", [4, 3, 8]))
    return model_of(
        nodes, [vi("x", [4, 3, 16])], outputs, {"w": w, "b": b} if with_bias else {"w": w}
    )


def batches(shape, n=16, scale=1.0):
    return [RNG.standard_normal(shape).astype(np.float32) * scale for _ in range(n)]


def test_linear_becomes_int_matmul_with_fused_bias():
    m = linear_model()
    q = quantize(m, batches((4, 3, 16)))
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Add"]
    ops = [n.op_type for n in q.graph.node]
    assert ops == ["QuantizeFloatBits", "IntMatMul", "Requantize", "Identity"]
    assert len(q.graph.node[1].input) == 3  # bias fused as int32
    assert check_integer_only(q) == []
    x = RNG.standard_normal((4, 3, 16)).astype(np.float32)
    y = reference_run(q, x)
    sig = load_signature(q)
    assert y.dtype == np.int32
    ref = ort_run(m, x)
    assert np.abs(y * sig.outputs[0].scale - ref).max() < 0.02 * np.abs(ref).max()


def test_bias_not_fused_when_matmul_output_has_other_readers():
    q = quantize(linear_model(bias_other_use=True), batches((4, 3, 16)))
    mm = [n for n in q.graph.node if n.op_type == "IntMatMul"]
    assert len(mm) == 1 and len(mm[0].input) == 2
    assert "IntAdd" in [n.op_type for n in q.graph.node]


def test_residual_add_uses_int16_common_scale():
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["x", "h"], ["y"], name="residual"),
    ]
    m = model_of(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], {"w": w})
    data = batches((2, 8))
    q = quantize(m, data)
    add = [n for n in q.graph.node if n.op_type == "IntAdd"][0]
    types = {v.name: v.type.tensor_type.elem_type for v in q.graph.value_info}
    assert types[add.output[0]] == TensorProto.INT16
    assert all(types[i] == TensorProto.INT16 for i in add.input)
    x = data[0]  # in the calibrated range: an int8 input clipped by range would spread error
    ref = ort_run(m, x)
    got = reference_run(q, x) * load_signature(q).outputs[0].scale
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_scalar_mul_is_a_scale_relabel_but_tensor_mul_is_rejected():
    nodes = [
        helper.make_node("MatMul", ["x", "xt"], ["s"], name="qk"),
        helper.make_node("Mul", ["s", "c"], ["y"], name="scale"),
    ]
    inits = {"c": np.array(0.125, np.float32)}
    m = model_of(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"), *nodes],
        [vi("x", [2, 4, 8])],
        [vi("y", [2, 4, 4])],
        inits,
    )
    data = batches((2, 4, 8))
    q = quantize(m, data)
    assert "Mul" not in [n.op_type for n in q.graph.node]
    x = data[0]
    ref = ort_run(m, x)
    got = reference_run(q, x) * load_signature(q).outputs[0].scale
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    bad = model_of(
        [helper.make_node("Mul", ["x", "x"], ["y"], name="square")],
        [vi("x", [2, 4])],
        [vi("y", [2, 4])],
        {},
    )
    with pytest.raises(UnsupportedOpError, match="square"):
        quantize(bad, batches((2, 4)))


def test_layernorm_softmax_gelu_become_integer_kernels():
    d = 16
    nodes = [
        helper.make_node(
            "LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, epsilon=1e-5, name="ln"
        ),
        helper.make_node("Softmax", ["ln"], ["sm"], axis=-1, name="sm"),
        helper.make_node("MatMul", ["sm", "w"], ["h"], name="fc"),
        helper.make_node("Gelu", ["h"], ["y"], name="gelu"),
    ]
    inits = {
        "g": (RNG.random(d) + 0.5).astype(np.float32),
        "b": RNG.standard_normal(d).astype(np.float32) * 0.1,
        "w": RNG.standard_normal((d, d)).astype(np.float32),
    }
    m = model_of(nodes, [vi("x", [3, 5, d])], [vi("y", [3, 5, d])], inits, opset=20)
    q = quantize(m, batches((3, 5, d), scale=2.0))
    ops = [n.op_type for n in q.graph.node]
    for want in ("IntLayerNorm", "IntSoftmax", "IntMatMul", "IntGELU"):
        assert want in ops
    for gone in ("LayerNormalization", "Softmax", "Gelu"):
        assert gone not in ops
    assert check_integer_only(q) == []
    x = RNG.standard_normal((3, 5, d)).astype(np.float32) * 2
    ref = ort_run(m, x)
    got = reference_run(q, x) * load_signature(q).outputs[0].scale
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_unsupported_op_names_op_and_node():
    m = model_of(
        [helper.make_node("Sin", ["x"], ["y"], name="weird_sin")],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {},
    )
    with pytest.raises(UnsupportedOpError) as e:
        quantize(m, batches((2, 3)))
    assert "Sin" in str(e.value) and "weird_sin" in str(e.value)


def test_calibration_errors_are_typed():
    m = linear_model()
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(m, [])
    with pytest.raises(CalibrationError, match="shape"):
        calibrate(m, [np.zeros((4, 3, 15), np.float32)])


def test_calibration_percentile_below_minmax_and_any_batch_size():
    m = linear_model()
    data = batches((7, 3, 16), n=2)  # not the model's static batch of 4
    cal = calibrate(m, data, percentile=99.0)
    s = cal.stats["x"]
    assert s.pct < s.amax
    assert np.isclose(s.amax, max(np.abs(d).max() for d in data))


def test_calibration_memory_budget_splits_runs_not_statistics(monkeypatch):
    """Under a byte budget that holds one activation per run, calibration asks onnxruntime for the
    tensors in several runs per batch, and every statistic is the same as with one run."""
    import intq.passes.calibration as calib

    m = linear_model()
    data = batches((4, 3, 16), n=3)
    names = [o.name for o in m.graph.output] + [v.name for v in m.graph.value_info]
    one = calib._output_groups(m, names, None)
    split = calib._output_groups(m, names, 4 * 3 * 8 * 4)  # one [4, 3, 8] float tensor
    assert len(one) == 1 and len(split) > 1 and sum(split, []) == names
    monkeypatch.setattr(calib, "SAMPLES_PER_BATCH", 50)  # subsampled pools, seeded per name
    monkeypatch.setattr(calib, "CALIBRATION_OUTPUT_BYTES", None)
    whole = calibrate(m, data, percentile=99.0, search=True)
    monkeypatch.setattr(calib, "CALIBRATION_OUTPUT_BYTES", 4 * 3 * 8 * 4)
    parts = calibrate(m, data, percentile=99.0, search=True)
    assert whole.stats.keys() == parts.stats.keys() and len(whole.stats) >= 3
    for n, a in whole.stats.items():
        b = parts.stats[n]
        assert (a.amax, a.pct, a.batches, a.search) == (b.amax, b.pct, b.batches, b.search), n
        np.testing.assert_array_equal(a.channel_amax, b.channel_amax)


def test_check_integer_only_reports_float_nodes():
    m = linear_model()
    bad = check_integer_only(m)
    assert {o.node for o in bad} >= {"fc", "fc_bias"}


def test_reference_interpreter_checks_dtypes_by_node():
    q = quantize(linear_model(), batches((4, 3, 16)))
    with pytest.raises(Exception, match="x_quantize.*float32"):  # float values, not their bits
        ReferenceInterpreter(q).run({"x": np.zeros((4, 3, 16), np.float32)})
    q.graph.node[1].input[0] = "x"  # the matmul fed the raw int32 bits
    with pytest.raises(Exception, match="fc.*int32"):
        ReferenceInterpreter(q).run({"x": np.zeros((4, 3, 16), np.int32)})


@pytest.mark.parametrize("op", ["Relu", "Clip"])
def test_relu_and_clip_fold_into_requantize_saturation(op):
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    inits = {"w": w}
    ins = ["h"]
    if op == "Clip":
        inits |= {"lo": np.array(-0.5, np.float32), "hi": np.array(1.5, np.float32)}
        ins += ["lo", "hi"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node(op, ins, ["y"], name="act"),
    ]
    m = model_of(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits)
    data = batches((2, 8))
    q = quantize(m, data)
    ops = [n.op_type for n in q.graph.node]
    assert op not in ops and ops.count("Requantize") == 1
    rq = [n for n in q.graph.node if n.op_type == "Requantize"][0]
    assert any(a.name == "clip_min" for a in rq.attribute)
    x = data[0]
    ref = ort_run(m, x)
    got = reference_run(q, x) * load_signature(q).outputs[0].scale
    assert got.min() >= (0 if op == "Relu" else -0.5 - 1e-6)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_reduce_mean_becomes_int_mean():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0, name="pool")]
    m = model_of(nodes, [vi("x", [2, 5, 8])], [vi("y", [2, 8])], {"axes": np.array([1], np.int64)})
    data = batches((2, 5, 8))
    q = quantize(m, data)
    assert "IntMean" in [n.op_type for n in q.graph.node]
    x = data[0]
    sig = load_signature(q)
    got = reference_run(q, x) * sig.outputs[0].scale
    # input rounding (<= s/2 per element, averaged) plus the mean's rounding (<= s/2)
    assert np.abs(got - x.mean(1)).max() <= sig.inputs[0].scale


def ln_linear_model(k: int, n: int = 24, outlier: float = 30.0):
    """x -> LayerNorm (one outlier channel in gamma) -> MatMul [k, n] + bias."""
    gamma = (RNG.random(k) + 0.5).astype(np.float32)
    gamma[3] = outlier  # a BERT-like outlier channel: int8 steps become coarse for the rest
    inits = {
        "g": gamma,
        "be": RNG.standard_normal(k).astype(np.float32) * 0.1,
        "w": (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
        "b": RNG.standard_normal(n).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias"),
    ]
    return model_of(nodes, [vi("x", [2, 6, k])], [vi("y", [2, 6, n])], inits)


@pytest.mark.parametrize("k", [64, 600])
def test_int16_linear_input_bounded_and_more_accurate(k):
    from intq.config import CompileConfig
    from intq.passes.quantize import int16_linear_qmax

    m = ln_linear_model(k)
    cal = batches((2, 6, k), n=8)
    q8 = quantize(m, cal)
    q16 = quantize(m, cal, config=CompileConfig(linear_input="int16"))
    req = [n for n in q16.graph.node if n.op_type == "Requantize" and "fc" in n.output[0]]
    assert len(req) == 1
    a = {x.name: helper.get_attribute_value(x) for x in req[0].attribute}
    assert a["to"] == TensorProto.INT16 and a["clip_min"] == -a["clip_max"]
    qmax = a["clip_max"]
    assert (qmax == 32767) == (k == 64)  # at K = 600 the int32 accumulator binds
    assert qmax <= int16_linear_qmax(k, None, 1.0, np.ones(1))
    # worst case |acc| = qmax * sum_k |W_q| + |bias_q| stays below 2^31
    ws = {t.name: numpy_helper.to_array(t) for t in q16.graph.initializer}
    mm = next(n for n in q16.graph.node if n.op_type == "IntMatMul")
    wq, bq = ws[mm.input[1]].astype(np.int64), ws[mm.input[2]].astype(np.int64)
    assert int((qmax * np.abs(wq).sum(0) + np.abs(bq)).max()) < 2**31
    assert [n.op_type for n in q8.graph.node] == [n.op_type for n in q16.graph.node]
    assert check_integer_only(q16) == []
    x = RNG.standard_normal((2, 6, k)).astype(np.float32)
    ref = ort_run(m, x)
    err = {}
    for name, q in (("int8", q8), ("int16", q16)):
        got = reference_run(q, x) * load_signature(q).outputs[0].scale
        err[name] = float(np.sqrt(np.mean((got - ref) ** 2)))
    assert err["int16"] < 0.5 * err["int8"], err


def test_int16_linear_input_not_used_for_int8_sources():
    """A graph input is already int8: widening it to int16 would add nothing, so it stays."""
    from intq.config import CompileConfig

    q = quantize(linear_model(), batches((4, 3, 16)), config=CompileConfig(linear_input="int16"))
    ops = [n.op_type for n in q.graph.node]
    assert ops == ["QuantizeFloatBits", "IntMatMul", "Requantize", "Identity"]
    assert q.graph.node[1].input[0] == q.graph.node[0].output[0]  # the int8 input itself


def test_int16_linear_input_compiles_bit_exact_on_cpu():
    import intq

    m = ln_linear_model(600)
    lib = intq.compile(
        m, None, batches((2, 6, 600), n=4), config=intq.CompileConfig(linear_input="int16")
    )
    x = RNG.standard_normal((2, 6, 600)).astype(np.float32)
    assert np.array_equal(lib.run(x), reference_run(lib.integer_onnx, x))
    assert lib._build.tir_floats == []


def qk_model(second_reader: str = "MatMul"):
    """x [1, 4, 8] -> a per-channel linear [8, 16] -> Reshape [1, 4, 2, 8] -> Gather the two
    halves (q, k) -> q @ k^T (or q + k: `second_reader="Add"`)."""
    w = (RNG.standard_normal((8, 16)) * np.repeat([0.1, 1.0], 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qk"], name="qkv"),
        helper.make_node("Reshape", ["qk", "shape"], ["qk4"], name="split_heads"),
        helper.make_node("Gather", ["qk4", "i0"], ["q"], name="take_q", axis=2),
        helper.make_node("Gather", ["qk4", "i1"], ["k"], name="take_k", axis=2),
    ]
    if second_reader == "MatMul":
        nodes += [
            helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["y"], name="scores"),
        ]
        out = vi("y", [1, 4, 4])
    else:
        nodes.append(helper.make_node("Add", ["q", "k"], ["y"], name="sum"))
        out = vi("y", [1, 4, 8])
    inits = {
        "w": w,
        "shape": np.array([1, 4, 2, 8], np.int64),
        "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64),
    }
    return model_of(nodes, [vi("x", [1, 4, 8])], [out], inits)


def test_split_accumulator_requantized_once_per_head():
    """A per-channel accumulator split by data movement into the operands of an activation
    matmul (attention's q / k / v) keeps its elements' scales through the movement: one
    Requantize per head with a broadcast multiplier, no int32 tensor in between."""
    m = qk_model()
    q = quantize(m, batches((1, 4, 8), n=8))
    ops = [n.op_type for n in q.graph.node]
    assert ops[:7] == [
        "QuantizeFloatBits", "IntMatMul", "Reshape", "Gather", "Gather", "Transpose", "Requantize"
    ]  # fmt: skip
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    heads = [n for n in q.graph.node if n.op_type == "Requantize"][:2]
    assert sorted(inits[n.input[1]].shape for n in heads) == [(1, 1, 8), (1, 8, 1)]
    x = RNG.standard_normal((1, 4, 8)).astype(np.float32)
    got = reference_run(q, x) * load_signature(q).outputs[0].scale
    ref = ort_run(m, x)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_split_accumulator_materialized_for_other_readers():
    """Must not fire when a head is read by anything but an activation matmul: the accumulator
    is materialized per tensor (int32) first, as before."""
    q = quantize(qk_model("Add"), batches((1, 4, 8), n=8))
    ops = [n.op_type for n in q.graph.node]
    assert ops[:3] == ["QuantizeFloatBits", "IntMatMul", "Requantize"]
    to = {a.name: helper.get_attribute_value(a) for a in q.graph.node[2].attribute}["to"]
    assert to == TensorProto.INT32  # the per-tensor int32 form, requantized again per reader
