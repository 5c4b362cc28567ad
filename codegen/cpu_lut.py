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
`vpermi2b` by their definition in TIR (res[i] = (u[i] & 64 ? b : a)[u[i] & 63]) on the same
quarter pairs and blend, so the table order, the pairs and the blend are tested bit for bit on
any CPU; the intrinsic's operand order itself only on a VBMI CPU (benchmarks/run_cases.py).
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


#: the 64-byte quarters of the table each vpermi2b picks from, (a, b): bytes (u & 64 ? b : a)
PAIRS = ((0, 1), (2, 3))


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
            if ntasks:
                with T.parallel(0, ntasks) as task:
                    first = task * (CHUNK // LANES)
                    with T.serial(first, tirx.min(first + CHUNK // LANES, nvec)) as v:
                        if emulate:
                            _emulated_step(t, x, y, v * LANES, out_dtype)
                        else:
                            _vector_step(t, x, y, v * LANES, in_dtype, out_dtype)
            with T.serial(nvec * LANES, size) as i:
                u = x[i].astype("int32") & 255
                T.buffer_store(y, t[u].astype(out_dtype), [i])
    return ib.get()


def _vector_step(t, x, y, at, in_dtype: str, out_dtype: str) -> None:
    """y[at : at + 64] by two vpermi2b (the quarters of PAIRS) and a blend on the sign bit."""
    vec = f"int8x{LANES}"
    quarter = [t[tirx.Ramp(q * LANES, 1, LANES)] for q in range(4)]  # hoisted by LLVM
    idx = tirx.Ramp(at, 1, LANES)
    u = x[idx] if in_dtype == "int8" else T.reinterpret(vec, x[idx])
    lo, hi = (
        T.call_llvm_pure_intrin(
            vec, T.llvm_lookup_intrinsic_id(VPERMI2B), quarter[a], u, quarter[b]
        )
        for a, b in PAIRS
    )
    r = tirx.Select(u < tirx.Broadcast(tirx.const(0, "int8"), LANES), hi, lo)  # u >= 128
    if out_dtype == "uint8":
        r = T.reinterpret(f"uint8x{LANES}", r)
    T.buffer_store(y, r, [idx])


def _emulated_step(t, x, y, at, out_dtype: str) -> None:
    """The same step lane by lane: each vpermi2b by its definition, (u & 64 ? b : a)[u & 63] for
    its PAIRS quarters, then the same choice on the sign bit (tests the pairs and the blend)."""
    with T.serial(0, LANES) as i:
        u = x[at + i].astype("int32") & 255

        def permi2b(pair):
            a, b = pair
            return t[tirx.Select((u & 64) != 0, b * LANES, a * LANES) + (u & 63)]

        lo, hi = (permi2b(pair) for pair in PAIRS)
        T.buffer_store(y, tirx.Select(u >= 128, hi, lo).astype(out_dtype), [at + i])
