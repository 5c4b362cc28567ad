"""cpu-int8 byte-table lookup with AVX-512 VBMI: y = table[x] for 8-bit x and 8-bit entries.

Used for tabulated elementwise functions of an int8 input (ShiftGELU with its following
Requantize composed in, `lower.gelu_table`). A generic lookup gathers each entry (`vpgatherdd`,
16 lanes, 32-bit entries). Here the 256-entry table sits in four zmm registers and 64 inputs at a
time are looked up by two `vpermi2b` (each picks bytes from a 128-byte half of the table by the
index's low 7 bits) and one byte blend on the index's bit 7:

    u = x as a byte (int8 x: its two's-complement bits; uint8 x: itself)
    y = (u < 128 ? vpermi2b(T0, u, T1) : vpermi2b(T2, u, T3)) = T[u]
    T = the table reordered by raw byte (`byte_order`), Tq its q-th 64 bytes; vpermi2b(a, u, b)
    = (u & 64 ? b : a)[u & 63], lane by lane.

The last `size % 64` elements are looked up one by one. `emulate=True` replaces the two
`vpermi2b` by their definition in TIR (res[i] = (u[i] & 64 ? b : a)[u[i] & 63]), so the kernel's
indexing is tested bit for bit on any CPU.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

LANES = 64  # bytes per zmm
CHUNK = 4096  # elements per parallel task
VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"


def byte_order(table: np.ndarray, in_dtype: str) -> np.ndarray:
    """The 256 entries of `table` (indexed by x + 128 for int8 x, by x for uint8 x) reordered by
    x's raw byte u, as int8 bytes (uint8 entries keep their bits)."""
    u = np.arange(256)
    x = u.astype(np.uint8).view(np.int8).astype(np.int64) + 128 if in_dtype == "int8" else u
    return np.asarray(table)[x].astype(np.int64).astype(np.uint8).view(np.int8)


def byte_table_func(
    size: int, in_dtype: str, out_dtype: str, name: str = "byte_table", emulate: bool = False
) -> tirx.PrimFunc:
    """PrimFunc(x: in_dtype[size], t: int8[256] (byte_order), y: out_dtype[size]), y = t[u(x)];
    in_dtype / out_dtype: int8 or uint8."""
    if in_dtype not in ("int8", "uint8") or out_dtype not in ("int8", "uint8"):
        raise ValueError(f"byte table: 8-bit input and output only, got {in_dtype} -> {out_dtype}")
    nvec = size // LANES
    ntasks = (nvec * LANES + CHUNK - 1) // CHUNK
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.arg("x", T.buffer((size,), in_dtype))
            t = T.arg("t", T.buffer((256,), "int8"))
            y = T.arg("y", T.buffer((size,), out_dtype))
            vec = f"int8x{LANES}"

            def permute(a, idx, b):
                return T.call_llvm_pure_intrin(vec, T.llvm_lookup_intrinsic_id(VPERMI2B), a, idx, b)

            if ntasks:
                with T.parallel(0, ntasks) as task:
                    halves = [t[tirx.Ramp(q * LANES, 1, LANES)] for q in range(4)]
                    first = task * (CHUNK // LANES)
                    with T.serial(first, tirx.min(first + CHUNK // LANES, nvec)) as v:
                        at = tirx.Ramp(v * LANES, 1, LANES)
                        if emulate:
                            _emulated(t, x, y, v * LANES, out_dtype)
                        else:
                            u = x[at] if in_dtype == "int8" else T.reinterpret(vec, x[at])
                            lo = permute(halves[0], u, halves[1])
                            hi = permute(halves[2], u, halves[3])
                            zero = tirx.Broadcast(tirx.const(0, "int8"), LANES)
                            r = tirx.Select(u < zero, hi, lo)  # bit 7 of the byte
                            if out_dtype == "uint8":
                                r = T.reinterpret(f"uint8x{LANES}", r)
                            T.buffer_store(y, r, [at])
            with T.serial(nvec * LANES, size) as i:
                u = x[i].astype("int32") & 255
                T.buffer_store(y, t[u].astype(out_dtype), [i])
    return ib.get()


def _emulated(t, x, y, at, out_dtype: str) -> None:
    """The vector step lane by lane, each vpermi2b by its definition: of the table half picked by
    bit 7 of u, (u & 64 ? second : first) 64-byte quarter, byte u & 63."""
    with T.serial(0, LANES) as i:
        u = x[at + i].astype("int32") & 255
        half, quarter = u >> 7, (u >> 6) & 1
        T.buffer_store(y, t[half * 128 + quarter * 64 + (u & 63)].astype(out_dtype), [at + i])
