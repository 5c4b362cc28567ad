"""Per-tensor quantization error: SQNR of every quantized tensor against the float model.

For a float tensor x and its integer form q at scale s (the compile-time tensor map that
QuantizePass stores in the integer graph's metadata), over the given data:

    SQNR(x) = 10 log10( sum x^2 / sum (x - q s)^2 )   dB   (per-channel s broadcast on its axis)

The float values come from onnxruntime on the float graph; the integer values from the reference
interpreter on the integer graph, fed the same inputs through the boundary quantizer. So the
report measures what the deployed model computes, error accumulated from the input onwards.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from intq import boundary
from intq.errors import GraphError
from intq.ir import topo_sort
from intq.passes.calibration import run_float_model
from intq.passes.quantize import TENSOR_MAP_KEY
from intq.reference import ReferenceInterpreter, load_signature


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2); inf when they are equal."""
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class TensorError:
    name: str  # the float tensor
    op: str  # the float op that produced it ("input" for graph inputs)
    integer: str  # its integer tensor in the integer graph
    dtype: str
    sqnr_db: float
    is_output: bool


@dataclass(frozen=True)
class ErrorReport:
    rows: tuple[TensorError, ...]  # in the float graph's topological order

    @property
    def output_sqnr_db(self) -> float:
        outs = [r.sqnr_db for r in self.rows if r.is_output]
        return min(outs) if outs else math.nan

    def worst(self, k: int = 5) -> list[TensorError]:
        return sorted(self.rows, key=lambda r: r.sqnr_db)[:k]

    def to_text(self) -> str:
        w = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'tensor':<{w}}  {'op':<20} {'dtype':<6} {'SQNR dB':>8}"]
        for r in self.rows:
            mark = "  <- output" if r.is_output else ""
            lines.append(f"{r.name:<{w}}  {r.op:<20} {r.dtype:<6} {r.sqnr_db:8.2f}{mark}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> str:
        """A PNG of SQNR per tensor in graph order (needs matplotlib: pip install intq[plot])."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vals = [min(r.sqnr_db, 99.0) for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(vals)), 3.5))
        colors = ["tab:red" if r.is_output else "tab:blue" for r in self.rows]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xlabel("tensor (float graph order)")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"per-tensor SQNR; output {self.output_sqnr_db:.1f} dB")
        fig.tight_layout()
        path = os.fspath(path)
        tmp = f"{path}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        return path


def tensor_map(integer_model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    for p in integer_model.metadata_props:
        if p.key == TENSOR_MAP_KEY:
            return json.loads(p.value)
    raise GraphError("integer graph has no tensor map (made by an older intq?)")


def error_report(
    float_model: onnx.ModelProto, integer_model: onnx.ModelProto, batches: Iterable[Any]
) -> ErrorReport:
    """SQNR of every quantized tensor of `integer_model` against `float_model` on `batches`."""
    tmap = tensor_map(integer_model)
    sig = load_signature(integer_model)
    g = float_model.graph
    producer = {o: n.op_type for n in topo_sort(g) for o in n.output}
    order = [i.name for i in g.input] + [o for n in topo_sort(g) for o in n.output]
    names = [n for n in order if n in tmap]
    interp = ReferenceInterpreter(integer_model)
    in_names = [s.name for s in sig.inputs]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    dtypes: dict[str, str] = {}
    for values in run_float_model(float_model, batches, names):
        feeds = boundary.quantize_inputs(sig.inputs, [values[n] for n in in_names])
        env = interp.run(dict(zip(in_names, feeds, strict=True)), keep_all=True)
        for n in names:
            info = tmap[n]
            q = env[info["int"]]
            dtypes[n] = q.dtype.name
            s = np.asarray(info["scale"], dtype=np.float64)
            if s.ndim:
                shape = [1] * q.ndim
                shape[int(info["axis"]) % q.ndim] = -1
                s = s.reshape(shape)
            x = values[n].astype(np.float64)
            signal[n] += float(np.sum(x**2))
            noise[n] += float(np.sum((x - q.astype(np.float64) * s) ** 2))
    outs = {o.name for o in g.output}
    rows = []
    for n in names:
        if noise[n] == 0.0:
            db = math.inf
        elif signal[n] == 0.0:
            db = -math.inf
        else:
            db = 10.0 * math.log10(signal[n] / noise[n])
        rows.append(
            TensorError(n, producer.get(n, "input"), tmap[n]["int"], dtypes[n], db, n in outs)
        )
    return ErrorReport(tuple(rows))
