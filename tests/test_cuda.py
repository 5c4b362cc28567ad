"""cuda-int8: compiles here (no GPU needed, nvcc needed), generated CUDA C is integer-only, the
artifact describes itself; on a GPU the artifact runs bit-exact against the reference."""

import os
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
