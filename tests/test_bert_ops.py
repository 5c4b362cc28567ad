"""The BERT-family intq ops (intq/ops/bert.py): TVM == numpy reference element for element,
and each kernel's error against the float function it approximates, over its input range."""

import math

import numpy as np
import pytest
from onnx import TensorProto
from test_codegen_ops import check, ri

from intq.ops import bert, make_node
from intq.ops.core import SOFTMAX_RECIP_BITS
from intq.passes.quantize_bert import _iexp_constants, ibert_gelu_constants

RNG = np.random.default_rng(7)
F = 12
IEXP = _iexp_constants(F)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def _key_mask(b: int, s: int) -> np.ndarray:
    m = (RNG.random((b, s)) < 0.6).astype(np.int64)
    m[:, 0] = 1
    m[0, :] = 1  # one row with every key kept
    return m.reshape(b, 1, 1, s)


# ------------------------------------------------------------------ TVM == reference
def test_int_embedding_bit_exact():
    table = ri(-127, 127, (50, 24), np.int8)
    mult = RNG.integers(1, 2**31 - 1, 50).astype(np.int32)
    ids = RNG.integers(0, 50, (3, 7)).astype(np.int64)
    node = make_node(
        "IntEmbedding", ["ids", "t", "m"], ["y"], "emb", shift=22, to=TensorProto.INT16
    )
    y = check([node], {}, {"ids": ids, "t": table, "m": mult})
    assert y.shape == (3, 7, 24) and y.dtype == np.int16
    assert np.any(y == 32767)  # large multipliers saturate, exactly as specified


@pytest.mark.parametrize("op", ["IntMaskedSoftmax", "IBertSoftmax"])
def test_masked_softmax_bit_exact(op):
    x = ri(-(2**20), 2**20, (2, 3, 5, 33), np.int32)
    x[0, 0, 0, :] = 2**31 - 1  # extreme scores stay exact (int64 arithmetic)
    mask = _key_mask(2, 33)
    kw = {"frac_bits": F} | (IEXP if op == "IBertSoftmax" else {})
    y = check([make_node(op, ["x", "mask"], ["y"], "sm", **kw)], {"x": x}, {"mask": mask})
    keep = np.broadcast_to(mask != 0, y.shape)
    assert np.all(y[~keep] == 0)  # masked keys get probability 0
    sums = y.astype(np.int64).sum(-1)
    assert np.all(np.abs(sums - 256) <= 33)  # each row is a distribution (8-bit rounding)


def test_ibert_softmax_unmasked_bit_exact():
    x = ri(-(2**16), 2**16, (4, 17), np.int32)
    check([make_node("IBertSoftmax", ["x"], ["y"], "sm", frac_bits=F, **IEXP)], {"x": x}, {})


@pytest.mark.parametrize("kernel,nmax", [("shiftmax", 255), ("ibert", 255), ("ibert", 32767)])
def test_deferred_softmax_bit_exact(kernel, nmax):
    x = ri(-(2**18), 2**18, (2, 2, 9, 20), np.int32)
    v = ri(-127, 127, (2, 2, 20, 6), np.int8)
    v[0, 0, :, 0] = 127  # row sums of E times 127: the largest P @ V accumulator
    mask = _key_mask(2, 20)
    nodes = [
        make_node(
            "IntSoftmaxNumerator",
            ["x", "mask"],
            ["e"],
            "num",
            kernel=kernel,
            frac_bits=F,
            nmax=nmax,
            **IEXP,
        ),
        make_node("IntMatMul", ["e", "v"], ["acc"], "pv"),
        make_node("IntRowNormalize", ["acc", "e"], ["y"], "norm", frac_bits=8),
    ]
    y = check(nodes, {"x": x, "v": v}, {"mask": mask})  # V a runtime tensor: the bmm kernel
    # (E @ V) / sum(E) is a weighted mean of V's rows: within V's range, in units of 2^-8
    assert np.all(np.abs(y) <= 127 * 256)


@pytest.mark.parametrize("dtype,qmax", [(np.int8, 127), (np.int16, 32767)])
def test_ibert_gelu_bit_exact(dtype, qmax):
    s = 8.0 / qmax
    b, c, sh = ibert_gelu_constants(s, qmax)
    x = np.arange(-qmax - 1, qmax + 1, max(1, qmax // 300), dtype=dtype).reshape(1, -1)
    node = make_node("IBertGELU", ["x"], ["y"], "g", clip_b=b, poly_c=c, out_shift=sh)
    check([node], {"x": x}, {})


@pytest.mark.parametrize("mdtype", [np.int64, np.int32])
def test_int_masked_mean_bit_exact(mdtype):
    x = ri(-(2**20), 2**20, (3, 11, 8), np.int32)
    m = (RNG.random((3, 11, 1)) < 0.5).astype(mdtype)
    m[2] = 0  # no token at all: count clamps to 1, the mean is 0
    y = check([make_node("IntMaskedMean", ["x", "m"], ["y"], "mm")], {"x": x}, {"m": m})
    assert np.all(y[2] == 0)
    k = m[0, :, 0].astype(bool)
    if k.any():
        want = x[0][k].astype(np.float64).mean(0)
        assert np.all(np.abs(y[0] - want) <= 0.5)


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_int_l2_normalize_bit_exact(dtype):
    hi = np.iinfo(dtype).max
    x = ri(-hi, hi, (4, 384), dtype)
    x[1] = 0  # zero vector: norm clamps to 1
    x[2, :] = hi
    y = check([make_node("IntL2Normalize", ["x"], ["y"], "l2", frac_bits=14)], {"x": x}, {})
    assert np.all(y[1] == 0)


# ------------------------------------------------------------------ error against float
def test_iexp_error_bound():
    """i-exp against exp(-d) over d in [0, 20] (F = 12): < 0.4 % relative where exp > 1e-4."""
    d = np.arange(0, 20 * 2**F, dtype=np.int64)
    e = bert.iexp_neg(d, IEXP["ln2"], IEXP["poly_b"], IEXP["poly_c"], F)
    e0 = bert.exp_at_zero("ibert", IEXP["poly_b"], IEXP["poly_c"])
    ref = np.exp(-d / 2**F)
    big = ref > 1e-4
    rel = np.abs(e / e0 - ref)[big] / ref[big]
    assert rel.max() < 0.004
    assert np.abs(e / e0 - ref).max() < 0.002
    assert np.all(np.diff(e) <= 0)  # monotone non-increasing


def test_ibert_softmax_error_bound():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.normal(0, rng.uniform(0.5, 6), (4, 128))
        q = np.floor(x * 2**F + 0.5).astype(np.int64)
        keep = np.ones(q.shape, bool)
        e = bert.ibert_exp(q, q.max(-1, keepdims=True), keep, F, **IEXP)
        p = bert.normalise(e, e.sum(-1, keepdims=True), bert.IBERT_RECIP_BITS) / 256
        xs = q / 2**F
        sm = np.exp(xs - xs.max(-1, keepdims=True))
        sm /= sm.sum(-1, keepdims=True)
        assert np.abs(p - sm).max() < 0.0045


def test_masked_shiftmax_equals_shiftmax_on_kept_keys():
    """With every key kept, IntMaskedSoftmax is IntSoftmax (Shiftmax) exactly."""
    from intq.ops.core import softmax_core

    x = RNG.integers(-(2**18), 2**18, (5, 40)).astype(np.int64)
    keep = np.ones(x.shape, bool)
    e = bert.shiftmax_exp(x, x.max(-1, keepdims=True), keep, F)
    got = bert.normalise(e, e.sum(-1, keepdims=True), SOFTMAX_RECIP_BITS)
    want = softmax_core(
        x, F, lambda t: t.max(-1, keepdims=True), lambda t: t.sum(-1, keepdims=True)
    )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qmax,rng_x", [(127, 6.0), (32767, 6.0), (32767, 20.0)])
def test_ibert_gelu_error_bound(qmax, rng_x):
    """i-GELU against erf-GELU over the whole input range: max |error| < 0.019 (the erf
    polynomial's own error, I-BERT's figure)."""
    s = rng_x / qmax
    b, c, sh = ibert_gelu_constants(s, qmax)
    q = np.arange(-qmax, qmax + 1, dtype=np.int64)
    y = bert.ibert_gelu_core(q, b, c, sh) * (s / (2 * c) * 2**sh)
    x = q * s
    gelu = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    assert np.abs(y - gelu).max() < 0.019


def test_l2_normalize_error_bound():
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = rng.normal(0, rng.uniform(0.01, 3), (8, 384))
        s = np.abs(x).max() / 32767
        q = np.floor(x / s + 0.5).astype(np.int64)
        y = bert.l2_normalize_core(q, (q * q).sum(-1, keepdims=True), 14) / 2**14
        assert np.abs(y - x / np.linalg.norm(x, axis=1, keepdims=True)).max() < 1e-4


@pytest.mark.parametrize("dtype,qmax,rng_x", [(np.int16, 32767, 6.0), (np.int8, 127, 8.0)])
def test_poly_gelu_bit_exact_and_error_bound(dtype, qmax, rng_x):
    from intq.passes.quantize_bert import poly_gelu_attrs

    s = rng_x / qmax
    a = poly_gelu_attrs(s, qmax)
    x = np.arange(-qmax - 1, qmax + 1, max(1, qmax // 300), dtype=dtype).reshape(1, -1)
    check([make_node("IntPolyGELU", ["x"], ["y"], "g", **a)], {"x": x}, {})
    q = np.arange(-qmax, qmax + 1, dtype=np.int64)
    y = bert.poly_gelu_core(q, a["mult"], a["shift"], a["clip"], a["coeffs"], a["out_shift"])
    y = y * (s / 2 * 2.0**-30 * 2 ** a["out_shift"])
    xs = q * s
    gelu = 0.5 * xs * (1 + _erf(xs / math.sqrt(2)))
    assert np.abs(y - gelu).max() < 2e-4  # vs 0.018 for i-GELU's second-order erf


def test_int16_numerators_keep_small_probabilities():
    """A peaked row: one key at p ~ 0.9, the rest share 0.1. uint8 numerators round each small
    e / e(0) ~ 1e-3 to 0 and lose that mass; 15-bit numerators keep it."""
    from intq.ops.registry import intq_op

    keys, f = 128, F
    x = np.full((1, keys), -round(7.0 * 2**f), np.int64)
    x[0, 0] = 0
    p = np.exp(x / 2**f)
    p /= p.sum()
    mass = {}
    for nmax in (255, 32767):
        attrs = {"kernel": "ibert", "frac_bits": f, "nmax": nmax, **IEXP}
        (e,) = intq_op("IntSoftmaxNumerator").reference([x.astype(np.int32)], attrs)
        assert e.dtype == (np.uint8 if nmax == 255 else np.int16)
        q = e.astype(np.float64) / e.astype(np.float64).sum()
        mass[nmax] = float(q[0, 1:].sum())
    want = float(p[0, 1:].sum())
    assert mass[255] == 0.0 and want > 0.1
    assert abs(mass[32767] - want) < 0.02 * want
