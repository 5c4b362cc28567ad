"""cuda-int8 kernel library: int8 x int8 -> int32 GEMMs for NVIDIA GPUs, scheduled by dlight.

The lowering hands every IntMatMul / IntConv to `CudaKernels`. They are written as plain TE
einsums in the layout dlight's GEMM rule normalises to, ``C[g, i, j] = sum_k A[g, i, k] *
B[g, j, k]`` (int8 operands widened to int32 inside the product, int32 accumulation), so

* a dense layer keeps its weight as a compile-time constant transposed to ``W^T[N, K]``;
* a convolution is an im2col stage (data movement) followed by the same GEMM;
* an activation x activation product (attention) is a batched GEMM on the runtime operands.

The CUDA Relax pipeline (`cuda_pipeline`) is TVM's default one (LegalizeOps, FuseOps/FuseTIR,
dlight) with one change: the GEMM rule tries `Int8TensorCoreMatmul` first, which is dlight's int8
WMMA (16x16x16 s8 -> s32 tensor-core) schedule with its software-pipeline annotations removed
(TVM 0.27's InjectSoftwarePipeline rejects the int8 WMMA fragments). FuseOps merges the
Requantize that follows a GEMM into it, so the requantization runs in the GEMM's write-back; the
integer nonlinearities (LayerNorm, Softmax, GELU, Add) are TE kernels that dlight schedules as GPU
row reductions / elementwise kernels. Every PrimFunc gets a GPU schedule (dlight's Fallback rule
catches the rest); the arithmetic is the reference's, and tests compare bit for bit.

The CUDA C that TVM generates is compiled by `nvcc` at build (`install_cuda_precompile`), which
catches compile errors early; the exported .so still stores the CUDA C (TVM 0.27's compiler-side
module serialises source), and the GPU machine compiles it again when it loads the artifact.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from intq.codegen import compat, cpu, cuda_intrin, te_ops  # noqa: F401 (int32 WMMA fill)
from intq.errors import LoweringError

#: Pass-config key turning on Relax's CUDA-graph capture of the VM's kernel sequence.
CUDA_GRAPH_CONFIG = "relax.backend.use_cuda_graph"


def dense_nt_te(x: te.Tensor, wt: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """y[m, n] = sum_k int32(x[m, k]) * int32(Wt[n, k]) + bias[n]  (int8 x int8 -> int32)."""
    m, k_len = x.shape
    n = wt.shape[0]
    k = te.reduce_axis((0, k_len), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, k].astype("int32") * wt[j, k].astype("int32"), axis=k),
        name="acc",
    )
    return te.compute((m, n), lambda i, j: acc[i, j] + bias[j], name="y")


def bmm_te(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """out[g, m, n] = sum_k int32(a[g, m, k]) * int32(b[g, k, n])  (int8/uint8 -> int32)."""
    g, m, k_len = a.shape
    n = b.shape[2]
    k = te.reduce_axis((0, k_len), name="k")
    return te.compute(
        (g, m, n),
        lambda gg, i, j: te.sum(a[gg, i, k].astype("int32") * b[gg, k, j].astype("int32"), axis=k),
        name="bmm",
    )


def schedule_rows(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """GPU schedule for multi-stage row kernels: every stage is its own kernel, one thread per
    output element of that stage (spatial loops fused, split over blockIdx.x / threadIdx.x), the
    reduction loops serial inside the thread. dlight's inlining rules would instead inline the
    isqrt Newton chain into one expression whose size doubles per step (the compile never ends).
    The function is marked scheduled and opaque, so FuseOps and dlight leave it as it is."""
    sch = Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        iters = sch.get(block).iter_vars
        spatial = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 0]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return compat.mark_scheduled(sch.mod["main"]).with_attr("op_pattern", 8)  # kOpaque


class CudaKernels:
    """The kernel library `codegen.lower` calls for IntMatMul / IntConv on cuda-int8."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def elementwise_attrs(self) -> dict:
        return {"intq.kernel": "rowwise"}

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Multi-stage integer kernels (LayerNorm, Softmax, Mean: row reductions and the Newton
        isqrt chain) get `schedule_rows`; single-stage elementwise kernels (Requantize, Add,
        GELU) are left untagged for FuseOps (they fuse into the GEMM before them) and dlight."""
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
                continue
            if "intq.kernel" not in func.attrs:
                continue
            func = func.without_attr("intq.kernel")
            sch = Schedule(func)
            if len(sch.get_child_blocks(sch.get_sblock("root"))) > 1:
                func = schedule_rows(func)
            mod[gv] = func
        return mod

    def _gemm(self, ctx, x2d: relax.Expr, w_kn: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        k, n = w_kn.shape
        wt = relax.const(np.ascontiguousarray(w_kn.astype(np.int8).T))
        b = relax.const((bias if bias is not None else np.zeros(n)).astype(np.int32).reshape(n))
        return ctx.bb.emit_te(dense_nt_te, x2d, wt, b, primfunc_name_hint="int8_dense")

    def dense(self, ctx, node) -> relax.Expr:
        a_shape = ctx.shapes[node.input[0]]
        w = ctx.const(node.input[1])
        if ctx.dtypes[node.input[0]] != "int8" or w.ndim != 2:
            return _plain_matmul(ctx, node)
        bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        rows = int(np.prod(a_shape[:-1]))
        x2d = ctx.bb.emit(relax.op.reshape(ctx.value(node.input[0]), (rows, a_shape[-1])))
        y = self._gemm(ctx, x2d, w, bias)
        return ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))

    def batch_matmul(self, ctx, node) -> relax.Expr:
        sa, sb = ctx.shapes[node.input[0]], ctx.shapes[node.input[1]]
        if (len(node.input) > 2 and node.input[2]) or sa[:-2] != sb[:-2] or len(sa) < 3:
            return _plain_matmul(ctx, node)
        g = int(np.prod(sa[:-2]))
        a3 = ctx.bb.emit(relax.op.reshape(ctx.value(node.input[0]), (g, sa[-2], sa[-1])))
        b3 = ctx.bb.emit(relax.op.reshape(ctx.value(node.input[1]), (g, sb[-2], sb[-1])))
        y = ctx.bb.emit_te(bmm_te, a3, b3, primfunc_name_hint="int8_bmm")
        return ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))

    def conv2d(self, ctx, node, attrs) -> relax.Expr:
        n, c, h, wd = ctx.shapes[node.input[0]]
        m, cg, kh, kw = ctx.shapes[node.input[1]]
        if int(attrs["group"]) != 1 or ctx.dtypes[node.input[0]] != "int8":
            raise LoweringError(
                f"IntConv {node.name!r}: only group=1 int8 convolution is lowered on cuda-int8"
            )
        _, _, oh, ow = ctx.shapes[node.output[0]]
        strides = list(attrs["strides"] or [1, 1])
        dil = list(attrs["dilations"] or [1, 1])
        pads = list(attrs["pads"] or [0, 0, 0, 0])
        cols = ctx.bb.emit_te(
            lambda x: cpu.im2col(x, kh, kw, strides, dil, pads, oh, ow),
            ctx.value(node.input[0]),
            primfunc_name_hint="im2col",
        )
        w_kn = np.ascontiguousarray(ctx.const(node.input[1]).reshape(m, -1).T)
        bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        y = self._gemm(ctx, cols, w_kn, bias)  # [n*oh*ow, m]
        y = ctx.bb.emit(relax.op.reshape(y, (n, oh, ow, m)))
        return ctx.bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def _plain_matmul(ctx, node) -> relax.Expr:
    args = [ctx.value(i) for i in node.input if i]
    return ctx.bb.emit_te(lambda *t: te_ops.int_matmul(*t), *args, primfunc_name_hint="int_matmul")


# ----------------------------------------------------------------------------------------------
# Relax pipeline: TVM's CUDA pipeline with an int8 tensor-core GEMM rule that builds on 0.27
# ----------------------------------------------------------------------------------------------


def _int8_tensorcore_rule() -> Any:
    from tvm.s_tir import dlight as dl

    class Int8TensorCoreMatmul(dl.gpu.Matmul):
        """dlight's int8 WMMA GEMM schedule without software pipelining.

        dlight.gpu.Matmul applies it when the GEMM reads int8, writes int32 and every static
        extent of (i, j, k) exceeds 64; the pipeline annotations it sets make 0.27's
        InjectSoftwarePipeline fail (GetWmmaFragmentSize), so they are dropped here: the kernel
        then loads each k-tile to shared memory and runs the 16x16x16 s8 WMMA on it unpipelined.
        """

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            sch = super().apply(func, target, tunable)
            if sch is None:
                return None
            for block in _all_blocks(sch):
                for loop in sch.get_loops(block):
                    for key in list(sch.get(loop).annotations.keys()):
                        if str(key).startswith("software_pipeline"):
                            sch.unannotate(loop, key)
            return sch

    return Int8TensorCoreMatmul()


def _all_blocks(sch: Any) -> list[Any]:
    out, todo = [], [sch.get_sblock("root") if _has_root(sch) else None]
    todo = [t for t in todo if t is not None]
    while todo:
        b = todo.pop()
        for c in sch.get_child_blocks(b):
            out.append(c)
            todo.append(c)
    return out


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def cuda_pipeline(target: tvm.target.Target) -> Any:
    """TVM's CUDA Relax pipeline with `Int8TensorCoreMatmul` as the GEMM rule."""
    from tvm.relax.backend.cuda import pipeline as cp
    from tvm.s_tir import dlight as dl

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(
            _int8_tensorcore_rule(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cp.library_dispatch_passes(target)
                + legalize
                + cp.dataflow_lower_passes(target)
                + cp.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


# ----------------------------------------------------------------------------------------------
# Ahead-of-time CUDA compilation and the float check of the generated source
# ----------------------------------------------------------------------------------------------

#: CUDA sources generated by the last builds in this process (for `find_float_in_cuda`).
GENERATED_SOURCES: list[str] = []


def nvcc_fatbin(code: str, arch: str, nvcc: str = "nvcc") -> bytes:
    """Compile CUDA C ``code`` for ``arch`` (e.g. ``sm_90``) to a fatbin holding the SASS for that
    architecture and its PTX (so newer GPUs can JIT it)."""
    num = arch.replace("sm_", "")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        with open(src, "w") as f:
            f.write(code)
        cmd = [nvcc, "--fatbin", "-O3", "-w", "--expt-relaxed-constexpr"]
        cmd += ["-gencode", f"arch=compute_{num},code=[sm_{num},compute_{num}]", "-o", out, src]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise LoweringError(f"cuda-int8 needs nvcc to compile kernels ({nvcc!r})") from e
        except subprocess.CalledProcessError as e:
            raise LoweringError(f"nvcc failed for {arch}: {e.stderr[-2000:]}") from e
        with open(out, "rb") as f:
            return f.read()


def install_cuda_precompile(arch: str) -> None:
    """Compile CUDA kernels ahead of time, at build, with nvcc for ``arch``.

    TVM's CUDA codegen (``target.build.cuda``) hands the generated CUDA C to the Python callback
    ``tvm_callback_cuda_compile`` when one is registered and stores what it returns (here a fatbin)
    in memory; the stock callback needs ``Target.current`` and defaults to NVRTC. This one
    compiles with nvcc for ``arch`` and records the source in `GENERATED_SOURCES`. The serialised
    module keeps the CUDA C (see TVM-NOTES section 9), so loading still compiles.
    """
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code: str, *_: Any) -> bytearray:
        GENERATED_SOURCES.append(code)
        return bytearray(nvcc_fatbin(code, arch))


# Float types and operations in CUDA C: type names, half/bfloat intrinsics, float literals.
_CUDA_FLOAT = re.compile(
    r"\b(float|double|half|half2|__half|__half2|__nv_bfloat16|__nv_bfloat162|nv_bfloat16|"
    r"__float2\w*|__\w*2float\w*|__int2float\w*|__f\w*_r[nzud]|"
    r"(?:h|__h)(?:add|mul|sub|div|fma)\w*|expf?|logf?|sqrtf?|rsqrtf?|tanhf?|erff?|powf?)\b"
    r"|(?<![\w.])\d+\.\d*(?:[eE][+-]?\d+)?f?\b|(?<![\w.])\d+[eE][+-]?\d+f?\b"
)


def kernel_bodies(code: str) -> list[tuple[str, str]]:
    """(name, text) of every ``__global__`` / ``__device__`` function in generated CUDA C (the
    header TVM prepends declares helper types only when a kernel uses them)."""
    out = []
    for m in re.finditer(r"\b(__global__|__device__)\b", code):
        start = code.find("{", m.end())
        if start < 0:
            continue
        names = [n for n in re.findall(r"(\w+)\s*\(", code[m.end() : start])]
        names = [n for n in names if n != "__launch_bounds__"]
        if not names:
            continue
        depth, i = 0, start
        while i < len(code):
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            if depth == 0:
                break
            i += 1
        out.append((names[0], code[m.start() : i + 1]))
    return out


def find_float_in_cuda(code: str) -> list[str]:
    """Floating-point types, intrinsics or literals in the kernels of generated CUDA C, as
    ``"kernel: token"`` lines (empty: the device code is integer-only)."""
    found = set()
    for name, body in kernel_bodies(code):
        body = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)
        for m in _CUDA_FLOAT.finditer(body):
            found.add(f"{name}: {m.group(0)}")
    return sorted(found)
