"""Per-target build: lower the integer graph to Relax, compile it, scan the TIR for floats and
wrap the result so it can run in-process or be exported as one self-describing .so.

Targets are data (`TargetSpec`): how to make the TVM target, which kernel library schedules the
heavy ops, and what the target can do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax

from intq import boundary
from intq.codegen import compat
from intq.codegen.lower import to_relax
from intq.config import CompileConfig
from intq.errors import IntegerOnlyViolation, LoweringError
from intq.reference import load_signature
from intq.runtime.executor import SIGNATURE_FUNC, Executor


@dataclass(frozen=True)
class TargetSpec:
    name: str
    make_target: Callable[[CompileConfig], Any]
    kernels: Callable[[Any], Any] | None  # target -> kernel library, or None for plain TE
    device: str  # "cpu" or "cuda"
    capabilities: frozenset[str]
    # target -> Relax pipeline (None: compat.lower's default for the target kind)
    pipeline: Callable[[Any], Any] | None = None
    # TVM PassContext config the target's lowering and build run under
    pass_config: dict[str, Any] = field(default_factory=dict)


def _cpu_kernels(target: Any) -> Any:
    from intq.codegen.cpu import CpuKernels

    return CpuKernels(target)


def _cuda_kernels(target: Any) -> Any:
    from intq.codegen.cuda import CudaKernels

    return CudaKernels(target)


def _cuda_pipeline(target: Any) -> Any:
    from intq.codegen.cuda import cuda_pipeline

    return cuda_pipeline(target)


def _cuda_target(cfg: CompileConfig) -> Any:
    """CUDA target for `cfg.extra["cuda_arch"]` (default sm_90, the H100/H200)."""
    return compat.cuda_target(str(cfg.extra.get("cuda_arch", "sm_90")))


TARGETS: dict[str, TargetSpec] = {
    "cpu-int8": TargetSpec(
        "cpu-int8",
        lambda cfg: compat.cpu_target(host=True, mcpu=cfg.cpu_mcpu),
        _cpu_kernels,
        "cpu",
        frozenset({"int8-gemm", "export"}),
    ),
    "cuda-int8": TargetSpec(
        "cuda-int8",
        _cuda_target,
        _cuda_kernels,
        "cuda",
        frozenset({"int8-gemm", "int8-tensor-core", "export"}),
        _cuda_pipeline,
        {"tirx.use_async_copy": True},  # cp.async in the pipelined GEMMs (schedule_int8_wmma)
    ),
}


def add_signature(mod: tvm.IRModule, sig: boundary.Signature) -> tvm.IRModule:
    """Add `intq_signature() -> uint8[n]`: the Signature JSON, so the .so describes itself."""
    data = np.frombuffer(sig.to_json().encode(), dtype=np.uint8).copy()
    bb = relax.BlockBuilder(mod)
    with bb.function(SIGNATURE_FUNC, []):
        bb.emit_func_output(relax.const(data))
    return bb.get()


@dataclass
class Build:
    signature: boundary.Signature
    executable: Any
    spec: TargetSpec
    config: CompileConfig
    tir_floats: list[str]
    device_source: str = ""  # generated device code (CUDA C), "" on CPU

    def executor(self) -> Executor:
        dev = tvm.cpu() if self.spec.device == "cpu" else tvm.cuda()
        vm = compat.virtual_machine(self.executable, dev)
        return Executor(vm, self.signature, dev, self.config.num_threads)

    def export(self, path: str) -> str:
        return compat.export_library(self.executable, path)


def build(integer_onnx: onnx.ModelProto, target: str, config: CompileConfig) -> Build:
    spec = TARGETS.get(target)
    if spec is None:
        raise LoweringError(f"target {target!r} is not implemented yet (have {sorted(TARGETS)})")
    tvm_target = spec.make_target(config)
    sig = load_signature(integer_onnx)
    kernels = spec.kernels(tvm_target) if spec.kernels else None
    mod = to_relax(integer_onnx, kernels)
    if kernels is not None:
        mod = kernels.schedule(mod)
    mod = add_signature(mod, sig)
    pipeline = spec.pipeline(tvm_target) if spec.pipeline else None
    # cuda-int8 with extra={"cuda_graph": True}: Relax captures the VM's kernel sequence in a CUDA
    # graph on the first run and replays it afterwards (RewriteCUDAGraph in the pipeline).
    graph = spec.device == "cuda" and bool(config.extra.get("cuda_graph", False))
    pass_config = {**spec.pass_config, **({"relax.backend.use_cuda_graph": True} if graph else {})}
    with tvm.transform.PassContext(config=pass_config):
        lowered = compat.lower(mod, tvm_target, pipeline)
        floats = compat.find_float_in_tir(lowered)
        if floats:
            raise IntegerOnlyViolation("float found in lowered TIR: " + "; ".join(floats[:5]))
        ex = compat.build(lowered, tvm_target, lowered=True)  # the scanned module is built
    device_source = compat.device_source(ex)
    if spec.device == "cuda":
        from intq.codegen.cuda import check_cuda_compiles, find_float_in_cuda

        cuda_floats = find_float_in_cuda(device_source)
        if cuda_floats:
            raise IntegerOnlyViolation(
                "float found in generated CUDA source: " + "; ".join(cuda_floats[:5])
            )
        check_cuda_compiles(device_source, str(tvm_target.attrs["arch"]))
    return Build(sig, ex, spec, config, floats, device_source)
