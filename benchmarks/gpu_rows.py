"""Row kernels of cuda-int8 (IntLayerNorm + Requantize, IntSoftmax with padded rows) alone on the
GPU, at DeiT-Small batch-64 shapes, in schedule variants; a profile, not a model speed claim
(that is benchmarks/gpu.py).

    python benchmarks/gpu_rows.py --prepare DIR                       # here (TVM + nvcc)
    PYTHONPATH=BUNDLE/site python3 benchmarks/gpu_rows.py --run DIR    # GPU machine

`--prepare` builds one CUDA module with each kernel under each variant of
`codegen.cuda.schedule_row_blocks` (VARIANTS), writes DIR/rows.so. `--run` feeds every variant
the same random inputs, checks that all variants' outputs are equal element by element (the
default variant is the one the model runs, checked against the reference interpreter there), and
times each with TVM's time_evaluator (median of 5 x 200 runs).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

LN = {"shape": (64, 197, 384), "eps": 167, "frac_bits": 10}  # DeiT-Small b64, int16 residuals
SM = {"shape": (64, 6, 197, 197), "frac_bits": 12, "pad": 208}  # its attention scores
#: variant name -> (schedule_row_blocks keyword arguments, LayerNorm's `narrow`)
VARIANTS = {"default": ({}, True), "rolled": ({"unroll": False}, True), "ln_int64": ({}, False)}


def prepare(out: str) -> None:
    import tvm
    from tvm import te

    from intq.codegen import compat, cuda, te_ops

    funcs = {}
    for variant, (kw, narrow) in VARIANTS.items():
        x = te.placeholder(LN["shape"], "int16", "x")
        g, b = te.placeholder((384,), "int32", "g"), te.placeholder((384,), "int32", "b")
        tb, tc = te.placeholder((384,), "int32", "tb"), te.placeholder((384,), "int32", "tc")
        rq = (tb, tc, -128, 127, "int8")
        y = te_ops.int_layernorm(
            x, g, b, eps=LN["eps"], frac_bits=LN["frac_bits"], rq=rq, narrow=narrow
        )
        f = cuda.schedule_row_blocks(te.create_prim_func([x, g, b, tb, tc, y]), **kw)
        funcs[f"ln_{variant}"] = f.with_attr("global_symbol", f"ln_{variant}")
        s = te.placeholder(SM["shape"], "int32", "s")
        p = te_ops.int_softmax(s, frac_bits=SM["frac_bits"], pad_to=SM["pad"])
        f = cuda.schedule_row_blocks(te.create_prim_func([s, p]), **kw)
        funcs[f"sm_{variant}"] = f.with_attr("global_symbol", f"sm_{variant}")
    with compat.cuda_target() as target:
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    cuda.check_cuda_compiles(compat.device_source(ex), str(target.attrs["arch"]))
    os.makedirs(out, exist_ok=True)
    ex.export_library(os.path.join(out, "rows.so"))
    print(f"{len(funcs)} kernels -> {out}/rows.so")


def run(out: str) -> None:
    import tvm

    from intq.codegen import compat

    compat.load_cuda_runtime()
    compat.install_cuda_jit_nvcc()
    dev = tvm.cuda(0)
    mod = tvm.runtime.load_module(os.path.join(out, "rows.so"))
    rng = np.random.default_rng(0)
    ln_in = [
        rng.integers(-3000, 3000, LN["shape"]).astype(np.int16),
        rng.integers(500, 2000, 384).astype(np.int32),
        rng.integers(-9000, 9000, 384).astype(np.int32),
        rng.integers(1 << 29, 1 << 30, 384).astype(np.int32),
        np.full(384, 44, np.int32),
    ]
    sm_in = [rng.integers(-40000, 40000, SM["shape"]).astype(np.int32)]
    cases = {
        "ln": (ln_in, LN["shape"], "int8"),
        "sm": (sm_in, SM["shape"][:-1] + (SM["pad"],), "uint8"),
    }
    for op, (inputs, oshape, odt) in cases.items():
        outs = {}
        for variant in VARIANTS:
            name = f"{op}_{variant}"
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            args.append(tvm.runtime.tensor(np.zeros(oshape, odt), dev))
            mod[name](*args)
            outs[variant] = args[-1].numpy()
            t = mod.time_evaluator(name, dev, number=200, repeat=5)(*args)
            same = np.array_equal(outs[variant], outs["default"])
            print(f"{name:16s} {np.median(t.results) * 1e6:8.2f} us  equal to default: {same}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", metavar="DIR")
    g.add_argument("--run", metavar="DIR")
    args = ap.parse_args(argv)
    prepare(args.prepare) if args.prepare else run(args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
