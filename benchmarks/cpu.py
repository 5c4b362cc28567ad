"""intq cpu-int8 vs ONNX Runtime FP32 vs PyTorch FP32, same process, same threads, interleaved.

    python benchmarks/cpu.py --model deit_tiny --batch 1 --rounds 10

Prints per-contender medians (ms) and ratios against intq. Random weights, calibration on
random data (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
import torch

import intq
from intq.models import vit

MODELS = {
    "deit_tiny": (lambda: vit.deit_tiny(), (3, 224, 224)),
    "deit_small": (lambda: vit.deit_small(), (3, 224, 224)),
    "vit_digits": (lambda: vit.vit_digits(), (1, 8, 8)),
}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="deit_tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner", type=int, default=3, help="calls per contender per round")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    make, shape = MODELS[args.model]
    model = make().eval()
    x = torch.randn(args.batch, *shape)
    t = time.perf_counter()
    lib = intq.compile(model, x, calibration=[torch.randn(args.batch, *shape) for _ in range(2)])
    compile_s = time.perf_counter() - t
    xn = x.numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        lib.float_onnx.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    feed = {sess.get_inputs()[0].name: xn}
    contenders = {
        "intq cpu-int8": lambda: lib.run(xn),
        "ONNX Runtime FP32": lambda: sess.run(None, feed),
        "PyTorch FP32": lambda: torch.inference_mode()(model)(x),
    }
    for fn in contenders.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            samples[name] += [timed(fn) for _ in range(args.inner)]
    med = {k: float(np.median(v)) for k, v in samples.items()}
    print(
        f"{args.model} batch {args.batch}, {threads} threads, {args.rounds} rounds x "
        f"{args.inner}; intq compile {compile_s:.1f} s"
    )
    print(f"{'contender':22s} {'median ms':>10s} {'vs intq':>8s}")
    for name, m in med.items():
        print(f"{name:22s} {m:10.2f} {m / med['intq cpu-int8']:7.2f}x")


if __name__ == "__main__":
    main()
