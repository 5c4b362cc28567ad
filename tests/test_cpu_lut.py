"""The AVX-512 VBMI byte-table kernel (codegen/cpu_lut.py): y = table[x (+128)] for 8-bit x.

Everywhere: the emulated kernel (each vpermi2b by its definition, same quarter pairs and blend)
equals a numpy lookup for int8 / uint8 inputs and outputs, with a tail of size % 64 elements;
the hardware kernel builds for Sapphire Rapids with `vpermi2b` / `vpermt2b` in its code (it
runs on the device Xeon: tests/test_cpu_amx.py's gelu_byte_table case)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from intq.codegen import compat, cpu_lut


def _build(size, in_dt, out_dt, emulate, target):
    func = cpu_lut.byte_table_func(size, in_dt, out_dt, emulate=emulate)
    func = func.with_attr("global_symbol", "byte_table")  # a public entry (built alone)
    return tvm.compile(tvm.IRModule({"byte_table": func}), target=target)


@pytest.mark.parametrize("in_dt,out_dt", [("int8", "int8"), ("uint8", "uint8"), ("int8", "uint8")])
def test_emulated_byte_table_equals_lookup(in_dt, out_dt):
    rng = np.random.default_rng(3)
    size = 64 * 70 + 37  # two parallel chunks of vectors and a tail
    lo = -128 if in_dt == "int8" else 0
    x = rng.integers(lo, lo + 256, size).astype(in_dt)
    x[:256] = np.arange(lo, lo + 256)  # every input value
    olo = -128 if out_dt == "int8" else 0
    table = rng.integers(olo, olo + 256, 256)  # indexed by x + 128 (int8 x) or x (uint8 x)
    want = table[x.astype(np.int64) - lo].astype(out_dt)
    mod = _build(size, in_dt, out_dt, True, compat.cpu_target())
    dev = tvm.cpu()
    args = [
        tvm.runtime.tensor(x, dev),
        tvm.runtime.tensor(cpu_lut.byte_order(table, in_dt), dev),
        tvm.runtime.tensor(np.zeros(size, out_dt), dev),
    ]
    mod["byte_table"](*args)
    np.testing.assert_array_equal(args[2].numpy(), want)


def test_byte_order_is_raw_byte_order():
    table = np.arange(256) - 128  # table[x + 128] = x for int8 x
    t = cpu_lut.byte_order(table, "int8")
    assert t.dtype == np.int8 and list(t[:3]) == [0, 1, 2] and t[128] == -128 and t[255] == -1


def test_hardware_byte_table_uses_vpermi2b():
    target = compat.cpu_target(mcpu="sapphirerapids", num_cores=2)
    asm = _build(64 * 3 + 5, "int8", "int8", False, target).mod.inspect_source("asm")
    assert "vpermi2b" in asm or "vpermt2b" in asm
