"""Each intq op's numpy semantics: the schema checks, shape rules and accuracy against the float
function it replaces."""

import math

import numpy as np
import onnx
import pytest

from intq.errors import GraphError, UnsupportedOpError
from intq.ops import all_ops, intq_op, lookup, make_node
from intq.ops import fixedpoint as fp
from intq.ops.core import SOFTMAX_OUT_BITS

RNG = np.random.default_rng(0)


def run(op, xs, **attrs):
    d = intq_op(op)
    a = dict(d.attributes)
    a.update(attrs)
    return d.reference(xs, a)[0]


def test_every_op_is_registered_once_and_documented():
    names = [(o.domain, o.name) for o in all_ops()]
    assert len(names) == len(set(names))
    for o in all_ops():
        assert o.doc, o.name
    intq_names = {o.name for o in all_ops() if o.domain == "ai.intq"}
    std_names = {o.name for o in all_ops() if o.domain == ""}
    assert not intq_names & std_names  # never a standard op's name
    assert {
        "IntMatMul",
        "IntConv",
        "Requantize",
        "IntAdd",
        "IntLayerNorm",
        "IntSoftmax",
        "IntGELU",
    } <= intq_names


def test_lookup_rejects_float_ops_naming_node():
    node = onnx.helper.make_node("Erf", ["x"], ["y"], name="gelu/erf")
    with pytest.raises(UnsupportedOpError, match="gelu/erf"):
        lookup(node)


def test_int_matmul_exact_and_broadcast():
    a = RNG.integers(-128, 128, (2, 3, 5, 64)).astype(np.int8)
    b = RNG.integers(-128, 128, (64, 7)).astype(np.int8)
    c = RNG.integers(-1000, 1000, 7).astype(np.int32)
    y = run("IntMatMul", [a, b, c])
    want = np.einsum("...k,kn->...n", a.astype(np.int64), b.astype(np.int64)) + c
    assert y.dtype == np.int32 and np.array_equal(y, want)
    u = RNG.integers(0, 256, (4, 64)).astype(np.uint8)
    assert np.array_equal(run("IntMatMul", [u, b]), u.astype(np.int64) @ b.astype(np.int64))


def test_int_matmul_worst_case_accumulator_is_exact():
    k = 4096
    a = np.full((1, k), -128, np.int8)
    b = np.full((k, 1), -128, np.int8)
    assert run("IntMatMul", [a, b])[0, 0] == 128 * 128 * k


def test_int_conv_matches_direct_loop():
    x = RNG.integers(-128, 128, (2, 4, 7, 6)).astype(np.int8)
    w = RNG.integers(-128, 128, (6, 2, 3, 3)).astype(np.int8)
    bias = RNG.integers(-50, 50, 6).astype(np.int32)
    attrs = dict(strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 1], group=2)
    y = run("IntConv", [x, w, bias], **attrs)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (0, 2)))
    oh, ow = (xp.shape[2] - 3) // 2 + 1, xp.shape[3] - 3 + 1
    want = np.zeros((2, 6, oh, ow), np.int64)
    for m in range(6):
        g = m // 3
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * 2 : g * 2 + 2, i * 2 : i * 2 + 3, j : j + 3]
                want[:, m, i, j] = (patch * w[m].astype(np.int64)).sum(axis=(1, 2, 3)) + bias[m]
    assert y.shape == want.shape and np.array_equal(y, want)


def test_requantize_per_channel_and_clip():
    x = RNG.integers(-(2**20), 2**20, (3, 4)).astype(np.int32)
    ms = [0.001, 0.01, 0.1, 0.0005]
    bc = [fp.quantize_multiplier(m) for m in ms]
    b = np.array([v[0] for v in bc], np.int32)
    c = np.array([v[1] for v in bc], np.int32)
    y = run("Requantize", [x, b, c], axis=1, to=onnx.TensorProto.INT8)
    want = np.clip(np.floor(x * np.array(ms) + 0.5), -128, 127)
    assert y.dtype == np.int8
    assert np.abs(y - want).max() <= 1
    relu = run("Requantize", [x, b, c], axis=1, to=onnx.TensorProto.INT8, clip_min=0)
    assert relu.min() >= 0 and np.array_equal(relu, np.maximum(y, 0))


EDGE_F32 = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-30, 3e38, -3e38, 0.5, -0.5, 4.5, -4.5]


@pytest.mark.parametrize("scale", [0.0371, 0.25, 1 / 127, 1e-6, 3e5])
@pytest.mark.parametrize("to", [onnx.TensorProto.INT8, onnx.TensorProto.UINT8])
def test_quantize_float_bits_is_exact_round_half_up(scale, to):
    """The input quantizer on binary32 bits equals floor(x * b / 2^c + 1/2), saturated, in exact
    rational arithmetic: normals, subnormals, signed zeros, ties (s = 1/4: x / s = k + 1/2 is
    exact), huge values; inf and NaN saturate by their sign bit."""
    from fractions import Fraction

    x = np.concatenate(
        [RNG.standard_normal(400) * 4, RNG.standard_normal(100) * 1e4, EDGE_F32]
    ).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32)])
    b, c = fp.quantize_multiplier(1 / scale)
    y = run("QuantizeFloatBits", [x.view(np.int32)], multiplier=b, shift=c, to=to)
    lo, hi = fp.dtype_bounds(y.dtype)
    assert y.dtype == (np.int8 if to == onnx.TensorProto.INT8 else np.uint8)
    for v, got in zip(x.tolist(), y.tolist(), strict=True):
        if np.isnan(v):
            sign_neg = np.signbit(np.float32(v))
            want = lo if sign_neg else hi
        elif np.isinf(v):
            want = hi if v > 0 else lo
        else:
            want = min(hi, max(lo, math.floor(Fraction(v) * b / 2**c + Fraction(1, 2))))
        assert got == want, (v, got, want)
    if scale == 0.25:  # the ties round up: 0.5 / 0.25 = 2, 4.5 / 0.25 = 18; -0.5 -> -2
        assert y[-16 + 8 : -4].tolist() == ([2, -2, 18, -18] if lo < 0 else [2, 0, 18, 0])


def test_quantize_float_bits_rejects_a_bad_multiplier_or_a_wide_output():
    d = intq_op("QuantizeFloatBits")
    with pytest.raises(GraphError, match="multiplier 0"):
        d.shape([(2, 3)], [np.dtype("int32")], dict(d.attributes, multiplier=0))
    with pytest.raises(GraphError, match="8 or 16 bits"):  # its shift clamp needs |y| < 2^23
        d.shape([(2, 3)], [np.dtype("int32")], dict(d.attributes, to=onnx.TensorProto.INT32))


def test_int_add_saturates():
    a = np.array([32000, -32000, 5], np.int16)
    b = np.array([1000, -1000, 6], np.int16)
    assert run("IntAdd", [a, b]).tolist() == [32767, -32768, 11]


def test_int_layernorm_close_to_float():
    c = 192
    x = (RNG.standard_normal((4, 10, c)) * 3000 + 500).astype(np.int16)
    gamma = RNG.integers(-2047, 2048, c).astype(np.int32)
    beta = RNG.integers(-5000, 5000, c).astype(np.int32)
    k = 10
    y = run("IntLayerNorm", [x, gamma, beta], frac_bits=k)
    xf = x.astype(np.float64)
    norm = (xf - xf.mean(-1, keepdims=True)) / xf.std(-1, keepdims=True)
    want = norm * gamma * 2**k + beta
    assert np.abs(y - want).max() <= 2048 * 2 + 2**k * 2048 * 0.002


def test_int_softmax_close_to_float_and_bounded():
    f = 12
    z = RNG.standard_normal((3, 5, 50)) * 4  # base-2 exponents
    x = np.floor(z * 2**f).astype(np.int32)
    y = run("IntSoftmax", [x], frac_bits=f)
    want = 2.0**z / (2.0**z).sum(-1, keepdims=True)
    assert y.dtype == np.uint8
    assert np.abs(y / 2**SOFTMAX_OUT_BITS - want).max() < 0.004  # measured 0.0025
    assert np.all(y.astype(int).sum(-1) <= 256 + 50)


def test_int_softmax_no_overflow_at_extremes():
    x = np.array([[-(2**31), 2**31 - 1, 0, 2**31 - 1]], np.int32)
    y = run("IntSoftmax", [x], frac_bits=12)
    assert y.tolist() == [[0, 128, 0, 128]]


def test_int_gelu_close_to_float():
    s = 0.05
    x = np.arange(-128, 128, dtype=np.int8)
    f = 14
    alpha = int(np.floor(1.702 / np.log(2) * s * 2**f + 0.5))
    y = run("IntGELU", [x], alpha=alpha, frac_bits=f)
    xf = x * s
    gelu_sig = xf / (1 + np.exp(-1.702 * xf))
    # measured: 0.00064 max abs error vs x*sigmoid(1.702x) on [-6.4, 6.35]
    assert np.abs(y * s / 2**fp.EXP2_BITS - gelu_sig).max() < 0.001


def test_schema_rejects_wrong_dtype_naming_node():
    node = make_node("IntMatMul", ["a", "b"], ["y"], name="attn/qk")
    op = lookup(node)
    with pytest.raises(GraphError, match="attn/qk"):
        op.check_inputs(node, [np.dtype("float32"), np.dtype("int8")])


def test_shape_rules():
    mm = intq_op("IntMatMul").shape
    assert mm([(2, 5, 8), (8, 3)], [], {}) == [((2, 5, 3), np.dtype("int32"))]
    with pytest.raises(GraphError):
        mm([(2, 5, 8), (7, 3)], [], {})
    conv = intq_op("IntConv")
    a = dict(conv.attributes, strides=[16, 16])
    assert conv.shape([(1, 3, 224, 224), (192, 3, 16, 16)], [], a)[0][0] == (1, 192, 14, 14)
