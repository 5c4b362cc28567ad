"""cuda-int8: compiles here (no GPU needed, nvcc needed), generated CUDA C is integer-only, the
artifact describes itself; on a GPU the artifact runs bit-exact against the reference."""

import os
import re
import shutil

import numpy as np
import pytest
import torch

import intq
from intq.codegen import compat
from intq.codegen.build import TARGETS
from intq.codegen.cuda import find_float_in_cuda, kernel_bodies
from intq.models.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    depth=1,
    num_heads=2,
    mlp_ratio=2.0,
)

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="cuda-int8 builds need nvcc")


def _gpu_present() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def tiny_cuda():
    torch.manual_seed(0)
    model = VisionTransformer(TINY).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(3, 1, 8, 8, generator=g) for _ in range(4)]
    return intq.compile(model, cal[0], calibration=cal, target="cuda-int8")


def test_cuda_target_is_data():
    spec = TARGETS["cuda-int8"]
    assert spec.device == "cuda" and "int8-tensor-core" in spec.capabilities
    from intq.config import CompileConfig

    assert str(spec.make_target(CompileConfig()).attrs["arch"]) == "sm_90"
    t = spec.make_target(CompileConfig(extra={"cuda_arch": "sm_80"}))
    assert str(t.attrs["arch"]) == "sm_80" and t.kind.name == "cuda"


@needs_nvcc
@pytest.mark.slow
def test_cuda_compiles_integer_only(tiny_cuda, tmp_path):
    build = tiny_cuda._build
    assert build.tir_floats == []
    src = build.device_source
    kernels = kernel_bodies(src)
    assert len(kernels) > 5 and all("__global__" in body for _, body in kernels[:1])
    assert find_float_in_cuda(src) == []
    # the executable carries a CUDA device module (its CUDA C is what was scanned above)
    assert compat.has_cuda_module(build.executable)
    assert "intq_signature" in build.executable.as_text()
    sig = tiny_cuda.signature
    assert sig.batch == 3 and tuple(sig.inputs[0].shape) == (3, 1, 8, 8)
    assert sig.outputs[0].qdtype == "int32" and tuple(sig.outputs[0].shape) == (3, 10)
    path = tiny_cuda.export(tmp_path / "tiny_cuda.so")
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        blob = f.read()
    assert b"intq_signature" in blob


def test_cuda_float_check_catches_floats():
    src = """
extern "C" __global__ void __launch_bounds__(128) k(int* __restrict__ a, float* __restrict__ b) {
  a[threadIdx.x] = (int)(b[threadIdx.x] * 0.5f);
}
extern "C" __global__ void ok(int* __restrict__ a) { a[threadIdx.x] = a[threadIdx.x] >> 1; }
extern "C" __global__ void h(int* a) { a[0] = __half2int_rn(__float2half(1e3)); }
"""
    found = find_float_in_cuda(src)
    assert "k: float" in found and "k: 0.5f" in found
    assert not any(f.startswith("ok:") for f in found)
    assert any(f.startswith("h: __float2half") for f in found)
    assert "h: 1e3" in found


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.skipif(not _gpu_present(), reason="needs a CUDA GPU")
def test_cuda_artifact_runs_bit_exact(tiny_cuda, tmp_path):
    from intq import runtime

    path = tiny_cuda.export(tmp_path / "tiny_cuda.so")
    ex = runtime.load(path)
    assert ex._device.dlpack_device_type() == 2  # kDLCUDA: picked from the artifact
    for n in (3, 1, 5):
        x = np.random.default_rng(n).standard_normal((n, 1, 8, 8)).astype(np.float32)
        np.testing.assert_array_equal(ex.run(x), intq.reference_run(tiny_cuda.integer_onnx, x))


@needs_nvcc
@pytest.mark.slow
def test_cuda_gemms_on_tensor_cores_and_row_kernels_fit(tiny_cuda):
    """Every GEMM of the model (dense, q.k^T, probabilities.V) runs our WMMA schedule with the
    following element-wise ops in its write-back; row kernels keep their per-row shared buffers
    to ROWS_PER_BLOCK rows."""
    from intq.codegen.cuda import ROWS_PER_BLOCK

    bodies = dict(kernel_bodies(tiny_cuda._build.device_source))
    gemms = [n for n in bodies if "dense" in n or "bmm" in n]
    assert any("u8s8_bmm" in n for n in gemms) and any("int8_bmm" in n for n in gemms)
    assert len([n for n in gemms if "dense" in n]) >= 5  # patch embedding, qkv, proj, fc1, fc2
    for name in gemms:
        assert "wmma::mma_sync" in bodies[name], name
    # fc1's ShiftGELU table and the two residual IntAdds run in their GEMM's write-back
    assert [n for n in gemms if "_table" in n] and len([n for n in gemms if "_add" in n]) == 2
    assert not [n for n in bodies if "gelu" in n or re.match(r"fused_reshape\d*_int_add", n)]
    # left: the patch-embedding / attention-output / head requantizations, not q, k, v
    assert len([n for n in bodies if "requantize" in n and "int_add" not in n]) <= 3
    row = TINY.embed_dim
    for name, body in bodies.items():
        if "layernorm" not in name and "softmax" not in name:
            continue
        # per-row values (sums, mean, isqrt steps, magic divisor) live in every lane's
        # registers: no lane-0-only stage whose shared-memory result other lanes would read
        # without a warp barrier (the race MiniLM's LayerNorm hit on the H200)
        assert not re.search(r"threadIdx\.x\) (< 1|== 0)\)", body), name
        if "layernorm" in name:
            assert "__shared__" not in body, name
        for size in re.findall(r"__shared__ alignas\(\d+\) \w+ \w+\[(\d+)\]", body):
            assert int(size) <= ROWS_PER_BLOCK * max(row, 17), (name, size)


def test_wmma_tile_choice_by_shape():
    from intq.codegen.cuda import TILE_LARGE, TILE_SMALL, pick_wmma_tile

    assert pick_wmma_tile(1, 12608, 1152) == TILE_LARGE  # DeiT-Small qkv at batch 64
    assert pick_wmma_tile(1, 197, 384) == TILE_SMALL  # batch 1: the small tile fills more SMs
    assert pick_wmma_tile(384, 197, 197) == TILE_LARGE  # attention at batch 64: 6 x 64 heads
    assert TILE_LARGE.rows * TILE_LARGE.cols > TILE_SMALL.rows * TILE_SMALL.cols
    assert pick_wmma_tile(384, 197, 64, 256) == TILE_SMALL  # P.V at batch 64 (384 heads): n = 64
    assert pick_wmma_tile(384, 197, 197, 64) == TILE_SMALL  # q.k^T at batch 64: one k-slice
    deep = pick_wmma_tile(1, 197, 384, 384)  # batch 1, K = 384: latency-bound, 128-deep slices
    assert (deep.rows, deep.cols, deep.k_frags) == (64, 64, 8)
    assert pick_wmma_tile(1, 197, 384, 320).k_frags == TILE_SMALL.k_frags  # 320: no deeper pad
    assert pick_wmma_tile(1, 12608, 1152, 384) == TILE_LARGE  # batch 64 fills the GPU


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [(197, 384, 1152), (3, 40, 10), (130, 64, 72)], ids=["deit", "tiny", "ragged"]
)
def test_wmma_schedule_builds_for_any_shape(shape):
    """Shapes that are not tile multiples are padded (M, N, K), every tile schedules, the CUDA C
    is integer-only and nvcc compiles it."""
    import tvm
    from tvm import te

    from intq.codegen import cuda

    m, k, n = shape
    x = te.placeholder((m, k), "int8", "x")
    w = te.placeholder((n, k), "int8", "w")
    b = te.placeholder((n,), "int32", "b")
    y = cuda.dense_nt_te(x, w, b, rq=(1 << 30, 38, -128, 127, "int8"))
    base = te.create_prim_func([x, w, b, y])
    funcs = {}
    tiles = [cuda.TILE_LARGE, cuda.TILE_SMALL, cuda.WmmaTile(1, 2, 2, 2, 4)]
    for i, tile in enumerate([*tiles, cuda.WmmaTile(2, 2, 2, 2, cuda.DEEP_K_FRAGS)]):
        f = cuda.schedule_int8_wmma(base, tile)
        assert f is not None, tile
        funcs[f"g{i}"] = f.with_attr("global_symbol", f"g{i}")
    target = compat.cuda_target()
    with target:
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    src = compat.device_source(ex)
    assert src.count("wmma::mma_sync") >= 4 and find_float_in_cuda(src) == []
    assert cuda.check_cuda_compiles(src, "sm_90")


@needs_nvcc
@pytest.mark.slow
def test_wmma_pipeline_only_where_cp_async_applies():
    """pipeline=2 on an unpadded GEMM of several k-slices: double-buffered cp.async k-slice loads
    (commit / wait groups); on a padded one (M = 197) or a single k-slice: the same kernel
    without them, still scheduled. Both compile."""
    import tvm
    from tvm import te

    from intq.codegen import cuda

    def gemm(m, k, n):
        x = te.placeholder((m, k), "int8", "x")
        w = te.placeholder((n, k), "int8", "w")
        b = te.placeholder((n,), "int32", "b")
        y = cuda.dense_nt_te(x, w, b, rq=(1 << 30, 38, -128, 127, "int8"))
        return te.create_prim_func([x, w, b, y])

    srcs = {}
    for name, shape in {
        "full": (256, 384, 256),
        "pad": (197, 384, 256),
        "one": (256, 64, 256),
    }.items():
        f = cuda.schedule_int8_wmma(gemm(*shape), cuda.TILE_LARGE, pipeline=2)
        assert f is not None, name
        with (
            compat.cuda_target() as target,
            tvm.transform.PassContext(config=TARGETS["cuda-int8"].pass_config),
        ):
            ex = tvm.compile(tvm.IRModule({"main": f}), target=target)
        srcs[name] = compat.device_source(ex)
        assert "wmma::mma_sync" in srcs[name] and cuda.check_cuda_compiles(srcs[name], "sm_90")
    assert "cp.async.cg.shared.global" in srcs["full"] and "cp.async.wait_group" in srcs["full"]
    assert "cp.async" not in srcs["pad"] and "cp.async" not in srcs["one"]


@needs_nvcc
@pytest.mark.slow
def test_wmma_write_back_unrolled_only_when_it_reads_a_tensor():
    """A write-back that adds a residual [m, n] tensor is unrolled (its stores, and the
    residual's loads, appear once per round); one that only requantizes keeps its loop (a
    single store site)."""
    import tvm
    from tvm import te

    from intq.codegen import cuda

    m, k, n = 256, 384, 256
    x = te.placeholder((m, k), "int8", "x")
    w = te.placeholder((n, k), "int8", "w")
    b = te.placeholder((n,), "int32", "b")
    r = te.placeholder((m, n), "int8", "r")
    rq = (1 << 30, 38, -128, 127, "int8")
    plain = te.create_prim_func([x, w, b, cuda.dense_nt_te(x, w, b, rq=rq)])
    added = cuda.dense_nt_te(x, w, b, rq=rq, residual=(r, None, -128, 127, "int8"))
    funcs = {"plain": plain, "added": te.create_prim_func([x, w, b, r, added])}
    stores = {}
    for name, f in funcs.items():
        f = cuda.schedule_int8_wmma(f, cuda.TILE_LARGE).with_attr("global_symbol", name)
        with compat.cuda_target() as target:
            src = compat.device_source(tvm.compile(tvm.IRModule({name: f}), target=target))
        stores[name] = len(re.findall(r"\by_ptr\b", src))  # the signature's, the stores'
    assert stores["plain"] <= 3 and stores["added"] > stores["plain"] + 3, stores


def test_wmma_schedule_declines_non_gemm():
    from tvm import te

    from intq.codegen import cuda

    x = te.placeholder((64, 64), "int32", "x")
    y = te.compute((64, 64), lambda i, j: x[i, j] >> 1, name="y")
    assert cuda.schedule_int8_wmma(te.create_prim_func([x, y])) is None


@needs_nvcc
def test_nvcc_check_fails_the_build_not_the_deployment():
    from intq.codegen.cuda import check_cuda_compiles
    from intq.errors import LoweringError

    too_big = """
extern "C" __global__ void k(int* a) {
  __shared__ int buf[20000];
  buf[threadIdx.x] = a[threadIdx.x];
  __syncthreads();
  a[threadIdx.x] = buf[(threadIdx.x + 1) % 20000];
}
"""
    with pytest.raises(LoweringError, match="shared data"):
        check_cuda_compiles(too_big, "sm_90")


def _cuda_lowering_on_cpu(lib, batch: int, seeds=(0, 1)) -> set[str]:
    """Lower `lib`'s integer graph with cuda-int8's kernels (its TE computes, before any GPU
    schedule), build that for the CPU and check it against the reference interpreter bit for
    bit; returns the kernel names."""
    import tvm
    from tvm import relax

    from intq import boundary
    from intq.codegen.cuda import CudaKernels
    from intq.codegen.lower import to_relax
    from intq.reference import ReferenceInterpreter, load_signature

    model = lib.integer_onnx
    mod = to_relax(model, CudaKernels(TARGETS["cuda-int8"].make_target(lib.config)))
    vm = relax.VirtualMachine(relax.build(mod, "llvm"), tvm.cpu())
    sig = load_signature(model)
    interp = ReferenceInterpreter(model)
    shape = (batch, *sig.inputs[0].shape[1:])
    for seed in seeds:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        (qx,) = boundary.quantize_inputs(sig.inputs, [x])
        want = interp.run({sig.inputs[0].name: qx})[sig.outputs[0].name]
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(qx)).numpy(), want)
    return {str(gv.name_hint) for gv in mod.functions}


@needs_nvcc
@pytest.mark.slow
def test_cuda_lowering_matches_reference_on_cpu(tiny_cuda):
    """q / k / v are Requantized in the qkv GEMM's write-back and read in place (v as a [k, n]
    right operand), the heads' merge is Requantized in the probabilities.V write-back and read
    in place by the projection; the lowering's arithmetic equals the reference's."""
    names = _cuda_lowering_on_cpu(tiny_cuda, 3)
    assert any(n.startswith("int8_dense_rq_pc") for n in names)  # qkv -> q, k, v per column
    assert not [n for n in names if n.startswith("operand")]  # q, k, v all read in place
    assert not [n for n in names if n.startswith("view")]  # every view read in place / copied
    assert len([n for n in names if n.startswith("requantize")]) <= 2  # patch embedding, head


def test_split_k_choice_by_shape():
    from intq.codegen.cuda import pick_split_k

    assert pick_split_k(197, 384, 1536) == 6  # DeiT-Small fc2 at batch 1: 24 -> 144 blocks
    assert pick_split_k(197, 1536, 384) == 1  # fc1: 6 slices deep, no split
    assert pick_split_k(12608, 384, 1536) == 1  # fc2 at batch 64 fills the GPU already
    assert pick_split_k(197, 384, 1500) == 1  # K not a multiple of 64


@needs_nvcc
@pytest.mark.slow
def test_split_k_dense_compiles_and_matches_reference(monkeypatch):
    """A dense layer cut into K chunks (partial GEMMs on tensor cores, then one kernel summing
    them with the write-back: Requantize and the residual IntAdd) equals the reference."""
    from intq.codegen import cuda

    monkeypatch.setattr(cuda, "SPLIT_K_MIN_SLICES", 4)  # fc2 here: K = 256, 4 slices
    cfg = ViTConfig(**{**TINY.__dict__, "embed_dim": 64, "mlp_ratio": 4.0})
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(3, 1, 8, 8, generator=g) for _ in range(2)]
    lib = intq.compile(model, cal[0], calibration=cal, target="cuda-int8")
    bodies = dict(kernel_bodies(lib._build.device_source))
    assert "wmma::mma_sync" in bodies["int8_dense_splitk_kernel"]
    assert [n for n in bodies if "splitk_sum_rq_pc_add" in n]  # sum + Requantize + residual
    assert find_float_in_cuda(lib._build.device_source) == []
    names = _cuda_lowering_on_cpu(lib, 3, seeds=(0,))
    assert "int8_dense_splitk" in names


def _split_ctx(shape, leaves, extra_output=None, by_rows=False):
    """LowerCtx over y[shape] -> Reshape [a, 2, b] -> Gather(axis 1, i) -> Requantize_i (two
    column halves); by_rows: Reshape [2, a / 2, b] -> Gather(axis 0, i) (two row halves)."""
    from onnx import helper

    from intq.codegen.lower import LowerCtx
    from intq.ops import make_node

    rows, cols = shape
    split = (2, rows // 2, cols) if by_rows else (rows, 2, cols // 2)
    head = (rows // 2, cols) if by_rows else (rows, cols // 2)
    consts = {"shape3": np.array(split, np.int64)}
    shapes = {"y": shape, "y3": split}
    nodes = [helper.make_node("Reshape", ["y", "shape3"], ["y3"])]
    for i, (b, c) in leaves.items():
        consts[f"i{i}"] = np.array(i, np.int64)
        consts[f"b{i}"], consts[f"c{i}"] = np.array(b, np.int32), np.array(c, np.int32)
        nodes.append(
            helper.make_node("Gather", ["y3", f"i{i}"], [f"h{i}"], axis=0 if by_rows else 1)
        )
        nodes.append(make_node("Requantize", [f"h{i}", f"b{i}", f"c{i}"], [f"q{i}"], f"r{i}", to=3))
        shapes[f"h{i}"] = shapes[f"q{i}"] = head
    ctx = LowerCtx(None, consts, shapes, {k: "int32" for k in shapes})
    for node in nodes:
        for t in node.input:
            ctx.consumers.setdefault(t, []).append(node)
        ctx.producers[node.output[0]] = node
    ctx.graph_outputs = frozenset({extra_output} if extra_output else set())
    return ctx


def test_requant_split_per_column_multipliers():
    from intq.codegen.lower import requant_split

    split = requant_split(_split_ctx((3, 8), {0: (1 << 30, 31), 1: (1 << 29, 33)}), "y")
    assert split is not None and sorted(split.inner) == ["h0", "h1", "y3"]
    b, c, lo, hi, dt = split.rq
    assert b.tolist() == [1 << 30] * 4 + [1 << 29] * 4 and c.tolist() == [31] * 4 + [33] * 4
    assert (lo, hi, dt) == (-128, 127, "int8")
    # leaf index -> y index: head 1, row 2, column 3 is y[2, 4 + 3]
    index = dict((n.output[0], ix) for n, ix in split.leaves)["q1"]
    assert [int(v) for v in index([2, 3])] == [2, 7]
    same = requant_split(_split_ctx((3, 8), {0: (1 << 30, 31), 1: (1 << 30, 31)}), "y")
    assert same.rq[:2] == (1 << 30, 31)  # one multiplier for every column: per-tensor
    ctx = _split_ctx((3, 8), {0: (1 << 30, 31), 1: (1 << 29, 33)})
    ctx.consts["b1"] = np.array([[1 << 29, 1 << 28, 3 << 28, 1 << 30]], np.int32)  # [1, 4]
    ctx.consts["c1"] = np.array([[33, 32, 33, 34]], np.int32)
    b, c = requant_split(ctx, "y").rq[:2]  # a leaf's broadcast multiplier: per column too
    assert b.tolist()[4:] == [1 << 29, 1 << 28, 3 << 28, 1 << 30] and c.tolist()[4:] == [
        33,
        32,
        33,
        34,
    ]


def test_requant_split_declines():
    from intq.codegen.lower import requant_split

    assert requant_split(_split_ctx((3, 8), {0: (1 << 30, 31)}), "y") is None  # half uncovered
    leaves = {0: (1 << 30, 31), 1: (1 << 29, 33)}
    assert requant_split(_split_ctx((3, 8), leaves, extra_output="y3"), "y") is None
    ctx = _split_ctx((3, 8), leaves)
    ctx.consts["b1"] = np.array([[1 << 29], [1 << 28], [1 << 29]], np.int32)  # varies by row
    ctx.consts["c1"] = np.full((3, 1), 33, np.int32)
    assert requant_split(ctx, "y") is None  # a column would need two multipliers
    rows = _split_ctx((4, 8), leaves, by_rows=True)  # each column in both leaves, two multipliers
    assert requant_split(rows, "y") is None
    same = _split_ctx((4, 8), {0: (1 << 30, 31), 1: (1 << 30, 31)}, by_rows=True)
    assert requant_split(same, "y").rq[:2] == (1 << 30, 31)  # agreeing leaves: folded
