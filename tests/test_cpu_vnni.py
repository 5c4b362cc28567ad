"""The AVX-512 VNNI (vpdpbusd u8 x s8) kernels of cpu-int8.

Everywhere: the ISA choice from the target, the packing + sign-flip + compensation algebra (in
numpy, against a plain int64 matmul), and that the kernels build for a VNNI CPU with the
instruction in the code. On a host with avx512_vnni the built kernels also run and must equal
the reference interpreter bit for bit (elsewhere that part is checked on the device Xeon, see
docs/PERFORMANCE.md).
"""

import numpy as np
import pytest
from intgraph import integer_graph

from intq.codegen import compat
from intq.codegen.cpu import VNNI_FLIP, CpuKernels, pack_weight, pick_isa
from intq.codegen.lower import to_relax
from intq.ops import make_node
from intq.reference import ReferenceInterpreter

RNG = np.random.default_rng(5)
VNNI_TARGET = compat.cpu_target(mcpu="cascadelake", num_cores=2)


def host_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize(
    "mcpu,isa",
    [("cascadelake", "avx512vnni"), ("skylake-avx512", "avx512"), ("haswell", "avx2")],
)
def test_pick_isa(mcpu, isa):
    assert pick_isa(compat.cpu_target(mcpu=mcpu)) == isa


@pytest.mark.parametrize("m,k,n", [(5, 3, 7), (9, 37, 40), (6, 64, 32)])
def test_packed_u8s8_with_compensation_equals_int8_matmul(m, k, n):
    """sum over the packed quads of (x + 128) * W, plus bias - 128 colsum(W), is x @ W + bias."""
    x = RNG.integers(-128, 127, (m, k), endpoint=True).astype(np.int8)
    w = RNG.integers(-128, 127, (k, n), endpoint=True).astype(np.int8)
    bias = RNG.integers(-(2**20), 2**20, n).astype(np.int64)
    wp = pack_weight(w, 16, 32, 4)  # [Np/16, Kp/4, 16, 4]
    nb, kq, nl, kg = wp.shape
    w_back = wp.transpose(1, 3, 0, 2).reshape(kq * kg, nb * nl)  # [Kp, Np]
    xu = np.zeros((m, kq * kg), np.int64)
    xu[:, :k] = x.astype(np.int64) + VNNI_FLIP
    assert xu.min() >= 0 and xu.max() <= 255
    got = xu @ w_back.astype(np.int64) + np.pad(
        bias - VNNI_FLIP * w.sum(0, dtype=np.int64), (0, nb * nl - n)
    )
    np.testing.assert_array_equal(got[:, :n], x.astype(np.int64) @ w + bias)


CASES = {
    "dense": lambda: (
        [make_node("IntMatMul", ["a", "w", "bias"], ["y"], "mm")],
        {"a": RNG.integers(-128, 127, (2, 13, 37), endpoint=True).astype(np.int8)},
        {
            "w": RNG.integers(-128, 127, (37, 40), endpoint=True).astype(np.int8),
            "bias": RNG.integers(-(2**20), 2**20, 40).astype(np.int32),
        },
    ),
    "bmm_s8": lambda: (
        [make_node("IntMatMul", ["a", "b"], ["y"], "bmm")],
        {
            "a": RNG.integers(-128, 127, (2, 3, 17, 13), endpoint=True).astype(np.int8),
            "b": RNG.integers(-128, 127, (2, 3, 13, 17), endpoint=True).astype(np.int8),
        },
        {},
    ),
    "bmm_u8": lambda: (
        [make_node("IntMatMul", ["a", "b"], ["y"], "bmm")],
        {
            "a": RNG.integers(0, 255, (2, 3, 17, 13), endpoint=True).astype(np.uint8),
            "b": RNG.integers(-128, 127, (2, 3, 13, 17), endpoint=True).astype(np.int8),
        },
        {},
    ),
    # int16 left operands (CompileConfig.linear_input / softmax_numerator_bits): vpdpbusd takes
    # u8 only, so these run on the AVX-512 vpmaddwd kernels of the same VNNI target
    "dense_s16": lambda: (
        [make_node("IntMatMul", ["a", "w", "bias"], ["y"], "mm")],
        {"a": RNG.integers(-30000, 30000, (2, 13, 37), endpoint=True).astype(np.int16)},
        {
            "w": RNG.integers(-127, 127, (37, 40), endpoint=True).astype(np.int8),
            "bias": RNG.integers(-(2**20), 2**20, 40).astype(np.int32),
        },
    ),
    "bmm_s16": lambda: (
        [make_node("IntMatMul", ["a", "b"], ["y"], "bmm")],
        {
            "a": RNG.integers(0, 32767, (2, 3, 17, 13), endpoint=True).astype(np.int16),
            "b": RNG.integers(-128, 127, (2, 3, 13, 17), endpoint=True).astype(np.int8),
        },
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vnni_kernels_build_and_match_reference_on_vnni_hosts(case):
    nodes, feeds, consts = CASES[case]()
    m, out = integer_graph(nodes, feeds, consts)
    kernels = CpuKernels(VNNI_TARGET)
    assert kernels.isa == "avx512vnni" and kernels.kg == 4
    ex = compat.build(kernels.schedule(to_relax(m, kernels)), VNNI_TARGET)
    asm = "".join(im.inspect_source("asm") for im in ex.mod.imports)
    if case.endswith("_s16"):  # LLVM may fuse vpmaddwd + vpaddd into VNNI's vpdpwssd
        assert "vpmaddwd" in asm or "vpdpwssd" in asm
    else:
        assert "vpdpbusd" in asm
    if not host_has_vnni():
        pytest.skip("built for cascadelake; this host has no avx512_vnni to run it")
    vm = compat.virtual_machine(ex)
    got = compat.to_numpy(vm["main"](*[compat.to_device_tensor(v) for v in feeds.values()]))
    want = ReferenceInterpreter(m).run(feeds)[out]
    np.testing.assert_array_equal(got, want)
