"""Main job: train a small ViT on scikit-learn's digits, compile it integer-only for the CPU,
export the .so, reload it in a fresh runtime-only process, and compare with FP32.

    python examples/digits.py [--out artifacts/digits_vit.so] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

import intq
from intq.models.digits import evaluate, load_digits_split, train_digits_vit


def median_ms(fn, rounds: int = 30) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="artifacts/digits_vit.so")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: model's)")
    ap.add_argument("--batch", type=int, default=64, help="compiled (static) batch size")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))

    split = load_digits_split()
    t0 = time.perf_counter()
    kw = {} if args.epochs is None else {"epochs": args.epochs}
    model = train_digits_vit(split, **kw)
    print(
        f"trained ViT on digits in {time.perf_counter() - t0:.1f} s "
        f"({split.x_train.shape[0]} train / {split.x_test.shape[0]} test images)"
    )
    x_test = split.x_test.numpy() if hasattr(split.x_test, "numpy") else np.asarray(split.x_test)
    y_test = np.asarray(split.y_test)
    fp32_acc = evaluate(model, torch.as_tensor(x_test), torch.as_tensor(y_test))

    t0 = time.perf_counter()
    x_train = np.asarray(split.x_train)
    calib = [x_train[i : i + args.batch] for i in range(0, len(x_train), args.batch)]
    lib = intq.compile(
        model, torch.as_tensor(x_train[: args.batch]), calibration=calib, target="cpu-int8"
    )
    compile_s = time.perf_counter() - t0
    problems = intq.check_integer_only(lib.integer_onnx)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lib.export(args.out)
    print(
        f"compiled for cpu-int8 in {compile_s:.1f} s; integer-only check: "
        f"{'clean' if not problems else problems}; wrote {args.out} "
        f"({os.path.getsize(args.out) / 1024:.0f} KiB)"
    )

    # Reload the artifact in a fresh process that has only the TVM runtime.
    with tempfile.TemporaryDirectory() as tmp:
        xin, yout = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
        np.save(xin, x_test.astype(np.float32))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "intq.runtime",
                args.out,
                "--input",
                xin,
                "--output",
                yout,
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        logits_so = np.load(yout)
    print("reloaded in a fresh process: " + proc.stdout.strip().splitlines()[-1])

    int_pred = logits_so.argmax(1)
    fp32_pred = model(torch.as_tensor(x_test)).argmax(1).numpy()
    int_acc = float((int_pred == y_test).mean() * 100)
    agree = float((int_pred == fp32_pred).mean() * 100)
    same_as_inprocess = np.array_equal(logits_so, lib.run(x_test))

    # Latency on one compiled batch, same threads: intq .so vs ONNX Runtime FP32 on the same model.
    xb = x_test[: args.batch].astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        lib.float_onnx.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    feed = {sess.get_inputs()[0].name: xb}
    ort_ms = median_ms(lambda: sess.run(None, feed))
    intq_ms = median_ms(lambda: lib.run(xb))

    print()
    print(f"FP32 test accuracy          : {fp32_acc:6.2f} %")
    print(f"integer-only (.so) accuracy : {int_acc:6.2f} %")
    print(f"gap                         : {fp32_acc - int_acc:+6.2f} points")
    print(f"prediction agreement        : {agree:6.2f} %")
    print(f".so output == in-process run: {same_as_inprocess}")
    print(
        f"latency, batch {args.batch}, {threads} threads: intq cpu-int8 {intq_ms:.2f} ms, "
        f"ONNX Runtime FP32 {ort_ms:.2f} ms (ratio ORT/intq {ort_ms / intq_ms:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
