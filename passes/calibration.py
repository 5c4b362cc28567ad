"""Activation calibration: run the float model in onnxruntime over the calibration batches and
record per-tensor statistics of every float tensor.

Per tensor: amax = max |x| over all batches; channel_amax = max |x| per index of the last
axis (for SmoothQuant-style migration); pct = the `percentile`-th percentile of |x| over a
pooled sample (every value of small tensors; a uniform random subsample of SAMPLES_PER_BATCH
values per batch of large ones, fixed seed). Ranges are symmetric.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from intq.boundary import iter_chunks
from intq.errors import CalibrationError

SAMPLES_PER_BATCH = 8192


@dataclass
class TensorStats:
    amax: float
    pct: float
    batches: int
    channel_amax: np.ndarray | None = None  # max |x| per index of the last axis


@dataclass
class Calibration:
    stats: dict[str, TensorStats]
    percentile: float

    def channel_amax(self, name: str) -> np.ndarray | None:
        """max |x| per index of the tensor's last axis (None when not recorded)."""
        s = self.stats.get(name)
        return None if s is None else s.channel_amax

    def amax(self, name: str, method: str = "minmax") -> float:
        if name not in self.stats:
            raise CalibrationError(f"no calibration statistics for tensor {name!r}")
        s = self.stats[name]
        v = s.pct if method == "percentile" else s.amax
        return float(v) if v > 0 else float(s.amax) if s.amax > 0 else 1e-8


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    inits = {t.name for t in g.initializer}
    out, seen = [], set()
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if (
            vi.name not in inits
            and vi.name not in seen
            and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        ):
            out.append(vi.name)
            seen.add(vi.name)
    return out


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[Any],
    *,
    percentile: float = 99.99,
    batch_size: int | None = None,
    progress: bool = False,
) -> Calibration:
    """Collect statistics of every float tensor of `model` (shape-inferred) over `batches`.

    Each batch is an array/tensor (single input) or a tuple of them (one per graph input).
    Batches of a size other than the model's static batch are split/padded (padding repeats
    real samples so statistics are not polluted by zeros).
    """
    import onnxruntime as ort

    names = _float_tensors(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    vis = {vi.name: vi for vi in m.graph.value_info}
    for n in names:
        if n not in present and n in vis:
            m.graph.output.append(vis[n])
    outputs = [o.name for o in m.graph.output]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = [i for i in sess.get_inputs()]
    static_batch = batch_size or (
        inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
    )
    in_names = [i.name for i in inputs]
    acc: dict[str, list[float]] = {n: [] for n in outputs + in_names}
    chan: dict[str, np.ndarray] = {}
    pools: dict[str, list[np.ndarray]] = {n: [] for n in outputs + in_names}
    rng = np.random.default_rng(0)
    count = 0
    for k, batch in enumerate(batches):
        arrays = [_to_numpy(b) for b in (batch if isinstance(batch, (tuple, list)) else (batch,))]
        if len(arrays) != len(inputs):
            raise CalibrationError(
                f"calibration batch {k} has {len(arrays)} arrays; "
                f"the model has {len(inputs)} inputs"
            )
        for a, i in zip(arrays, inputs, strict=True):
            want = tuple(d for d in i.shape[1:])
            if tuple(a.shape[1:]) != want:
                raise CalibrationError(
                    f"calibration batch {k}: input {i.name!r} has shape {list(a.shape)}, "
                    f"expected [batch, {', '.join(map(str, want))}]"
                )
        arrays = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays]

        chunks = iter_chunks(arrays, static_batch) if static_batch else [(arrays, 0)]
        for chunk, _ in chunks:
            res = sess.run(outputs, dict(zip(in_names, chunk, strict=True)))
            for n, r in zip(outputs + in_names, res + chunk, strict=True):
                if r.dtype.kind != "f":
                    continue
                a = np.abs(r.astype(np.float32, copy=False))
                if a.size == 0:
                    continue
                if a.ndim >= 1:
                    cm = a.reshape(-1, a.shape[-1]).max(axis=0)
                    chan[n] = np.maximum(chan[n], cm) if n in chan else cm
                a = a.ravel()
                acc[n].append(float(a.max()))
                if a.size > SAMPLES_PER_BATCH:
                    a = a[rng.integers(0, a.size, SAMPLES_PER_BATCH)]
                pools[n].append(a.copy())
        count += 1
        if progress:
            print(f"\rcalibration batch {count}", end="", flush=True)
    if progress:
        print()
    if count == 0:
        raise CalibrationError("calibration data is empty: pass at least one batch")
    stats = {
        n: TensorStats(
            max(acc[n]),
            float(np.percentile(np.concatenate(pools[n]), percentile)),
            len(acc[n]),
            chan.get(n),
        )
        for n in acc
        if acc[n]
    }
    return Calibration(stats, percentile)
