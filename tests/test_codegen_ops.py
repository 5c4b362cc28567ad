"""Every intq op (and each data-movement op) lowered to TVM for cpu-int8 equals the numpy
reference element for element, on shapes that exercise padding and odd sizes."""

import numpy as np
import pytest
from intgraph import integer_graph
from onnx import TensorProto

from intq.codegen import compat
from intq.codegen.cpu import CpuKernels
from intq.codegen.lower import to_relax
from intq.ops import fixedpoint as fp
from intq.ops import make_node
from intq.reference import ReferenceInterpreter

RNG = np.random.default_rng(0)
TARGET = compat.cpu_target()


def check(nodes, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray]):
    """Build a graph, run it through TVM and the reference, assert bit-exact equality."""
    m, out = integer_graph(nodes, feeds, consts)
    kernels = CpuKernels(TARGET)
    mod = kernels.schedule(to_relax(m, kernels))
    vm = compat.virtual_machine(compat.build(mod, TARGET))
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(v) for v in feeds.values()]))
    want = ReferenceInterpreter(m).run(feeds)[out]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} elements differ"
    return want


def ri(lo, hi, shape, dt):
    return RNG.integers(lo, hi, shape, endpoint=True).astype(dt)


def mult(values):
    bc = [fp.quantize_multiplier(v) for v in values]
    return np.array([b for b, _ in bc], np.int32), np.array([c for _, c in bc], np.int32)


@pytest.mark.parametrize(
    "to,clip",
    [
        (TensorProto.INT8, None),
        (TensorProto.INT16, None),
        (TensorProto.INT8, (0, 127)),
        (TensorProto.INT32, None),
    ],
)
def test_requantize_per_tensor(to, clip):
    b, c = mult([0.0037])
    kw = {"to": to} | ({"clip_min": clip[0], "clip_max": clip[1]} if clip else {})
    x = ri(-(2**31), 2**31 - 1, (3, 17), np.int32)
    x[0, :4] = [-(2**31), 2**31 - 1, 0, -1]
    check(
        [make_node("Requantize", ["x", "b", "c"], ["y"], "rq", **kw)],
        {"x": x},
        {"b": b.reshape(()), "c": c.reshape(())},
    )


def test_requantize_per_channel_int16_input():
    b, c = mult(RNG.uniform(1e-4, 3.0, 5))
    check(
        [make_node("Requantize", ["x", "b", "c"], ["y"], "rq", axis=1, to=TensorProto.INT8)],
        {"x": ri(-32768, 32767, (2, 5, 3), np.int16)},
        {"b": b, "c": c},
    )


@pytest.mark.parametrize("to", [TensorProto.INT8, TensorProto.UINT8])
def test_quantize_float_bits(to):
    """The input quantizer's kernel on float32 bit patterns: normals, subnormals, ties at
    s = 1/4, huge values, inf and NaN."""
    b, c = fp.quantize_multiplier(4.0)
    x = (RNG.standard_normal((5, 37)) * 40).astype(np.float32)
    x.reshape(-1)[:16] = [
        0,
        -0.0,
        1e-45,
        -1e-45,
        0.125,
        -0.125,
        0.375,
        -0.375,
        3e38,
        -3e38,
        np.inf,
        -np.inf,
        np.nan,
        -np.nan,
        1e-30,
        -31.875,
    ]
    check(
        [make_node("QuantizeFloatBits", ["x"], ["y"], "q", multiplier=b, shift=c, to=to)],
        {"x": x.view(np.int32)},
        {},
    )


def test_int_add_broadcast_saturating():
    check(
        [make_node("IntAdd", ["a", "b"], ["y"], "add", to=TensorProto.INT16)],
        {"a": ri(-32768, 32767, (2, 7, 9), np.int16)},
        {"b": ri(-32768, 32767, (1, 7, 9), np.int16)},
    )


@pytest.mark.parametrize(
    "dt,c,eps", [(np.int16, 192, 3), (np.int8, 33, 3), (np.int16, 64, 2**31 + 5)]
)
def test_int_layernorm(dt, c, eps):
    """The last case puts every row's variance above 2^31 (the isqrt's 64-bit divisions) and
    rows at the full int16 range."""
    x = (RNG.standard_normal((2, 5, c)) * (3000 if dt == np.int16 else 40)).astype(dt)
    x[0, 0] = 7  # a constant row: variance 0
    x[1, 0, ::2], x[1, 0, 1::2] = np.iinfo(dt).max, np.iinfo(dt).min
    check(
        [make_node("IntLayerNorm", ["x", "g", "b"], ["y"], "ln", epsilon=eps, frac_bits=10)],
        {"x": x},
        {"g": ri(-2047, 2047, c, np.int32), "b": ri(-(2**20), 2**20, c, np.int32)},
    )


def test_int_softmax():
    x = ri(-(2**20), 2**20, (2, 3, 5, 37), np.int32)
    x[0, 0, 0] = [-(2**31)] * 18 + [2**31 - 1] * 19
    check([make_node("IntSoftmax", ["x"], ["y"], "sm", frac_bits=12)], {"x": x}, {})


def test_int_gelu_all_int8_values():
    x = np.arange(-128, 128, dtype=np.int8).reshape(4, 64)
    check([make_node("IntGELU", ["x"], ["y"], "gelu", alpha=5200, frac_bits=14)], {"x": x}, {})


@pytest.mark.parametrize(
    "m,k,n,bias", [(7, 33, 19, True), (64, 64, 64, False), (197, 192, 576, True)]
)
def test_int_matmul_dense(m, k, n, bias):
    consts = {"w": ri(-128, 127, (k, n), np.int8)}
    ins = ["a", "w"]
    if bias:
        consts["bias"] = ri(-(2**20), 2**20, n, np.int32)
        ins.append("bias")
    check(
        [make_node("IntMatMul", ins, ["y"], "mm")], {"a": ri(-128, 127, (2, m, k), np.int8)}, consts
    )


@pytest.mark.parametrize("k,n", [(384, 40), (1536, 19)])
def test_int_matmul_dense_int16_input_at_the_accumulator_bound(k, n):
    """int16 x int8 on the vpmaddwd kernel (or its portable fallback), with inputs at the
    largest level `int16_linear_qmax` allows and signs matching the weights, so column 0's
    accumulator is as close to 2^31 as the bound permits: no overflow, bit-exact."""
    from intq.passes.quantize import int16_linear_qmax

    w = ri(-127, 127, (k, n), np.int8)
    w[:, 0] = 127
    bias = ri(-(2**20), 2**20, n, np.int32)
    bias[0] = 2**20
    # the bound in integer units: a real bias b quantizes to b q / (amax s_W), here = bias
    q = int16_linear_qmax(k, None, 1.0, np.ones(n))
    q = min(q, (2**31 - 2 - 2**20) // (127 * k))
    a = ri(-q, q, (2, 5, k), np.int16)
    a[0, 0] = q
    y = check(
        [make_node("IntMatMul", ["a", "w", "bias"], ["y"], "mm16")],
        {"a": a},
        {"w": w, "bias": bias},
    )
    exact = a.astype(np.int64) @ w.astype(np.int64) + bias
    assert np.array_equal(y, exact)  # no wrap-around: the bound holds
    assert int(exact[0, 0, 0]) > 2**31 * 0.7


@pytest.mark.parametrize("adt", [np.int8, np.uint8])
def test_int_matmul_batched(adt):
    lo, hi = (-128, 127) if adt == np.int8 else (0, 255)
    check(
        [make_node("IntMatMul", ["a", "b"], ["y"], "bmm")],
        {"a": ri(lo, hi, (2, 3, 17, 13), adt), "b": ri(-128, 127, (2, 3, 13, 17), np.int8)},
        {},
    )


@pytest.mark.parametrize("stride,pad,k", [(1, 1, 3), (2, 0, 2), (16, 0, 16), (2, 3, 7)])
def test_int_conv(stride, pad, k):
    x = ri(-128, 127, (2, 3, 32, 30), np.int8)
    consts = {"w": ri(-128, 127, (8, 3, k, k), np.int8), "b": ri(-999, 999, 8, np.int32)}
    check(
        [
            make_node(
                "IntConv", ["x", "w", "b"], ["y"], "conv", strides=[stride, stride], pads=[pad] * 4
            )
        ],
        {"x": x},
        consts,
    )


def test_data_movement_ops():
    x = ri(-32768, 32767, (2, 6, 4), np.int16)
    nodes = [
        make_node("Reshape", ["x", "shape"], ["r"], "reshape"),
        make_node("Transpose", ["r"], ["t"], "transpose", perm=[0, 2, 1, 3]),
        make_node("Gather", ["t", "idx"], ["g"], "gather", axis=1),
        make_node("Slice", ["g", "st", "en", "ax"], ["s"], "slice"),
        make_node("Concat", ["s", "s"], ["c"], "concat", axis=-1),
        make_node("Flatten", ["c"], ["y"], "flatten", axis=1),
    ]
    check(
        nodes,
        {"x": x},
        {
            "shape": np.array([2, 3, 2, 4], np.int64),
            "idx": np.array(1, np.int64),
            "st": np.array([1], np.int64),
            "en": np.array([3], np.int64),
            "ax": np.array([-1], np.int64),
        },
    )


@pytest.mark.parametrize("axes,keep", [([1], 0), ([-1], 1), ([1, 2], 1)])
def test_int_mean(axes, keep):
    check(
        [make_node("IntMean", ["x"], ["y"], "mean", axes=axes, keepdims=keep)],
        {"x": ri(-32768, 32767, (2, 7, 5), np.int16)},
        {},
    )


def test_int_matmul_broadcast_batch_plain_path():
    """Batch dims that broadcast ([3, M, K] x [K, N] activation) take the plain TE kernel."""
    check(
        [make_node("IntMatMul", ["a", "b"], ["y"], "mm_plain")],
        {"a": ri(-128, 127, (3, 5, 9), np.int8), "b": ri(-128, 127, (9, 4), np.int8)},
        {},
    )


# ------------------------------------------------------------- kernels with a folded epilogue
# A Requantize that alone reads a matmul / GELU / LayerNorm output runs in that kernel's last
# stage (codegen lower.py LowerCtx.sole_consumer): the two-op graph must still equal the
# reference's two separate ops bit for bit.
@pytest.mark.parametrize(
    "per_channel,to,clip",
    [
        (True, TensorProto.INT8, None),
        (False, TensorProto.INT16, None),
        (True, TensorProto.INT32, None),
        (False, TensorProto.INT8, (0, 127)),
    ],
)
def test_dense_with_folded_requantize(per_channel, to, clip):
    k, n = 45, 37
    b, c = mult(RNG.uniform(1e-5, 2.0, n) if per_channel else [0.00071])
    kw = {"to": to, "axis": -1} | ({"clip_min": clip[0], "clip_max": clip[1]} if clip else {})
    check(
        [
            make_node("IntMatMul", ["a", "w", "bias"], ["acc"], "mm"),
            make_node("Requantize", ["acc", "b", "c"], ["y"], "rq", **kw),
        ],
        {"a": ri(-128, 127, (2, 9, k), np.int8)},
        {
            "w": ri(-128, 127, (k, n), np.int8),
            "bias": ri(-(2**20), 2**20, n, np.int32),
            "b": b,
            "c": c,
        },
    )


@pytest.mark.parametrize("adt", [np.int8, np.uint8])
def test_bmm_with_folded_requantize(adt):
    lo, hi = (-128, 127) if adt == np.int8 else (0, 255)
    b, c = mult([0.0123])
    check(
        [
            make_node("IntMatMul", ["a", "bm"], ["acc"], "bmm"),
            make_node("Requantize", ["acc", "b", "c"], ["y"], "rq", to=TensorProto.INT32),
        ],
        {"a": ri(lo, hi, (2, 3, 19, 11), adt), "bm": ri(-128, 127, (2, 3, 11, 21), np.int8)},
        {"b": b, "c": c},
    )


def test_gelu_table_with_folded_requantize():
    x = np.arange(-128, 128, dtype=np.int8).reshape(4, 64)
    b, c = mult([0.37 / 2**14])
    check(
        [
            make_node("IntGELU", ["x"], ["g"], "gelu", alpha=8008, frac_bits=18),
            make_node("Requantize", ["g", "b", "c"], ["y"], "rq", to=TensorProto.INT8),
        ],
        {"x": x},
        {"b": b, "c": c},
    )


def test_requantize_not_folded_when_its_input_has_two_readers():
    b, c = mult([0.001])
    x = ri(-128, 127, (2, 5, 16), np.int8)
    check(
        [
            make_node("IntMatMul", ["a", "w"], ["acc"], "mm"),
            make_node("Requantize", ["acc", "b", "c"], ["r"], "rq", to=TensorProto.INT32),
            make_node("IntAdd", ["acc", "r"], ["y"], "add", to=TensorProto.INT32),
        ],
        {"a": x},
        {"w": ri(-128, 127, (16, 24), np.int8), "b": b, "c": c},
    )


@pytest.mark.parametrize("dt,per_channel", [(np.int16, False), (np.int8, True)])
def test_layernorm_with_folded_requantize(dt, per_channel):
    c = 48
    x = (RNG.standard_normal((3, 7, c)) * (9000 if dt == np.int16 else 60)).astype(dt)
    x[0, 0] = -5  # a constant row
    x[1, 1, ::2], x[1, 1, 1::2] = np.iinfo(dt).min, np.iinfo(dt).max  # extreme spread
    b, cc = mult(RNG.uniform(1e-4, 1e-2, c) if per_channel else [0.0031])
    check(
        [
            make_node("IntLayerNorm", ["x", "g", "bt"], ["ln"], "ln", epsilon=5, frac_bits=10),
            make_node("Requantize", ["ln", "b", "c"], ["y"], "rq", to=TensorProto.INT8),
        ],
        {"x": x},
        {
            "g": ri(-2047, 2047, c, np.int32),
            "bt": ri(-(2**20), 2**20, c, np.int32),
            "b": b,
            "c": cc,
        },
    )


@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_reads_through_data_movement(per_channel):
    """Reshape -> Transpose -> Gather (scalar index) -> Transpose -> Requantize: the Requantize
    kernel reads the matmul output through the composed index map (the head split of attention)
    and the moved copies are never written; results equal the reference's op-by-op ones."""
    k, n = 24, 3 * 2 * 5
    b, c = mult([0.0021])
    nodes = [
        make_node("IntMatMul", ["a", "w"], ["acc"], "mm"),
        make_node("Reshape", ["acc", "shape"], ["r"], "reshape"),
        make_node("Transpose", ["r"], ["t"], "transpose", perm=[2, 0, 3, 1, 4]),
        make_node("Gather", ["t", "idx"], ["g"], "gather", axis=0),
        make_node("Transpose", ["g"], ["gt"], "transpose2", perm=[0, 1, 3, 2]),
    ]
    if per_channel:
        b, c = mult(RNG.uniform(1e-3, 1e-2, 7))
        nodes.append(make_node("Requantize", ["gt", "b", "c"], ["y"], "rq", axis=-1, to=3))
    else:
        nodes.append(make_node("Requantize", ["gt", "b", "c"], ["y"], "rq", to=3))
    check(
        nodes,
        {"a": ri(-128, 127, (2, 7, k), np.int8)},
        {
            "w": ri(-128, 127, (k, n), np.int8),
            "shape": np.array([2, 7, 3, 2, 5], np.int64),
            "idx": np.array(1, np.int64),
            "b": b,
            "c": c,
        },
    )


def test_int_add_applies_its_operands_requantize():
    b1, c1 = mult([0.61])
    b2, c2 = mult([1.7])
    check(
        [
            make_node("Requantize", ["a", "b1", "c1"], ["ra"], "rqa", to=TensorProto.INT16),
            make_node("Requantize", ["bb", "b2", "c2"], ["rb"], "rqb", to=TensorProto.INT16),
            make_node("IntAdd", ["ra", "rb"], ["y"], "add", to=TensorProto.INT16),
        ],
        {"a": ri(-32768, 32767, (2, 7, 9), np.int16), "bb": ri(-32768, 32767, (1, 9), np.int16)},
        {"b1": b1, "c1": c1, "b2": b2, "c2": c2},
    )


@pytest.mark.parametrize("requant_after", [True, False])
def test_dense_requantize_gelu_chain(requant_after):
    """Linear -> Requantize(int8, per channel) -> ShiftGELU (-> Requantize): the GEMM epilogue
    requantizes, the table kernel applies GELU and the last Requantize; equal to the
    reference's ops."""
    k, n = 40, 48
    b, c = mult(RNG.uniform(1e-4, 1e-3, n))
    b2, c2 = mult([0.41 / 2**14])
    nodes = [
        make_node("IntMatMul", ["a", "w", "bias"], ["acc"], "mm"),
        make_node("Requantize", ["acc", "b", "c"], ["q"], "rq", axis=-1, to=TensorProto.INT8),
        make_node("IntGELU", ["q"], ["g"], "gelu", alpha=8008, frac_bits=18),
    ]
    if requant_after:
        nodes.append(make_node("Requantize", ["g", "b2", "c2"], ["y"], "rq2", to=3))
    check(
        nodes,
        {"a": ri(-128, 127, (3, 11, k), np.int8)},
        {
            "w": ri(-128, 127, (k, n), np.int8),
            "bias": ri(-(2**16), 2**16, n, np.int32),
            "b": b,
            "c": c,
            "b2": b2,
            "c2": c2,
        },
    )


def _residual_graph(ln_reads_sum: bool = True, post_ln: bool = False, bcast: bool = False):
    """x' = Requantize(x); s = IntAdd(x', r); l = Requantize(IntLayerNorm(s or r), int8 per
    channel); out = IntAdd(s, Requantize(l, int16)): the sum is read by the LayerNorm and by the
    residual stream, as in a pre-LN transformer block. post_ln: out = l (BERT's post-LN: the
    LayerNorm is the sum's only reader). bcast: r is a constant [C], broadcast by the add."""
    c = 48
    b, cc = mult([0.71])
    bl, cl = mult(RNG.uniform(2e-3, 9e-3, c))
    b16, c16 = mult([37.0])
    nodes = [
        make_node("Requantize", ["x", "b", "c"], ["xq"], "rq_x", to=TensorProto.INT16),
        make_node("IntAdd", ["xq", "r"], ["s"], "add", to=TensorProto.INT16),
        make_node(
            "IntLayerNorm",
            ["s" if ln_reads_sum else "r", "g", "beta"],
            ["l"],
            "ln",
            epsilon=5,
            frac_bits=10,
        ),
        make_node("Requantize", ["l", "bl", "cl"], ["l8"], "rq_l", axis=-1, to=TensorProto.INT8),
        make_node("Requantize", ["l8", "b16", "c16"], ["l16"], "rq16", to=TensorProto.INT16),
        make_node("IntAdd", ["s", "l16"], ["y"], "add_out", to=TensorProto.INT16),
    ]
    if post_ln:
        nodes = nodes[:4]
    x = ri(-32768, 32767, (2, 7, c), np.int16)
    x[0, 0] = 32767  # saturating sums
    feeds = {"x": x, "r": ri(-20000, 20000, (2, 7, c), np.int16)}
    r_const = {"r": feeds.pop("r")[0, 0]} if bcast else {}
    consts = {
        "b": b.reshape(()),
        "c": cc.reshape(()),
        "bl": bl,
        "cl": cl,
        "b16": b16.reshape(()),
        "c16": c16.reshape(()),
        "g": ri(-2047, 2047, c, np.int32),
        "beta": ri(-(2**18), 2**18, c, np.int32),
    }
    if post_ln:
        del consts["b16"], consts["c16"]
    return nodes, feeds, {**consts, **r_const}


@pytest.mark.parametrize(
    "fuse,ln_reads_sum,post_ln,bcast",
    [
        (True, True, False, False),
        (False, True, False, False),
        (True, False, False, False),
        (True, True, True, False),
        (True, True, False, True),
    ],
)
def test_residual_add_fused_into_layernorm(fuse, ln_reads_sum, post_ln, bcast):
    """cpu-int8 runs a residual IntAdd and the IntLayerNorm reading it as one row kernel: two
    outputs (the sum for the residual stream, the requantized LayerNorm), or the LayerNorm
    alone when it is the sum's only reader (post-LN); bit-exact either way. It must not fire
    without the capability or when the LayerNorm reads another tensor."""
    nodes, feeds, consts = _residual_graph(ln_reads_sum, post_ln, bcast)
    m, out = integer_graph(nodes, feeds, consts)
    kernels = CpuKernels(TARGET)
    kernels.fuse_add_layernorm = fuse
    mod = kernels.schedule(to_relax(m, kernels))
    names = sorted(gv.name_hint for gv, f in mod.functions_items() if gv.name_hint != "main")
    fused = [n for n in names if n.startswith("int_add_int_layernorm_rq")]
    adds = [n for n in names if n.startswith("int_add") and n not in fused]
    assert len(fused) == (1 if fuse and ln_reads_sum else 0), names
    assert len(adds) == (1 if fused else 2) - post_ln, names
    if fused:  # one parallel pass over rows, not one per stage; the sum stored only if read
        func = mod[fused[0]]
        assert str(func).count("T.parallel") == 1
        assert len(func.params) == (5 if post_ln else 6) + 2  # x, r, gamma, beta, rq b / c
    vm = compat.virtual_machine(compat.build(mod, TARGET))
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(v) for v in feeds.values()]))
    want = ReferenceInterpreter(m).run(feeds)[out]
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_row_varying_multiplier_not_folded_as_columns():
    """A Requantize whose full-rank multiplier varies along rows ([M, 1]) after a dense GEMM with
    M == N is applied per row (the GEMM's per-column epilogue must not take it)."""
    b, c = mult(RNG.uniform(1e-4, 1e-2, 16))
    check(
        [
            make_node("IntMatMul", ["a", "w"], ["acc"], "mm"),
            make_node("Requantize", ["acc", "b", "c"], ["y"], "rq", to=TensorProto.INT8),
        ],
        {"a": ri(-128, 127, (16, 16), np.int8)},
        {"w": ri(-128, 127, (16, 16), np.int8), "b": b.reshape(16, 1), "c": c.reshape(16, 1)},
    )
