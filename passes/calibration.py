"""Activation calibration: run the float model in onnxruntime over the calibration batches and
record per-tensor statistics of every float tensor.

Per tensor, over all batches (ranges are symmetric, |x| only):
  * minmax:     a = max |x|;
  * percentile: a = the `percentile`-th percentile of |x| over a pooled sample (every value of
    small tensors; a uniform random subsample of SAMPLES_PER_BATCH values per batch of large
    ones, seeded per tensor name, so the sample does not depend on run order);
  * search:     a = argmin over the candidates {p-th percentile of |x| : p in
    SEARCH_PERCENTILES} u {max |x|} of the L2 error of int8 quantization on the pooled sample,
        err(a) = sum_i (clip(round_half_up(|x_i| * 127 / a), 0, 127) * a / 127 - |x_i|)^2,
    i.e. the clipping range that trades rounding against clipping error best;
  * channel_amax: max |x| per index of the last axis (for SmoothQuant-style migration).

Memory: onnxruntime keeps every graph output of a run alive until the run ends (with every
activation made an output, DeiT-Base at batch 64 held over 24 GB and was killed), so calibration
makes the tensors outputs in groups of at most CALIBRATION_OUTPUT_BYTES, one session and one
pass over the batches per group: peak memory is bounded by the budget, time grows with the
number of groups.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from intq.boundary import iter_chunks
from intq.errors import CalibrationError

SAMPLES_PER_BATCH = 8192
#: Bytes of tensors one onnxruntime run hands back during calibration (see the module docstring).
CALIBRATION_OUTPUT_BYTES = 2 << 30
SEARCH_PERCENTILES = (99.9, 99.99, 99.999)
METHODS = ("minmax", "percentile", "search")


@dataclass
class TensorStats:
    amax: float
    pct: float
    batches: int
    search: float | None = None  # only computed when asked for (calibrate(search=True))
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
        if method not in METHODS:
            raise CalibrationError(f"unknown calibration method {method!r}; expected {METHODS}")
        s = self.stats[name]
        if method == "search" and s.search is None:
            raise CalibrationError("range search was not run: calibrate(..., search=True)")
        v = {"minmax": s.amax, "percentile": s.pct, "search": s.search}[method]
        return float(v) if v > 0 else float(s.amax) if s.amax > 0 else 1e-8


def int8_l2_error(sample: np.ndarray, a: float, qmax: int = 127) -> float:
    """L2 error of symmetric quantization of |sample| with clipping range `a`."""
    if a <= 0:
        return float(np.sum(np.square(sample, dtype=np.float64)))
    x = np.abs(np.asarray(sample, dtype=np.float64))
    q = np.clip(np.floor(x * (qmax / a) + 0.5), 0, qmax)
    return float(np.sum(np.square(q * (a / qmax) - x)))


def search_range(sample: np.ndarray, amax: float, qmax: int = 127) -> float:
    """The candidate clipping range with the lowest int8 L2 error on `sample` (ties: larger)."""
    cands = [float(np.percentile(sample, p)) for p in SEARCH_PERCENTILES] + [float(amax)]
    errs = [int8_l2_error(sample, a, qmax) for a in cands]
    best = min(errs)
    return max(a for a, e in zip(cands, errs, strict=True) if e == best)


class _Progress:
    """A one-line progress bar on stderr over calibration batches (silent when disabled)."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total, self.k = enabled, total, 0

    def step(self) -> None:
        self.k += 1
        if not self.enabled:
            return
        if self.total:
            done = int(30 * self.k / self.total)
            bar = "#" * done + "." * (30 - done)
            msg = f"\rcalibrating [{bar}] {self.k}/{self.total}"
        else:
            msg = f"\rcalibrating batch {self.k}"
        sys.stderr.write(msg)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.k:
            sys.stderr.write("\n")
            sys.stderr.flush()


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


def _output_groups(
    model: onnx.ModelProto, outputs: list[str], max_bytes: int | None
) -> list[list[str]]:
    """`outputs` in consecutive groups of at most `max_bytes` (static shapes; a tensor whose size
    is unknown or over the budget gets a group of its own). One group when `max_bytes` is None."""
    if max_bytes is None:
        return [outputs]
    infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    groups: list[list[str]] = [[]]
    used = 0
    for name in outputs:
        size = max_bytes
        vi = infos.get(name)
        if vi is not None and vi.type.tensor_type.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim
            ]
            if all(dims):
                item = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize
                size = int(np.prod(dims)) * item
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def run_float_model(
    model: onnx.ModelProto,
    batches: Iterable[Any],
    names: list[str] | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    max_output_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run the float `model` in onnxruntime over `batches`, yielding {name: value} per chunk of
    the model's static batch for the graph outputs, the inputs and the tensors `names`
    (default: every float tensor). Raises CalibrationError on malformed or empty data.

    With `max_output_bytes`, the tensors are split into groups of at most that many bytes (a
    larger tensor alone) and the batches are run once per group, yielding one dict per group and
    chunk (the inputs with the first group): a name then appears once per chunk, but not every
    name in every dict, and `batches` is read into a list.

    Each batch is an array/tensor (single input) or a tuple of them (one per graph input).
    Batches of a size other than the model's static batch are split/padded (padding repeats
    real samples so statistics are not polluted by zeros).
    """
    import onnxruntime as ort

    names = _float_tensors(model) if names is None else names
    vis = {vi.name: vi for vi in model.graph.value_info}
    outputs = [o.name for o in model.graph.output]
    outputs += [n for n in names if n not in set(outputs) and n in vis]
    groups = _output_groups(model, outputs, max_output_bytes)
    if len(groups) > 1:
        batches = list(batches)  # read once per group
    count = 0
    for g, group in enumerate(groups):
        # A session per group whose graph outputs are exactly that group: onnxruntime keeps
        # every graph output of a run alive to its end, fetched or not.
        m = onnx.ModelProto()
        m.CopyFrom(model)
        known = {o.name: o for o in m.graph.output}
        del m.graph.output[:]
        m.graph.output.extend([known[n] if n in known else vis[n] for n in group])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        del m
        inputs = [i for i in sess.get_inputs()]
        static_batch = batch_size or (
            inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        )
        in_names = [i.name for i in inputs]
        total = len(batches) if hasattr(batches, "__len__") else None
        bar = _Progress(progress and g == 0, total)
        count = 0
        for k, batch in enumerate(batches):
            items = batch if isinstance(batch, (tuple, list)) else (batch,)
            arrays = [_to_numpy(b) for b in items]
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
                feed = dict(zip(in_names, chunk, strict=True))
                values = dict(zip(group, sess.run(group, feed), strict=True))
                if g == 0:
                    values.update(feed)
                yield values
            count += 1
            bar.step()
        bar.close()
        del sess
        if count == 0:
            raise CalibrationError("calibration data is empty: pass at least one batch")


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[Any],
    *,
    percentile: float = 99.99,
    batch_size: int | None = None,
    progress: bool = False,
    search: bool = False,
) -> Calibration:
    """Collect statistics of every float tensor of `model` (shape-inferred) over `batches`
    (see `run_float_model` for the batch format)."""
    acc: dict[str, list[float]] = {}
    pools: dict[str, list[np.ndarray]] = {}
    chan: dict[str, np.ndarray] = {}
    rngs: dict[str, np.random.Generator] = {}
    runs = run_float_model(
        model,
        batches,
        batch_size=batch_size,
        progress=progress,
        max_output_bytes=CALIBRATION_OUTPUT_BYTES,
    )
    for values in runs:
        for n, r in values.items():
            if r.dtype.kind != "f":
                continue
            a = np.abs(r.astype(np.float32, copy=False))
            if a.size == 0:
                continue
            if a.ndim >= 1:
                cm = a.reshape(-1, a.shape[-1]).max(axis=0)
                chan[n] = np.maximum(chan[n], cm) if n in chan else cm
            a = a.ravel()
            acc.setdefault(n, []).append(float(a.max()))
            if a.size > SAMPLES_PER_BATCH:
                if n not in rngs:
                    rngs[n] = np.random.default_rng(zlib.crc32(n.encode()))
                a = a[rngs[n].integers(0, a.size, SAMPLES_PER_BATCH)]
            pools.setdefault(n, []).append(a.copy())
    stats = {}
    for n in acc:
        if not acc[n]:
            continue
        pool = np.concatenate(pools[n])
        amax = max(acc[n])
        stats[n] = TensorStats(
            amax,
            float(np.percentile(pool, percentile)),
            len(acc[n]),
            search_range(pool, amax) if search else None,
            chan.get(n),
        )
    return Calibration(stats, percentile)


def channel_ranges(
    model: onnx.ModelProto, batches: Iterable[Any], names: list[str], *, progress: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of the float tensors `names` over `batches`."""
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for values in run_float_model(model, batches, names, progress=progress):
        for n in names:
            v = values[n].astype(np.float64).reshape(-1, values[n].shape[-1])
            lo[n] = np.minimum(lo[n], v.min(0)) if n in lo else v.min(0)
            hi[n] = np.maximum(hi[n], v.max(0)) if n in hi else v.max(0)
    return {n: (lo[n], hi[n]) for n in names}
