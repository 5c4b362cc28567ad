"""cpu-int8's LayerNorm kernel (+ per-column Requantize, `schedule_rows`) on [8, 197, 384] int16
with its element loop in int64 (cpu-int8 without AVX-512) and in 32-bit lanes (cuda-int8 and
AVX-512 CPUs),
timed on this CPU; both outputs compared element by element. A profile, not a speed claim.

    python benchmarks/cpu_rows.py
"""

from __future__ import annotations

import numpy as np


def main() -> None:
    import tvm
    from tvm import te

    from intq.codegen import compat, cpu, te_ops

    shape = (8, 197, 384)
    rng = np.random.default_rng(0)
    inputs = [
        rng.integers(-3000, 3000, shape).astype(np.int16),
        rng.integers(500, 2000, 384).astype(np.int32),
        rng.integers(-9000, 9000, 384).astype(np.int32),
        rng.integers(1 << 29, 1 << 30, 384).astype(np.int32),
        np.full(384, 44, np.int32),
    ]
    outs = {}
    for narrow in (False, True):
        x = te.placeholder(shape, "int16", "x")
        g, b, tb, tc = (te.placeholder((384,), "int32", n) for n in ("g", "b", "tb", "tc"))
        rq = (tb, tc, -128, 127, "int8")
        y = te_ops.int_layernorm(x, g, b, eps=167, frac_bits=10, rq=rq, narrow=narrow)
        f = cpu.schedule_rows(te.create_prim_func([x, g, b, tb, tc, y]))
        ex = tvm.compile(tvm.IRModule({"main": f}), target=compat.cpu_target(host=True))
        args = [tvm.runtime.tensor(a) for a in inputs]
        args.append(tvm.runtime.tensor(np.zeros(shape, np.int8)))
        ex.mod["main"](*args)
        outs[narrow] = args[-1].numpy()
        t = ex.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=5)(*args)
        label = "32-bit lanes" if narrow else "int64"
        print(f"LayerNorm {label:13s} {np.median(t.results) * 1e3:.3f} ms")
    print("outputs equal:", bool(np.array_equal(outs[False], outs[True])))


if __name__ == "__main__":
    main()
