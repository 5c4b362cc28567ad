"""Issue 4's transformer-side figures on the digits ViT: RepQ-ViT reparameterization vs plain
per-tensor calibration (end-to-end SQNR), log2 vs uniform (Shiftmax) attention probabilities
(accuracy), calibration methods, and the per-tensor SQNR report (text + PNG).

    python examples/quant_methods.py [--out artifacts] [--epochs N]

Everything runs through intq.compile on cpu-int8; every integer model is checked bit-exact
against the reference interpreter on the test set before its figures are printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

import intq
from intq.config import CompileConfig
from intq.models.digits import evaluate, load_digits_split, train_digits_vit
from intq.models.vit import spread_layernorm_channels
from intq.report import sqnr_db


def compile_and_measure(model, x_train, x_test, y_test, cfg, batch=64):
    calib = [x_train[i : i + batch] for i in range(0, len(x_train), batch)]
    t0 = time.perf_counter()
    lib = intq.compile(model, torch.as_tensor(x_train[:batch]), calibration=calib, config=cfg)
    secs = time.perf_counter() - t0
    out = lib.run(x_test)
    assert np.array_equal(out, intq.reference_run(lib.integer_onnx, x_test)), "TVM != reference"
    assert not intq.check_integer_only(lib.integer_onnx)
    with torch.no_grad():
        ref = model(torch.as_tensor(x_test)).numpy()
    logits = lib.dequantize(out)
    acc = 100.0 * float(np.mean(logits.argmax(-1) == y_test))
    return lib, acc, sqnr_db(ref, logits), secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="artifacts")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    split = load_digits_split()
    kw = {} if args.epochs is None else {"epochs": args.epochs}
    model = train_digits_vit(split, **kw)
    x_train = np.asarray(split.x_train, dtype=np.float32)
    x_test = np.asarray(split.x_test, dtype=np.float32)
    y_test = np.asarray(split.y_test)
    fp32 = evaluate(model, torch.as_tensor(x_test), torch.as_tensor(y_test))
    print(f"digits ViT FP32 accuracy {fp32:.2f} %  (test set, {len(y_test)} images)")

    spread = copy.deepcopy(model)
    spread_layernorm_channels(spread, spread=4.0, seed=0)  # same function, LN channels x2^+-4
    print("\n== RepQ-ViT reparameterization: end-to-end SQNR of the logits (dB), accuracy (%)")
    print(f"{'model':<34} {'per-tensor':>18} {'RepQ':>18}")
    for name, m in (("digits ViT (as trained)", model), ("digits ViT, LN channels spread", spread)):
        row = []
        for reparam in ("none", "repq"):
            cfg = CompileConfig(reparam=reparam, calibration="minmax")
            _, acc, db, _ = compile_and_measure(m, x_train, x_test, y_test, cfg)
            row.append(f"{db:6.2f} dB {acc:6.2f} %")
        print(f"{name:<34} {row[0]:>18} {row[1]:>18}")

    print("\n== attention probabilities: uniform uint8 (Shiftmax) vs log2 codes (shift-only AV)")
    for out_mode, bits in (("uniform", 4), ("log2", 4), ("log2", 3)):
        cfg = CompileConfig(softmax_out=out_mode, softmax_log2_bits=bits)
        _, acc, db, _ = compile_and_measure(model, x_train, x_test, y_test, cfg)
        label = "uniform (Shiftmax)" if out_mode == "uniform" else f"log2, {bits}-bit codes"
        print(f"{label:<24} accuracy {acc:6.2f} %  (FP32 {fp32:.2f} %)  logits SQNR {db:6.2f} dB")

    print("\n== calibration methods")
    lib = None
    for method in ("minmax", "percentile", "search"):
        lib_m, acc, db, secs = compile_and_measure(
            model, x_train, x_test, y_test, CompileConfig(calibration=method)
        )
        lib = lib_m if method == "search" else lib
        print(f"{method:<11} accuracy {acc:6.2f} %  logits SQNR {db:6.2f} dB  compile {secs:.1f} s")

    rep = lib.error_report([x_test[i : i + 64] for i in range(0, 256, 64)])
    txt = os.path.join(args.out, "digits_sqnr.txt")
    with open(txt, "w") as f:
        f.write(rep.to_text() + "\n")
    png = rep.plot(os.path.join(args.out, "digits_sqnr.png"))
    worst = ", ".join(f"{r.name} {r.sqnr_db:.1f} dB" for r in rep.worst(3))
    print(f"\nper-tensor SQNR report: {txt}, {png}; worst: {worst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
