"""int8 GEMM tiles of `codegen.cuda.schedule_int8_wmma` on the GPU, beside cuBLAS, by shape.

    python benchmarks/gpu_gemm.py --prepare DIR [--pipelines 0,2,3] [--tiles 0,3] [--rows 12608]
    PYTHONPATH=BUNDLE/site python3 benchmarks/gpu_gemm.py --run DIR  # GPU machine (torch, numpy)

`--prepare` builds one CUDA module holding the fused GEMM kernel that cuda-int8 emits for a dense
layer (int8 x int8 -> int32, + bias, per-column Requantize to int8) for every (shape, tile,
software-pipeline depth) triple (`--tiles` indexes TILES, `--rows` keeps those M only),
and writes it as DIR/gemm.so with DIR/gemm.json (kernel names, shapes, tiles). `--run` checks
every kernel against the exact result (torch._int_mm, exact int32, then the reference
requantization in numpy) element by element and times it with CUDA events, beside the same
product by cuBLAS: torch._int_mm (int8 -> int32, no epilogue) and FP16 torch.matmul. A profile
for choosing tiles, not a model speed claim (that is benchmarks/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# DeiT-Small's dense layers at batch 64 and 1 (M = batch * 197 tokens): qkv, proj, fc1, fc2.
SHAPES = [(m, k, n) for m in (12608, 197) for k, n in ((384, 1152), (384, 384), (384, 1536))]
SHAPES += [(12608, 1536, 384), (197, 1536, 384)]
# (warps_m, warps_n, frags_m, frags_n, k_frags)
TILES = [
    (4, 2, 2, 4, 4),
    (4, 2, 2, 4, 2),
    (2, 2, 4, 4, 2),
    (2, 4, 2, 2, 4),
    (2, 2, 4, 2, 4),
    (2, 2, 2, 2, 4),
    (4, 4, 2, 2, 2),
    (2, 2, 1, 2, 4),
    (1, 2, 2, 2, 4),
]


def _name(shape, tile, stages: int = 0) -> str:
    return "g_" + "x".join(map(str, shape)) + "_t" + "".join(map(str, tile)) + f"_p{stages}"


def prepare(
    out: str, pipelines: tuple[int, ...] = (0,), tiles=None, rows: tuple[int, ...] | None = None
) -> None:
    import tvm
    from tvm import te

    from intq.codegen import compat, cuda
    from intq.codegen.build import TARGETS

    os.makedirs(out, exist_ok=True)
    funcs, kept, table = {}, rows, []
    for m, k, n in SHAPES:
        if kept is not None and m not in kept:
            continue
        x = te.placeholder((m, k), "int8", "x")
        w = te.placeholder((n, k), "int8", "w")
        b = te.placeholder((n,), "int32", "b")
        rb = te.placeholder((n,), "int32", "rb")
        rc = te.placeholder((n,), "int32", "rc")
        y = cuda.dense_nt_te(x, w, b, rq=(rb, rc, -128, 127, "int8"))
        base = te.create_prim_func([x, w, b, rb, rc, y])
        for tile in tiles or TILES:
            for stages in pipelines:
                f = cuda.schedule_int8_wmma(base, cuda.WmmaTile(*tile), pipeline=stages)
                if f is None:
                    print(f"skip {(m, k, n)} {tile}: schedule failed", file=sys.stderr)
                    continue
                name = _name((m, k, n), tile, stages)
                funcs[name] = f.with_attr("global_symbol", name)
                table.append({"name": name, "shape": [m, k, n], "tile": list(tile), "p": stages})
    target = compat.cuda_target()
    with target, tvm.transform.PassContext(config=TARGETS["cuda-int8"].pass_config):
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
    cuda.check_cuda_compiles(compat.device_source(ex), str(target.attrs["arch"]))
    ex.export_library(os.path.join(out, "gemm.so"))
    with open(os.path.join(out, "gemm.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(f"{len(table)} kernels -> {out}/gemm.so")


def run(directory: str) -> None:
    import shutil

    import torch
    import tvm
    from gpu import _cuda_ms  # benchmarks/gpu.py: CUDA-event timing, best of 3

    from intq.codegen import compat

    compat.load_cuda_runtime()
    if shutil.which("nvcc") and not compat.compiler_loaded():
        compat.install_cuda_jit_nvcc()
    lib = tvm.runtime.load_module(os.path.join(directory, "gemm.so"))
    rows = json.load(open(os.path.join(directory, "gemm.json")))
    dev = tvm.cuda(0)
    print(f"device: {torch.cuda.get_device_name(0)}")
    by_shape: dict[tuple, list[dict]] = {}
    for r in rows:
        by_shape.setdefault(tuple(r["shape"]), []).append(r)
    for (m, k, n), kernels in by_shape.items():
        rng = np.random.default_rng(m + k + n)
        x = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
        b = rng.integers(-(2**20), 2**20, n, dtype=np.int32)
        rb = rng.integers(2**29, 2**30, n, dtype=np.int32)
        rc = rng.integers(38, 44, n, dtype=np.int32)
        xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        acc = torch._int_mm(xt, wt.t()).cpu().numpy().astype(np.int64) + b
        # Requantize (docs/OPS.md): clip((acc * b + 2^(c-1)) >> c, -128, 127), int64
        c64 = rc.astype(np.int64)
        ref = np.clip((acc * rb + (np.int64(1) << (c64 - 1))) >> c64, -128, 127)
        macs = 2 * m * k * n
        cublas = _cuda_ms(lambda xt=xt, wt=wt: torch._int_mm(xt, wt.t()))
        xh, wh = xt.half(), wt.half()
        fp16 = _cuda_ms(lambda xh=xh, wh=wh: torch.matmul(xh, wh.t()))
        print(
            f"\nM={m} K={k} N={n}: cuBLAS int8 {cublas * 1e3:.1f} us "
            f"({macs / cublas / 1e9:.0f} TOPS), cuBLAS fp16 {fp16 * 1e3:.1f} us"
        )
        args = [tvm.runtime.tensor(a, dev) for a in (x, w, b, rb, rc)]
        y = tvm.runtime.tensor(np.zeros((m, n), np.int8), dev)
        for r in kernels:
            f = lib[r["name"]]
            f(*args, y)
            exact = bool(np.array_equal(y.numpy(), ref.astype(np.int8)))
            ms = _cuda_ms(lambda f=f, args=args, y=y: f(*args, y))
            print(
                f"  tile {r['tile']} pipeline {r.get('p', 0)}: {ms * 1e3:8.1f} us  "
                f"{macs / ms / 1e9:6.0f} TOPS  x{cublas / ms:.2f} of cuBLAS int8  exact={exact}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", metavar="DIR")
    g.add_argument("--run", metavar="DIR")
    ap.add_argument("--pipelines", default="0", help="software-pipeline stages, e.g. 0,2,3")
    ap.add_argument("--tiles", default="", help="tile indices into TILES, e.g. 3,5 (all)")
    ap.add_argument("--rows", default="", help="only these M, e.g. 12608")
    args = ap.parse_args(argv)
    if args.prepare:
        ints = lambda v: tuple(int(t) for t in v.split(",") if t)  # noqa: E731
        tiles = [TILES[i] for i in ints(args.tiles)] or None
        prepare(args.prepare, ints(args.pipelines), tiles, ints(args.rows) or None)
    else:
        run(args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
