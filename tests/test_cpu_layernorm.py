"""cpu-int8's LayerNorm row kernel (codegen/cpu_layernorm.py) against the op registry's reference
(IntAdd, Requantize, IntLayerNorm, Requantize), element by element, on rows built to reach the
edges: constant rows (variance 0, eps 0), one outlier per row (|q| near its bound), int16
extremes; per-tensor and per-channel Requantizes in int32 lanes (hi32) and in int64; the add's
operand Requantizes in int32 (split16) and in int64 (an int32 operand); the affine in int32 and
(gamma too large for the proof) in int64. Also the proofs behind the int32 paths
(`core.layernorm_q_bound`, `fixedpoint.requantize_dyadic_split16`) and where the kernel must not
apply."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import tvm

from intq.codegen import compat, cpu_layernorm
from intq.codegen.te_ops import RowAdd
from intq.ir import INTQ_DOMAIN
from intq.ops import core, lookup
from intq.ops import fixedpoint as fp

I16 = np.iinfo(np.int16)
TO = {dt: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)) for dt in ("int8", "uint8", "int16")}


def _ref(op: str, xs, **attrs):
    """The registry's reference of one node of `op` (its attribute defaults filled in)."""
    node = onnx.helper.make_node(op, ["x"] * len(xs), ["y"], domain=INTQ_DOMAIN, **attrs)
    opdef = lookup(node)
    return opdef.reference(xs, opdef.attrs_of(node))[0]


def _rows(rng, rows: int, n: int, dtype: str, spread: int) -> np.ndarray:
    info = np.iinfo(dtype)
    x = rng.integers(-spread, spread + 1, (rows, n))
    x[0] = 7  # constant row: variance 0
    x[1] = 0
    x[1, 3] = info.max  # one outlier: |q| near layernorm_q_bound
    x[2] = info.min
    x[2, -1] = info.max
    if rows > 4:
        x[3, ::2] = info.min  # alternating extremes
        x[3, 1::2] = info.max
    return np.clip(x, info.min, info.max).astype(dtype)


def _run(func, args, outs):
    func = func.with_attr("global_symbol", "main")  # a public entry (built alone)
    mod = tvm.compile(tvm.IRModule({"main": func}), target=compat.cpu_target(host=True))
    dev = tvm.cpu()
    targs = [tvm.runtime.tensor(np.ascontiguousarray(a).reshape(-1), dev) for a in args]
    touts = [tvm.runtime.tensor(np.zeros(int(np.prod(s)), d), dev) for s, d in outs]
    mod["main"](*targs, *touts)
    return [t.numpy().reshape(s) for t, (s, _) in zip(touts, outs, strict=True)]


CASES = {
    # name: (x dtypes, add operand requantizes, eps, frac_bits, rq after, gamma scale)
    "ln_int16_rq_hi32": (["int16"], None, 160, 10, ("pt", 1147405274, 46, "int8"), 2000),
    "ln_int8_no_rq": (["int8"], None, 0, 10, None, 2000),
    "ln_int16_rq_int64": (["int16"], None, 3, 12, ("pt", 1500000000, 30, "int8"), 2000),
    "ln_rq_per_channel_hi32": (["int16"], None, 0, 10, ("pc", None, 44, "uint8"), 2000),
    "ln_rq_per_channel_int64": (["int16"], None, 9, 10, ("pc", None, 31, "int8"), 2000),
    "ln_affine_int64": (["int16"], None, 0, 10, ("pt", 1147405274, 50, "int8"), 1 << 20),
    "add_split16": (["int16", "int16"], (2116346636, 31), 160, 10, ("pt", 1147405274, 46, "int8"),
                    2000),
    "add_int32_operand": (["int16", "int32"], (1167957603, 42), 0, 10, None, 2000),
    "add_int8_both_rq": (["int8", "int8"], (1 << 30, 20), 1, 8, ("pc", None, 40, "int8"), 2000),
}  # fmt: skip


@pytest.mark.parametrize(
    "name,keep_sum",
    [(k, keep) for k in sorted(CASES) for keep in (False, True)[: len(CASES[k][0])]],
)
def test_row_kernel_equals_reference(name, keep_sum):
    """keep_sum: the add's sum is an output too (pre-LN residual stream), else a row buffer."""
    x_dtypes, op_rq, eps, frac, rq, gscale = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    rows, n = 37, 96
    xs = [_rows(rng, rows, n, dt, 900 if dt != "int8" else 90) for dt in x_dtypes]
    if x_dtypes[-1] == "int32":
        xs[-1] = rng.integers(-(2**31), 2**31, (rows, n)).astype(np.int32)
    gamma = rng.integers(-gscale, gscale, n).astype(np.int32)
    beta = rng.integers(-50000, 50000, n).astype(np.int32)
    sum_dt = "int16" if len(x_dtypes) == 2 else x_dtypes[0]
    lo, hi = fp.dtype_bounds(sum_dt)

    # the reference: IntAdd of the Requantized operands, IntLayerNorm, Requantize
    add = None
    x = xs[0]
    if len(xs) == 2:
        rqs = (None, (*op_rq, lo, hi, sum_dt))
        if x_dtypes == ["int8", "int8"]:
            rqs = ((*op_rq, lo, hi, sum_dt), (*op_rq, lo, hi, sum_dt))
        add = RowAdd(rqs, sum_dt, lo, hi)
        ops = []
        for v, q in zip(xs, rqs, strict=True):
            if q is not None:
                v = _ref("Requantize", [v, np.int32(q[0]), np.int32(q[1])], axis=-1, to=TO[sum_dt])
            ops.append(v)
        x = _ref("IntAdd", ops, to=TO[sum_dt])
    y = _ref("IntLayerNorm", [x, gamma, beta], axis=-1, epsilon=eps, frac_bits=frac)
    krq, rq_args, hi32 = None, [], False
    if rq is not None:
        kind, b, c, dt = rq
        b_arr = np.int32(b) if kind == "pt" else rng.integers(1 << 29, 1 << 31, n).astype(np.int32)
        c_arr = np.int32(c) if kind == "pt" else np.full(n, c, np.int32) + rng.integers(0, 3, n)
        if kind == "pc":
            b_arr[5] = 0  # a channel of zero scale
        y = _ref("Requantize", [y, b_arr, c_arr.astype(np.int32)], axis=-1, to=TO[dt])
        lo_r, hi_r = fp.dtype_bounds(dt)
        hi32 = fp.hi32_applies(b_arr, c_arr)
        if kind == "pt":
            krq = (int(b_arr), int(c_arr), lo_r, hi_r, dt)
        else:
            krq = (None, None, lo_r, hi_r, dt)
            rq_args = cpu_layernorm.rq_arrays((b_arr, c_arr), n, hi32)
    in_bits = 8 * np.dtype(sum_dt).itemsize
    affine = core.layernorm_affine_fits_int32(gamma, beta, n, eps, frac, in_bits)
    assert affine == (gscale < (1 << 20))  # the proof holds for the small gammas only
    keep = add is not None and keep_sum
    func = cpu_layernorm.layernorm_rows_func(
        rows, n, x_dtypes, sum_dt, eps=eps, frac_bits=frac, add=add, keep_sum=keep,
        affine_i32=affine, rq=krq, rq_hi32=hi32,
    )  # fmt: skip
    outs = ([((rows, n), sum_dt)] if keep else []) + [((rows, n), y.dtype)]
    got = _run(func, [*xs, gamma, beta, *rq_args], outs)
    if keep:
        np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[-1], y)


@pytest.mark.parametrize("eps", [0, 2])
def test_row_statistics_on_many_small_rows(eps):
    """Rows of small spread: the variance lands on and next to perfect squares, where an
    off-by-one in a row sum or a rounding changes std (the kernel sums x and x^2 and forms the
    centred sum algebraically)."""
    rows, n, frac = 4096, 16, 10
    rng = np.random.default_rng(11 + eps)
    x = rng.integers(-3, 4, (rows, n)).astype(np.int16) + rng.integers(-900, 900, (rows, 1))
    x = x.astype(np.int16)
    gamma = rng.integers(500, 2000, n).astype(np.int32)
    beta = rng.integers(-5000, 5000, n).astype(np.int32)
    y = _ref("IntLayerNorm", [x, gamma, beta], axis=-1, epsilon=eps, frac_bits=frac)
    func = cpu_layernorm.layernorm_rows_func(
        rows, n, ["int16"], "int16", eps=eps, frac_bits=frac, affine_i32=True
    )
    np.testing.assert_array_equal(_run(func, [x, gamma, beta], [((rows, n), "int32")])[0], y)


def test_split16_requantize_equals_int64_form():
    x = np.arange(I16.min, I16.max + 1, dtype=np.int32)
    rng = np.random.default_rng(5)
    mults = [0, 1, 0xFFFF, 1 << 16, (1 << 31) - 1, *rng.integers(0, 1 << 31, 3)]
    shifts = range(fp.SPLIT16_MIN_SHIFT, fp.SPLIT16_MAX_SHIFT + 1)
    for b, c in itertools.product(mults, shifts):
        want = fp.requantize_dyadic(x.astype(np.int64), int(b), int(c), I16.min, I16.max)
        got = fp.requantize_dyadic_split16(x, int(b), int(c), I16.min, I16.max)
        assert got.dtype == np.int32  # numpy int32 arithmetic: an overflow would wrap and differ
        np.testing.assert_array_equal(got, want)
    assert fp.split16_applies(5, 17) and not fp.split16_applies(5, 16)
    assert not fp.split16_applies(5, 47) and not fp.split16_applies(-1, 20)


@pytest.mark.parametrize("eps", [0, 1, 160])
def test_q_bound_holds_and_is_tight(eps):
    n, frac = 64, 10
    bound = core.layernorm_q_bound(n, eps, frac, 16)
    # rows of k equal outliers v over zeros (the extreme |x - mean| / std), and random rows
    x = np.zeros((3 * 2999 + 200, n), np.int64)
    for k in (1, 2, 3):
        x[(k - 1) * 2999 : k * 2999, :k] = np.arange(1, 3000)[:, None]
    x[-200:] = np.random.default_rng(eps).integers(-32768, 32768, (200, n))
    mean, std = core.layernorm_row_stats(x, n, eps, lambda v: v.sum(-1, keepdims=True))
    worst = int(np.abs(fp.div_round((x - mean) << frac, std)).max())
    assert worst <= bound < 1.2 * worst  # holds, and not much looser than what rows reach
    assert core.layernorm_q_bound(n, eps, frac, 32) is None  # beyond the proof's domain


def test_applies_only_where_the_kernel_is_exact():
    add = RowAdd((None, None), "int16", -32768, 32767)
    assert cpu_layernorm.applies(384, ["int16", "int16"], add, "int16")
    assert not cpu_layernorm.applies(100, ["int16", "int16"], add, "int16")  # n % 16
    assert not cpu_layernorm.applies(384, ["int16", "int32"], add, "int16")  # no Requantize
    wide = RowAdd((None, (1 << 30, 40, -(2**31), 2**31 - 1, "int32")), "int16", -32768, 32767)
    assert not cpu_layernorm.applies(384, ["int16", "int32"], wide, "int16")
    assert not cpu_layernorm.applies(384, ["int32"], None, "int32")
