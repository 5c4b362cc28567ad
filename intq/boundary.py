"""The boundary of an integer graph: the input quantizer and the output dequantizer.

The input quantizer is the graph's own first op (`QuantizeFloatBits`: integer arithmetic on the
float32 input's IEEE-754 bit pattern), so the host only checks its inputs, converts them to
float32 and hands the graph their bits as int32; the output dequantizer (q * s) is the only
float arithmetic at run time. numpy only, so the runtime-only loader shares it with
`CompiledModel` and the reference interpreter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from intq.errors import InputSignatureError, InputValueError

DTYPE_BOUNDS: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}
"""Saturation range of each integer dtype (the one table; intq.ops.fixedpoint uses it too)."""


@dataclass(frozen=True)
class InputSpec:
    """A graph input: the float tensor the user passes and how it becomes an integer tensor.

    `scale is None` means the input is already integer (e.g. token ids) and passes through,
    checked for dtype and range. A float input is read by the graph as the int32 bit pattern of
    its float32 values (`bits`) and quantized there at step `scale` (`QuantizeFloatBits`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # what the user passes, e.g. "float32" or "int64"
    qdtype: str  # what the integer graph reads, e.g. "int32" (float32 bits) or "int64"
    scale: float | None
    valid_range: tuple[int, int] | None = None  # integer inputs: allowed [lo, hi] (e.g. ids)
    bits: bool = False  # the graph reads float32 bit patterns (int32) and quantizes them

    def signature(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class OutputSpec:
    """A graph output: integer dtype and the scale(s) that turn it into float (x * scale)."""

    name: str
    shape: tuple[int, ...]
    qdtype: str
    scale: float | list[float] | None
    axis: int = -1


METADATA_KEY = "intq"
FORMAT_VERSION = 2  # 2: float inputs quantized in the graph, from their bits


@dataclass(frozen=True)
class Signature:
    """Compile-time metadata of an integer graph: its boundary and its static batch size.

    Stored as JSON in the integer ONNX model's metadata_props[METADATA_KEY] and beside every
    exported artifact; scales live here and nowhere in the graph.
    """

    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    batch: int

    def to_json(self) -> str:
        def enc(s: InputSpec | OutputSpec) -> dict[str, Any]:
            d = asdict(s)
            d["shape"] = list(s.shape)
            return d

        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "batch": self.batch,
                "inputs": [enc(s) for s in self.inputs],
                "outputs": [enc(s) for s in self.outputs],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Signature:
        d = json.loads(text)
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported intq metadata format {d.get('format')!r} (this intq reads "
                f"{FORMAT_VERSION}: recompile the model)"
            )
        ins = tuple(
            InputSpec(
                i["name"],
                tuple(i["shape"]),
                i["dtype"],
                i["qdtype"],
                i["scale"],
                tuple(i["valid_range"]) if i.get("valid_range") is not None else None,
                bool(i.get("bits", False)),
            )
            for i in d["inputs"]
        )
        outs = tuple(
            OutputSpec(o["name"], tuple(o["shape"]), o["qdtype"], o["scale"], o.get("axis", -1))
            for o in d["outputs"]
        )
        return cls(ins, outs, int(d["batch"]))

    def describe(self) -> str:
        return ", ".join(s.signature() for s in self.inputs)


def float_bits(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The int32 bit patterns of `x` as float32 (the graph's `QuantizeFloatBits` reads them):
    a view when `x` is already float32, else x rounded to float32 first; into `out` (int32,
    x's shape) when given."""
    if out is None:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
    np.copyto(out.view(np.float32), x, casting="same_kind")  # one pass, rounding as astype
    return out


def check_batch_inputs(
    specs: tuple[InputSpec, ...] | list[InputSpec], inputs: tuple[Any, ...]
) -> list[np.ndarray]:
    """Validate user inputs against the signature; the leading (batch) dim may differ, but must
    agree across inputs. Raises InputSignatureError naming the input and the signature."""
    sig = ", ".join(s.signature() for s in specs)
    if len(inputs) != len(specs):
        raise InputSignatureError(f"expected {len(specs)} input(s) ({sig}), got {len(inputs)}")
    arrays = []
    batch = None
    for spec, x in zip(specs, inputs, strict=True):
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype.kind != np.dtype(spec.dtype).kind:
            raise InputSignatureError(
                f"input {spec.name!r} has dtype {x.dtype}, expected {spec.dtype} (signature: {sig})"
            )
        if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != tuple(spec.shape[1:]):
            raise InputSignatureError(
                f"input {spec.name!r} has shape {list(x.shape)}, expected "
                f"[batch, {', '.join(map(str, spec.shape[1:]))}] (signature: {sig})"
            )
        if batch is not None and x.shape[0] != batch:
            raise InputSignatureError(f"inputs disagree on batch size ({batch} vs {x.shape[0]})")
        batch = x.shape[0]
        if spec.scale is None:
            lo, hi = DTYPE_BOUNDS.get(spec.qdtype, (None, None))
            if lo is not None and x.size and (x.min() < lo or x.max() > hi):
                raise InputSignatureError(f"input {spec.name!r} has values outside {spec.qdtype}")
            if spec.valid_range is not None and x.size:
                vlo, vhi = spec.valid_range
                bad = np.argwhere((x < vlo) | (x > vhi))
                if bad.size:
                    pos = tuple(int(v) for v in bad[0])
                    raise InputValueError(
                        f"input {spec.name!r} holds {int(x[pos])} at index {list(pos)}, outside "
                        f"its valid range [{vlo}, {vhi}] ({len(bad)} value(s) out of range)",
                        spec.name,
                        int(x[pos]),
                    )
        elif x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            # min / max propagate NaN and reach +-inf: two passes and no temporary array (a
            # bool mask of the input is a fresh allocation, page faults included, every call)
            raise InputSignatureError(f"input {spec.name!r} holds NaN or infinity")
        arrays.append(x)
    return arrays


def quantize_inputs(
    specs: tuple[InputSpec, ...] | list[InputSpec],
    arrays: list[np.ndarray],
    outs: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """What the graph reads for each input: a float input's float32 bit patterns (int32), an
    integer input cast to its qdtype; into `outs[i]` when given."""
    res = []
    for i, (s, x) in enumerate(zip(specs, arrays, strict=True)):
        out = outs[i] if outs is not None else None
        if s.bits:
            res.append(float_bits(x, out))
        elif s.scale is not None:
            raise InputSignatureError(
                f"input {s.name!r}: a float input the graph does not quantize itself (an artifact "
                "of an older intq: recompile it)"
            )
        elif out is not None:
            np.copyto(out, x, casting="unsafe")  # the same C cast as astype
            res.append(out)
        else:
            res.append(x.astype(s.qdtype))
    return res


def dequantize(y: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Float value of an integer output: y * scale (per-channel scales broadcast along axis)."""
    if spec.scale is None:
        return np.asarray(y)
    s = np.asarray(spec.scale, dtype=np.float64)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * y.ndim
        shape[spec.axis % y.ndim] = s.size
        s = s.reshape(shape)
    return (np.asarray(y, dtype=np.float64) * s).astype(np.float32)


def iter_chunks(arrays: list[np.ndarray], batch: int):
    """Yield (chunk, k): consecutive chunks of `batch` samples; a short last chunk (k real
    samples) is padded by repeating its own samples, so padding never adds new values."""
    n = arrays[0].shape[0]
    if n == 0:
        raise InputSignatureError("empty batch")
    for start in range(0, n, batch):
        chunk = [a[start : start + batch] for a in arrays]
        k = chunk[0].shape[0]
        if k < batch:
            idx = np.arange(batch) % k
            chunk = [c[idx] for c in chunk]
        yield chunk, k


def run_in_batches(fn, arrays: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Run a fixed-batch `fn(list_of_arrays) -> list_of_arrays` over any batch size, trimming
    the padded samples. Every intq op is per-sample, so a sample's output does not depend on
    its chunk-mates."""
    outs = [[r[:k] for r in fn(chunk)] for chunk, k in iter_chunks(arrays, batch)]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def pack_outputs(outputs: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One output -> the array itself; several -> the list (the convention of every `run`)."""
    return outputs[0] if len(outputs) == 1 else outputs


def dequantize_outputs(sig: Signature, outputs: Any) -> Any:
    if isinstance(outputs, np.ndarray):
        return dequantize(outputs, sig.outputs[0])
    return [dequantize(y, s) for y, s in zip(outputs, sig.outputs, strict=True)]
