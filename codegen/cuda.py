"""cuda-int8 kernel library: int8 tensor-core GEMMs and integer row kernels for NVIDIA GPUs.

The lowering hands every IntMatMul / IntConv to `CudaKernels`. They are written as plain TE
einsums, ``C[g, i, j] = sum_k A[g, i, k] * B[g, j, k]`` (int8 operands widened to int32 inside
the product, int32 accumulation), so

* a dense layer keeps its weight as a compile-time constant transposed to ``W^T[N, K]``;
* a convolution is an im2col stage (data movement) followed by the same GEMM;
* an activation x activation product (attention) is a batched GEMM on the runtime operands; the
  q / k / v heads are each written once as int8 operands by one kernel that applies their data
  movement and Requantize (`_bmm_operand`), and uint8 probabilities enter the s8 tensor cores as
  p - 128.

A Requantize that alone reads a GEMM's output runs in the GEMM's write-back (`epilogue_requant`),
and after a dense layer so does a following int8 ShiftGELU table or residual IntAdd.
Every GEMM gets our own schedule, `schedule_int8_wmma` (16x16x16 s8 -> s32 WMMA, tile chosen by
shape from tiles measured by benchmarks/gpu_gemm.py); LayerNorm / Softmax get
`schedule_row_blocks` (a warp per row). The remaining elementwise kernels go through TVM's CUDA
Relax pipeline (`cuda_pipeline`: LegalizeOps, FuseOps/FuseTIR, dlight), whose GEMM rule
(`Int8TensorCoreMatmul`, dlight's int8 WMMA rule without its software-pipeline annotations,
which TVM 0.27's InjectSoftwarePipeline rejects) only sees a GEMM our schedule does not cover.
The arithmetic is the reference's, and tests compare bit for bit.

The exported .so stores the CUDA C (TVM 0.27's compiler-side module serialises source); the GPU
machine compiles it when it loads the artifact. Where nvcc is on PATH the build also compiles it
once (`check_cuda_compiles`), so a kernel nvcc rejects fails the compile, not the deployment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from intq.codegen import compat, cpu, cuda_intrin, te_ops  # noqa: F401 (int32 WMMA fill)
from intq.codegen.lower import View, gelu_table, movement_source, requant_split
from intq.errors import LoweringError
from intq.ops import lookup
from intq.ops.core import out_dtype
from intq.ops.fixedpoint import dtype_bounds

#: Pass-config key turning on Relax's CUDA-graph capture of the VM's kernel sequence.
CUDA_GRAPH_CONFIG = "relax.backend.use_cuda_graph"


def dense_nt_te(
    x: te.Tensor, wt: te.Tensor, bias: te.Tensor, rq=None, table=None, residual=None, rq2=None
) -> te.Tensor:
    """y[m, n] = sum_k int32(x[m, k]) * int32(Wt[n, k]) + bias[n]  (int8 x int8 -> int32), or
    Requantize(y) when `rq` = (b, c, lo, hi, dtype) is folded into the write-back (b, c python
    ints or per-column te.Tensors), then table[. + 128] when `table` = (int32 te.Tensor of 256
    entries, dtype) is (an int8 ShiftGELU tabulated by `lower.gelu_table`), or saturate(. + r)
    when `residual` = (r: [m, n] te.Tensor, its per-tensor Requantize or None, lo, hi, dtype) is
    (the IntAdd of a residual connection), or a second Requantize `rq2` (per column: the
    Requantizes of the q / k / v heads cut out of a fused projection, `lower.RequantSplit`)."""
    m, k_len = x.shape
    n = wt.shape[0]
    k = te.reduce_axis((0, k_len), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, k].astype("int32") * wt[j, k].astype("int32"), axis=k),
        name="acc",
    )
    return te.compute(
        (m, n),
        lambda i, j: _dense_value(acc[i, j] + bias[j], i, j, rq, table, residual, rq2),
        name="y",
    )


def _dense_value(v, i, j, rq, table, residual, rq2):
    """The dense write-back of int32 `v` at (i, j): see `dense_nt_te`."""
    v = cpu._epilogue(v, j, rq)
    if rq2 is not None:
        return cpu._epilogue(v, j, rq2)
    if table is not None:
        return table[0][v.astype("int32") + 128].astype(table[1])
    if residual is not None:  # IntAdd: saturate(v + other), other maybe Requantize(t)
        t, t_rq, lo, hi, dt = residual
        return te_ops.int_add_expr(v, t[i, j], lo, hi, dt, rq_b=t_rq)
    return v


def dense_partial_te(x3: te.Tensor, wt3: te.Tensor) -> te.Tensor:
    """Split-K partial sums: part[s, m, n] = sum_k int32(x3[m, s, k]) * int32(wt3[n, s, k]), the
    K axis cut into S chunks (x3, wt3: the [M, K] input and [N, K] weight viewed [., S, K/S])."""
    m, splits, kc = x3.shape
    n = wt3.shape[0]
    k = te.reduce_axis((0, kc), name="k")
    return te.compute(
        (splits, m, n),
        lambda s, i, j: te.sum(x3[i, s, k].astype("int32") * wt3[j, s, k].astype("int32"), k),
        name="part",
    )


def dense_split_sum_te(
    part: te.Tensor, bias: te.Tensor, rq=None, table=None, residual=None, rq2=None
) -> te.Tensor:
    """y[m, n] = the dense write-back (`dense_nt_te`) of sum_s part[s, m, n] + bias[n]."""
    splits, m, n = part.shape

    def total(i, j):
        acc = part[0, i, j]
        for s in range(1, int(splits)):
            acc = acc + part[s, i, j]
        return acc

    return te.compute(
        (m, n),
        lambda i, j: _dense_value(total(i, j) + bias[j], i, j, rq, table, residual, rq2),
        name="y",
    )


def bmm_te(
    a: te.Tensor, b: te.Tensor, colsum: te.Tensor | None = None, rq=None, b_nt: bool = False
) -> te.Tensor:
    """out[g, m, n] = sum_k int32(a[g, m, k]) * int32(b[g, k, n])  (int8 x int8 -> int32), with a
    per-tensor or per-column Requantize folded into the write-back when `rq` is given; with
    `b_nt` the right operand is given transposed, as bt[g, n, k].

    A uint8 left operand (Softmax probabilities) enters the int8 tensor cores as a - 128; the
    product is then sum_k (a - 128) * b + 128 * colsum[g, n] with colsum[g, n] = sum_k b[g, k, n]
    (`rowsum_te` of the transposed operand), exact in int32."""
    g, m, k_len = a.shape
    n = b.shape[1] if b_nt else b.shape[2]
    k = te.reduce_axis((0, k_len), name="k")
    if colsum is not None:
        a = te.compute(a.shape, lambda *i: (a(*i).astype("int32") - 128).astype("int8"), "a_s8")

    def rhs(gg, kk, j):
        return b[gg, j, kk] if b_nt else b[gg, kk, j]

    acc = te.compute(
        (g, m, n),
        lambda gg, i, j: te.sum(a[gg, i, k].astype("int32") * rhs(gg, k, j).astype("int32"), k),
        name="bmm",
    )
    if colsum is None and rq is None:
        return acc

    def value(gg, i, j):
        v = acc[gg, i, j] if colsum is None else acc[gg, i, j] + colsum[gg, j] * 128
        return cpu._epilogue(v, j, rq)

    return te.compute((g, m, n), value, name="y")


def rowsum_te(bt: te.Tensor) -> te.Tensor:
    """rowsum[g, n] = sum_k int32(bt[g, n, k])."""
    g, n, k_len = bt.shape
    k = te.reduce_axis((0, k_len), name="k")
    return te.compute((g, n), lambda gg, j: te.sum(bt[gg, j, k].astype("int32"), axis=k), "rowsum")


def colsum_te(b: te.Tensor) -> te.Tensor:
    """colsum[g, n] = sum_k int32(b[g, k, n])."""
    g, k_len, n = b.shape
    k = te.reduce_axis((0, k_len), name="k")
    return te.compute((g, n), lambda gg, j: te.sum(b[gg, k, j].astype("int32"), axis=k), "rowsum")


def transpose_te(b: te.Tensor) -> te.Tensor:
    """bt[g, n, k] = b[g, k, n]."""
    g, k_len, n = b.shape
    return te.compute((g, n, k_len), lambda gg, j, kk: b[gg, kk, j], name="transpose")


@dataclass(frozen=True)
class WmmaTile:
    """Thread-block tile of the int8 WMMA GEMM: warps_m x warps_n warps, each computing
    frags_m x frags_n 16x16 int32 accumulator fragments, k_frags 16-deep k-slices per shared-memory
    load. The block computes (16 * warps_m * frags_m) x (16 * warps_n * frags_n) outputs."""

    warps_m: int
    warps_n: int
    frags_m: int
    frags_n: int
    k_frags: int

    @property
    def rows(self) -> int:
        return 16 * self.warps_m * self.frags_m

    @property
    def cols(self) -> int:
        return 16 * self.warps_n * self.frags_n

    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n


# Tiles measured on an H100 by benchmarks/gpu_gemm.py (docs/PERFORMANCE.md): of nine tiles,
# 64 x 128 was the fastest or within 5 % of it on DeiT-Small's four dense shapes at M = 12608,
# 64 x 64 within 5 % of the fastest at M = 197.
#: 64 x 128 block, 8 warps of 32 x 32, k-slices of 64 (GEMMs that fill the GPU).
TILE_LARGE = WmmaTile(2, 4, 2, 2, 4)
#: 64 x 64 block, 4 warps of 32 x 32, k-slices of 64 (GEMMs with few blocks of the large tile).
TILE_SMALL = WmmaTile(2, 2, 2, 2, 4)
#: SMs of an H100; tile choice only aims to give every SM two blocks.
_SM_COUNT = 132


#: Shared-memory k-slice buffers of the pipelined GEMM (`schedule_int8_wmma(pipeline=)`): on the
#: H200, 2 took DeiT-Small's four b64 dense GEMMs from 210 to 184 us per layer (3: 183 us;
#: benchmarks/gpu_gemm.py, docs/PERFORMANCE.md).
GEMM_PIPELINE_STAGES = 2

#: k-slice depth (16-deep fragments) of a latency-bound GEMM's tile (see `pick_wmma_tile`).
DEEP_K_FRAGS = 8


def pick_wmma_tile(batch: int, m: int, n: int, k: int | None = None) -> WmmaTile:
    """The large tile when it gives every SM at least two blocks, n fills its columns and k is
    more than one k-slice deep, else the small one (attention's probabilities.V, n = 64, would
    leave half the large tile idle; q.k^T, k = 64, is bound by its write-back, whose shared
    staging of the large tile leaves room for fewer blocks per SM).
    A GEMM that still gives fewer than two blocks per SM is latency-bound (batch 1): its k-slices
    are then 128 deep instead of 64 when that does not pad k further, halving the
    load-synchronise-multiply rounds each block walks in turn."""
    blocks = batch * -(-m // TILE_LARGE.rows) * -(-n // TILE_LARGE.cols)
    one_slice = k is not None and k <= 16 * TILE_SMALL.k_frags  # q.k^T: write-back bound
    if n > TILE_SMALL.cols and blocks >= 2 * _SM_COUNT and not one_slice:
        return TILE_LARGE
    tile = TILE_SMALL
    small_blocks = batch * -(-m // tile.rows) * -(-n // tile.cols)
    deep = 16 * DEEP_K_FRAGS
    if k is not None and small_blocks < 2 * _SM_COUNT and -(-k // 64) * 64 % deep == 0:
        tile = WmmaTile(tile.warps_m, tile.warps_n, tile.frags_m, tile.frags_n, DEEP_K_FRAGS)
    return tile


#: Split-K only for GEMMs at least this many 64-deep k-slices deep (one block walks them in turn,
#: unpipelined) that give fewer blocks than SMs.
SPLIT_K_MIN_SLICES = 12


def pick_split_k(m: int, n: int, k: int) -> int:
    """Chunks to cut K into (1: none) for an [m, k] x [k, n] GEMM that gives too few thread
    blocks to fill the GPU and walks many k-slices in each (DeiT's fc2 at batch 1: 24 blocks of
    24 slices): the most chunks, each a multiple of 64 and at least 2 slices deep, that keep the
    grid within two blocks per SM, preferring chunks a multiple of 128 deep (`pick_wmma_tile`'s
    deep k-slices)."""
    tile = pick_wmma_tile(1, m, n)
    blocks = -(-m // tile.rows) * -(-n // tile.cols)
    slices = k // 64
    if k % 64 or slices < SPLIT_K_MIN_SLICES or blocks >= _SM_COUNT:
        return 1
    fits = [s for s in range(2, slices // 2 + 1) if slices % s == 0 and blocks * s <= 2 * _SM_COUNT]
    even = [s for s in fits if (slices // s) % 2 == 0]  # chunks of whole 128-deep k-slices
    return max(even or fits or [1])


def _vector_lanes(elements: int, threads: int, max_lanes: int = 16) -> int:
    """Widest int8 vector (<= `max_lanes`) such that `threads` threads cover `elements` evenly."""
    lanes = max_lanes
    while lanes > 1 and elements % (threads * lanes):
        lanes //= 2
    return lanes


def schedule_int8_wmma(
    func: tirx.PrimFunc, tile: WmmaTile | None = None, b_kn: bool = False, pipeline: int = 0
) -> tirx.PrimFunc | None:
    """int8 x int8 -> int32 GEMM / batched GEMM on tensor cores (16x16x16 s8 WMMA).

    The reduction block is normalised to C[S, I, J] += A[S, I, K] * B[S, J, K] and padded to the
    tile; per thread block A and B k-slices are staged in shared memory (16-byte vector loads,
    rows padded against bank conflicts), each warp keeps its fragments in registers over the whole
    k loop, and the accumulators go through shared memory to global with the epilogue (bias,
    folded Requantize, GELU table, residual add) inlined into that write. Blocks: x over column
    tiles, y over row tiles, z over the batch. With `b_kn` B is staged as [S, K, J] (row-major
    matrix_b fragments): a right operand read in place along n (v inside the qkv output). With
    `pipeline` = S > 1 the k-slice loads go through cp.async into S rotating shared buffers,
    S - 1 slices ahead of the multiplies (only where both tiles load unpadded 16-byte rows and
    k spans several slices); the write-back is unrolled when it reads a tensor
    (`_reads_tensor`). None when `func` is not such a GEMM.
    """
    from tvm.s_tir.dlight.gpu.matmul import (
        auto_inline_consumer_chain,
        auto_inline_producers,
        get_index_map,
        get_reduction_blocks,
    )
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = get_reduction_blocks(sch, blocks)
    if not reductions or len(reductions) != 1:
        return None
    main = reductions[0]
    try:
        ra = sch.reindex(main, ("read", 0))
        rb = sch.reindex(main, ("read", 1))
        rc = sch.reindex(main, ("write", 0))
        maps = get_index_map(sch.get(main))
        if maps is None:
            return None
        mm_map, a_map, b_map, c_map = maps
        if b_kn:  # [S, J, K] -> [S, K, J]
            nt_map = b_map
            b_map = tirx.IndexMap.from_func(
                lambda *i: (lambda o: [o[0], o[2], o[1]])(nt_map.map_indices(list(i))),
                ndim=len(nt_map.initial_indices),
            )
        sch.transform_layout(ra, ("write", 0), a_map)
        sch.transform_layout(rb, ("write", 0), b_map)
        sch.transform_layout(rc, ("read", 0), c_map)
        sch.transform_block_layout(main, mm_map)
        ext = [int(iv.dom.extent) for iv in sch.get(main).iter_vars]
        t = tile or pick_wmma_tile(*ext)
        sch.pad_einsum(main, [1, t.rows, t.cols, 16 * t.k_frags])
        batch, i, j, k = sch.get_loops(main)
        i, ii = sch.split(i, [None, 16])
        j, ji = sch.split(j, [None, 16])
        k, ki = sch.split(k, [None, 16])
        sch.reorder(i, j, k, ii, ji, ki)
        inner = main
        outer = sch.blockize(ii)
        i0, i1, i2 = sch.split(i, [None, t.warps_m, t.frags_m])
        j0, j1, j2 = sch.split(j, [None, t.warps_n, t.frags_n])
        k0, k1 = sch.split(k, [None, t.k_frags])
        sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
        warp = sch.fuse(i1, j1)
        sch.bind(batch, "blockIdx.z")
        sch.bind(i0, "blockIdx.y")
        sch.bind(j0, "blockIdx.x")
        sch.bind(warp, "threadIdx.y")

        def stage(index: int, rows: int, padded: bool):
            blk = sch.cache_read(outer, index, "shared.dyn")
            sch.compute_at(blk, k0)
            fused = sch.fuse(*sch.get_loops(blk)[-2:])
            threads = 32 * t.warps
            # (TVM 0.27 prints a padded 16 x int8 load's zero as a 16-argument make_int4)
            lanes = _vector_lanes(rows * 16 * t.k_frags, threads, 4 if padded else 16)
            _, ty, tx, vec = sch.split(fused, [None, t.warps, 32, lanes])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            sch.storage_align(blk, 0, axis=-2, factor=32, offset=16)
            return blk

        k_pad = ext[3] % (16 * t.k_frags) != 0
        a_pad, b_pad = k_pad or ext[1] % t.rows != 0, k_pad or ext[2] % t.cols != 0
        a_s = stage(0, t.rows, a_pad)
        b_s = stage(1, t.cols, b_pad)
        auto_inline_producers(sch, a_s)
        auto_inline_producers(sch, b_s)
        a_f = sch.cache_read(outer, 0, "wmma.matrix_a")
        b_f = sch.cache_read(outer, 1, "wmma.matrix_b")
        sch.compute_at(a_f, k1)
        sch.compute_at(b_f, k1)
        c_s = sch.cache_write(outer, 0, "shared.dyn")
        sch.storage_align(c_s, 0, -2, 16, 4)
        c_f = sch.cache_write(outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(c_f, warp)
        sch.reverse_compute_at(c_s, warp)
        for blk in (c_f, a_f, b_f):
            ri, rj = sch.get_loops(blk)[-2:]
            ri0, ri1 = sch.split(ri, [None, 16])
            rj0, rj1 = sch.split(rj, [None, 16])
            sch.reorder(ri0, rj0, ri1, rj1)
            if blk != c_f:
                sch.unroll(ri0)
                sch.unroll(rj0)
        init = sch.decompose_reduction(outer, k0)
        init_inner = sch.get_child_blocks(init)[0]
        intrin = get_wmma_intrin_group(
            load_scope="shared.dyn",
            store_scope="shared.dyn",
            in_dtype="int8",
            out_dtype="int32",
            trans_b=not b_kn,
        )
        sch.tensorize(sch.get_loops(a_f)[-2], intrin["load_a"])
        sch.tensorize(sch.get_loops(b_f)[-2], intrin["load_b"])
        sch.tensorize(sch.get_loops(init_inner)[-2], intrin["init"])
        sch.tensorize(sch.get_loops(c_f)[-2], intrin["store"])
        sch.tensorize(sch.get_loops(inner)[-3], intrin["compute"])
        auto_inline_consumer_chain(sch, c_s)
        fused = sch.fuse(*sch.get_loops(c_s)[-2:])
        rounds, tx, vec = sch.split(fused, [None, 32, 4])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        if _reads_tensor(sch.get(c_s)):  # a residual: its loads go out back to back
            sch.unroll(rounds)
        copies = all(_plain_copy(sch.get(blk)) for blk in (a_s, b_s))
        if pipeline > 1 and copies and not (a_pad or b_pad) and ext[3] > 16 * t.k_frags:
            # k-slice loads (cp.async into `pipeline` rotating shared buffers) run pipeline - 1
            # slices ahead of the multiplies: a block's loads overlap its tensor-core work.
            # Only unpadded 16-byte copies (TVM's cp.async injection fails on the padded
            # 4-byte zero-filling loads) of more than one k-slice.
            sch.annotate(k0, "software_pipeline_stage", [0, 0, pipeline - 1])
            sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
            sch.annotate(k0, "software_pipeline_async_stages", [0])
    except Exception:  # noqa: BLE001 - not an int8 GEMM this schedule covers
        return None
    return compat.mark_scheduled(sch.mod["main"])


def _reads_tensor(block: Any) -> bool:
    """Whether a GEMM's write-back reads a global tensor of two or more dimensions (a residual
    added there), not only the staged accumulators and per-column constants. Its rounds are
    then unrolled, so each thread's residual loads go out together: on the H200 (DeiT-Small
    b64) that took proj / fc2 + residual from 1.025 to 0.921 ms per run, where unrolling every
    write-back slowed q.k^T (66 -> 91 us per layer) and the qkv split; unrolling the tile
    loads too gained nothing at b64 and cost 0.04 ms at b1 (docs/PERFORMANCE.md)."""
    buffers = [compat.region_buffer(r) for r in block.reads]
    return any(str(b.scope()) == "global" and len(b.shape) >= 2 for b in buffers)


def _plain_copy(block: Any) -> bool:
    """Whether a shared-memory staging block copies its operand as it is (a load of the same
    dtype, or one guarded by the padding's if_then_else): what cp.async can do. An operand read
    through a cast or arithmetic (a view that converts) is staged synchronously."""
    store = block.body
    if not compat.is_node(store, "BufferStore"):
        return False
    value = store.value
    if str(getattr(getattr(value, "op", None), "name", "")).endswith("if_then_else"):
        value = value.args[1]
    source = compat.loaded_buffer(value)
    return source is not None and str(source.dtype) == str(store.buffer.dtype)


#: Threads along the summed axis in `schedule_colsum` (each sums a strided share of it).
COLSUM_SPLIT = 8


def schedule_colsum(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """colsum[g, n] = sum_k b[g, k, n] (the u8 correction of probabilities.V with v read as
    [k, n]): 32 consecutive n per warp (coalesced loads along n), `COLSUM_SPLIT` warps per block
    each summing every COLSUM_SPLIT-th k, combined by a cross-thread reduction. (Left to dlight,
    this reduction over a non-contiguous axis ran 37 us per call at DeiT-Small batch 1.)"""
    sch = Schedule(func)
    try:
        *views, block = sch.get_child_blocks(sch.get_sblock("root"))
        for view in views:  # the operand read through its view: inlined into the loads
            sch.compute_inline(view)
        g, n, k = sch.get_loops(block)
        bx, tx = sch.split(sch.fuse(g, n), [None, 32])
        ko, ty = sch.split(k, [None, COLSUM_SPLIT])
        sch.reorder(bx, tx, ty, ko)
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
    except Exception:  # noqa: BLE001 - not that shape: dlight's reduction rules
        return None
    return compat.mark_scheduled(sch.mod["main"]).with_attr("op_pattern", 8)  # kOpaque


#: Rows per thread block in `schedule_row_blocks` (one warp each).
ROWS_PER_BLOCK = 4


def schedule_row_blocks(func: tirx.PrimFunc, unroll: bool = True) -> tirx.PrimFunc | None:
    """One warp per row for a multi-stage row kernel (LayerNorm, Softmax), `ROWS_PER_BLOCK` rows
    per thread block: the last stage's row loops split over blockIdx.x / threadIdx.y; every
    earlier stage computed inside that row (elementwise whole-tensor stages are inlined unless
    named "_row"). A row reduction runs over the warp's 32 lanes (threadIdx.x) and ends in a
    warp all-reduce (shuffles) that leaves the row's value in every lane's registers; a per-row
    scalar stage (mean, a Newton step of the isqrt, the magic divisor) runs in every lane on
    those registers; a "_row" stage is split over the lanes into shared memory. Small blocks
    let many rows run at once on each SM, which hides the serial per-row steps. None when the
    kernel does not have that shape (the caller then uses `schedule_rows`). Each lane's loop
    over its share of the row is unrolled (`unroll`): its loads then go out back to back
    instead of one per iteration (on the H200 at DeiT-Small b64: LayerNorm 32.2 -> 26.4 us,
    Softmax 37.7 -> 32.7 us; benchmarks/gpu_rows.py, docs/PERFORMANCE.md)."""
    sch = Schedule(func)
    shape = cpu.row_kernel_shape(sch)
    if shape is None:
        return None
    blocks, last, loops, out_extent = shape
    try:
        # Split the innermost row loop, not the fused one: a block's rows then differ only in
        # that index, so every per-row shared buffer spans ROWS_PER_BLOCK rows (a split of the
        # fused loop would make TVM size them by the bounding box over all row dimensions).
        per_block = min(ROWS_PER_BLOCK, out_extent[-2])
        io, ty = sch.split(loops[-2], [None, per_block])
        bx = sch.fuse(*loops[:-2], io) if len(loops) > 2 else io
        kept = []
        for block in reversed(blocks[:-1]):
            b_iters = sch.get(block).iter_vars
            extent = [int(iv.dom.extent) for iv in b_iters]
            name = str(sch.get(block).name_hint)
            if extent == out_extent and all(iv.iter_type == 0 for iv in b_iters):
                if not name.endswith("_row"):
                    sch.compute_inline(block)
                    continue
            per_row = math.prod(extent[len(out_extent) - 1 :]) == 1 or any(
                iv.iter_type != 0 for iv in b_iters
            )  # one value per row (a scalar stage, or a reduction over the row)
            # A per-row value lives in every lane's registers ("local"): the reductions end in
            # a warp all-reduce that leaves the result in every lane, and the scalar stages
            # (mean, the isqrt steps, the magic divisor) run on all 32 lanes at once, costing
            # the same issue slots as on one. Kept in shared memory, written by lane 0 and read
            # by all, they would need a warp barrier that TVM 0.27 does not insert: lanes read
            # stale values whenever lane 0 ran late (MiniLM's first LayerNorm on the H200).
            sch.set_scope(block, 0, "local" if per_row else "shared")
            sch.compute_at(block, ty, preserve_unit_loops=True)
            kept.append((block, per_row))
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        for block, per_row in [*kept, (last, False)]:
            inner = sch.get_loops(block)[2:]
            kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
            n_red = sum(1 for k in kinds if k != 0)
            if per_row and not n_red:
                continue  # every lane computes the row's scalar itself
            if n_red:  # reduce over the trailing loops; any spatial loop before is unit
                spatial, red = inner[:-n_red], inner[-n_red:]
                if any(int(sch.get(lp).extent) != 1 for lp in spatial):
                    return None
                inner = red
            fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            per_lane, tx = sch.split(fused, [None, 32])
            sch.bind(tx, "threadIdx.x")
            if unroll:
                sch.unroll(per_lane)
    except Exception:  # noqa: BLE001 - not a row kernel
        return None
    return compat.mark_scheduled(sch.mod["main"]).with_attr("op_pattern", 8)  # kOpaque


def schedule_rows(func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    """Fallback GPU schedule for multi-stage kernels that are not row kernels (e.g. a mean over
    several axes): every stage is its own kernel, one thread per output element of that stage
    (spatial loops fused, split over blockIdx.x / threadIdx.x), the reduction loops serial inside
    the thread. dlight's inlining rules would instead inline the isqrt Newton chain into one
    expression whose size doubles per step (the compile never ends). The function is marked
    scheduled and opaque, so FuseOps and dlight leave it as it is."""
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

    #: LayerNorm's element loop in 32-bit lanes (te_ops.int_layernorm(narrow=True))
    narrow_layernorm = True

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target
        arch = str(target.attrs.get("arch", "sm_90"))
        # cp.async (sm_80 and newer) feeds the GEMMs' software pipeline
        self.pipeline = GEMM_PIPELINE_STAGES if int(re.sub(r"\D", "", arch) or 0) >= 80 else 0

    def elementwise_attrs(self) -> dict:
        return {"intq.kernel": "rowwise"}

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """int8 GEMMs (tagged "gemm") get `schedule_int8_wmma`; multi-stage integer kernels
        (LayerNorm, Softmax, Mean: row reductions and the Newton isqrt chain) get
        `schedule_row_blocks` (or `schedule_rows`); both become opaque, scheduled kernels.
        Single-stage elementwise kernels (Requantize, Add, GELU) are left to FuseOps and dlight,
        as is a GEMM the WMMA schedule does not cover (dlight's generic GPU matmul)."""
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
                continue
            if "intq.kernel" not in func.attrs:
                continue
            kind = str(func.attrs["intq.kernel"])
            func = func.without_attr("intq.kernel")
            sch = Schedule(func)
            if kind == "colsum":
                func = schedule_colsum(func) or func
            elif kind in ("gemm", "gemm_kn"):
                wmma = schedule_int8_wmma(func, b_kn=kind == "gemm_kn", pipeline=self.pipeline)
                if wmma is not None:
                    func = wmma.with_attr("op_pattern", 8)  # kOpaque: FuseOps leaves it alone
            elif len(sch.get_child_blocks(sch.get_sblock("root"))) > 1:
                func = schedule_row_blocks(func) or schedule_rows(func)
            mod[gv] = func
        return mod

    def _gemm(
        self,
        ctx,
        x2d: relax.Expr,
        rows: int,
        w_kn: np.ndarray,
        bias: np.ndarray | None,
        rq=None,
        table: np.ndarray | None = None,
        residual=None,
        rq2=None,
        x_view=None,
    ) -> relax.Expr:
        """[M, K] int8 x constant [K, N] int8 (+ bias) -> [M, N] int32, or Requantize of it when
        `rq` = (b, c, lo, hi, dtype) (ints, or int32 arrays per column) is folded in; `x_view`
        = (shape, index map) when `x2d` is a buffer read through a view."""
        k, n = w_kn.shape
        w_nk = np.ascontiguousarray(w_kn.astype(np.int8).T)
        b = relax.const((bias if bias is not None else np.zeros(n)).astype(np.int32).reshape(n))
        splits = pick_split_k(rows, n, k)
        if splits > 1:  # partial GEMMs over K chunks, then their sum and the write-back
            kc = k // splits
            if x_view is not None:
                shape, index = x_view
                x_arg, x3_view = x2d, ((shape[0], splits, kc), _chunked(index, kc))
            else:
                x_arg = ctx.bb.emit(relax.op.reshape(x2d, (rows, splits, kc)))
                x3_view = None
            part = _emit_with_rq(
                ctx,
                lambda a, w, **kw: dense_partial_te(a, w),
                [x_arg, relax.const(w_nk.reshape(n, splits, kc))],
                None,
                "int8_dense_splitk",
                views={0: x3_view} if x3_view is not None else None,
            )
            return _emit_with_rq(
                ctx,
                dense_split_sum_te,
                [part, b],
                rq,
                "splitk_sum",
                table=table,
                residual=residual,
                rq2=rq2,
                kernel=None,
            )
        wt = relax.const(w_nk)
        views = {0: x_view} if x_view is not None else None
        return _emit_with_rq(
            ctx,
            dense_nt_te,
            [x2d, wt, b],
            rq,
            "int8_dense",
            table=table,
            residual=residual,
            rq2=rq2,
            views=views,
        )

    def dense(self, ctx, node) -> relax.Expr:
        a_shape = ctx.shapes[node.input[0]]
        w = ctx.const(node.input[1])
        if ctx.dtypes[node.input[0]] != "int8" or w.ndim != 2:
            return _plain_matmul(ctx, node)
        bias = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        rows = int(np.prod(a_shape[:-1]))
        x2d, x_view = _dense_input(ctx, node.input[0], rows, int(a_shape[-1]))
        rq_node, rq = ctx.epilogue_requant(node)
        gelu, table, last = None, None, None
        if rq_node is not None and rq[4] == "int8":  # an int8 ShiftGELU after it: tabulated
            gelu = ctx.sole_consumer(rq_node.output[0], "IntGELU")
            tab = gelu_table(ctx, gelu) if gelu is not None else None
            if tab is not None:
                table, last = tab
        add, residual = None, None
        if rq_node is not None and table is None:
            add, residual = _residual_add(ctx, rq_node, rows)
            last = add
        split, rq2 = None, None
        if table is None and add is None:  # q / k / v heads: Requantized in the write-back
            split = requant_split(ctx, (rq_node or node).output[0])
            if split is not None:
                rq, rq2 = (split.rq, None) if rq is None else (rq, split.rq)
        y = self._gemm(ctx, x2d, rows, w, bias, rq, table, residual, rq2=rq2, x_view=x_view)
        if split is not None:  # readers index the heads inside y (lower.View)
            split.bind(ctx, y, (rows, w.shape[1]))
            if rq_node is not None:
                ctx.skipped.add(rq_node.output[0])
            return y
        out_name = (last or rq_node or node).output[0]
        out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[out_name]))
        if table is not None:  # GEMM -> Requantize -> IntGELU [-> Requantize] in one kernel
            ctx.skipped.update({rq_node.output[0], gelu.output[0]})
            ctx.bind_folded(last, out)
            return out  # (the GEMM's own int32 output has no other reader)
        if add is not None:  # GEMM -> Requantize -> IntAdd in one kernel
            ctx.skipped.add(rq_node.output[0])
            ctx.bind_folded(add, out)
            return out
        if rq_node is not None:
            ctx.bind_folded(rq_node, out)
        return out

    def batch_matmul(self, ctx, node) -> relax.Expr:
        """Attention products on tensor cores. Each operand is written once as a contiguous int8
        tensor by one kernel that also applies its data movement and Requantize
        (`_bmm_operand`); the right operand is written transposed ([g, n, k]) so both tile
        loads run along k. uint8 probabilities enter as p - 128 with the exact 128 * rowsum
        correction."""
        sa, sb = ctx.shapes[node.input[0]], ctx.shapes[node.input[1]]
        if (len(node.input) > 2 and node.input[2]) or sa[:-2] != sb[:-2] or len(sa) < 3:
            return _plain_matmul(ctx, node)
        dts = (ctx.dtypes[node.input[0]], ctx.dtypes[node.input[1]])
        if dts not in (("int8", "int8"), ("uint8", "int8")):
            return _plain_matmul(ctx, node)
        a3, a_view = _bmm_operand(ctx, node.input[0], transpose=False)
        bt, b_view = _bmm_operand(ctx, node.input[1], transpose=True, allow_kn=True)
        b_nt, gemm = True, "gemm"
        if b_view is not None and len(b_view) == 3:  # v read in place as [g, k, n]
            b_view, b_nt, gemm = b_view[:2], False, "gemm_kn"
        if a_view is not None and b_view is not None:
            a_view, b_view = _pad_k(ctx.views.get(node.input[0]), a_view, b_view, b_nt)
        views = {i: v for i, v in enumerate((a_view, b_view)) if v is not None}
        rq_node, rq = ctx.epilogue_requant(node)
        split = None
        if rq_node is None:  # a Requantize behind the heads' merge: in the write-back
            split = requant_split(ctx, node.output[0])
            rq = split.rq if split is not None else None
        if dts == ("int8", "int8"):
            y = _emit_with_rq(
                ctx,
                lambda a, b, **kw: bmm_te(a, b, b_nt=b_nt, **kw),
                [a3, bt],
                rq,
                "int8_bmm",
                views=views,
                kernel=gemm,
            )
        else:
            sum_fn = rowsum_te if b_nt else colsum_te
            cs = ctx.bb.emit_te(
                lambda t: sum_fn(_read_view(t, *b_view) if b_view else t),
                bt,
                primfunc_name_hint="rowsum" if b_nt else "colsum",
                **({} if b_nt else {"primfunc_attrs": {"intq.kernel": "colsum"}}),
            )
            y = _emit_with_rq(
                ctx,
                lambda a, b, c, **kw: bmm_te(a, b, c, b_nt=b_nt, **kw),
                [a3, bt, cs],
                rq,
                "u8s8_bmm",
                views=views,
                kernel=gemm,
            )
        if split is not None:
            split.bind(ctx, y, (int(np.prod(sa[:-2])), int(sa[-2]), int(sb[-1])))
            return y
        out = ctx.bb.emit(relax.op.reshape(y, ctx.shapes[node.output[0]]))
        if rq_node is not None:
            ctx.bind_folded(rq_node, out)
        return out

    def softmax(self, ctx, node, attrs) -> relax.Expr | None:
        """IntSoftmax read only as the left operand of an attention GEMM, rows not a multiple of
        16 long (197 in DeiT): written with rows padded to 16 bytes (zeros after the row), so
        the GEMM's tile loads run on aligned rows; the probabilities are a `View` of that
        buffer. None (the generic lowering) otherwise."""
        shape = tuple(int(d) for d in ctx.shapes[node.output[0]])
        users = ctx.consumers.get(node.output[0], [])
        n = shape[-1]
        if (
            n % 16 == 0
            or len(shape) < 3
            or node.output[0] in ctx.graph_outputs
            or len(users) != 1
            or users[0].op_type != "IntMatMul"
            or list(users[0].input[:2]).index(node.output[0]) != 0
            or users[0].input[1] in ctx.consts
        ):
            return None
        padded = (*shape[:-1], -(-n // 16) * 16)
        out = ctx.emit_te(
            lambda x: te_ops.int_softmax(x, frac_bits=int(attrs["frac_bits"]), pad_to=padded[-1]),
            ctx.value(node.input[0]),
            name="int_softmax",
        )
        ctx.bind_view(node, View(out, shape, lambda i: list(i), padded))
        return out

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
        y = self._gemm(ctx, cols, n * oh * ow, w_kn, bias)  # [n*oh*ow, m]
        y = ctx.bb.emit(relax.op.reshape(y, (n, oh, ow, m)))
        return ctx.bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def _residual_add(ctx, rq_node, rows: int) -> tuple[Any, Any]:
    """(IntAdd node, (value [rows, n], Requantize or None, lo, hi, dtype)) when the output of a
    GEMM's folded `rq_node` is read only by an IntAdd whose other operand has the same shape and
    is already computed (or is a per-tensor Requantize, read only there, of a computed tensor):
    the add then runs in the GEMM's write-back. (None, None) otherwise."""
    add = ctx.sole_consumer(rq_node.output[0], "IntAdd")
    if add is None or len(add.input) != 2:
        return None, None
    shape = ctx.shapes[add.output[0]]
    other = add.input[1] if add.input[0] == rq_node.output[0] else add.input[0]
    if ctx.shapes[other] != shape or ctx.shapes[rq_node.output[0]] != shape:
        return None, None
    src, o_rq = other, None
    fr = ctx.fusable_requant(other)
    if fr is not None:
        src, o_rq = fr
    if src not in ctx.env:
        return None, None
    dt = out_dtype(lookup(add).attrs_of(add)).name
    lo, hi = dtype_bounds(dt)
    value = ctx.bb.emit(relax.op.reshape(ctx.value(src), (rows, int(shape[-1]))))
    return add, (value, o_rq, lo, hi, dt)


def _bmm_operand(ctx, name: str, transpose: bool, allow_kn: bool = False) -> tuple:
    """The batched-GEMM operand ``name`` ([*lead, m, k]) as a contiguous [prod(lead), m, k] tensor
    (``transpose``: [prod(lead), k, m]), with the view it is read through when it is one
    (`lower.View`: (shape, index map), or (shape, index map, "kn") when ``allow_kn`` and the
    view is contiguous only along its last axis: the right operand is then read untransposed,
    [g, k, n]). When ``name`` is a per-tensor Requantize to int8 of a
    data movement (Gather / Transpose / Reshape: a q, k or v head cut out of the fused qkv
    projection's int32 output) that only this GEMM reads, one kernel reads the movement's source
    and writes the operand, Requantize applied, in the GEMM's layout; else a transposed operand
    is one copy kernel and a plain one is a reshape (no kernel). (Reading the movement inside the
    GEMM's tile loads instead was 3x slower for q.k^T at DeiT-Small batch 64 on the H100: int32
    gathers with the requantization on the critical path of every tile.)"""
    shape = [int(d) for d in ctx.shapes[name]]
    lead, (m, k) = shape[:-2], shape[-2:]
    g = int(np.prod(lead))
    hint = "operand_t" if transpose else "operand"
    view = ctx.views.get(name)
    if view is not None:  # a head inside the projection's output (lower.View)
        if transpose:
            op_shape = (g, k, m)
            index = lambda i: view.index([*_unflatten(i[0], lead), i[2], i[1]])  # noqa: E731
        else:
            op_shape = (g, m, k)
            index = lambda i: view.index([*_unflatten(i[0], lead), i[1], i[2]])  # noqa: E731
        if view.contiguous(len(shape) - (2 if transpose else 1)):  # tile loads run along it
            return view.source, (op_shape, index)
        if transpose and allow_kn and view.contiguous(len(shape) - 1):  # B read as [g, k, n]
            kn = lambda i: view.index([*_unflatten(i[0], lead), i[1], i[2]])  # noqa: E731
            return view.source, ((g, m, k), kn, "kn")
        copy = ctx.bb.emit_te(
            lambda t: _read_view(t, op_shape, index), view.source, primfunc_name_hint=hint
        )
        return copy, None
    fr = ctx.fusable_requant(name)
    if fr is None or fr[1][4] != "int8":
        x3 = ctx.bb.emit(relax.op.reshape(ctx.value(name), (g, m, k)))
        if not transpose:
            return x3, None
        return ctx.bb.emit_te(transpose_te, x3, primfunc_name_hint="operand_t"), None
    src, index = movement_source(ctx, fr[0])
    b, c, lo, hi, dt = fr[1]

    def view(t: te.Tensor) -> te.Tensor:
        def f(gg, i, kk):
            v = t(*index([*_unflatten(gg, lead), i, kk]))
            return te_ops.requant_expr(v, b, c, lo, hi, dt)

        if transpose:
            return te.compute((g, k, m), lambda gg, kk, i: f(gg, i, kk), name="operand_t")
        return te.compute((g, m, k), f, name="operand")

    return ctx.bb.emit_te(view, ctx.value(src), primfunc_name_hint=hint), None


def _unflatten(i, dims: list[int]) -> list:
    """Row-major multi-index over `dims` of the flat index `i`."""
    out = []
    for d in reversed(dims):
        out.insert(0, i % d)
        i = i // d
    return out


def _dense_input(ctx, name: str, rows: int, k: int) -> tuple[relax.Expr, Any]:
    """The dense layer's [rows, k] input: (value, None), or (buffer, (shape, index map)) when
    `name` is a view contiguous along k (e.g. the attention heads merged inside the
    probabilities.V output): the GEMM's tile loads then read it in place."""
    view = ctx.views.get(name)
    if view is not None and view.contiguous(len(view.shape) - 1):
        lead = list(view.shape[:-1])
        return view.source, ((rows, k), lambda i: view.index([*_unflatten(i[0], lead), i[1]]))
    return ctx.bb.emit(relax.op.reshape(ctx.value(name), (rows, k))), None


def _emit_with_rq(
    ctx,
    te_fn,
    args: list,
    rq,
    name: str,
    table=None,
    residual=None,
    rq2=None,
    views=None,
    kernel: str | None = "gemm",
) -> relax.Expr:
    """Emit `te_fn(*args, rq=..., [table=..., residual=..., rq2=...])`; per-column multipliers /
    shifts of `rq` / `rq2` and the 256-entry `table` (numpy, applied after `rq`) enter as
    constants; `residual` = (relax value, its Requantize or None, lo, hi, dtype) is added after
    `rq`. `views` maps an argument's position to (shape, index map): that argument is then a
    buffer read through the map (`lower.View`), e.g. a q head inside the qkv projection.
    `kernel`: the "intq.kernel" tag (None: an element-wise kernel left to FuseOps and dlight)."""
    views = views or {}
    per_channel = [r is not None and isinstance(r[0], np.ndarray) for r in (rq, rq2)]
    extra = []
    for r, pc in zip((rq, rq2), per_channel, strict=True):
        if pc:
            extra += [relax.const(r[0]), relax.const(r[1])]
    if table is not None:
        extra.append(relax.const(table.astype(np.int32)))  # 32-bit entries
    if residual is not None:
        extra.append(residual[0])
    n_args = len(args)

    def fn(*ts):
        rest, kw = list(ts[n_args:]), {}
        for key, r, pc in zip(("rq", "rq2"), (rq, rq2), per_channel, strict=True):
            if r is not None:
                kw[key] = (rest.pop(0), rest.pop(0), *r[2:]) if pc else r
        if table is not None:
            kw["table"] = (rest.pop(0), str(table.dtype))
        if residual is not None:
            kw["residual"] = (rest.pop(0), *residual[1:])
        operands = [
            _read_view(t, *views[i]) if i in views else t for i, t in enumerate(ts[:n_args])
        ]
        return te_fn(*operands, **kw)

    name += ("_rq" if rq is not None else "") + ("_pc" if per_channel[0] else "")
    name += "_split" if rq2 is not None else ""
    name += "_table" if table is not None else ""
    name += "_add" if residual is not None else ""
    attrs = {"primfunc_attrs": {"intq.kernel": kernel}} if kernel else {}
    return ctx.bb.emit_te(fn, *args, *extra, primfunc_name_hint=name, **attrs)


def _chunked(index, kc: int):
    """A [rows, K] view's index map as one over [rows, S, K / S] (split-K chunks of `kc`)."""
    return lambda i: index([i[0], i[1] * kc + i[2]])


def _read_view(t: te.Tensor, shape, index, valid=None) -> te.Tensor:
    """A compute reading buffer `t` through `index` (inlined into the GEMM's tile loads); where
    `valid(i)` is false, zero."""
    if valid is None:
        return te.compute(tuple(shape), lambda *i: t(*index(list(i))), name="view")
    zero = tirx.const(0, t.dtype)
    return te.compute(
        tuple(shape),
        lambda *i: tirx.if_then_else(valid(list(i)), t(*index(list(i))), zero),
        name="view",
    )


def _pad_k(a_src, a_view, b_view, b_nt: bool) -> tuple:
    """When the left operand is a view of a buffer whose rows are padded (the probabilities,
    `CudaKernels.softmax`), run the GEMM over the padded k: the left operand is read whole rows
    (its pad is zeros) and the right one is zero past the real k. The tile loads are then
    predicated per 16 bytes, not per byte, and vectorise. Unchanged views otherwise."""
    if a_src is None or a_src.shape[:-1] != a_src.source_shape[:-1]:
        return a_view, b_view
    k, kp = a_src.shape[-1], a_src.source_shape[-1]
    if kp <= k:
        return a_view, b_view
    (g, m, _), lead = a_view[0], list(a_src.shape[:-2])
    a_pad = ((g, m, kp), lambda i: [*_unflatten(i[0], lead), i[1], i[2]])
    shape, index = b_view[:2]
    ax = 2 if b_nt else 1  # k's position in the right operand: [g, n, k] or [g, k, n]

    def clamped(i):
        i = list(i)
        i[ax] = tirx.min(i[ax], k - 1)
        return index(i)

    padded = list(shape)
    padded[ax] = kp
    return a_pad, (tuple(padded), clamped, lambda i: i[ax] < k)


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


def nvcc_fatbin(code: str, arch: str, nvcc: str = "nvcc") -> bytes:
    """`compat.nvcc_fatbin` with the PTX kept (newer GPUs can JIT it), errors as LoweringError."""
    try:
        return compat.nvcc_fatbin(code, arch, nvcc, ptx=True)
    except FileNotFoundError as e:
        raise LoweringError(f"cuda-int8 needs nvcc to compile kernels ({nvcc!r})") from e
    except RuntimeError as e:
        raise LoweringError(str(e)) from e


def check_cuda_compiles(code: str, arch: str) -> bool:
    """Compile the generated CUDA C with nvcc for ``arch`` at build, when nvcc is on PATH, so that
    an error (e.g. a kernel over the 48 KiB static shared-memory limit) fails the compile here
    rather than the load on the GPU machine. TVM 0.27 compiles CUDA only when a module is loaded
    (``tvm_callback_cuda_compile`` is called by the CUDA runtime, not by the compiler). Returns
    False when nvcc is absent (nothing checked); raises LoweringError when nvcc rejects it."""
    import shutil

    if not shutil.which("nvcc"):
        return False
    nvcc_fatbin(code, arch)
    return True


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
