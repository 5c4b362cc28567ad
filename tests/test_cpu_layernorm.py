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
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import tvm

from intq.codegen import compat, cpu_layernorm, te_ops
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


@dataclass(frozen=True)
class Case:
    """One kernel configuration: the add's operands (dtype, value spread, Requantize (b, c, lo,
    hi, dtype) or None), or the LayerNorm's input alone; the LayerNorm; its Requantize
    ("pt" / "pc", b (pt), c, dtype, clip (lo, hi) or None: the dtype's range); gamma's scale, or
    "wide" (about 1.5 * 2^31 / layernorm_q_bound: the int32 affine's proof fails and rows
    overflow int32 unless the kernel takes the int64 path)."""

    operands: tuple
    eps: int = 0
    frac: int = 10
    rq: tuple | None = None
    gamma: int | str = 2000


I16R = (-32768, 32767, "int16")
CASES = {
    "ln_int16_rq_hi32": Case((("int16", 900, None),), 160, 10, ("pt", 1147405274, 46, "int8")),
    "ln_int8_no_rq": Case((("int8", 90, None),)),
    "ln_int16_rq_int64": Case((("int16", 900, None),), 3, 12, ("pt", 1500000000, 30, "int8")),
    "ln_rq_per_channel_hi32": Case((("int16", 900, None),), 0, 10, ("pc", None, 44, "uint8")),
    "ln_rq_per_channel_int64": Case((("int16", 900, None),), 9, 10, ("pc", None, 31, "int8")),
    "ln_affine_int64": Case((("int16", 900, None),), 0, 10, ("pt", 1147405274, 50, "int8"),
                            1 << 20),
    "ln_affine_wide": Case((("int16", 30000, None),), 0, 10, ("pt", 1 << 30, 52, "int8"), "wide"),
    "ln_rq_clip_outside_int32": Case((("int16", 900, None),), 0, 10,
                                     ("pt", 1 << 30, 46, "int8", (1 << 31, 5))),
    "add_split16": Case((("int16", 900, None), ("int16", 900, (2116346636, 31, *I16R))), 160, 10,
                        ("pt", 1147405274, 46, "int8")),
    "add_int32_operand": Case((("int16", 900, None), ("int32", None, (1167957603, 42, *I16R)))),
    "add_int8_both_rq": Case((("int8", 90, (1 << 30, 20, *I16R)),
                              ("int8", 90, (1 << 30, 20, *I16R))), 1, 8, ("pc", None, 40, "int8")),
    "add_int8_int16": Case((("int8", 90, (1 << 30, 22, *I16R)), ("int16", 30000, None)), 0, 12),
    # an operand Requantize whose clip reaches outside its int8 dtype: the reference wraps
    "add_operand_clip_wraps": Case((("int16", 900, None), ("int16", 900, (1 << 30, 30, -300, -200,
                                                                         "int8")))),
}  # fmt: skip


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())  # fixed across processes (str hash() is not)


@pytest.mark.parametrize(
    "name,keep_sum",
    [(k, False) for k in sorted(CASES)]
    + [(k, True) for k in sorted(CASES) if len(CASES[k].operands) == 2],
)
def test_row_kernel_equals_reference(name, keep_sum):
    """keep_sum: the add's sum is an output too (pre-LN residual stream), else a row buffer."""
    case = CASES[name]
    rng = np.random.default_rng(_seed(name))
    rows, n = 37, 96
    xs, x_dtypes = [], [dt for dt, _, _ in case.operands]
    for dt, spread, _ in case.operands:
        if spread is None:
            xs.append(rng.integers(-(2**31), 2**31, (rows, n)).astype(dt))
        else:
            xs.append(_rows(rng, rows, n, dt, spread))
    sum_dt = "int16" if len(xs) == 2 else x_dtypes[0]
    lo, hi = fp.dtype_bounds(sum_dt)
    in_bits = 8 * np.dtype(sum_dt).itemsize
    if case.gamma == "wide":  # rows of k equal outliers v over zeros: |q| near its bound
        xs[0] = np.zeros((rows, n), np.int16)
        for r in range(rows):
            xs[0][r, : 1 + r % 3] = 1 + 7 * r
        unit = np.ones(n, np.int32), np.zeros(n, np.int32)
        q = _ref("IntLayerNorm", [xs[0], *unit], axis=-1, epsilon=case.eps, frac_bits=case.frac)
        g = 11 * (1 << 31) // (10 * int(np.abs(q).max()))  # |q| g reaches 1.1 * 2^31
        gamma = np.where(rng.integers(0, 2, n) > 0, g, -g).astype(np.int32)
    else:
        gamma = rng.integers(-case.gamma, case.gamma, n).astype(np.int32)
    beta = rng.integers(-50000, 50000, n).astype(np.int32)

    # the reference: IntAdd of the Requantized operands, IntLayerNorm, Requantize
    add = None
    x = xs[0]
    if len(xs) == 2:
        rqs, ops = [], []
        for v, (_, _, q) in zip(xs, case.operands, strict=True):
            if q is not None:  # the node's clip; the kernel takes it as lowering does
                attrs = dict(axis=-1, to=TO[q[4]], clip_min=q[2], clip_max=q[3])
                v = _ref("Requantize", [v, np.int32(q[0]), np.int32(q[1])], **attrs)
                q = (q[0], q[1], *core.requant_bounds(attrs), q[4])
            rqs.append(q)
            ops.append(v)
        add = RowAdd(tuple(rqs), sum_dt, lo, hi)
        x = _ref("IntAdd", ops, to=TO[sum_dt])
    y = _ref("IntLayerNorm", [x, gamma, beta], axis=-1, epsilon=case.eps, frac_bits=case.frac)
    krq, rq_args = None, []
    if case.rq is not None:
        kind, b, c, dt, *clip = case.rq
        lo_r, hi_r = clip[0] if clip else fp.dtype_bounds(dt)
        b_arr = np.int32(b) if kind == "pt" else rng.integers(1 << 29, 1 << 31, n).astype(np.int32)
        c_arr = np.int32(c) if kind == "pt" else np.full(n, c, np.int32) + rng.integers(0, 3, n)
        if kind == "pc":
            b_arr[5] = 0  # a channel of zero scale
        attrs = dict(axis=-1, to=TO[dt], clip_min=lo_r, clip_max=hi_r)
        y = _ref("Requantize", [y, b_arr, c_arr.astype(np.int32)], **attrs)
        lo_r, hi_r = core.requant_bounds(attrs)
        krq = (
            (int(b_arr), int(c_arr), lo_r, hi_r, dt)
            if kind == "pt"
            else (b_arr, c_arr, lo_r, hi_r, dt)
        )
        rq_args = cpu_layernorm.rq_arrays(krq, n)
        if name.endswith(("rq_hi32", "rq_int64")):  # the form the case is meant to take
            assert te_ops.hi32_ok([krq]) == name.endswith("hi32")
    affine = core.layernorm_affine_fits_int32(gamma, beta, n, case.eps, case.frac, in_bits)
    assert affine == (case.gamma in (2000,))  # the proof holds for the small gammas only
    keep = add is not None and keep_sum
    func = cpu_layernorm.layernorm_rows_func(
        rows, n, x_dtypes, sum_dt, eps=case.eps, frac_bits=case.frac, add=add, keep_sum=keep,
        affine_i32=affine, rq=krq,
    )  # fmt: skip
    outs = ([((rows, n), sum_dt)] if keep else []) + [((rows, n), y.dtype)]
    got = _run(func, [*xs, gamma, beta, *rq_args], outs)
    if keep:
        np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[-1], y)
    if case.gamma == "wide":  # the case is only a test if int32 arithmetic would overflow
        assert np.abs(_ref("IntLayerNorm", [x, gamma, beta], axis=-1, epsilon=case.eps,
                           frac_bits=case.frac)).max() == 2**31 - 1  # fmt: skip


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


def _ln_kernel(rows: int, n: int, x_dtypes, eps: int, frac: int):
    """The row kernel without a Requantize (int32 output); with two operands, their plain add."""
    add = RowAdd((None, None), "int16", -32768, 32767) if len(x_dtypes) == 2 else None
    return cpu_layernorm.layernorm_rows_func(
        rows, n, x_dtypes, "int16", eps=eps, frac_bits=frac, add=add, keep_sum=False,
        affine_i32=True,
    )  # fmt: skip


def test_row_kernel_runs_every_newton_step():
    """A large eps where floor(sqrt(var)) takes more than 4 Newton steps from isqrt_init (rows
    +-d alternating: var = eps + d^2 exactly; eps and d found by a search over eps in
    [2^36, 2^40)): the kernel's loop of steps stopping at a fixed point must reach it."""
    eps, d, n, frac = 321305507001, 25975, 16, 12
    var = np.int64(eps + d * d)
    root = fp.isqrt_init(var)
    for _ in range(4):
        root = fp.isqrt_step(root, var)
    assert root != fp.isqrt_newton(var)  # four steps are not enough here
    x = np.tile(np.array([d, -d], np.int16), (4, n // 2))
    unit = np.ones(n, np.int32), np.zeros(n, np.int32)
    want = _ref("IntLayerNorm", [x, *unit], axis=-1, epsilon=eps, frac_bits=frac)
    got = _run(_ln_kernel(4, n, ["int16"], eps, frac), [x, *unit], [((4, n), "int32")])[0]
    np.testing.assert_array_equal(got, want)


def test_row_kernel_divides_with_the_sums_width():
    """int8 + int16 operands, an int16 sum: the magic divisor must be sized for 16-bit rows.
    Rows (a seeded search) where a divisor sized for the int8 operand would round wrong."""
    n, frac = 96, 12
    rng = np.random.default_rng(0)
    found = []
    while len(found) < 3:
        x = np.zeros((4096, n), np.int64)
        k = rng.integers(1, 4)
        x[:, :k] = rng.integers(-32768, 32768, (4096, 1))
        spread = rng.integers(-3, 4, (4096, n - k)) * rng.integers(0, 300, (4096, 1))
        x[:, k:] = rng.integers(-32768, 32768, (4096, 1)) + spread
        x = np.clip(x, -32768, 32767)
        mean, std = core.layernorm_row_stats(x, n, 0, lambda t: t.sum(-1, keepdims=True))
        narrow = fp.row_magic(std, 8 + frac, core.LN_STD_BITS)
        exact = core.layernorm_normalise(x, mean, std, 1, 0, frac, 16)
        wrong = core.layernorm_normalise(x, mean, std, 1, 0, frac, 16, magic=narrow)
        found += [x[r] for r in np.nonzero((wrong != exact).any(-1))[0][:3]]
    rows = np.array(found[:3], np.int16)
    zeros = np.zeros_like(rows, np.int8)
    unit = np.ones(n, np.int32), np.zeros(n, np.int32)
    want = _ref("IntLayerNorm", [rows, *unit], axis=-1, epsilon=0, frac_bits=frac)
    func = _ln_kernel(3, n, ["int8", "int16"], 0, frac)
    got = _run(func, [zeros, rows, *unit], [((3, n), "int32")])[0]
    np.testing.assert_array_equal(got, want)


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
@pytest.mark.parametrize("n,frac,in_bits", [(64, 10, 16), (16, 0, 16), (768, 12, 16), (32, 10, 8)])
def test_q_bound_holds_and_is_tight(eps, n, frac, in_bits):
    bound = core.layernorm_q_bound(n, eps, frac, in_bits)
    top = (1 << (in_bits - 1)) - 1
    # rows of k equal outliers v over zeros (the extreme |x - mean| / std), and random rows
    v = np.arange(1, min(3000, top + 1))
    x = np.zeros((3 * len(v) + 200, n), np.int64)
    for k in (1, 2, 3):
        x[(k - 1) * len(v) : k * len(v), :k] = v[:, None]
    x[-200:] = np.random.default_rng(eps).integers(-top - 1, top + 1, (200, n))
    mean, std = core.layernorm_row_stats(x, n, eps, lambda t: t.sum(-1, keepdims=True))
    worst = int(np.abs(fp.div_round((x - mean) << frac, std)).max())
    assert worst <= bound < 1.25 * worst + 2  # holds, and not much looser than what rows reach
    assert core.layernorm_q_bound(n, eps, frac, 32) is None  # beyond the proof's domain


def test_applies_only_where_the_kernel_is_exact():
    add = RowAdd((None, None), "int16", -32768, 32767)
    assert cpu_layernorm.applies(384, ["int16", "int16"], add, "int16", 10)
    assert not cpu_layernorm.applies(100, ["int16", "int16"], add, "int16", 10)  # n % 16
    assert not cpu_layernorm.applies(384, ["int16", "int32"], add, "int16", 10)  # no Requantize
    wide = RowAdd((None, (1 << 30, 40, -(2**31), 2**31 - 1, "int32")), "int16", -32768, 32767)
    assert not cpu_layernorm.applies(384, ["int16", "int32"], wide, "int16", 10)
    assert not cpu_layernorm.applies(384, ["int32"], None, "int32", 10)
    assert not cpu_layernorm.applies(384, ["int16"], None, "int16", 20)  # no row magic divisor
    # an int32 operand Requantized near int32's minimum: a' + b' could overflow int32
    low = RowAdd((None, (1 << 30, 40, -(2**31), -(2**31) + 5, "int32")), "int16", -32768, 32767)
    assert not cpu_layernorm.applies(384, ["int16", "int32"], low, "int16", 10)
    # ... and one Requantized into int8 (whatever its clip, the value is an int8)
    to8 = RowAdd((None, (1 << 30, 40, -128, 127, "int8")), "int16", -32768, 32767)
    assert cpu_layernorm.applies(384, ["int16", "int32"], to8, "int16", 10)


@pytest.mark.parametrize("gscale,clip_min", [(2000, None), (1 << 20, None), (2000, 1 << 31)])
def test_lowered_graph_uses_row_kernel_and_equals_reference(gscale, clip_min, monkeypatch):
    """IntAdd (one operand Requantized) + IntLayerNorm + Requantize lowered by cpu-int8's kernel
    library: the row kernel is built (with the int32 affine only where the proof holds) and the
    compiled graph equals the reference interpreter's output; also with the Requantize's
    clip_min above int32 (lo > hi after the dtype's bounds: every output is clip_max)."""
    from intgraph import integer_graph
    from onnx import TensorProto

    from intq.codegen.cpu import CpuKernels
    from intq.codegen.lower import to_relax
    from intq.ops import make_node
    from intq.reference import ReferenceInterpreter

    built = []
    orig = cpu_layernorm.layernorm_rows_func
    monkeypatch.setattr(
        cpu_layernorm,
        "layernorm_rows_func",
        lambda *a, **k: built.append(k["affine_i32"]) or orig(*a, **k),
    )
    rng = np.random.default_rng(gscale)
    n = 48
    nodes = [
        make_node("Requantize", ["a", "ab", "ac"], ["a2"], "rqa", to=TensorProto.INT16),
        make_node("IntAdd", ["a2", "r"], ["s"], "add", to=TensorProto.INT16),
        make_node("IntLayerNorm", ["s", "g", "b"], ["l"], "ln", epsilon=3, frac_bits=10),
        make_node("Requantize", ["l", "bq", "cq"], ["y"], "rq", to=TensorProto.INT8),
    ]
    if clip_min is not None:
        nodes[-1] = make_node(
            "Requantize", ["l", "bq", "cq"], ["y"], "rq", to=TensorProto.INT8, clip_min=clip_min
        )
    feeds = {k: _rows(rng, 5, n, "int16", 3000) for k in ("a", "r")}
    feeds["a"][4] = 0  # a row of one outlier: |q| near its bound
    feeds["a"][4, 7] = 30000
    consts = {
        "ab": np.int32(1 << 30), "ac": np.int32(31),
        "g": rng.integers(-gscale, gscale, n).astype(np.int32),
        "b": rng.integers(-9000, 9000, n).astype(np.int32),
        "bq": np.int32(1 << 30), "cq": np.int32(40 if gscale < 1 << 20 else 50),
    }  # fmt: skip
    model, out = integer_graph(nodes, feeds, consts)
    want = ReferenceInterpreter(model).run(feeds)[out]
    target = compat.cpu_target(host=True)
    kernels = CpuKernels(target)
    mod = kernels.schedule(to_relax(model, kernels))
    assert built == [gscale < (1 << 20)]  # one row kernel; int32 affine where proved
    vm = compat.virtual_machine(compat.build(mod, target))
    got = vm["main"](*(compat.to_device_tensor(feeds[k]) for k in ("a", "r")))
    np.testing.assert_array_equal(compat.to_numpy(got), want)
