"""Per-kernel time of a compiled model on cpu-int8: each PrimFunc built and timed alone on
zero inputs, multiplied by its call count in `main`, grouped by kernel name.

    python benchmarks/kernels.py --model deit_tiny --batch 1

An estimate of where time goes (data-independent kernels only; no peer: this is a profile).
"""

from __future__ import annotations

import argparse
import collections
import re

import numpy as np
import torch
import tvm
from tvm import tirx

import intq
from intq.codegen import compat
from intq.codegen.cpu import CpuKernels
from intq.codegen.lower import to_relax
from intq.models import vit

MODELS = {"deit_tiny": (vit.deit_tiny, (3, 224, 224)), "vit_digits": (vit.vit_digits, (1, 8, 8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="deit_tiny")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    make, shape = MODELS[args.model]
    torch.manual_seed(0)
    x = torch.randn(args.batch, *shape)
    lib = intq.compile(make().eval(), x, calibration=[x])
    target = compat.cpu_target()
    compat.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    kernels = CpuKernels(target)
    mod = compat.lower(kernels.schedule(to_relax(lib.integer_onnx, kernels)), target)
    main_text = str(mod["main"])
    total: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    dev = tvm.cpu()
    for gv, f in mod.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        name = gv.name_hint
        n = len(re.findall(r"\b" + re.escape(name) + r"\b", main_text)) or 1
        single = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        ex = tvm.compile(single, target=target)
        bufs = [
            tvm.runtime.tensor(np.zeros([int(s) for s in p.shape], str(p.dtype)), dev)
            for p in f.params
        ]
        ms = ex.jit().time_evaluator("main", dev, number=5, repeat=3)(*bufs).mean * 1e3
        group = re.sub(r"\d+$", "", name).rstrip("_")
        total[group] += ms * n
        calls[group] += n
    whole = sum(total.values())
    print(f"{args.model} batch {args.batch}: sum of kernel estimates {whole:.2f} ms")
    for group, ms in total.most_common():
        print(f"{group:24s} {ms:8.2f} ms {100 * ms / whole:5.1f} %  ({calls[group]} calls)")


if __name__ == "__main__":
    main()
