"""cpu-int8 kernel library: int8 GEMM / batched matmul / conv with hand-written TIR schedules.

Layout: weights pre-packed at compile time as W[N/NL, K/2, NL, 2] int8; activations widened to
int16 once per call; the inner product is one `vpmaddwd` (s16 x s8 pairs -> s32) per NL lanes
(AVX2: 8, AVX-512: 16) through a tensor intrinsic of our own; register tile MR x NT, parallel
over output tiles; int32 accumulators. Without AVX2 a portable vectorized schedule is used.
Convolution with group 1 is im2col (a TE data-movement stage) + the same GEMM; grouped and
depthwise convolution is a direct int32 reduction over C/group * kh * kw taps (grouped_conv_te).
The arithmetic is int8 x int8 -> int32 exactly as IntMatMul / IntConv define it; tests compare
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from intq.codegen import compat, cpu_amx, cpu_layernorm, cpu_lut, te_ops
from intq.codegen.lower import View, fit_affine, index_offsets, requant_split, view_affine
from intq.errors import LoweringError
from intq.ops import core, lookup

# ----------------------------------------------------------------------------------------------
# Tensor intrinsics: acc[0:L] += sum_{k<2} a16[k] * b8[0:L, k]  ->  one vpmaddwd + vpaddd.
# a is int16 (activation pre-widened once per kernel), b int8 (weights, sign-extended on load by
# vpmovsxbw). The tensorize comparator also compares buffer scopes: C is "global" here, and so
# must be the accumulator it is matched against (see _schedule_gemm_core).
# ----------------------------------------------------------------------------------------------


def _pmaddwd_intrin(lanes: int, llvm_intrin: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(description, implementation) of acc[0:lanes] += sum_{k<2} a16[k] * b8[0:lanes, k] as one
    `vpmaddwd` of 2*lanes int16 pairs (`llvm_intrin`: the AVX2 or AVX-512 form)."""
    wide = 2 * lanes

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((lanes, 2), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((lanes, 2), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            # One expression, no named temporaries: a TVMScript assignment creates a "local"
            # buffer, which LowerTVMBuiltin turns into a heap TVMBackendAllocWorkspace call.
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrin),
                T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), lanes),
                    dtype=f"int16x{wide}",
                ),
                T.Cast(f"int16x{wide}", B.vload([0, 0], dtype=f"int8x{wide}")),
                dtype=f"int32x{lanes}",
            )

    return desc, impl


def _vnni_intrin(lanes: int, llvm_intrin: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(description, implementation) of acc[0:lanes] += sum_{k<4} a_u8[k] * b_s8[0:lanes, k] as one
    `vpdpbusd` (u8 x s8 quads -> s32, accumulated in place, no saturation: exact int32 sums).
    LLVM 22 types the intrinsic (<lanes x i32>, <4*lanes x i8>, <4*lanes x i8>)."""
    wide = 4 * lanes

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrin),
                C.vload([0], f"int32x{lanes}"),
                T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                    dtype=f"int8x{wide}",
                ),
                B.vload([0, 0], dtype=f"int8x{wide}"),
                dtype=f"int32x{lanes}",
            )

    return desc, impl


INTRIN_AVX2 = "intq_pmaddwd_s16s8_x8_avx2"
INTRIN_AVX512 = "intq_pmaddwd_s16s8_x16_avx512"
TensorIntrin.register(INTRIN_AVX2, *_pmaddwd_intrin(8, "llvm.x86.avx2.pmadd.wd"), override=True)
TensorIntrin.register(
    INTRIN_AVX512, *_pmaddwd_intrin(16, "llvm.x86.avx512.pmaddw.d.512"), override=True
)

INTRIN_VNNI512 = "intq_vpdpbusd_u8s8_x16_avx512vnni"
TensorIntrin.register(
    INTRIN_VNNI512, *_vnni_intrin(16, "llvm.x86.avx512.vpdpbusd.512"), override=True
)

# ISA -> (intrinsic or None, vector lanes NL, row tile MR, column tile NT)
ISA_PARAMS = {
    "avx512vnni": (INTRIN_VNNI512, 16, 6, 32),
    "avx512": (INTRIN_AVX512, 16, 6, 32),
    "avx2": (INTRIN_AVX2, 8, 6, 16),
    "generic": (None, 8, 4, 16),
}


# ISA -> K group of the inner product (vpmaddwd: pairs; vpdpbusd: quads)
KGROUP = {"avx512vnni": 4}

#: VNNI multiplies u8 x s8: a signed activation x is fed as x + 128 (its sign bit flipped) and
#: 128 * sum_k W[k, n] is subtracted again (folded into the bias for constant weights).
VNNI_FLIP = 128


def pick_isa(target: tvm.target.Target) -> str:
    """Kernel flavour for a CPU target, from the target's own features (mcpu + mattr). "amx":
    AMX-INT8 for the int8 dense GEMMs (codegen/cpu_amx.py), AVX-512 VNNI for the rest."""
    has = tvm.target.codegen.target_has_features
    if has(["avx512f", "avx512bw", "avx512vnni", "amx-tile", "amx-int8"], target):
        return "amx"
    if has(["avx512f", "avx512bw", "avx512vnni"], target):
        return "avx512vnni"
    if has(["avx512f", "avx512bw"], target):
        return "avx512"
    if has("avx2", target):
        return "avx2"
    return "generic"


def pack_weight(w_kn: np.ndarray, nl: int, nt: int, kg: int = 2) -> np.ndarray:
    """int8 W[K, N] -> Wp[Np/nl, Kp/kg, nl, kg] (zero padded: Kp multiple of kg, at least 2 kg so
    the K loop never has extent 1 (the scheduler drops unit loops), Np multiple of nt)."""
    k, n = w_kn.shape
    kp, np_ = max(cpu_amx.round_up(k, kg), 2 * kg), cpu_amx.round_up(n, nt)
    wpad = np.zeros((kp, np_), np.int8)
    wpad[:k, :n] = w_kn
    return np.ascontiguousarray(wpad.reshape(kp // kg, kg, np_ // nl, nl).transpose(2, 0, 3, 1))


def _activation_operand(v, flip: bool, vnni: bool):
    """The GEMM's left operand element: int16 for vpmaddwd; uint8 for vpdpbusd, with a signed
    int8 value moved to v + 128 (exact: -128..127 -> 0..255)."""
    if not vnni:
        return v.astype("int16")
    if flip:
        return (v.astype("int32") + VNNI_FLIP).astype("uint8")
    return v.astype("uint8")


def _index_dtype(e) -> str:
    """dtype of a shape expression. In 0.27 a scalar PrimExpr/Var carries it as ``e.ty.dtype``
    (``Var.dtype`` only exists for buffer-typed vars)."""
    return "int32" if isinstance(e, int) else str(e.ty.dtype)


def _epilogue(v, j, rq):
    """The GEMM's output element: int32 `v`, or Requantize(v) when `rq` = (b, c, lo, hi, dtype)
    (b, c ints or per-column te.Tensors indexed by the column j) is folded in."""
    if rq is None:
        return v
    b, c, lo, hi, dt = rq
    return te_ops.requant_expr(v, b, c, lo, hi, dt, ch=j)


def dense_te(x, w, bias, *, k: int, n: int, mr: int, rq=None):
    """y[m, n] = x[m, K] @ W[K, N] + bias[n] (int32) with W given packed (see pack_weight);
    with `rq` (see _epilogue) the Requantize of that int32 value instead."""
    m = x.shape[0]
    # One index dtype for every extent (emit_te uses int64): mixed int32/int64 bindings are not
    # quasi-affine and decompose_reduction / tensorize refuse the block.
    idx = lambda v: tirx.const(v, _index_dtype(m))  # noqa: E731
    nb, kh, nl, kg = (int(s) for s in w.shape)
    kp, np_ = kh * kg, nb * nl
    vnni = kg == 4  # the bias then already holds -128 * colsum(W) (see CpuKernels._gemm)
    mp = (m + mr - 1) // mr * mr

    def widen(i, kk):
        v = _activation_operand(x[tirx.min(i, m - 1), kk], True, vnni)
        if kp == k:
            return v
        return tirx.if_then_else(kk < k, v, tirx.const(0, "uint8" if vnni else "int16"))

    x16 = te.compute((mp, idx(kp)), widen, name="x16")
    ko = te.reduce_axis((idx(0), idx(kh)), name="ko")
    ki = te.reduce_axis((idx(0), idx(kg)), name="ki")
    acc = te.compute(
        (mp, idx(np_)),
        lambda i, j: te.sum(
            x16[i, ko * kg + ki].astype("int32") * w[j // nl, ko, j % nl, ki].astype("int32"),
            axis=[ko, ki],
        ),
        name="acc",
    )
    return te.compute((m, idx(n)), lambda i, j: _epilogue(acc[i, j] + bias[j], j, rq), name="y")


def bmm_te(a, bm, *, transpose_b: bool, mr: int, nl: int, nt: int, kg: int = 2, rq=None):
    """out[g, m, n] = sum_k a[g, m, k] * B[g, k, n] (int8 x int8 -> int32); B given as (G, K, N), or
    as (G, N, K) when transpose_b (e.g. keys for Q K^T). B is packed inside the kernel.
    kg=4 (VNNI): a int8 is fed as a + 128 and 128 * comp[g, n] = 128 * sum_k B[g, k, n] is taken off
    in the epilogue; a uint8 (softmax probabilities) goes in unchanged. `rq`: see _epilogue."""
    g, m, k = a.shape
    n = bm.shape[1] if transpose_b else bm.shape[2]
    vnni = kg == 4
    flip = vnni and a.dtype == "int8"
    static = lambda e: isinstance(e, int) or isinstance(e, tirx.IntImm)  # noqa: E731
    kp, np_ = (k + kg - 1) // kg * kg, (n + nt - 1) // nt * nt  # symbolic when k / n are
    if static(k) and int(k) <= kg:  # keep the K loop's extent > 1 (unit loops get dropped)
        kp = 2 * kg
    pad_k = not static(k) or int(k) % kg != 0 or int(k) <= kg
    pad_n = not static(n) or int(n) % nt != 0
    mp = (m + mr - 1) // mr * mr
    zero = tirx.const(0, "int8")

    def widen(gg, i, kk):
        v = _activation_operand(a[gg, tirx.min(i, m - 1), kk], flip, vnni)
        if not pad_k:
            return v
        return tirx.if_then_else(kk < k, v, tirx.const(0, "uint8" if vnni else "int16"))

    def pack(gg, jo, ko, ji, ki):
        j, kk = jo * nl + ji, ko * kg + ki
        conds = ([j < n] if pad_n else []) + ([kk < k] if pad_k else [])
        # clamp indices so the (discarded) padded lanes never read out of bounds
        jc = tirx.min(j, n - 1) if pad_n else j
        kc = tirx.min(kk, k - 1) if pad_k else kk
        v = bm[gg, jc, kc] if transpose_b else bm[gg, kc, jc]
        if conds:
            v = tirx.if_then_else(tirx.all(*conds) if len(conds) > 1 else conds[0], v, zero)
        return v

    idx = lambda v: tirx.const(v, _index_dtype(m)) if isinstance(v, int) else v  # noqa: E731
    a16 = te.compute((g, mp, idx(kp)), widen, name="x16")
    bp = te.compute((g, idx(np_ // nl), idx(kp // kg), idx(nl), idx(kg)), pack, name="bpack")
    ko = te.reduce_axis((idx(0), idx(kp // kg)), name="ko")
    ki = te.reduce_axis((idx(0), idx(kg)), name="ki")
    acc = te.compute(
        (g, mp, np_),
        lambda gg, i, j: te.sum(
            a16[gg, i, ko * kg + ki].astype("int32")
            * bp[gg, j // nl, ko, j % nl, ki].astype("int32"),
            axis=[ko, ki],
        ),
        name="acc",
    )
    comp = None
    if flip:
        kc = te.reduce_axis((idx(0), k if not static(k) else idx(int(k))), name="kc")
        jc = (lambda j: tirx.min(j, n - 1)) if pad_n else (lambda j: j)  # noqa: E731
        comp = te.compute(
            (g, np_ if pad_n else n),
            lambda gg, j: te.sum(
                (bm[gg, jc(j), kc] if transpose_b else bm[gg, kc, jc(j)]).astype("int32"),
                axis=[kc],
            ),
            name="comp",
        )

    def value(gg, i, j):
        v = acc[gg, i, j] if comp is None else acc[gg, i, j] - comp[gg, j] * VNNI_FLIP
        return _epilogue(v, j, rq)

    if pad_n and (comp is not None or rq is not None):
        # N padded to the tile: the epilogue arithmetic runs on whole padded tiles ("ep",
        # vectorized, no per-lane predicate) and only the copy into y is predicated (a
        # predicated epilogue is scalarised; rq here is per-tensor, so padded lanes index
        # nothing out of bounds)
        ep = te.compute((g, mp, np_), value, name="ep")
        return te.compute((g, m, n), lambda gg, i, j: ep[gg, i, j], name="y")
    return te.compute((g, m, n), value, name="y")


#: Widest vector a packing loop is turned into in one piece. LLVM's codegen time grows much
#: faster than linearly with the vector width: one <4608 x i16> widening (ResNet-18's last
#: 3x3 conv, K = 4608) took 160 s to compile and the <2304 x i16> ones 10 s each.
MAX_VECTOR_LANES = 256


def _vectorize_if_static(sch: Schedule, loop) -> None:
    """Vectorize a loop whose extent is a constant; leave symbolic-extent loops scalar (x86 LLVM
    vectorization needs a static lane count:
    ``Failed to vectorize loop with extent (s + 1) // 2 * 2``). A longer loop than
    MAX_VECTOR_LANES is split by its largest power-of-two factor <= 64 and the inner part
    vectorized."""
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        return
    n = int(extent)
    if n <= MAX_VECTOR_LANES:
        sch.vectorize(loop)
        return
    lanes = 64
    while n % lanes:
        lanes //= 2
    if lanes > 1:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def _parallel_fused(sch: Schedule, outer, inner) -> None:
    """parallel(fuse(outer, inner)) when inner has a static extent, else parallel(outer) alone:
    fusing with a symbolic extent leaves an int64 div/mod per element in the loop body (LLVM does
    not hoist it), 5x slower for the packing stages."""
    if isinstance(sch.get(inner).extent, tirx.IntImm):
        sch.parallel(sch.fuse(outer, inner))
    else:
        sch.parallel(outer)


def _schedule_gemm_core(sch: Schedule, isa: str, mr: int, nt: int, batch: bool) -> None:
    intrin, nl, _, _ = ISA_PARAMS[isa]
    y = sch.get_sblock("y")
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(y)
    i, j = loops[-2:]
    io, ii = sch.split(i, [None, mr])
    jo, ji = sch.split(j, [None, nt])
    if batch:
        sch.reorder(loops[0], io, jo, ii, ji)
        outer = sch.fuse(loops[0], io, jo)
    else:
        sch.reorder(io, jo, ii, ji)
        outer = sch.fuse(io, jo)
    sch.parallel(outer)
    # acc tile (mr x nt int32) computed per output tile, in a buffer allocated inside the parallel
    # loop. Keep it "global" scope: a small constant-size global allocation becomes a stack alloca
    # that LLVM promotes to registers, whereas set_scope(acc, 0, "local") makes LowerTVMBuiltin
    # emit TVMBackendAllocWorkspace (heap) per tile, 1.5-5x slower. Tile must stay < 1024 bytes.
    try:
        ep = sch.get_sblock("ep")
    except Exception:  # noqa: BLE001 - no separate epilogue stage
        ep = None
    if ep is not None:  # the padded tile's epilogue, per tile, vectorized (see bmm_te)
        sch.compute_at(ep, outer)
        sch.vectorize(sch.get_loops(ep)[-1])
    sch.compute_at(acc, outer)
    ai, aj, ko, ki = sch.get_loops(acc)[-4:]
    ajo, aji = sch.split(aj, [None, nl])
    if intrin is not None:
        sch.reorder(ko, ai, ajo, aji, ki)
        init = sch.decompose_reduction(acc, ko)
        sch.tensorize(aji, intrin)  # (aji, ki) = (nl lanes, k pair) -> one vpmaddwd
        sch.unroll(ai)
        sch.unroll(ajo)
    else:  # portable int32 lanes; annotate before decompose_reduction (breaks compact dataflow)
        sch.reorder(ko, ki, ai, ajo, aji)
        sch.vectorize(aji)
        sch.unroll(ai)
        sch.unroll(ajo)
        sch.unroll(ki)
        init = sch.decompose_reduction(acc, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(y)[-1])  # fused epilogue, nt lanes


def schedule_dense(func: tirx.PrimFunc, isa: str, mr: int, nt: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    x16 = sch.get_sblock("x16")
    xi, xk = sch.get_loops(x16)
    sch.parallel(xi)
    _vectorize_if_static(sch, xk)
    _schedule_gemm_core(sch, isa, mr, nt, batch=False)
    return compat.mark_scheduled(sch.mod["main"])


def schedule_bmm(func: tirx.PrimFunc, isa: str, mr: int, nt: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    x16 = sch.get_sblock("x16")
    g, xi, xk = sch.get_loops(x16)
    _parallel_fused(sch, g, xi)
    _vectorize_if_static(sch, xk)
    bp = sch.get_sblock("bpack")
    g, jo, ko, ji, ki = sch.get_loops(bp)
    _parallel_fused(sch, g, jo)
    sch.vectorize(sch.fuse(ji, ki))
    try:
        comp = sch.get_sblock("comp")
    except Exception:  # noqa: BLE001 - no compensation stage (pmaddwd, or unsigned a)
        comp = None
    if comp is not None:
        g, j, _ = sch.get_loops(comp)
        _parallel_fused(sch, g, j)
    _schedule_gemm_core(sch, isa, mr, nt, batch=True)
    return compat.mark_scheduled(sch.mod["main"])


_SCHEDULERS = {"dense": schedule_dense, "bmm": schedule_bmm}


def apply_cpu_schedules(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace every PrimFunc tagged ``intq.kernel`` (through emit_te's primfunc_attrs) with its
    scheduled version; untagged PrimFuncs are left to the default pipeline."""
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if "intq.kernel" not in func.attrs:
            continue
        kind = str(func.attrs["intq.kernel"])
        if kind == "elementwise":
            mod[gv] = schedule_parallel_outer(func)
            continue
        isa = str(func.attrs["intq.isa"])
        mr, nt = int(func.attrs["intq.mr"]), int(func.attrs["intq.nt"])
        mod[gv] = _SCHEDULERS[kind](func, isa, mr, nt)
    return mod


def schedule_parallel_outer(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Generic schedule for elementwise / row-reduction kernels (requantize, LayerNorm, Softmax,
    GELU, add). A kernel of several stages whose last stage walks rows x columns runs as ONE
    parallel loop over rows (schedule_rows: every earlier stage computed per row, or inlined);
    otherwise every stage's spatial loops except the innermost are fused and run in parallel.
    LLVM vectorizes the innermost loops itself."""
    fused = schedule_rows(func)
    if fused is not None:
        return fused
    sch = Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        iters = sch.get(block).iter_vars
        if len(loops) != len(iters) or not loops:
            continue
        spatial = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 0]
        if len(spatial) != len(loops) and spatial != loops[: len(spatial)]:
            continue
        outer = spatial[:-1] if len(spatial) > 1 else spatial
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    return compat.mark_scheduled(sch.mod["main"])


def row_kernel_shape(sch: Schedule) -> tuple[list, Any, list, list[int]] | None:
    """(stages, last stage, its loops, its extents) of a multi-stage row kernel: at least two
    stages, the last one spatial over >= 2 loops (rows..., row elements); else None."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2:
        return None
    last = blocks[-1]
    loops = sch.get_loops(last)
    iters = sch.get(last).iter_vars
    if len(loops) < 2 or any(iv.iter_type != 0 for iv in iters):
        return None
    return blocks, last, loops, [int(iv.dom.extent) for iv in iters]


def schedule_rows(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """One pass per row for a multi-stage row kernel (LayerNorm: sums, variance, isqrt steps,
    magic divisor, normalise; Softmax: max, exp, sum, reciprocal, scale): the last stage's outer
    loops fused and parallel, each earlier stage inlined into its readers when it is elementwise
    over the whole tensor (no row-sized temporary) unless its name ends in "_row" (a row of
    values worth keeping, e.g. Softmax's exponentials), else computed at that row loop. None
    when the kernel has a single stage or does not fit that shape."""
    sch = Schedule(func)
    shape = row_kernel_shape(sch)
    if shape is None:
        return None
    blocks, last, loops, out_extent = shape
    try:
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks[:-1]):
            b_iters = sch.get(block).iter_vars
            extent = [int(iv.dom.extent) for iv in b_iters]
            name = str(sch.get(block).name_hint)
            elementwise = extent == out_extent and all(iv.iter_type == 0 for iv in b_iters)
            if elementwise and not name.endswith("_row"):
                sch.compute_inline(block)
            else:
                sch.compute_at(block, row)
        sch.parallel(row)
    except Exception:  # noqa: BLE001 - not this shape: maybe a row kernel led by an output
        return schedule_rows_from_first(func)
    return compat.mark_scheduled(sch.mod["main"])


def schedule_rows_from_first(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """One pass per row for a row kernel whose FIRST stage is an output over the whole tensor
    (a fused residual add: its sum is an output and the LayerNorm's input; an output stage
    cannot be computed at a later stage's loop): that stage's row loop is the parallel one and
    every later stage is computed under it, in order. None when that does not apply."""
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2:
        return None
    writes = [compat.region_buffer(w) for w in sch.get(blocks[0]).writes]
    if not any(w.same_as(p) for w in writes for p in func.params):
        return None  # only a kernel led by an output stage (else: the per-stage schedule)
    first = sch.get_loops(blocks[0])
    if len(first) < 2 or any(iv.iter_type != 0 for iv in sch.get(blocks[0]).iter_vars):
        return None
    try:
        row = sch.fuse(*first[:-1]) if len(first) > 2 else first[0]
        for block in blocks[1:]:
            sch.reverse_compute_at(block, row)
        sch.parallel(row)
    except Exception:  # noqa: BLE001 - not a row kernel: the caller's per-stage schedule
        return None
    return compat.mark_scheduled(sch.mod["main"])


class CpuKernels:
    """The kernel library `codegen.lower` calls for IntMatMul / IntConv on cpu-int8."""

    def __init__(self, target: tvm.target.Target, amx: str | None = None) -> None:
        """amx: None = AMX GEMMs where the target has AMX (and VBMI byte tables where it has
        AVX-512 VBMI); "emulate" = both kernels with each AMX / vpermi2b instruction emulated by
        TIR loops (runs anywhere: tests of the kernels' logic)."""
        isa = pick_isa(target)
        self.amx = amx or ("hw" if isa == "amx" else None)
        self.amx_prefetch = True  # cpu_amx.gemm_amx_func(prefetch=)
        self.amx_k_chunk: int | None = None  # cpu_amx.gemm_amx_func(k_chunk=); None: by shape
        self.amx_hi32_rq = True  # cpu_amx.gemm_amx_func(hi32_rq=): epilogues in int32 lanes
        # a residual IntAdd and the IntLayerNorm reading it as one row kernel (two outputs)
        self.fuse_add_layernorm = True
        # attention's Q K^T, its Requantize and the IntSoftmax as one AMX kernel
        self.fuse_softmax = True
        # LayerNorm (+ its residual add and Requantize) as cpu_layernorm's two-pass row kernel
        self.rows_layernorm = True
        # LayerNorm's element loop in 32-bit lanes (te_ops.int_layernorm(narrow=True), same
        # values): on the AVX-512 Xeon 54 -> 51 us per DeiT-Small LayerNorm; slower on AVX2
        self.narrow_layernorm = tvm.target.codegen.target_has_features("avx512f", target)
        vbmi = tvm.target.codegen.target_has_features(["avx512bw", "avx512vbmi"], target)
        self.vbmi = "emulate" if amx == "emulate" else ("hw" if vbmi else None)
        if isa == "amx":
            isa = "avx512vnni"  # the kernels AMX does not cover
        self.isa = isa
        _, self.nl, self.mr, self.nt = ISA_PARAMS[self.isa]
        self.kg = KGROUP.get(self.isa, 2)

    def _attrs(self, kind: str, isa: str | None = None) -> dict:
        isa = isa or self.isa
        _, _, mr, nt = ISA_PARAMS[isa]
        return {"intq.kernel": kind, "intq.isa": isa, "intq.mr": mr, "intq.nt": nt}

    def _int16_isa(self) -> str:
        """GEMM flavour for an int16 left operand: vpmaddwd (s16 x s8 pairs); VNNI's vpdpbusd
        takes u8 only, so a VNNI host uses its AVX-512 vpmaddwd kernel."""
        return "avx512" if self.isa == "avx512vnni" else self.isa

    def elementwise_attrs(self) -> dict:
        return self._attrs("elementwise")

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Scheduled kernels; chains of reshapes (the flat views the AMX and table kernels take)
        folded into one and no-op reshapes dropped, each being a VM call at run time (DeiT-Small
        b1: 284 of them before)."""
        return apply_cpu_schedules(relax.transform.RemoveRedundantReshape()(mod))

    def _gemm(
        self,
        ctx,
        x2d: relax.Expr,
        w_kn: np.ndarray,
        bias: np.ndarray | None,
        rq=None,
        isa: str = "",
    ) -> relax.Expr:
        """[M, K] int8 (or int16) x constant [K, N] int8 (+ bias) -> [M, N] int32, or Requantize
        of it when `rq` = (b, c, lo, hi, dtype) (ints, or int32 arrays per column) is folded in."""
        isa = isa or self.isa
        if self._on_amx(isa, str(x2d.ty.dtype)):
            return self._gemm_amx(ctx, x2d, w_kn, bias, [rq] if rq is not None else [])
        _, nl, mr, nt = ISA_PARAMS[isa]
        kg = KGROUP.get(isa, 2)
        k, n = w_kn.shape
        w8 = w_kn.astype(np.int8)
        wp = relax.const(pack_weight(w8, nl, nt, kg))
        b64 = (bias if bias is not None else np.zeros(n)).astype(np.int64).reshape(n)
        if kg == 4:  # VNNI: the activation enters as x + 128; take 128 * colsum(W) back
            b64 = b64 - VNNI_FLIP * w8.astype(np.int64).sum(axis=0)
        if np.abs(b64).max(initial=0) >= 2**31:
            raise LoweringError(f"int8 GEMM {k}x{n}: bias + VNNI compensation exceeds int32")
        b = relax.const(b64.astype(np.int32))
        per_channel = rq is not None and isinstance(rq[0], np.ndarray)
        extra = [rq[0], rq[1]] if per_channel else []

        def fn(x, w, c, *ts):
            rq_t = (ts[0], ts[1], *rq[2:]) if per_channel else rq
            return dense_te(x, w, c, k=k, n=n, mr=mr, rq=rq_t)

        name = "int8_dense" + ("_rq" if rq is not None else "") + ("_pc" if per_channel else "")
        return ctx.bb.emit_te(
            fn,
            x2d,
            wp,
            b,
            *[relax.const(e) for e in extra],
            primfunc_name_hint=name,
            primfunc_attrs=self._attrs("dense", isa),
        )

    def _on_amx(self, isa: str, a_dtype: str) -> bool:
        """Whether a GEMM of flavour `isa` with an `a_dtype` left operand runs on AMX tiles."""
        return self.amx is not None and isa == self.isa and a_dtype in ("int8", "uint8")

    def _gemm_amx(self, ctx, x2d: relax.Expr, w_kn: np.ndarray, bias, rqs) -> relax.Expr:
        """The AMX form of _gemm (s8 or u8 left operand; no sign-flip compensation needed);
        `rqs`: the Requantizes its epilogue applies in turn (see cpu_amx.gemm_amx_func)."""
        m, k = (int(d) for d in x2d.ty.shape)
        n = w_kn.shape[1]
        bias_pad = np.zeros(cpu_amx.round_up(n, cpu_amx.BLOCK), np.int32)  # C starts from it
        if bias is not None:
            bias_pad[:n] = np.asarray(bias, np.int64).reshape(n)
        args = [_flat(ctx, x2d), relax.const(cpu_amx.pack_weight_amx(w_kn.astype(np.int8)))]
        args.append(relax.const(bias_pad))
        name = "int8_dense_amx" + "_rq" * len(rqs)
        func = self._amx_func((1, m, k, n), str(x2d.ty.dtype), rqs, args, name, True, {})
        y = _call_flat(ctx, func, name, args, m * n, _out_dtype(rqs))
        return ctx.bb.emit(relax.op.reshape(y, (m, n)))

    def _softmax_reader(self, ctx, node, rq_node, rq):
        """The IntSoftmax reading this batched matmul's output (through a per-tensor int32
        Requantize, if any) when the AMX kernel can run it over its rows (`fuse_softmax`,
        rows of at most SOFTMAX_FUSE_MAX_N, at least MIN_TASKS 32-row blocks); else None."""
        if not self.fuse_softmax:
            return None
        if rq is not None and (isinstance(rq[0], np.ndarray) or rq[4] != "int32"):
            return None
        src = rq_node.output[0] if rq_node is not None else node.output[0]
        sm = ctx.sole_consumer(src, "IntSoftmax")
        shape = ctx.shapes[node.output[0]]
        n, g = int(shape[-1]), int(np.prod(shape[:-2]))
        tasks = g * cpu_amx.round_up(int(shape[-2]), cpu_amx.BLOCK) // cpu_amx.BLOCK
        if sm is None or n > SOFTMAX_FUSE_MAX_N or ctx.shapes[sm.output[0]] != ctx.shapes[src]:
            return None
        if tasks < cpu_amx.MIN_TASKS:  # one task per 32 whole rows: too few to share out
            return None
        fb = lookup(sm).attrs_of(sm)["frac_bits"]
        return _FusedSoftmax(sm, rq_node.output[0] if rq_node is not None else "", fb)

    def _bmm_amx(self, ctx, node, rqs, y_layout=None, softmax: int | None = None) -> relax.Expr:
        """IntMatMul [.., M, K] (s8 / u8) x [.., K, N] s8 on AMX, B packed per call inside the
        kernel. An operand that is a view (lower.View: a q / k / v head inside the qkv
        projection's output) with an affine layout is read in place. Returns y flat: [G*M*N],
        or laid out by `y_layout`."""
        sa, sb = ctx.shapes[node.input[0]], ctx.shapes[node.input[1]]
        g, m, k, n = int(np.prod(sa[:-2])), int(sa[-2]), int(sa[-1]), int(sb[-1])
        args, layouts = [], {}
        for key, name, need_k in (
            ("a_layout", node.input[0], True),
            ("b_layout", node.input[1], False),
        ):
            layout = _view_layout(ctx, name, need_k)
            if layout is None:
                args.append(_flat(ctx, ctx.value(name)))
            else:
                args.append(_flat(ctx, ctx.views[name].source))
                layouts[key] = layout
        if y_layout is not None:
            layouts["y_layout"] = y_layout
        name = "int8_bmm_amx" + "_rq" * len(rqs) + ("_softmax" if softmax is not None else "")
        func = self._amx_func(
            (g, m, k, n), ctx.dtypes[node.input[0]], rqs, args, name, False, layouts, softmax
        )
        size = y_layout.size if y_layout is not None else g * m * n
        out_dt = "uint8" if softmax is not None else _out_dtype(rqs)
        return _call_flat(ctx, func, name, args, size, out_dt)

    def _amx_func(
        self, gmkn, a_dtype, rqs, args: list, name: str, dense: bool, layouts, softmax=None
    ):
        """The kernel; appends the per-column Requantize arrays to `args`."""
        hi32 = cpu_amx.epilogue_in_int32(rqs, self.amx_hi32_rq)
        n = gmkn[3]
        args += [relax.const(a) for a in cpu_amx.epilogue_arrays(rqs, n, hi32)]
        return cpu_amx.gemm_amx_func(
            *gmkn,
            a_dtype,
            packed_b=dense,
            bias=dense,
            rqs=tuple(rqs),
            name=name,
            emulate=self.amx == "emulate",
            prefetch=self.amx_prefetch,
            hi32_rq=self.amx_hi32_rq,
            k_chunk=self.amx_k_chunk,
            softmax=softmax,
            **layouts,
        )

    def layernorm_rows(self, ctx, node, x_args, row_add, keep_sum: bool, rq, name: str):
        """IntLayerNorm `node` (with the IntAdd `row_add` computing its input from `x_args`, else
        reading x_args[0]; `rq` = its folded Requantize or None) as cpu_layernorm's row kernel:
        (the sum or None, the output), or None where that kernel does not apply."""
        if not self.rows_layernorm:
            return None
        attrs = lookup(node).attrs_of(node)
        shape = tuple(ctx.shapes[node.output[0]])
        n, rows = int(shape[-1]), int(np.prod(shape[:-1]))
        eps, frac = int(attrs["epsilon"]), int(attrs["frac_bits"])
        x_dtypes = [str(x.ty.dtype) for x in x_args]
        sum_dtype = row_add.dtype if row_add is not None else x_dtypes[0]
        same_shape = all(tuple(int(d) for d in x.ty.shape) == shape for x in x_args)
        params = [ctx.consts.get(i) for i in node.input[1:3]]
        if (
            not same_shape
            or any(p is None or p.dtype != np.int32 or p.shape != (n,) for p in params)
            or not cpu_layernorm.applies(n, x_dtypes, row_add, sum_dtype, frac)
        ):
            return None
        in_bits = te_ops.layernorm_in_bits(sum_dtype)
        affine = core.layernorm_affine_fits_int32(*params, n, eps, frac, in_bits)
        keep = row_add is not None and keep_sum
        func = cpu_layernorm.layernorm_rows_func(
            rows, n, x_dtypes, sum_dtype, eps=eps, frac_bits=frac, add=row_add, keep_sum=keep,
            affine_i32=affine, rq=rq, name=name,
        )  # fmt: skip
        args = [_flat(ctx, x) for x in x_args] + [ctx.value(i) for i in node.input[1:3]]
        args += [relax.const(a) for a in cpu_layernorm.rq_arrays(rq, n)] if rq is not None else []
        y_dtype = rq[4] if rq is not None else "int32"
        dtypes = [sum_dtype, y_dtype] if keep else y_dtype
        call = _call_flat(ctx, func, name, args, rows * n, dtypes)
        flat = [ctx.bb.emit(relax.TupleGetItem(call, i)) for i in (0, 1)] if keep else [call]
        shaped = [ctx.bb.emit(relax.op.reshape(v, shape)) for v in flat]
        return (shaped[0], shaped[1]) if keep else (None, shaped[0])

    def byte_table(
        self, ctx, x: str, table: np.ndarray, shape: tuple[int, ...]
    ) -> relax.Expr | None:
        """y = table[x + 128] (int8 x) or table[x] (uint8 x) with 8-bit entries, on AVX-512
        VBMI (`cpu_lut`: 64 lookups per two vpermi2b); None where that does not apply."""
        in_dt, out_dt = ctx.dtypes[x], str(table.dtype)
        if self.vbmi is None or in_dt not in ("int8", "uint8") or out_dt not in ("int8", "uint8"):
            return None
        size = int(np.prod(shape))
        func = cpu_lut.byte_table_func(size, in_dt, out_dt, emulate=self.vbmi == "emulate")
        args = [_flat(ctx, ctx.value(x)), relax.const(cpu_lut.byte_order(table, in_dt))]
        y = _call_flat(ctx, func, "byte_table", args, size, out_dt)
        return ctx.bb.emit(relax.op.reshape(y, shape))

    def dense(self, ctx, node) -> relax.Expr:
        a_shape = ctx.shapes[node.input[0]]
        w = ctx.const(node.input[1])
        bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        a = ctx.value(node.input[0])
        isa = {"int8": self.isa, "int16": self._int16_isa()}.get(ctx.dtypes[node.input[0]])
        if self.amx and ctx.dtypes[node.input[0]] == "uint8":
            isa = self.isa  # tdpbusd: u8 x s8
        if isa is None or w.ndim != 2:
            return _plain_matmul(ctx, node)
        rows = int(np.prod(a_shape[:-1]))
        x2d = ctx.bb.emit(relax.op.reshape(a, (rows, a_shape[-1])))
        # (a following ShiftGELU table lookup is NOT folded in as well: in the GEMM epilogue the
        # per-element gather made fc1 2x slower on the Xeon than the GEMM + a separate table
        # kernel, docs/PERFORMANCE.md)
        rq_node, rq = ctx.epilogue_requant(node)
        split = None
        if self._on_amx(isa, ctx.dtypes[node.input[0]]):  # q / k / v heads: in the epilogue
            split = requant_split(ctx, (rq_node or node).output[0])
        if split is not None:
            rqs = [r for r in (rq, split.rq) if r is not None]
            y = self._gemm_amx(ctx, x2d, w, bias, rqs)
            split.bind(ctx, y, (rows, w.shape[1]))  # readers index the heads inside y
            if rq_node is not None:
                ctx.skipped.add(rq_node.output[0])
            return y
        y = self._gemm(ctx, x2d, w, bias, rq, isa)
        out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))
        if rq_node is not None:
            ctx.bind_folded(rq_node, out)
        return out

    def batch_matmul(self, ctx, node) -> relax.Expr:
        sa, sb = ctx.shapes[node.input[0]], ctx.shapes[node.input[1]]
        if (len(node.input) > 2 and node.input[2]) or sa[:-2] != sb[:-2] or len(sa) < 3:
            return _plain_matmul(ctx, node)
        rq_node, rq = ctx.epilogue_requant(node)
        if rq is not None and isinstance(rq[0], np.ndarray):
            rq_node, rq = None, None  # per-column requantization after a bmm: not folded
        if (
            self._on_amx(self.isa, ctx.dtypes[node.input[0]])
            and ctx.dtypes[node.input[1]] == "int8"
        ):
            sm = self._softmax_reader(ctx, node, rq_node, rq)
            if sm is not None:  # Q K^T, its Requantize and the Softmax: one kernel
                y = self._bmm_amx(ctx, node, [rq] if rq else [], softmax=int(sm.frac_bits))
                out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[sm.node.output[0]]))
                ctx.skipped.update(o for o in (node.output[0], sm.rq_out) if o)
                ctx.bind_folded(sm.node, out)
                return out
            return self._batch_matmul_amx(ctx, node, rq_node, rq)
        g = int(np.prod(sa[:-2]))
        a = ctx.value(node.input[0])
        a3 = ctx.bb.emit(relax.op.reshape(a, (g, sa[-2], sa[-1])))
        b3 = ctx.bb.emit(relax.op.reshape(ctx.value(node.input[1]), (g, sb[-2], sb[-1])))
        kg, attrs = self.kg, self._attrs("bmm")
        # vpdpbusd needs a signed int8 right side and an 8-bit left side
        if kg == 4 and (
            ctx.dtypes[node.input[1]] != "int8" or ctx.dtypes[node.input[0]] == "int16"
        ):
            kg, attrs = 2, {**attrs, "intq.isa": "avx512"}
        y = ctx.bb.emit_te(
            lambda x, y: bmm_te(
                x, y, transpose_b=False, mr=self.mr, nl=self.nl, nt=self.nt, kg=kg, rq=rq
            ),
            a3,
            b3,
            primfunc_name_hint="int8_bmm" if rq is None else "int8_bmm_rq",
            primfunc_attrs=attrs,
        )
        out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))
        if rq_node is not None:
            ctx.bind_folded(rq_node, out)
        return out

    def _batch_matmul_amx(self, ctx, node, rq_node, rq) -> relax.Expr:
        """batch_matmul on AMX. A Requantize behind the heads' merge (a Transpose + Reshape of
        P.V) runs in the epilogue, which writes the merged tensor directly when the merge is an
        affine map (`_merged_layout`); else the heads are a view of the bmm output."""
        split = None
        if rq_node is None:
            split = requant_split(ctx, node.output[0])
            rq = split.rq if split is not None else None
        merged = _merged_layout(ctx, split) if split is not None else None
        rqs = [rq] if rq is not None else []
        if merged is not None:  # the merged heads, written in place by the epilogue
            leaf, layout = merged
            y = self._bmm_amx(ctx, node, rqs, layout)
            out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[leaf.output[0]]))
            ctx.skipped.update(split.inner)
            ctx.bind_folded(leaf, out)
            return out
        y = self._bmm_amx(ctx, node, rqs)
        if split is not None:
            split.bind(ctx, y, (int(y.ty.shape[0]),))
            return y
        out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))
        if rq_node is not None:
            ctx.bind_folded(rq_node, out)
        return out

    def conv2d(self, ctx, node, attrs) -> relax.Expr:
        xs, ws = ctx.shapes[node.input[0]], ctx.shapes[node.input[1]]
        n, c, h, wd = xs
        m, cg, kh, kw = ws
        group = int(attrs["group"])
        if ctx.dtypes[node.input[0]] != "int8":
            raise LoweringError(f"IntConv {node.name!r}: only int8 convolution is lowered on cpu")
        _, _, oh, ow = ctx.shapes[node.output[0]]
        strides = list(attrs["strides"] or [1, 1])
        dil = list(attrs["dilations"] or [1, 1])
        pads = list(attrs["pads"] or [0, 0, 0, 0])
        if group != 1:
            bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            b = relax.const((bias if bias is not None else np.zeros(m)).astype(np.int32))
            out_shape = ctx.shapes[node.output[0]]
            return ctx.emit_te(
                lambda x, w, c: grouped_conv_te(x, w, c, group, strides, dil, pads, out_shape),
                ctx.value(node.input[0]),
                relax.const(ctx.const(node.input[1]).astype(np.int8)),
                b,
                name="int8_conv_grouped",
            )
        # channel-innermost im2col (contiguous copies, no per-element divisions), parallel over
        # its outer loops; as 2-D: a view. K is ordered (i, j, c): the weights to match.
        cols6 = ctx.emit_te(
            lambda x: im2col_nhwc(x, kh, kw, strides, dil, pads, oh, ow),
            ctx.value(node.input[0]),
            name="im2col",
        )
        cols = ctx.bb.emit(relax.op.reshape(cols6, (n * oh * ow, c * kh * kw)))
        w_kn = ctx.const(node.input[1]).transpose(2, 3, 1, 0).reshape(-1, m)
        bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        # the Requantize after the conv (per output channel: a column of the GEMM) in the
        # epilogue, so the NHWC -> NCHW permute moves 8-bit values, not int32
        rq_node, rq = ctx.sole_consumer(node.output[0], "Requantize"), None
        if rq_node is not None:
            rq = ctx.last_axis_requant(rq_node, 4, m, axis=1)
            rq_node = rq_node if rq is not None else None
        y = self._gemm(ctx, cols, np.ascontiguousarray(w_kn), bias, rq)  # [n*oh*ow, m]
        y = ctx.bb.emit(relax.op.reshape(y, (n, oh, ow, m)))
        # NCHW as a view of the NHWC GEMM output: a reader that indexes views (a Requantize,
        # through the ViT patch embedding's Reshape + Transpose back to tokens x channels)
        # reads it in place; any other reader gets the one permuting copy (LowerCtx.value)
        last = rq_node if rq_node is not None else node
        if last.output[0] in ctx.graph_outputs:
            out = ctx.bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
            if rq_node is not None:
                ctx.bind_folded(rq_node, out)
            return out
        nchw = View(y, (n, m, oh, ow), lambda i: [i[0], i[2], i[3], i[1]], (n, oh, ow, m))
        if rq_node is not None:
            ctx.skipped.add(node.output[0])
        ctx.bind_view(last, nchw)
        return y


SOFTMAX_FUSE_MAX_N = 1024  # longest rows the AMX kernel runs Softmax over (a task's rows)


@dataclass(frozen=True)
class _FusedSoftmax:
    node: Any  # the IntSoftmax
    rq_out: str  # the output of the Requantize between (never stored), or ""
    frac_bits: int  # its frac_bits


def _flat(ctx, x: relax.Expr) -> relax.Expr:
    """x reshaped to 1-D (a free view in the VM)."""
    return ctx.bb.emit(relax.op.reshape(x, (int(np.prod([int(d) for d in x.ty.shape])),)))


def _call_flat(ctx, func: tirx.PrimFunc, name: str, args: list, size: int, dtype):
    """Add a hand-built kernel (AMX GEMM, byte table, LayerNorm rows) and call it: a 1-D
    `dtype` output, or a tuple of them for a list of dtypes."""
    gv = ctx.bb.add_func(func, name)
    out = (
        relax.TensorType((size,), dtype)
        if isinstance(dtype, str)
        else [relax.TensorType((size,), d) for d in dtype]
    )
    return ctx.bb.emit(relax.call_tir(gv, relax.Tuple(args), out))


def _out_dtype(rqs) -> str:
    """A GEMM's output dtype: its last folded Requantize's, else int32."""
    return rqs[-1][4] if rqs else "int32"


def _merged_layout(ctx, split) -> tuple[Any, cpu_amx.Layout] | None:
    """(leaf node, Layout) when `split` has one leaf (e.g. the attention heads' merge) and each
    element of the split tensor [.., M, N] goes to an affine place in the leaf's output,
    contiguous along N: the bmm's epilogue then writes the leaf's tensor directly."""
    if len(split.leaves) != 1:
        return None
    leaf, index = split.leaves[0]
    lshape = [int(d) for d in ctx.shapes[leaf.output[0]]]
    size = int(np.prod(lshape))
    if size != int(np.prod(split.shape)):
        return None
    pos = np.empty(size, np.int64)  # split tensor's offset -> the leaf's offset (a permutation)
    pos[index_offsets(index, lshape, split.shape)] = np.arange(size)
    fit = fit_affine(pos, split.shape)
    if fit is None or fit[1][-1] != 1:
        return None
    base, coeffs = fit
    gdims = tuple((int(e), int(c)) for e, c in zip(split.shape[:-2], coeffs[:-2], strict=True))
    return leaf, cpu_amx.Layout(size, int(base), gdims, int(coeffs[-2]), 1)


def _view_layout(ctx, name: str, need_k_contiguous: bool) -> cpu_amx.Layout | None:
    """The AMX Layout of tensor `name` when it is a view (lower.View) whose offsets are affine
    in its indices: leading dims -> the g digits, then rows, columns. A left operand must be
    contiguous along K (its last axis); a right one along K or N (the packing reads either)."""
    view = ctx.views.get(name)
    if view is None or len(view.shape) < 3:
        return None
    fit = view_affine(view)
    if fit is None:
        return None
    base, coeffs = fit
    row, col = coeffs[-2], coeffs[-1]
    if (need_k_contiguous and col != 1) or (not need_k_contiguous and 1 not in (row, col)):
        return None
    size = int(np.prod(view.source_shape))
    gdims = tuple((int(e), int(c)) for e, c in zip(view.shape[:-2], coeffs[:-2], strict=True))
    return cpu_amx.Layout(size, int(base), gdims, int(row), int(col))


def grouped_conv_te(x, w, bias, group: int, strides, dil, pads, out_shape):
    """Grouped / depthwise conv as a direct int32 reduction (C/group * kh * kw taps per output):
    y[b, m, oy, ox] = bias[m] + sum_{c, i, j} xpad[b, g*C/group + c, oy*sh + i*dh, ox*sw + j*dw]
    * w[m, c, i, j] with g = m // (M/group), xpad zero-padded by `pads`. Exact in int32 (the
    reduction is bounded by IntConv's shape rule)."""
    n, c, h, wd = (int(s) for s in x.shape)
    m, cg, kh, kw = (int(s) for s in w.shape)
    mg = m // group
    pt, pl, pb, pr = pads
    zero = tirx.const(0, x.dtype)

    def pad(b, ci, y, xx):
        inside = tirx.all(y >= pt, y < h + pt, xx >= pl, xx < wd + pl)
        yc = tirx.max(tirx.min(y - pt, h - 1), 0)
        xc = tirx.max(tirx.min(xx - pl, wd - 1), 0)
        return tirx.if_then_else(inside, x[b, ci, yc, xc], zero)

    xpad = te.compute((n, c, h + pt + pb, wd + pl + pr), pad, name="conv_pad")
    rc = te.reduce_axis((0, cg), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def acc(b, mo, oy, ox):
        ci = (mo // mg) * cg + rc
        v = xpad[b, ci, oy * strides[0] + ri * dil[0], ox * strides[1] + rj * dil[1]]
        return te.sum(v.astype("int32") * w[mo, rc, ri, rj].astype("int32"), axis=[rc, ri, rj])

    y = te.compute(tuple(out_shape), acc, name="conv_acc")
    return te.compute(y.shape, lambda b, mo, oy, ox: y[b, mo, oy, ox] + bias[mo], name="conv_y")


def _tap(oy, ox, i, j, strides, dil, pads, h: int, w: int):
    """(inside, y, x) of kernel tap (i, j) at output pixel (oy, ox): the input pixel, clamped
    into the image, and whether it lies inside (else the tap reads the zero padding)."""
    y = oy * strides[0] + i * dil[0] - pads[0]
    xx = ox * strides[1] + j * dil[1] - pads[1]
    inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
    return inside, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)


def im2col(x, kh, kw, strides, dil, pads, oh, ow):
    """cols[(b, oy, ox), (c, i, j)] = x[b, c, oy*sh + i*dh - pt, ox*sw + j*dw - pl] (0 outside)."""
    n, c, h, w = (int(s) for s in x.shape)
    zero = tirx.const(0, x.dtype)

    def f(r, q):
        b, rem = r // (oh * ow), r % (oh * ow)
        ci, rem2 = q // (kh * kw), q % (kh * kw)
        inside, y, xx = _tap(rem // ow, rem % ow, rem2 // kw, rem2 % kw, strides, dil, pads, h, w)
        return tirx.if_then_else(inside, x[b, ci, y, xx], zero)

    return te.compute((n * oh * ow, c * kh * kw), f, name="im2col")


def im2col_nhwc(x, kh, kw, strides, dil, pads, oh, ow):
    """From an NCHW input: cols[b, oy, ox, i, j, c] = x[b, c, oy*sh + i*dh - pt, ...] (0
    outside) in two stages, an NHWC copy of x, then the taps with the channel innermost, so
    both stages' inner loops are contiguous copies (reshaped to [(b, oy, ox), (i, j, c)] the
    GEMM's left operand, for weights ordered (i, j, c) along K)."""
    n, c, h, w = (int(s) for s in x.shape)
    zero = tirx.const(0, x.dtype)
    xh = te.compute((n, h, w, c), lambda b, y, xx, ci: x[b, ci, y, xx], name="nhwc")

    def f(b, oy, ox, i, j, ci):
        inside, y, xx = _tap(oy, ox, i, j, strides, dil, pads, h, w)
        return tirx.if_then_else(inside, xh[b, y, xx, ci], zero)

    return te.compute((n, oh, ow, kh, kw, c), f, name="im2col")


def _plain_matmul(ctx, node) -> relax.Expr:
    args = [ctx.value(i) for i in node.input if i]
    return ctx.bb.emit_te(lambda *t: te_ops.int_matmul(*t), *args, primfunc_name_hint="int_matmul")
