"""Where an AMX dense GEMM's time goes: the kernel of codegen/cpu_amx.py timed whole, without
its epilogue, and without its C stores (compute only), on DeiT-Small's layer shapes.

    python benchmarks/amx_probe.py --prepare DIR              # here (builds for sapphirerapids)
    taskset -c 0,1 python3 benchmarks/amx_probe.py --run DIR --threads 2    # the AMX machine

A profile, not a speed claim: zero inputs, each variant timed alone; MAC/s from M*N*K.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

SHAPES = {  # name -> (M, K, N): DeiT-Small qkv / fc1 / fc2 at batch 1 and 8
    "qkv_b1": (197, 384, 1152),
    "fc1_b1": (197, 384, 1536),
    "fc2_b1": (197, 1536, 384),
    "fc1_b8": (1576, 384, 1536),
}
PROBES = ("", "no_epilogue", "compute_only")


def prepare(folder: str) -> None:
    import tvm

    from intq.codegen import compat, cpu_amx

    os.makedirs(folder, exist_ok=True)
    funcs, manifest = {}, []
    for shape_name, (m, k, n) in SHAPES.items():
        for probe in PROBES:
            name = f"{shape_name}_{probe or 'whole'}"
            b, c = np.full(n, 1 << 30, np.int32), np.full(n, 40, np.int32)  # per column
            f = cpu_amx.gemm_amx_func(
                1,
                m,
                k,
                n,
                "int8",
                packed_b=True,
                bias=True,
                rqs=((b, c, -128, 127, "int8"),),
                name=name,
                probe=probe,
            )
            funcs[name] = f.with_attr("global_symbol", name)
            params = [[[int(d) for d in p.shape], str(p.dtype)] for p in f.params]
            manifest.append({"name": name, "params": params, "macs": m * n * k})
    target = compat.cpu_target(mcpu="sapphirerapids", num_cores=2)
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    lib.export_library(os.path.join(folder, "probe.so"))
    with open(os.path.join(folder, "probe.json"), "w") as f:
        json.dump(manifest, f)


def run(folder: str, threads: int) -> None:
    import tvm

    from intq.codegen import compat

    compat.set_num_threads(threads)
    lib = compat.load_executable(os.path.join(folder, "probe.so"))
    dev = tvm.cpu()
    for k in json.load(open(os.path.join(folder, "probe.json"))):
        bufs = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in k["params"]]
        ms = lib.time_evaluator(k["name"], dev, number=20, repeat=5)(*bufs).median * 1e3
        print(f"{k['name']:24s} {ms:8.3f} ms  {k['macs'] / ms / 1e6:8.1f} GMAC/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepare")
    ap.add_argument("--run")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    prepare(a.prepare) if a.prepare else run(a.run, a.threads)
