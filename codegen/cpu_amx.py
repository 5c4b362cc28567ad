"""cpu-int8 GEMM kernels on Intel AMX-INT8 (Sapphire Rapids and later).

One AMX instruction, ``tdpbssd`` (s8 x s8) or ``tdpbusd`` (u8 x s8), computes
C[16, 16] int32 += A[16, 64] . B[64, 16] with exact int32 sums (no saturation), B held in the
VNNI layout B[16 k-quads][16 columns][4] (row kq of the tile = 64 bytes: column j's four k).

Kernel (`gemm_amx_func`): y[g, i, j] = epilogue(sum_k A[g, i, k] B[g, k, j] + bias[j]), the
epilogue being the Requantize stages folded in, applied in turn (`fixedpoint.requantize_dyadic`,
the reference's own formula), or none. Where every stage's shifts are 33..62 (the usual case)
the epilogue runs in 16-lane int32 vectors from the products' high halves
(`fixedpoint.requantize_dyadic_hi32`, the same values; on the Xeon DeiT-Small b1 0.978 and
1/1.023 of the int64 form's time). B is a constant packed at compile time
(`pack_weight_amx`: dense layers, one B for every g) or a tensor packed per call inside the
kernel (batched matmul). A, B and y are flat buffers addressed through a `Layout` (affine in g's
digits, the row and the column), so an operand can be a view inside another tensor (a q head
inside the qkv projection's output) and y can be written in another tensor's layout (the
merged heads).

Register use (one configuration, every tile 16 rows x 64 bytes): C tiles 0-3 hold a 32 x 32
output block, A tiles 4-5 its two 16-row slices, B tiles 6-7 its two 16-column slices; per
64-deep k-step two A loads, two B loads and four tile multiplies, each load issued just before
the first multiply that needs it. A dense GEMM's C starts from the bias (a stride-0 tile
load), so the epilogue's product is int32 x int32; a batched matmul's from zero. A task is one
32-row block of one g and a chunk of up to 8 32-column blocks (a loop); the parallel loop runs
at most 32 runs of consecutive tasks, each loading the tile configuration once. Per output block
a task runs the k loop (prefetching the next block's B rows) and stores C to one of two
[32, 32] int32 buffers; a block's epilogue is issued after the next block's multiplies, so
vector and tile work overlap. Where K is deep (Kp > 512 bytes) a task runs K in passes of 8
k-steps over its blocks (`k_chunk_steps`), each block's partial sums kept in a per-task
accumulator between passes, so one pass's A rows (16 KB) stay in L1. A last row block of at
most 16 rows runs as half a block (A tile 4, C tiles 0-1).

Padding without copies: A is read in place, rows of 64 bytes at the layout's row stride. A
k-step past K reads bytes after the row and a row past M later rows: both meet zero rows of the
packed B (B is zero for k >= K) or land in output rows that are never written, so they cannot
change a result. Only a block whose reads would pass the end of A's buffer copies its rows to a
zero-padded [32, Kp] buffer first.

`emulate=True` builds the same kernel with each tile instruction replaced by TIR loops over a
tile register file in memory (same addresses, same arithmetic): it runs on any CPU, so the
kernel's indexing is tested bit for bit where there is no AMX. The process must be granted AMX
state by the kernel before real tile instructions run (`compat.enable_amx`; Linux 5.16+).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from intq.codegen import te_ops

TILE_ROWS = 16
TILE_BYTES = 64  # bytes per tile row: 64 int8 along K, or 16 int32 along N
BLOCK = 32  # output block: 2 x 2 C tiles
KSTEP = 64
VEC = 16  # int32 lanes of an epilogue vector (a zmm)
C_TILES, A_TILES, B_TILES = (0, 1, 2, 3), (4, 5), (6, 7)
# C tile t = A tile (its row half) x B tile (its column half); its corner in the 32 x 32 block
DOTS = ((0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7))
CORNERS = ((0, 0, 0), (1, 0, 16), (2, 16, 0), (3, 16, 16))
MAX_PER, MIN_TASKS = 8, 16  # column blocks per task (at most), tasks per kernel (at least)
TASK_GROUPS = 32  # parallel iterations (runs of tasks) per kernel, at most
K_CHUNK = 8  # k-steps (512 bytes of K) per pass over a task's blocks when K is deep
K_CHUNK_ABOVE = 512  # Kp above which the task's blocks run K in chunks (A's 32 rows > 16 KB)


def round_up(a: int, b: int) -> int:
    """a rounded up to a multiple of b."""
    return (a + b - 1) // b * b


def pack_weight_amx(w_kn: np.ndarray) -> np.ndarray:
    """int8 W[K, N] -> Wp[Np/16, Kp/4, 16, 4], Kp = K rounded up to 64, Np to 32, zero padded:
    Wp[nb, kq, j, q] = W[4 kq + q, 16 nb + j]."""
    k, n = w_kn.shape
    kp, np_ = round_up(k, KSTEP), round_up(n, BLOCK)
    wpad = np.zeros((kp, np_), np.int8)
    wpad[:k, :n] = w_kn
    return np.ascontiguousarray(wpad.reshape(kp // 4, 4, np_ // 16, 16).transpose(2, 0, 3, 1))


# ----------------------------------------------------------------------------------------------
# Tile instructions: real (LLVM's AMX intrinsics) or emulated (TIR loops, any CPU)
# ----------------------------------------------------------------------------------------------


class _Tiles:
    """Emits the tile instructions the kernel uses. Memory operands are (flat 1-D buffer,
    element offset, row stride in elements), rows of 64 bytes."""

    def __init__(self, a_dtype: str, emulate: bool) -> None:
        self.a_dtype, self.emulate = a_dtype, emulate
        self.mul = "tdpbssd" if a_dtype == "int8" else "tdpbusd"

    @staticmethod
    def _intrin(name: str, *args) -> None:
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86." + name, *args))

    def configure(self) -> None:
        """Per task: ldtilecfg of palette 1, tiles 0-7 all 16 rows x 64 bytes (the 64-byte
        layout: byte 0 palette, bytes 16 + 2t the row width of tile t (u16), byte 48 + t its
        row count); emulated: the register file instead."""
        if self.emulate:
            self.c_reg = T.alloc_buffer((4, TILE_ROWS, 16), "int32")
            self.a_reg = T.alloc_buffer((2, TILE_ROWS, TILE_BYTES), self.a_dtype)
            self.b_reg = T.alloc_buffer((2, TILE_ROWS, TILE_BYTES), "int8")
            return
        cfg = T.alloc_buffer((64,), "uint8", align=64)
        with T.vectorized(0, 64) as i:
            T.buffer_store(cfg, T.uint8(0), [i])
        T.buffer_store(cfg, T.uint8(1), [0])
        for t in C_TILES + A_TILES + B_TILES:
            T.buffer_store(cfg, T.uint8(TILE_BYTES), [16 + 2 * t])
            T.buffer_store(cfg, T.uint8(TILE_ROWS), [48 + t])
        self._intrin("ldtilecfg", T.address_of(cfg[0]))

    def prefetch(self, flat, offset) -> None:
        """Prefetch the 64-byte line holding flat[offset] into every cache level (a hint: no
        effect on results; none when emulated)."""
        if not self.emulate:
            ptr = T.address_of(flat[offset])
            T.evaluate(
                T.call_llvm_intrin(
                    "void", "llvm.prefetch.p0", ptr, T.int32(0), T.int32(3), T.int32(1)
                )
            )

    def release(self) -> None:
        if not self.emulate:
            self._intrin("tilerelease")

    def zero(self, t: int) -> None:
        if not self.emulate:
            self._intrin("tilezero", T.int8(t))
            return
        with T.serial(0, TILE_ROWS) as r:
            with T.vectorized(0, 16) as j:
                T.buffer_store(self.c_reg, T.int32(0), [t, r, j])

    def load(self, t: int, flat, offset, stride) -> None:
        """Tile t = 16 rows of 64 bytes from flat[offset + r * stride] (stride in elements of
        flat: bytes for A / B tiles, int32 for C tiles; 0 repeats one row)."""
        if not self.emulate:
            nbytes = 4 if t in C_TILES else 1
            ptr = T.address_of(flat[offset])
            self._intrin("tileloadd64", T.int8(t), ptr, T.int64(stride * nbytes))
            return
        if t in C_TILES:
            with T.serial(0, TILE_ROWS) as r:
                with T.serial(0, 16) as j:
                    T.buffer_store(self.c_reg, flat[offset + r * stride + j], [t, r, j])
            return
        reg, i = (self.a_reg, t - A_TILES[0]) if t in A_TILES else (self.b_reg, t - B_TILES[0])
        with T.serial(0, TILE_ROWS) as r:
            with T.serial(0, TILE_BYTES) as c:
                T.buffer_store(reg, flat[offset + r * stride + c], [i, r, c])

    def dot(self, c: int, a: int, b: int) -> None:
        """C tile c += A tile a . B tile b."""
        if not self.emulate:
            self._intrin(self.mul, T.int8(c), T.int8(a), T.int8(b))
            return
        ai, bi = a - A_TILES[0], b - B_TILES[0]
        with T.serial(0, TILE_ROWS) as r:
            with T.serial(0, 16) as j:
                with T.serial(0, TILE_BYTES) as q:
                    prod = self.a_reg[ai, r, q].astype("int32") * self.b_reg[
                        bi, q // 4, j * 4 + q % 4
                    ].astype("int32")
                    T.buffer_store(self.c_reg, self.c_reg[c, r, j] + prod, [c, r, j])

    def store(self, t: int, flat, offset, stride) -> None:
        if not self.emulate:
            self._intrin("tilestored64", T.int8(t), T.address_of(flat[offset]), T.int64(stride * 4))
            return
        with T.serial(0, TILE_ROWS) as r:
            with T.serial(0, 16) as j:
                T.buffer_store(flat, self.c_reg[t, r, j], [offset + r * stride + j])


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


def _task_split(row_blocks: int, nblocks: int) -> int:
    """32-column blocks per task (a loop, epilogues pipelined one block behind; the task's A
    rows stay in L1 across them): the most, up to MAX_PER and dividing the count, that still
    leaves at least MIN_TASKS tasks (`row_blocks` = G x 32-row blocks)."""
    for per in range(min(MAX_PER, nblocks), 1, -1):
        if nblocks % per == 0 and row_blocks * (nblocks // per) >= MIN_TASKS:
            return per
    return 1


def k_chunk_steps(kp: int) -> int:
    """k-steps per pass over a task's blocks: all of them (one pass) up to K_CHUNK_ABOVE bytes
    of K, else K_CHUNK. In one pass a task reads its 32 A rows once per output block; at
    Kp = 1536 they are 48 KB, L1's size, so every block re-reads them from L2 beside its B, and
    the kernel waits on L2 (fc2 took 1.7x fc1's time for the same MACs on the Xeon). In chunks
    the A rows of one chunk (16 KB) stay in L1 across the blocks, whose partial sums wait in a
    per-task accumulator (4 KB a block)."""
    nk = kp // KSTEP
    return nk if kp <= K_CHUNK_ABOVE else K_CHUNK


def _task_groups(ntasks: int) -> int:
    """Parallel iterations, each a run of consecutive tasks: one tile configuration and one
    set of buffers per run, not per task. TASK_GROUPS runs keep 2 to 16 threads balanced."""
    return min(ntasks, TASK_GROUPS)


def _flat(buf, size: int):
    """A 1-D view of `buf` (same data)."""
    return T.decl_buffer((size,), buf.dtype, data=buf.data)


@dataclass(frozen=True)
class Layout:
    """Where element (g, i, j) of a [G, rows, cols]-shaped operand lives in a flat buffer of
    `size` elements: base + sum_d c_d * digit_d(g) + i * row + j * col, the digits of g over
    `gdims` ((extent, c) pairs, outermost first). A plain contiguous tensor is `dense`; a view
    (e.g. a q head inside the qkv projection's output) is read in place through its layout."""

    size: int
    base: int
    gdims: tuple[tuple[int, int], ...]
    row: int
    col: int

    @staticmethod
    def dense(g: int, rows: int, cols: int) -> Layout:
        return Layout(g * rows * cols, 0, ((g, rows * cols),), cols, 1)

    def g_offset(self, gg):
        off, rest = tirx.const(self.base, "int32"), gg
        for extent, c in reversed(self.gdims):
            off = off + (rest % extent) * c
            rest = rest // extent
        return off


def epilogue_in_int32(rqs, enabled: bool = True) -> bool:
    """Whether a kernel's epilogue requantizes in int32 lanes (te_ops.requant_hi32_lanes, where
    te_ops.hi32_ok)."""
    return enabled and te_ops.hi32_ok(rqs)


def epilogue_arrays(rqs, n: int, hi32: bool) -> list[np.ndarray]:
    """The int32 arrays a kernel takes for its per-column stages, in order: each stage's
    te_ops.requant_arrays (N each; with `hi32` b and its shifts, padded to whole 32-column
    blocks)."""
    out = []
    for rb, rc, *_ in rqs:
        if isinstance(rb, np.ndarray):
            out += te_ops.requant_arrays(rb, rc, n, hi32, round_up(n, BLOCK))
    return out


def gemm_amx_func(
    g: int,
    m: int,
    k: int,
    n: int,
    a_dtype: str,
    *,
    packed_b: bool,
    bias: bool,
    rqs: tuple = (),
    a_layout: Layout | None = None,
    b_layout: Layout | None = None,
    y_layout: Layout | None = None,
    name: str = "int8_gemm_amx",
    emulate: bool = False,
    probe: str = "",
    prefetch: bool = True,
    hi32_rq: bool = True,
    k_chunk: int | None = None,
    softmax: int | None = None,
) -> tirx.PrimFunc:
    """PrimFunc y[g] = epilogue(A[g] @ B[g] + bias), A[g]: M x K, B[g]: K x N, for g < G.

    Parameters in order: a (a_dtype int8 / uint8), flat, laid out by a_layout (default: dense
    [G, M, K]; K must be its contiguous axis); b: packed_b -> Wp (pack_weight_amx, shared by
    every g), else int8, flat, by b_layout (default dense [G, K, N]); y flat, by y_layout
    (default dense [G, M, N]; N contiguous); bias int32[Np] (N rounded up
    to 32, zero padded: C tiles start from it) if `bias`;
    for each stage of `rqs` whose multiplier / shift are arrays, its `epilogue_arrays`; then y.
    rqs: the Requantizes applied in order in the epilogue, each (b, c, lo, hi, dtype) with b, c
    ints (per tensor) or int32 arrays along N (per column); () = int32 out.
    probe (benchmarks/amx_probe.py only; wrong results): "no_epilogue" drops the epilogue,
    "compute_only" also three of the four C stores, to time the parts of the kernel apart.
    prefetch: software-prefetch each next block's B (see compute) - a hint, same results.
    hi32_rq: requantize in int32 vector lanes from the products' high halves where every stage
    passes fixedpoint.hi32_applies (te_ops.requant_hi32_lanes; the same results).
    k_chunk: k-steps per pass over a task's blocks (default `k_chunk_steps`); the sums are the
    same exact int32 sums in any order.
    softmax: IntSoftmax (frac_bits) over each output row, fused (attention's Q K^T): a task
    then covers whole rows, its epilogues write int32 rows into a task buffer, and the task
    ends with Shiftmax over its rows (te_ops' element expressions, int_softmax's values) and
    writes uint8 probabilities; `rqs` must be per-tensor with an int32 result.
    """
    kp, np_ = round_up(k, KSTEP), round_up(n, BLOCK)
    mblocks, nblocks = round_up(m, BLOCK) // BLOCK, np_ // BLOCK
    per = _task_split(g * mblocks, nblocks) if softmax is None else nblocks  # whole rows
    if softmax is not None and (
        (rqs and rqs[-1][4] != "int32") or any(isinstance(r[0], np.ndarray) for r in rqs)
    ):
        raise ValueError("AMX GEMM with softmax: per-tensor Requantizes to int32 only")
    nk = kp // KSTEP
    # one block per task reads its A rows once whatever K is: passes would only add acc traffic
    kc = nk if per == 1 else min(nk, k_chunk or k_chunk_steps(kp))
    kpasses = (nk + kc - 1) // kc  # passes over the task's blocks; the last one runs epilogues
    nchunks = nblocks // per
    hi32 = epilogue_in_int32(rqs, hi32_rq)
    out_dtype = "uint8" if softmax is not None else (rqs[-1][4] if rqs else "int32")
    tiles = _Tiles(a_dtype, emulate)
    al = a_layout or Layout.dense(g, m, k)
    bl = b_layout or Layout.dense(g, k, n)
    yl = y_layout or Layout.dense(g, m, n)
    if al.col != 1 or yl.col != 1:
        raise ValueError("AMX GEMM: A must be contiguous along K and y along N")
    bp_shape = (np_ // 16, kp // 4, 16, 4) if packed_b else (g, np_ // 16, kp // 4, 16, 4)
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            a_flat = T.arg("a", T.buffer((al.size,), a_dtype))
            b = T.arg("b", T.buffer(bp_shape if packed_b else (bl.size,), "int8"))
            bias_t = T.arg("bias", T.buffer((np_,), "int32")) if bias else None
            # rqs with their per-column arrays replaced by buffer parameters (epilogue_arrays);
            # with hi32 each stage's shift is c - 32
            stages = []
            for i, (rb, rc, lo, hi, dt) in enumerate(rqs):
                if isinstance(rb, np.ndarray):
                    size = np_ if hi32 else n
                    rb = T.arg(f"rq{i}_b", T.buffer((size,), "int32"))
                    rc = T.arg(f"rq{i}_{'sh' if hi32 else 'c'}", T.buffer((size,), "int32"))
                elif hi32:
                    rc = te_ops.hi32_sh(rb, rc)
                stages.append((rb, rc, lo, hi, dt))
            y = T.arg("y", T.buffer((yl.size,), out_dtype))
            rq = (stages, hi32)
            if packed_b:
                bp = b
            else:
                bp = T.alloc_buffer(bp_shape, "int8", align=64)
                _pack_b(bp, b, bl, g, k, n, kp, np_)
            bp_flat = _flat(bp, int(np.prod(bp_shape)))
            b_stride_g = 0 if packed_b else np_ * kp  # bytes of one g's packed B
            ntasks = g * nchunks * mblocks
            groups = _task_groups(ntasks)
            with T.parallel(0, groups) as grp:
                tiles.configure()
                # two C buffers: block i's epilogue (vector code) runs after block i+1's tile
                # multiplies are issued, so the core overlaps the two
                cbuf = T.alloc_buffer((2, BLOCK, BLOCK), "int32", align=64)
                c_flat = _flat(cbuf, 2 * BLOCK * BLOCK)
                if kpasses > 1:  # each block's sums between passes over K
                    acc = T.alloc_buffer((per, BLOCK, BLOCK), "int32", align=64)
                    acc_flat = _flat(acc, per * BLOCK * BLOCK)
                if softmax is not None:  # the task's rows of scores, then of exponentials
                    sm = _SoftmaxRows(n, np_, softmax)

                def task_body(task) -> None:
                    """Task = (g, column chunk, 32-row block), row blocks fastest: a run of
                    consecutive tasks shares its B column chunk (on the Xeon 6 % faster than
                    chunks fastest, whose runs share A rows; docs/PERFORMANCE.md)."""
                    gg = task // (nchunks * mblocks)
                    nc = task // mblocks % nchunks
                    mb = task % mblocks
                    a_row0 = al.g_offset(gg) + mb * BLOCK * al.row  # the block's first A row
                    y_row0 = yl.g_offset(gg) + mb * BLOCK * yl.row
                    rows = tirx.min(BLOCK, m - mb * BLOCK)  # the block's rows inside M

                    def compute(
                        src, src_at, stride: int, nb, half: bool, ahead, ks, fresh, src_c, dst
                    ) -> None:
                        """Block nb's sums over k-steps ks = (lo, hi) -> dst = (flat buffer,
                        offset) of a [32, 32] int32 block; A row r at src[src_at + r * stride].
                        C starts from the bias (one row repeated) or 0 where `fresh` (True or
                        a condition), else from src_c (the sums of the earlier k-steps).
                        half: the block's first 16 rows only (C tiles 0-1, A tile 4). ahead (a
                        condition): also prefetch block nb + 1's B rows of each k-step (its 32
                        lines) while this block's multiplies run: a weight comes from L3 or
                        memory on its first use in a model run, and a tile load waits for all
                        its 16 lines."""
                        corners = CORNERS[:2] if half else CORNERS

                        def start() -> None:
                            for t, _, c in corners:
                                if bias_t is not None:
                                    tiles.load(t, bias_t, nb * BLOCK + c, 0)
                                else:
                                    tiles.zero(t)

                        def resume() -> None:
                            for t, r, c in corners:
                                tiles.load(t, src_c[0], src_c[1] + r * BLOCK + c, BLOCK)

                        if fresh is True:
                            start()
                        elif fresh is False:
                            resume()
                        else:
                            with T.If(fresh):
                                with T.Then():
                                    start()
                                with T.Else():
                                    resume()
                        with T.serial(ks[0], ks[1]) as kb:

                            def a_tile(i, kb=kb):
                                off = src_at + i * TILE_ROWS * stride + kb * KSTEP
                                tiles.load(A_TILES[i], src, off, stride)

                            def b_tile(i, kb=kb):
                                kq = (nb * 2 + i) * (kp // 4) + kb * TILE_ROWS
                                tiles.load(B_TILES[i], bp_flat, gg * b_stride_g + kq * 64, 64)

                            if prefetch:
                                with T.If(ahead):
                                    with T.Then():
                                        with T.serial(0, 2 * TILE_ROWS) as line:
                                            half_nb = (nb + 1) * 2 + line // TILE_ROWS
                                            kq = half_nb * (kp // 4) + kb * TILE_ROWS
                                            at = gg * b_stride_g + (kq + line % TILE_ROWS) * 64
                                            tiles.prefetch(bp_flat, at)
                            # loads interleaved with the multiplies that wait for them
                            a_tile(0)
                            b_tile(0)
                            tiles.dot(*DOTS[0])
                            b_tile(1)
                            tiles.dot(*DOTS[1])
                            if not half:
                                a_tile(1)
                                tiles.dot(*DOTS[2])
                                tiles.dot(*DOTS[3])
                        partial = dst[0] is not c_flat  # sums between passes: always stored
                        kept = 1 if probe == "compute_only" and not partial else 4
                        for t, r, c in corners[:kept]:
                            tiles.store(t, dst[0], dst[1] + r * BLOCK + c, BLOCK)

                    def epilogue(nb, buf: int) -> None:
                        if probe:
                            return
                        with T.serial(0, rows) as r:
                            if softmax is not None:  # into the task's rows (all 32 columns)
                                at = r * np_ + nb * BLOCK
                                _epilogue_row(sm.scores, cbuf, buf, r, at, nb * BLOCK, np_, *rq)
                            else:
                                y_at = y_row0 + r * yl.row + nb * BLOCK
                                _epilogue_row(y, cbuf, buf, r, y_at, nb * BLOCK, n, *rq)

                    def blocks(src, src_at, stride: int, half: bool) -> None:
                        """The task's `per` output blocks (a loop: the code size does not grow
                        with `per`); A row r of the block at src[src_at + r * stride]. Deep K
                        runs in kpasses passes over the blocks, k-steps [p kc, (p + 1) kc):
                        the earlier passes leave each block's sums in acc, the last one stores
                        to a C buffer and runs the epilogues one block behind."""
                        last = ((kpasses - 1) * kc, nk)
                        if kpasses > 1:
                            with T.serial(0, kpasses - 1) as p:
                                with T.serial(0, per) as i:
                                    at = (acc_flat, i * BLOCK * BLOCK)
                                    ks = (p * kc, p * kc + kc)
                                    ahead = i + 1 < per
                                    nb = nc * per + i
                                    run = dict(ks=ks, fresh=p == 0, src_c=at, dst=at)
                                    compute(src, src_at, stride, nb, half, ahead, **run)
                        with T.serial(0, per) as i:
                            acc_at = (acc_flat, i * BLOCK * BLOCK) if kpasses > 1 else None
                            c_at = (c_flat, i % 2 * BLOCK * BLOCK)
                            ahead = i + 1 < per
                            run = dict(ks=last, fresh=kpasses == 1, src_c=acc_at, dst=c_at)
                            compute(src, src_at, stride, nc * per + i, half, ahead, **run)
                            with T.If(i > 0):
                                with T.Then():
                                    epilogue(nc * per + i - 1, (i + 1) % 2)
                        epilogue(nc * per + per - 1, (per - 1) % 2)

                    def place(half: bool) -> None:
                        """A read in place where every byte the tiles read lies inside it (the
                        block's last row, k-steps up to kp), else from a zero-padded copy."""
                        last_row = (TILE_ROWS if half else BLOCK) - 1
                        with T.If(a_row0 + last_row * al.row + kp <= al.size):
                            with T.Then():
                                blocks(a_flat, a_row0, al.row, half)
                            with T.Else():
                                panel = T.alloc_buffer((BLOCK, kp), a_dtype, align=64)
                                with T.serial(0, BLOCK) as r:
                                    ok = mb * BLOCK + r < m
                                    _padded_row(panel, a_flat, r, a_row0 + r * al.row, ok, k, kp)
                                blocks(_flat(panel, BLOCK * kp), 0, kp, half)

                    if 0 < m % BLOCK <= TILE_ROWS:  # the last block of each g: half a block
                        with T.If(mb == mblocks - 1):
                            with T.Then():
                                place(True)
                            with T.Else():
                                place(False)
                    else:
                        place(False)
                    if softmax is not None and not probe:
                        sm.rows(y, y_row0, yl.row, rows)

                with T.serial(grp * ntasks // groups, (grp + 1) * ntasks // groups) as task:
                    task_body(task)
                tiles.release()
    return ib.get()


class _SoftmaxRows:
    """Shiftmax over the rows of a task's [32, Np] int32 scores (columns >= N unused), each
    row's uint8 probabilities written to y: te_ops.int_softmax's stages (row max, the
    exponentials kept per row, their sum, the reciprocal, the outputs) and element expressions,
    so the values are the same; LLVM vectorizes the loops."""

    def __init__(self, n: int, np_: int, frac_bits: int) -> None:
        self.n, self.np_, self.frac_bits = n, np_, frac_bits
        self.narrow = te_ops.softmax_narrow(n, frac_bits)
        self.acc = "int32" if self.narrow else "int64"
        self.scores = _flat(T.alloc_buffer((BLOCK, np_), "int32", align=64), BLOCK * np_)
        self.exps = T.alloc_buffer((np_,), self.acc, align=64)
        self.mx = T.alloc_buffer((1,), "int32")
        self.sum = T.alloc_buffer((1,), self.acc)

    def rows(self, y, y_row0, y_row: int, nrows) -> None:
        n, sc, e, mxb, sb, fb = self.n, self.scores, self.exps, self.mx, self.sum, self.frac_bits
        with T.serial(0, nrows) as r:
            at = r * self.np_
            T.buffer_store(mxb, sc[at], [0])
            with T.serial(1, n) as j:
                T.buffer_store(mxb, tirx.max(mxb[0], sc[at + j]), [0])
            with T.serial(0, n) as j:
                v = te_ops.softmax_exp_expr(sc[at + j], mxb[0], fb, self.narrow, "int32")
                T.buffer_store(e, v.astype(self.acc), [j])
            T.buffer_store(sb, tirx.const(0, self.acc), [0])
            with T.serial(0, n) as j:
                T.buffer_store(sb, sb[0] + e[j], [0])
            recip = te_ops.softmax_recip_expr(sb[0], self.acc)
            with T.serial(0, n) as j:
                T.buffer_store(y, te_ops.softmax_out_expr(e[j], recip), [y_row0 + r * y_row + j])


def _pack_b(bp, b_flat, bl: Layout, g: int, k: int, n: int, kp: int, np_: int) -> None:
    """bp[g, nb, kq, j, q] = B[g, 4 kq + q, 16 nb + j] (B read through its layout), zero where
    k >= K or the column >= N (zero k-rows are what make the in-place A reads safe). Where the
    four k-rows and 16 columns are all inside B, as vectors: B contiguous along N: four 16-byte
    row loads interleaved by one shuffle; contiguous along K: sixteen 4-byte column loads; else
    (and at the edges) element by element."""
    zero = tirx.const(0, "int8")
    nbs = np_ // 16
    bp_flat = _flat(bp, g * nbs * kp * 16)
    with T.parallel(0, g * nbs) as t:
        gg, nb = t // nbs, t % nbs
        base = bl.g_offset(gg)

        def at(kk, col):
            return base + kk * bl.row + col * bl.col

        with T.serial(0, kp // 4) as kq:
            out = ((gg * nbs + nb) * (kp // 4) + kq) * 64
            edge = tirx.Not(tirx.all(kq * 4 + 3 < k, nb * 16 + 16 <= n))
            if bl.col == 1:
                rows = [b_flat[tirx.Ramp(at(kq * 4 + q, nb * 16), 1, 16)] for q in range(4)]
                fast = tirx.Shuffle(rows, [q * 16 + j for j in range(16) for q in range(4)])
            elif bl.row == 1:
                cols = [b_flat[tirx.Ramp(at(kq * 4, nb * 16 + j), 1, 4)] for j in range(16)]
                fast = tirx.Shuffle(cols, list(range(64)))
            else:
                fast, edge = None, tirx.const(True, "bool")
            with T.If(edge):
                with T.Then():
                    with T.serial(0, 4) as q:
                        with T.serial(0, 16) as j:
                            kk, col = kq * 4 + q, nb * 16 + j
                            v = b_flat[at(tirx.min(kk, k - 1), tirx.min(col, n - 1))]
                            ok = tirx.all(kk < k, col < n)
                            T.buffer_store(
                                bp_flat, tirx.if_then_else(ok, v, zero), [out + j * 4 + q]
                            )
                if fast is not None:
                    with T.Else():
                        T.buffer_store(bp_flat, fast, [tirx.Ramp(out, 1, 64)])


def _padded_row(dst, a_flat, r, at, ok, k: int, kp: int) -> None:
    """dst[r, :] = a_flat[at : at + k] zero padded to kp columns; zeros when not `ok`."""
    zero = tirx.const(0, dst.dtype)
    with T.If(ok):
        with T.Then():
            with T.serial(0, k // 16) as ko:
                with T.vectorized(0, 16) as ki:
                    T.buffer_store(dst, a_flat[at + ko * 16 + ki], [r, ko * 16 + ki])
            with T.serial(k // 16 * 16, kp) as kk:
                v = a_flat[at + tirx.min(kk, k - 1)]
                T.buffer_store(dst, tirx.if_then_else(kk < k, v, zero), [r, kk])
        with T.Else():
            with T.serial(0, kp // 16) as ko:
                with T.vectorized(0, 16) as ki:
                    T.buffer_store(dst, zero, [r, ko * 16 + ki])


def _epilogue_row(y, cbuf, buf: int, r, y_at, col0, n: int, stages, hi32: bool) -> None:
    """y[y_at : y_at + 32] = the Requantize `stages` applied in turn to cbuf[buf, r, :] (the
    bias is already in C; columns col0 .. col0 + 31), vectorized: with `hi32` in 16-lane int32
    vectors by te_ops.requant_hi32_lanes (each stage's shift is c - 32, its arrays padded to a
    whole block), else by the int64 formula. A block reaching past N computes its 32 values into
    a small buffer (int64 formula: channel indices clamped) and copies the ones inside N."""

    def value(j, clamp: bool):
        col = tirx.min(col0 + j, n - 1) if clamp else col0 + j
        v = cbuf[buf, r, j]
        for b, c, lo, hi, dt in stages:
            v = te_ops.requant_expr(v, b, c, lo, hi, dt, ch=col)
        return v

    def store(dst, at, clamp: bool) -> None:
        if not hi32:
            with T.vectorized(0, BLOCK) as j:
                T.buffer_store(dst, value(j, clamp), [at + j])
            return
        for j0 in range(0, BLOCK, VEC):
            v = cbuf[buf, r, tirx.Ramp(j0, 1, VEC)]
            cols = tirx.Ramp(col0 + j0, 1, VEC)
            for b, sh, lo, hi, _ in stages:
                bv, shv = (t if isinstance(t, int) else t[cols] for t in (b, sh))
                v = te_ops.requant_hi32_lanes(v, bv, shv, lo, hi, VEC)
            T.buffer_store(dst, v.astype(f"{y.dtype}x{VEC}"), [tirx.Ramp(at + j0, 1, VEC)])

    if n % BLOCK == 0:
        store(y, y_at, False)
        return
    with T.If(col0 + BLOCK <= n):
        with T.Then():
            store(y, y_at, False)
        with T.Else():
            ebuf = T.alloc_buffer((BLOCK,), y.dtype, align=64)
            store(ebuf, 0, True)
            with T.serial(0, n - col0) as j:
                T.buffer_store(y, ebuf[j], [y_at + j])
