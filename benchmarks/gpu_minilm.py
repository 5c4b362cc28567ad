"""all-MiniLM-L6-v2 (sequence 128) on cuda-int8 against PyTorch FP32 / FP16, eager and with
CUDA-graph replay, in one process on the GPU machine (which has no TVM and no transformers).

    python benchmarks/gpu_minilm.py --prepare DIR [--batches 1,64]          # here
    PYTHONPATH=BUNDLE/site python3 benchmarks/gpu_minilm.py --run DIR        # GPU machine

`--prepare` compiles the model (examples/minilm.py's CompileConfig, CUDA graph on) for each
batch and writes DIR/minilm_b<n>.so, the token ids and attention mask it is fed (real text,
numpy docstrings, padded to 128), the reference interpreter's integer output on them, and the
BERT dimensions (DIR/minilm.json). `--run` checks the artifact's output against the reference
element by element, times intq (Relax VM, inputs on the GPU) and, as the PyTorch peer, a
self-contained BERT encoder of those dimensions (`TorchBert`: the same layers as Hugging
Face's BertModel, scaled-dot-product attention, mean pooling, L2 norm) with random weights
(speed does not depend on them; the GPU machine has no transformers) in FP32 and FP16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def prepare(out: str, batches: list[int]) -> None:
    import intq
    from intq.models.minilm import MINILM_CONFIG, Tokenizer, minilm_l6
    from intq.models.textdata import calibration_texts, numpy_doc_pairs

    os.makedirs(out, exist_ok=True)
    model, tok = minilm_l6(), Tokenizer()
    c = model.bert.config
    dims = {
        "vocab": c.vocab_size, "hidden": c.hidden_size, "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads, "ffn": c.intermediate_size,
        "positions": c.max_position_embeddings, "eps": c.layer_norm_eps,
    }  # fmt: skip
    with open(os.path.join(out, "minilm.json"), "w") as f:
        json.dump(dims, f)
    for b in batches:
        tag = f"minilm_b{b}"
        ids, mask = tok([p[2] for p in numpy_doc_pairs()[: b * 4]])
        ids, mask = ids[:b], mask[:b]
        cal_ids, cal_mask = tok(calibration_texts(64))
        cal = [(cal_ids[i : i + b], cal_mask[i : i + b]) for i in range(0, 64, b)][:16]
        cfg = MINILM_CONFIG.with_(extra={"cuda_graph": True})
        t0 = time.perf_counter()
        lib = intq.compile(model, (ids, mask), cal, target="cuda-int8", config=cfg)
        lib.export(os.path.join(out, tag + ".so"))
        secs = time.perf_counter() - t0
        ref = intq.reference_run(lib.integer_onnx, ids, mask)
        for name, arr in (("ids", ids), ("mask", mask), ("ref", ref)):
            np.save(os.path.join(out, f"{tag}_{name}.npy"), arr)
        print(f"{tag}: compile+export {secs:.1f} s, output {ref.dtype}{list(ref.shape)}")


def torch_bert(dims: dict):
    """BERT encoder + masked mean pooling + L2 normalisation (all-MiniLM-L6-v2's computation)
    in plain PyTorch, random weights."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    h, heads = dims["hidden"], dims["heads"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.ln1, self.ln2 = nn.LayerNorm(h, dims["eps"]), nn.LayerNorm(h, dims["eps"])
            self.fc1, self.fc2 = nn.Linear(h, dims["ffn"]), nn.Linear(dims["ffn"], h)

        def forward(self, x, bias):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = self.ln1(x + self.out(a.transpose(1, 2).reshape(b, s, h)))
            return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(dims["vocab"], h)
            self.pos, self.segment = nn.Embedding(dims["positions"], h), nn.Embedding(2, h)
            self.ln = nn.LayerNorm(h, dims["eps"])
            self.layers = nn.ModuleList(Layer() for _ in range(dims["layers"]))

        def forward(self, ids, mask):
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.ln(self.word(ids) + self.pos(pos) + self.segment(torch.zeros_like(ids)))
            m = mask.to(x.dtype)
            bias = ((1.0 - m) * torch.finfo(x.dtype).min)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=1)

    return Bert()


def run(directory: str) -> None:
    import torch
    from gpu import _cuda_ms, _graph_ms, _intq_ms  # benchmarks/gpu.py's timers

    from intq import runtime

    rows = []
    for so in sorted(f for f in os.listdir(directory) if f.endswith(".so")):
        tag = so[:-3]
        load = lambda name, tag=tag: np.load(os.path.join(directory, f"{tag}_{name}.npy"))  # noqa: E731
        ids, mask, ref = load("ids"), load("mask"), load("ref")
        ex = runtime.load(os.path.join(directory, so))
        y = ex.run(ids, mask)
        row = {"model": tag, "bit_exact": bool(np.array_equal(y, ref))}
        row["mismatches"] = int(np.sum(y != ref)) if y.shape == ref.shape else -1
        row["intq_ms"] = _intq_ms(ex, ids, mask)
        t_ids, t_mask = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()
        dims = json.load(open(os.path.join(directory, "minilm.json")))
        for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            torch.manual_seed(0)
            m = torch_bert(dims).to("cuda", dtype).eval()
            with torch.no_grad():
                row[f"{label}_eager"] = _cuda_ms(lambda m=m, a=t_ids, k=t_mask: m(a, k))
            row[f"{label}_graph"] = _graph_ms(m, t_ids, t_mask)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("| model | bit-exact | intq ms | fp32 eager | fp32 graph | fp16 eager | fp16 graph |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[k]:.3f} ({r[k] / r['intq_ms']:.2f}x)"
            for k in ("fp32_eager", "fp32_graph", "fp16_eager", "fp16_graph")
        ]
        print(f"| {r['model']} | {r['bit_exact']} | {r['intq_ms']:.3f} | " + " | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", metavar="DIR")
    g.add_argument("--run", metavar="DIR")
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, [int(b) for b in args.batches.split(",")])
    else:
        run(args.run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
