"""all-MiniLM-L6-v2 at sequence length 128: intq cpu-int8 vs ONNX Runtime FP32 vs ONNX Runtime
dynamic INT8 (onnxruntime.quantization.quantize_dynamic, the standard BERT recipe: int8
weights, activations quantized per call), same process, same threads, interleaved rounds.

    python benchmarks/minilm.py --batch 1 8 --rounds 10

All contenders run the same canonical float ONNX graph (ORT) or its integer compilation (intq)
on the same real token ids (numpy docstrings, padded to 128 with the attention mask). Prints
per-contender medians (ms) and ratios against intq.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

import intq
from intq.models.minilm import MINILM_CONFIG, SEQ_LEN, Tokenizer, minilm_l6
from intq.models.textdata import calibration_texts, numpy_doc_pairs

CONFIG = MINILM_CONFIG  # examples/minilm.py's: the accuracy figures in docs/ are for it


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def ort_session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def bench(batch: int, rounds: int, inner: int, threads: int, model, tok) -> None:
    texts = [p[2] for p in numpy_doc_pairs()[: batch * 4]]
    ids, mask = tok(texts)
    ids, mask = ids[:batch], mask[:batch]
    cal_ids, cal_mask = tok(calibration_texts(64))
    cal = [(cal_ids[i : i + batch], cal_mask[i : i + batch]) for i in range(0, 64, batch)][:16]
    t = time.perf_counter()
    lib = intq.compile(model, (ids, mask), cal, config=CONFIG.with_(num_threads=threads))
    compile_s = time.perf_counter() - t
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "minilm_fp32.onnx")
        i8 = os.path.join(tmp, "minilm_dyn_int8.onnx")
        onnx.save(lib.float_onnx, f32)
        quantize_dynamic(f32, i8, weight_type=QuantType.QInt8)
        s32, s8 = ort_session(f32, threads), ort_session(i8, threads)
    feed = {"input_ids": ids, "attention_mask": mask}
    contenders = {
        "intq cpu-int8": lambda: lib.run(ids, mask),
        "ONNX Runtime FP32": lambda: s32.run(None, feed),
        "ONNX Runtime dynamic INT8": lambda: s8.run(None, feed),
    }
    for fn in contenders.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name] += [timed(fn) for _ in range(inner)]
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["intq cpu-int8"]
    print(
        f"\nall-MiniLM-L6-v2, batch {batch}, seq {SEQ_LEN}, {threads} threads, "
        f"{rounds} rounds x {inner} calls (intq compile {compile_s:.1f} s)"
    )
    print("| contender | median ms | vs intq |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner", type=int, default=3, help="calls per contender per round")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    model, tok = minilm_l6(), Tokenizer()
    for b in args.batch:
        bench(b, args.rounds, args.inner, threads, model, tok)


if __name__ == "__main__":
    main()
