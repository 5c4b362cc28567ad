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
        for size in re.findall(r"__shared__ alignas\(\d+\) \w+ \w+\[(\d+)\]", body):
            assert int(size) <= ROWS_PER_BLOCK * max(row, 17), (name, size)


def test_wmma_tile_choice_by_shape():
    from intq.codegen.cuda import TILE_LARGE, TILE_SMALL, pick_wmma_tile

    assert pick_wmma_tile(1, 12608, 1152) == TILE_LARGE  # DeiT-Small qkv at batch 64
    assert pick_wmma_tile(1, 197, 384) == TILE_SMALL  # batch 1: the small tile fills more SMs
    assert pick_wmma_tile(384, 197, 197) == TILE_LARGE  # attention at batch 64: 6 x 64 heads
    assert TILE_LARGE.rows * TILE_LARGE.cols > TILE_SMALL.rows * TILE_SMALL.cols


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
    for i, tile in enumerate([cuda.TILE_LARGE, cuda.TILE_SMALL, cuda.WmmaTile(1, 2, 2, 2, 4)]):
        f = cuda.schedule_int8_wmma(base, tile)
        assert f is not None, tile
        funcs[f"g{i}"] = f.with_attr("global_symbol", f"g{i}")
    target = compat.cuda_target()
    with target:
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    src = compat.device_source(ex)
    assert src.count("wmma::mma_sync") >= 3 and find_float_in_cuda(src) == []
    assert cuda.check_cuda_compiles(src, "sm_90")


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
