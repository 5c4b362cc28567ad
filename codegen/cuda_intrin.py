"""An integer zero-fill for int32 WMMA accumulators, registered over TVM's own.

TVM's ``wmma_fill_16x16x16_s32`` tensor intrinsic fills the int32 accumulator fragment with the
literal ``T.float32(0)``, so every tensor-core GEMM would carry a float constant into the TIR and
``fill_fragment(acc, 0.000000e+00f)`` into the CUDA C. This file re-registers that name (dlight's
int8 rule looks it up by name) with the same description and an ``int32`` zero. It needs a real
source file: the TVMScript parser reads the functions' source.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from intq.codegen import compat

compat.import_tvmscript_module("tvm.s_tir.tensor_intrin.cuda")  # TVM's intrinsics first

FILL_S32 = "wmma_fill_16x16x16_s32"
_M = _N = _K = 16


def _fragment_index(buf, stride):
    """Index of the 16x16 fragment that starts at ``buf``'s element offset in its parent tile
    (row-major tiles of ``stride`` elements per row)."""
    return (buf.elem_offset // stride // _M) * (stride // _N) + buf.elem_offset % stride // _N


@T.prim_func(s_tir=True)
def _fill_desc(c: T.handle) -> None:
    C = T.match_buffer(c, (_M, _N), "int32", align=64, offset_factor=_N, scope="wmma.accumulator")
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:_M, 0:_N])
        for i, j in T.grid(_M, _N):
            with T.sblock("init"):
                vi, vj = T.axis.remap("SS", [i, j])
                C[vi, vj] = T.int32(0)


@T.prim_func(s_tir=True)
def _fill_impl(c: T.handle) -> None:
    d1 = T.int32()
    d0 = T.int32()
    C = T.match_buffer(
        c,
        (_M, _N),
        "int32",
        align=64,
        offset_factor=_N,
        scope="wmma.accumulator",
        strides=[d1, d0],
    )
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:_M, 0:_N])
        T.evaluate(
            T.tvm_fill_fragment(
                C.data, _M, _N, _K, _fragment_index(C, d1), T.int32(0), dtype="void"
            )
        )


TensorIntrin.register(FILL_S32, _fill_desc, _fill_impl, override=True)
