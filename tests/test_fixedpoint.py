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
            [(1 << fp.ISQRT_DOMAIN_BITS) - 1],
        ]
    ).astype(np.int64)
    got = fp.isqrt_newton(n)
    assert np.array_equal(got, np.array([math.isqrt(int(v)) for v in n]))


def test_exp2_neg_error_bound():
    f = 12
    d = np.arange(0, 20 << f, 7, dtype=np.int64)
    got = fp.exp2_neg(d, f) / 2.0**fp.EXP2_BITS
    want = 2.0 ** (-d / 2.0**f)
    # second-order fraction: within 0.3 % relative plus truncation of the Q14 result
    assert np.all(np.abs(got - want) <= 0.003 * want + 2.0**-13)
    assert fp.exp2_neg(np.int64(0), f) == 1 << fp.EXP2_BITS
