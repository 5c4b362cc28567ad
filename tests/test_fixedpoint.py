"""The fixed-point primitives every op is built from: exactness and documented error bounds."""

import math

import numpy as np
import pytest

from intq.errors import ConfigError
from intq.ops import fixedpoint as fp


@pytest.mark.parametrize("m", [1e-9, 3.1e-5, 0.0123, 0.5, 0.9999, 1.0, 1.7, 123.4, 2.0**30])
def test_quantize_multiplier_is_31_bit_dyadic(m):
    b, c = fp.quantize_multiplier(m)
    assert 2**30 <= b < 2**31 and 0 <= c <= 62
    assert abs(b / 2.0**c - m) <= m * 2.0**-30


def test_quantize_multiplier_rejects_bad_values():
    for bad in (-1.0, float("nan"), float("inf"), 2.0**31):
        with pytest.raises(ConfigError):
            fp.quantize_multiplier(bad)
    assert fp.quantize_multiplier(0.0) == (0, 0)


def test_round_shift_rounds_half_up_including_negatives():
    x = np.arange(-8, 9, dtype=np.int64)
    got = fp.round_shift(x, np.int64(2))
    assert np.array_equal(got, np.floor(x / 4 + 0.5).astype(np.int64))
    assert np.array_equal(fp.round_shift(x, np.int64(0)), x)


def test_requantize_saturates():
    x = np.array([-(2**31), -1000, 0, 1000, 2**31 - 1], dtype=np.int64)
    b, c = fp.quantize_multiplier(0.5)
    y = fp.requantize_dyadic(x, b, np.int64(c), -128, 127)
    assert y.tolist() == [-128, -128, 0, 127, 127]


def test_requantize_hi32_equals_requantize_dyadic():
    """The fast path's identity over every shift it takes, the int32 extremes of x and b, values
    whose low 32 product bits sit at the rounding boundary, and random values."""
    rng = np.random.default_rng(3)
    i32 = np.iinfo(np.int32)
    edge = np.array([i32.min, i32.min + 1, -(2**16), -2, -1, 0, 1, 2, 2**16, i32.max - 1, i32.max])
    for c in range(fp.HI32_MIN_SHIFT, fp.MAX_SHIFT + 1):
        b = np.concatenate([edge, rng.integers(i32.min, i32.max, 40, endpoint=True)])
        x = np.concatenate([edge, rng.integers(i32.min, i32.max, 400, endpoint=True)])
        xx, bb = (a.astype(np.int64) for a in np.meshgrid(x, b))
        # x * b == (2k + 1) 2^(c-1) exactly, from int32 factors x = (2k + 1) 2^sx, b = 2^sb:
        # the halfway cases (round up), both signs of each factor
        sx = max(c - 31, 1)  # so that sb = c - 1 - sx <= 30
        odd = np.array([1, 3, 5, 7, 99, 1001, 65535], np.int64) << sx
        hx = odd[odd <= i32.max] if sx < 31 else np.array([i32.min], np.int64)
        hb = np.int64(1) << (c - 1 - sx)
        tie_x = np.concatenate([hx, -hx, hx, -hx])
        tie_b = np.concatenate([np.full(hx.size * 2, hb), np.full(hx.size * 2, -hb)])
        in32 = (tie_x >= i32.min) & (tie_x <= i32.max)
        tie_x, tie_b = tie_x[in32], tie_b[in32]
        assert tie_x.size and np.all((tie_x * tie_b) % (1 << (c - 1)) == 0)
        assert np.all(((tie_x * tie_b) >> (c - 1)) % 2 == 1)  # odd multiples: exact halves
        xx = np.concatenate([xx.ravel(), tie_x])
        bb = np.concatenate([bb.ravel(), tie_b])
        for lo, hi in ((-128, 127), (0, 255), (i32.min, i32.max)):
            want = fp.requantize_dyadic(xx, bb, np.int64(c), lo, hi)
            got = fp.requantize_dyadic_hi32(xx, bb, c, lo, hi)
            assert np.array_equal(got.astype(np.int64), want), (c, lo, hi)
    assert fp.hi32_applies(np.array([5, -(2**31)]), np.array([33, 62]))
    assert not fp.hi32_applies(5, 32)  # the rounding term 2^31 reaches the low 32 bits
    assert not fp.hi32_applies(2**31, 40)  # b beyond int32
    assert not fp.hi32_applies(np.array([5, 7]), np.array([40, 63]))
    # a zero multiplier (a channel of zero scale: quantize_multiplier(0) = (0, 0)) is 0 at any
    # shift, so it does not send the other channels back to the int64 form
    b0, c0 = np.array([0, 2**30 + 5]), np.array([0, 40])
    assert fp.hi32_applies(b0, c0) and fp.hi32_shift(b0, c0).tolist() == [33, 40]
    x0 = np.array([[i32.min], [-7], [0], [12345], [i32.max]], np.int64)
    want = fp.requantize_dyadic(x0, b0, c0, -128, 127)
    assert np.array_equal(fp.requantize_dyadic_hi32(x0, b0, c0, -128, 127), want)


def test_div_round():
    a = np.array([-7, -6, -5, -1, 0, 1, 5, 6, 7], dtype=np.int64)
    assert np.array_equal(fp.div_round(a, 4), np.floor(a / 4 + 0.5).astype(np.int64))


def test_isqrt_newton_exact_over_domain():
    rng = np.random.default_rng(0)
    n = np.concatenate(
        [
            np.arange(1, 1 << 16),
            rng.integers(1, 1 << fp.ISQRT_DOMAIN_BITS, 50_000),
            [k * k + d for k in (3, 1 << 10, (1 << 20) - 1, 777_777) for d in (-1, 0, 1)],
            # around every perfect square of a power of two and its neighbours
            [
                (k + e) ** 2 + d
                for k in (1 << np.arange(20))
                for e in (-1, 0, 1)
                for d in (-1, 0, 1)
            ],
            [(1 << fp.ISQRT_DOMAIN_BITS) - 1],
        ]
    ).astype(np.int64)
    n = n[(n >= 1) & (n < 1 << fp.ISQRT_DOMAIN_BITS)]
    got = fp.isqrt_newton(n)
    assert np.array_equal(got, np.array([math.isqrt(int(v)) for v in n]))
    # the start is an upper bound, and ISQRT_ITERS - 2 steps already reach the fixed point
    x = fp.isqrt_init(n)
    assert np.all(x * x >= n) and np.all(x <= fp.ISQRT_INIT)
    for _ in range(fp.ISQRT_ITERS - 2):
        x = fp.isqrt_step(x, n)
    assert np.array_equal(x, got)


def test_exp2_neg_error_bound():
    f = 12
    d = np.arange(0, 20 << f, 7, dtype=np.int64)
    got = fp.exp2_neg(d, f) / 2.0**fp.EXP2_BITS
    want = 2.0 ** (-d / 2.0**f)
    # second-order fraction: within 0.3 % relative plus truncation of the Q14 result
    assert np.all(np.abs(got - want) <= 0.003 * want + 2.0**-13)
    assert fp.exp2_neg(np.int64(0), f) == 1 << fp.EXP2_BITS


@pytest.mark.parametrize("a_bits", [8, 18, 26, 27])
def test_div_round_by_row_equals_div_round(a_bits):
    """The per-row magic-multiplier division is div_round exactly: every divisor up to 5000,
    random ones up to 2^20 (LayerNorm's std bound), numerators at the bounds and near the
    rounding boundaries (2a + b close to a multiple of 2b)."""
    rng = np.random.default_rng(a_bits)
    b = np.concatenate(
        [np.arange(1, 5001), rng.integers(1, 2**20 + 1, 100_000), [2**20, 2**20 - 1, 2**19 + 1]]
    ).astype(np.int64)
    lim = 2**a_bits - 1
    a = rng.integers(-lim, lim + 1, b.size)
    a[:6] = [lim, -lim, 0, -1, 1, -2]
    q = rng.integers(-(lim // 2**20), lim // 2**20 + 1, b.size)
    near = np.clip(q * b - b // 2 + rng.integers(-2, 3, b.size), -lim, lim)
    for num in (a, near):
        np.testing.assert_array_equal(fp.div_round_by_row(num, b, a_bits, 20), fp.div_round(num, b))


@pytest.mark.parametrize("frac_bits", [4, 12, 18])
def test_exp2_neg_in_int32_after_the_cap(frac_bits):
    """exp2_neg(min(d, EXP2_CAP << F)) evaluated in int32 arithmetic equals exp2_neg(d) in int64
    for every d below the cap and beyond it (the compiled Softmax runs it in int32)."""
    d = np.arange(0, (fp.EXP2_CAP << frac_bits) + 4096, dtype=np.int64)
    d = np.concatenate([d, [2**31, 2**32 - 1, 2**40]])
    narrow = fp.exp2_neg(fp.exp2_neg_arg(d, frac_bits).astype(np.int32), frac_bits)
    assert narrow.dtype == np.int32
    np.testing.assert_array_equal(narrow, fp.exp2_neg(d, frac_bits))


def test_bit_length_compiled_equals_reference():
    """TE's bit_length (64 - clz) equals the reference's count of comparisons, at every power
    of two and its neighbours, capped at `bits`, and at 0."""
    import tvm
    from tvm import te

    from intq.codegen.te_ops import TE

    pw = np.array([1 << k for k in range(0, 62)], dtype=np.int64)
    n = np.unique(np.concatenate([[0, 1, 2, 3], pw - 1, pw, pw + 1]))
    for bits in (21, 40):
        x = te.placeholder(n.shape, "int64", "x")
        y = te.compute(n.shape, lambda i: TE.bit_length(x[i], bits), name="y")  # noqa: B023
        f = tvm.compile(te.create_prim_func([x, y]), target="llvm")
        out = tvm.runtime.tensor(np.zeros(n.shape, np.int64))
        f(tvm.runtime.tensor(n), out)
        np.testing.assert_array_equal(out.numpy(), fp.NUMPY.bit_length(n, bits))
        assert out.numpy().max() == bits


@pytest.mark.parametrize("narrow", [False, True], ids=["int64", "32-bit lanes"])
def test_layernorm_element_loop_forms_equal_reference(narrow):
    """te_ops.int_layernorm's two element-loop forms (int64: cpu-int8 without AVX-512; 32-bit
    lanes: cuda-int8 and AVX-512 CPUs) equal the reference on int16 rows at the extremes:
    |x - mean| near 2^16, the largest variances an int16 row can have (~2^30), and constant
    rows (variance 0)."""
    import tvm
    from tvm import te

    from intq.codegen import te_ops
    from intq.ops import core

    rng = np.random.default_rng(3)
    x = rng.integers(-(2**15), 2**15, (6, 384)).astype(np.int16)
    x[1, ::2], x[1, 1::2] = -(2**15), 2**15 - 1  # |x - mean| ~ 2^15, variance ~ 2^30
    x[2, :] = 2**15 - 1  # constant row
    x[3, :200] = -(2**15)  # skewed: |x - mean| up to ~2^16
    g = rng.integers(-3000, 3000, 384).astype(np.int32)
    b = rng.integers(-(2**20), 2**20, 384).astype(np.int32)
    want = core.layernorm_core(
        x.astype(np.int64), g.astype(np.int64), b.astype(np.int64), 384, 0, 10,
        lambda t: t.sum(axis=-1, keepdims=True),
    )  # fmt: skip
    want = np.clip(want, -(2**31), 2**31 - 1).astype(np.int32)
    X = te.placeholder(x.shape, "int16", "x")
    G, B = te.placeholder((384,), "int32", "g"), te.placeholder((384,), "int32", "b")
    Y = te_ops.int_layernorm(X, G, B, eps=0, frac_bits=10, narrow=narrow)
    f = tvm.compile(te.create_prim_func([X, G, B, Y]), target="llvm")
    out = tvm.runtime.tensor(np.zeros(x.shape, np.int32))
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(g), tvm.runtime.tensor(b), out)
    np.testing.assert_array_equal(out.numpy(), want)
