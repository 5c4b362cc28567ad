"""The AMX-INT8 GEMM / batched matmul kernel of cpu-int8 (codegen/cpu_amx.py).

Everywhere: the ISA choice, the AMX weight layout (in numpy, against a plain int64 matmul), and
that every case builds for a Sapphire Rapids target with tile multiplies in the code. On a host
with amx_int8 the built kernels also run and must equal the reference interpreter bit for bit.
Elsewhere that part runs on the device Xeon: `python tests/test_cpu_amx.py --prepare DIR` here,
`python benchmarks/run_cases.py DIR` there (runtime only; docs/PERFORMANCE.md).

The cases cover the kernel's paths: full 32-row blocks read in place, a last block of at most
16 rows (half a block; read from a zero-padded copy where its reads would pass the end of A),
K % 64 != 0 (k-steps past K meet zero rows of B), N % 32 != 0 (the last column block's
epilogue through a small buffer), a uint8 left operand (tdpbusd), per-tensor and per-channel
Requantize folded in (in int32 lanes, and multipliers too large for them), deep K in passes
over the blocks (3 passes; one of them short), batched matmuls with B packed per call,
attention's scores with their Requantize and Softmax in the kernel, and an im2col convolution.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
from intgraph import integer_graph
from onnx import TensorProto

from intq.codegen import compat
from intq.codegen.cpu import CpuKernels, pick_isa
from intq.codegen.cpu_amx import pack_weight_amx
from intq.ops import fixedpoint as fp
from intq.ops import make_node
from intq.reference import ReferenceInterpreter

AMX_TARGET = compat.cpu_target(mcpu="sapphirerapids", num_cores=2)
HOST_TARGET = compat.cpu_target()


def host_has_amx() -> bool:
    return {"amx_int8", "amx_tile"} <= compat.host_cpu_flags()


def _ri(rng, lo, hi, shape, dt):
    return rng.integers(lo, hi, shape, endpoint=True).astype(dt)


def _mult(values):
    bc = [fp.quantize_multiplier(float(v)) for v in values]
    return np.array([b for b, _ in bc], np.int32), np.array([c for _, c in bc], np.int32)


def _dense(m, k, n, adt=np.int8, rq=None, scales=(1e-5, 2e-3), zero_every=0, **clip):
    """IntMatMul x[2, m, k] @ W[k, n] + bias, then Requantize when rq = "tensor" / "channel"
    (multipliers drawn log-uniformly from `scales`, every `zero_every`-th channel's (b, c) =
    (0, 0), a channel of zero scale; `clip`: its clip_min / clip_max)."""

    def make(rng):
        lo, hi = (-128, 127) if adt == np.int8 else (0, 255)
        nodes = [make_node("IntMatMul", ["a", "w", "bias"], ["acc"], "mm")]
        consts = {
            "w": _ri(rng, -128, 127, (k, n), np.int8),
            "bias": _ri(rng, -(2**20), 2**20, n, np.int32),
        }
        if rq is not None:
            log_lo, log_hi = np.log(scales)
            consts["b"], consts["c"] = _mult(np.exp(rng.uniform(log_lo, log_hi, n)))
            if zero_every:
                consts["b"][::zero_every] = consts["c"][::zero_every] = 0
            if rq == "tensor":
                consts["b"], consts["c"] = consts["b"][:1].reshape(()), consts["c"][:1].reshape(())
            nodes.append(
                make_node(
                    "Requantize",
                    ["acc", "b", "c"],
                    ["y"],
                    "rq",
                    to=TensorProto.INT8,
                    axis=-1,
                    **clip,
                )
            )
        return nodes, {"a": _ri(rng, lo, hi, (2, m, k), adt)}, consts

    return make


def _dense_two_requantizes(rng):
    """IntMatMul -> Requantize (per column, int16) -> Requantize (per tensor, int8), the last one
    the graph output: both fold into the GEMM's epilogue, and the output is bound as a view."""
    m, k, n = 45, 64, 40
    b0, c0 = _mult(np.exp(rng.uniform(np.log(1e-4), np.log(5e-3), n)))
    b1, c1 = (v.reshape(()) for v in _mult([0.013]))
    nodes = [
        make_node("IntMatMul", ["a", "w", "bias"], ["acc"], "mm"),
        make_node("Requantize", ["acc", "b0", "c0"], ["y0"], "rq0", to=TensorProto.INT16, axis=-1),
        make_node("Requantize", ["y0", "b1", "c1"], ["y"], "rq1", to=TensorProto.INT8),
    ]
    consts = {
        "w": _ri(rng, -128, 127, (k, n), np.int8),
        "bias": _ri(rng, -(2**20), 2**20, n, np.int32),
        "b0": b0,
        "c0": c0,
        "b1": b1,
        "c1": c1,
    }
    return nodes, {"a": _ri(rng, -128, 127, (2, m, k), np.int8)}, consts


def _bmm(g, m, k, n, adt=np.int8, rq=False):
    """IntMatMul a[2, g, m, k] @ b[2, g, k, n] (per-tensor Requantize folded in when rq)."""

    def make(rng):
        lo, hi = (-128, 127) if adt == np.int8 else (0, 255)
        nodes = [make_node("IntMatMul", ["a", "bm"], ["acc"], "bmm")]
        consts = {}
        if rq:
            consts["b"], consts["c"] = (v.reshape(()) for v in _mult([0.0123]))
            nodes.append(
                make_node("Requantize", ["acc", "b", "c"], ["y"], "rq", to=TensorProto.INT8)
            )
        feeds = {
            "a": _ri(rng, lo, hi, (2, g, m, k), adt),
            "bm": _ri(rng, -128, 127, (2, g, k, n), np.int8),
        }
        return nodes, feeds, consts

    return make


def _bmm_softmax(g, m, k, n, rq=True, frac_bits=12):
    """Attention's scores: IntMatMul a[2, g, m, k] @ b[2, g, k, n] -> Requantize (int32, the
    exponent with 12 fraction bits; none when not rq) -> IntSoftmax: one AMX kernel (Shiftmax
    over each task's rows, `cpu_amx.gemm_amx_func(softmax=)`)."""

    def make(rng):
        b, c = (v.reshape(()) for v in _mult([0.05]))
        nodes = [
            make_node("IntMatMul", ["a", "bm"], ["acc"], "bmm"),
            make_node("Requantize", ["acc", "b", "c"], ["z"], "rq", to=TensorProto.INT32),
            make_node("IntSoftmax", ["z"], ["y"], "sm", frac_bits=frac_bits),
        ]
        if not rq:  # the accumulators are the exponent (smaller operands keep them in range)
            sm = make_node("IntSoftmax", ["acc"], ["y"], "sm", frac_bits=frac_bits)
            nodes = [nodes[0], sm]
        lim = 127 if rq else 15
        feeds = {
            "a": _ri(rng, -lim, lim, (2, g, m, k), np.int8),
            "bm": _ri(rng, -lim, lim, (2, g, k, n), np.int8),
        }
        feeds["a"][0, 0, 0] = lim  # a row with one large score: exponentials that underflow
        return nodes, feeds, {"b": b, "c": c} if rq else {}

    return make


def _conv(rng):
    nodes = [make_node("IntConv", ["x", "w", "bias"], ["y"], "conv", pads=[1, 1, 1, 1])]
    consts = {
        "w": _ri(rng, -128, 127, (24, 3, 3, 3), np.int8),
        "bias": _ri(rng, -(2**16), 2**16, 24, np.int32),
    }
    return nodes, {"x": _ri(rng, -128, 127, (2, 3, 11, 13), np.int8)}, consts


def _gelu(rng):
    """IntGELU of int8 x (s_x = 0.05, F = 16) + Requantize to int8: a 256-entry byte table,
    looked up with vpermi2b on AVX-512 VBMI; 59100 elements = 923 vectors of 64 + 28 one by one."""
    alpha = round(1.702 * np.log2(np.e) * 0.05 * 2**16)
    b, c = (v.reshape(()) for v in _mult([1.3 * 2**-14]))
    nodes = [
        make_node("IntGELU", ["x"], ["g"], "gelu", alpha=alpha, frac_bits=16),
        make_node("Requantize", ["g", "b", "c"], ["y"], "rq", to=TensorProto.INT8),
    ]
    return nodes, {"x": _ri(rng, -128, 127, (2, 197, 150), np.int8)}, {"b": b, "c": c}


CASES = {
    "full_blocks": _dense(32, 128, 64),  # M = 2 * 32 rows: in place, no padding
    "tail_rows_per_channel": _dense(197, 384, 96, rq="channel"),  # DeiT's rows
    "pad_k_and_n": _dense(13, 37, 40),  # K % 64, N % 32 != 0
    "u8_per_tensor_wide_n": _dense(25, 64, 1000, adt=np.uint8, rq="tensor"),
    "deep_k": _dense(40, 1536, 64, rq="channel"),  # K in 3 passes of 8 k-steps (k_chunk_steps)
    # per-column stages in int32 lanes on a ragged last block (arrays padded to whole blocks)
    "per_channel_ragged_n": _dense(45, 64, 40, rq="channel", scales=(1e-4, 5e-2)),
    # channels of zero scale ((b, c) = (0, 0)) among shifts >= 33: still the int32 epilogue
    "zero_scale_channels": _dense(20, 64, 64, rq="channel", zero_every=5),
    # clip_min > clip_max (a Clip whose min exceeds its max): every output is clip_max, as in
    # the reference (clip to [lo, hi] in the order max then min)
    "clip_lo_above_hi": _dense(20, 64, 64, rq="channel", clip_min=50, clip_max=10),
    # multipliers up to 4: shifts below 33, so the epilogue keeps the int64 formula
    "wide_multipliers": _dense(40, 64, 64, rq="channel", scales=(1e-6, 4.0)),
    "deep_k_ragged_u8": _dense(40, 1100, 40, adt=np.uint8),  # passes 8, 8, 2; half block; N % 32
    "conv_im2col": _conv,
    "two_requantizes_to_output": _dense_two_requantizes,  # the graph output is a view
    "bmm_qk": _bmm(3, 197, 64, 197, rq=True),  # attention's Q K^T (DeiT shapes)
    "bmm_pv_u8": _bmm(3, 197, 197, 64, adt=np.uint8),  # P V: K % 64 != 0, u8 x s8
    "bmm_small": _bmm(2, 5, 7, 9),  # every block past the end of A: the padded panel
    "bmm_qk_softmax": _bmm_softmax(3, 197, 64, 197),  # DeiT's scores and Softmax, one kernel
    "bmm_softmax_small": _bmm_softmax(3, 70, 40, 70),  # half block, K % 64, N % 32
    "bmm_softmax_deep_k": _bmm_softmax(4, 40, 600, 24, rq=False),  # passes 8 + 2, no Requantize
    # 26 fraction bits: the exponentials and their sum in int64 (te_ops.softmax_narrow False)
    "bmm_softmax_int64": _bmm_softmax(3, 70, 64, 33, rq=False, frac_bits=26),
    "gelu_byte_table": _gelu,  # the VBMI byte table (cpu_lut), not AMX
}


def build_case(name: str, seed: int = 7):
    """(integer ONNX model, feeds, output name) of one case."""
    nodes, feeds, consts = CASES[name](np.random.default_rng(seed))
    model, out = integer_graph(nodes, feeds, consts, name)
    return model, feeds, out


def compile_case(name: str, emulate: bool = False):
    """(executable built for AMX_TARGET, or with emulate=True for this host with the tile
    instructions emulated, feeds, reference output, assembly)."""
    from intq.codegen.lower import to_relax

    model, feeds, out = build_case(name)
    target = HOST_TARGET if emulate else AMX_TARGET
    kernels = CpuKernels(target, amx="emulate" if emulate else None)
    mod = kernels.schedule(to_relax(model, kernels))
    assert not compat.find_float_in_tir(compat.lower(mod, target))
    ex = compat.build(mod, target)
    asm = "".join(im.inspect_source("asm") for im in ex.mod.imports)
    return ex, feeds, ReferenceInterpreter(model).run(feeds)[out], asm


def test_pick_isa_amx():
    assert pick_isa(AMX_TARGET) == "amx"
    assert pick_isa(compat.cpu_target(mcpu="cascadelake")) == "avx512vnni"
    k = CpuKernels(AMX_TARGET)
    assert k.amx and k.isa == "avx512vnni"  # what AMX does not cover (int16 GEMMs) keeps VNNI


@pytest.mark.parametrize("k,n", [(37, 40), (64, 32), (150, 1000)])
def test_amx_weight_layout(k, n):
    """Wp[nb, kq, j, q] = W[4 kq + q, 16 nb + j]: the 16 x 64 B tiles multiply back to x @ W."""
    rng = np.random.default_rng(1)
    w = _ri(rng, -128, 127, (k, n), np.int8)
    x = _ri(rng, -128, 127, (5, k), np.int8)
    wp = pack_weight_amx(w)
    nb, kq, lanes, quad = wp.shape
    assert (lanes, quad) == (16, 4) and kq * 4 % 64 == 0 and nb * 16 % 32 == 0
    w_back = wp.transpose(1, 3, 0, 2).reshape(kq * 4, nb * 16)
    xp = np.zeros((5, kq * 4), np.int64)
    xp[:, :k] = x
    np.testing.assert_array_equal((xp @ w_back)[:, :n], x.astype(np.int64) @ w)


@pytest.mark.parametrize("case", sorted(CASES))
def test_amx_kernels_build_and_match_reference_on_amx_hosts(case):
    ex, feeds, want, asm = compile_case(case)
    if case.startswith("gelu"):
        assert "byte_table" in asm and ("vpermi2b" in asm or "vpermt2b" in asm)
    else:
        mul = "tdpbusd" if "u8" in case else "tdpbssd"
        assert mul in asm and "ldtilecfg" in asm and "tilerelease" in asm
    if "softmax" in case:  # fused: no Softmax kernel of its own
        assert re.search(r"int8_bmm_amx(_rq)?_softmax", asm) and "int_softmax" not in asm
    if not host_has_amx():
        pytest.skip("built for sapphirerapids; this host has no amx_int8 to run it")
    vm = compat.virtual_machine(ex)
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(v) for v in feeds.values()]))
    np.testing.assert_array_equal(got, want)


def test_amx_epilogue_requantizes_in_int32_lanes():
    """Where every multiplier passes fixedpoint.hi32_applies the epilogue multiplies the int32
    sums in place (vpmuldq), picks the products' high halves by one shuffle (vpermt2d) and never
    widens the sums to int64 (vpmovsxdq); shifts below 33 keep the int64 formula."""
    for case in ("tail_rows_per_channel", "zero_scale_channels"):
        *_, fast = compile_case(case)
        assert "vpmuldq" in fast and "vpermt2d" in fast and "vpmovsxdq" not in fast, case
    *_, wide = compile_case("wide_multipliers")
    assert "vpmovsxdq" in wide and "vpermt2d" not in wide


def _int32_shifts_by_offset(mod) -> list[str]:
    """int32 right shifts whose amount is an expression +- a constant, in the TIR of `mod`."""
    import tvm_ffi

    consts = ("IntImm", "Broadcast")
    found = []

    def visit(node) -> None:
        if type(node).__name__ != "RShift" or "int32" not in str(node.ty):
            return
        amount = node.b
        if type(amount).__name__ in ("Sub", "Add") and {
            type(amount.a).__name__,
            type(amount.b).__name__,
        } & set(consts):
            found.append(str(node)[:120])

    for _, func in compat.iter_tir_functions(mod):
        tvm_ffi.structural_walk(func, visit)
    return found


@pytest.mark.parametrize("case", ["tail_rows_per_channel", "per_channel_ragged_n", "bmm_qk"])
def test_amx_epilogue_shifts_are_loads_or_constants(case):
    """TVM 0.27 bounds an int32 x >> (c - k) as [-1, 0] (so Simplify drops a clamp after it): the
    int32 epilogue's shifts are constants or loads of c - 32 arrays made at compile time."""
    from tvm import tirx
    from tvm.sym import Analyzer

    from intq.codegen.lower import to_relax

    h, c = tirx.Var("h", "int32"), tirx.Var("c", "int32")
    bound = Analyzer().const_int_bound(h >> (c - 32))
    if (bound.min_value, bound.max_value) != (-1, 0):
        pytest.skip("this TVM bounds x >> (c - k) soundly; the check below guards 0.27")
    model, _, _ = build_case(case)
    kernels = CpuKernels(AMX_TARGET)
    mod = kernels.schedule(to_relax(model, kernels))
    assert not _int32_shifts_by_offset(mod)


@pytest.mark.parametrize("case", sorted(CASES))
def test_amx_kernels_emulated_match_reference(case):
    """The same kernels with tile instructions emulated in TIR (same addresses and padding
    rules) run on any host and must equal the reference bit for bit."""
    ex, feeds, want, asm = compile_case(case, emulate=True)
    assert not any(i in asm for i in ("tdpbssd", "tdpbusd", "vpermi2b", "vpermt2b"))
    assert ("byte_table" in asm) == case.startswith("gelu")  # the VBMI kernel, emulated
    vm = compat.virtual_machine(ex)
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(v) for v in feeds.values()]))
    np.testing.assert_array_equal(got, want)


def _prepare(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in CASES:
        ex, feeds, want, _ = compile_case(name)
        compat.export_library(ex, os.path.join(folder, f"{name}.so"))
        np.savez(os.path.join(folder, f"{name}.npz"), want=want, **feeds)
        print("prepared", name)


if __name__ == "__main__":  # --prepare DIR; benchmarks/run_cases.py DIR runs them
    if sys.argv[1:2] != ["--prepare"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_cpu_amx.py --prepare DIR")
    _prepare(sys.argv[2])


def test_emulated_amx_attention_model_matches_reference():
    """A whole ViT (attention, q / k / v heads Requantized in the qkv GEMM's epilogue and read
    as views, the heads' merge Requantized in the P.V epilogue) through the emulated AMX
    kernels equals the reference interpreter bit for bit."""
    import torch

    import intq
    from intq.codegen.lower import to_relax
    from intq.models import vit

    torch.manual_seed(0)
    model = vit.vit_digits().eval()
    x = torch.randn(3, 1, 8, 8)
    lib = intq.compile(model, x, calibration=[torch.randn(3, 1, 8, 8)])
    kernels = CpuKernels(HOST_TARGET, amx="emulate")
    mod = kernels.schedule(to_relax(lib.integer_onnx, kernels))
    names = {gv.name_hint for gv, _ in mod.functions_items()}
    # q / k / v: one Requantize per head (scales moved with the qkv accumulator's elements),
    # applied per column in the qkv GEMM's epilogue and read in place: no head kernel or copy
    inits = {t.name: t for t in lib.integer_onnx.graph.initializer}
    rqs = [n for n in lib.integer_onnx.graph.node if n.op_type == "Requantize"]
    assert any(len(inits[n.input[1]].dims) >= 3 for n in rqs)  # a head's broadcast multiplier
    assert not [n for n in names if n.startswith("view")], names
    assert len([n for n in names if n.startswith("requantize")]) <= 2, names  # patch, head
    assert any(n.startswith("int8_bmm_amx_rq") for n in names), names
    vm = compat.virtual_machine(compat.build(mod, HOST_TARGET))
    from intq import boundary

    q = boundary.quantize_inputs(lib.signature.inputs, [x.numpy()])
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(a) for a in q]))
    feeds = {s.name: a for s, a in zip(lib.signature.inputs, q, strict=True)}
    want = ReferenceInterpreter(lib.integer_onnx).run(feeds)[lib.integer_onnx.graph.output[0].name]
    np.testing.assert_array_equal(got, want)
