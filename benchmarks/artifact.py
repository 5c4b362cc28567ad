"""Shared by the runtime-only profiles (kernels.py --run, ab.py, idle.py): an artifact loaded
with example inputs that its signature accepts, and a median timer."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np


def load(so: str, threads: int, seed: int = 0):
    """(Executor, float / integer example inputs, the VM arguments: those inputs quantized).
    Float inputs are standard normal; integer inputs (token ids) lie in their valid range."""
    import tvm

    from intq import boundary, runtime
    from intq.codegen import compat

    ex = runtime.load(so, threads=threads)
    rng = np.random.default_rng(seed)
    xs = []
    for s in ex.signature.inputs:
        if np.dtype(s.dtype).kind == "f":
            xs.append(rng.standard_normal(s.shape).astype(s.dtype))
        else:
            lo, hi = s.valid_range if s.valid_range is not None else (0, 1)
            xs.append(rng.integers(lo, hi, s.shape, endpoint=True).astype(s.dtype))
    q = boundary.quantize_inputs(ex.signature.inputs, xs)
    return ex, xs, [compat.to_device_tensor(a, tvm.cpu()) for a in q]


def median_ms(fn: Callable[[], object], calls: int = 15, before: Callable | None = None) -> float:
    """Median ms of `calls` calls of fn after one untimed call; `before` runs untimed before
    each timed call."""
    fn()
    samples = []
    for _ in range(calls):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return float(np.median(samples)) * 1e3


def kernel_group(name: str) -> str:
    """A kernel's name without the numeric suffix TVM gives each copy (int8_dense_amx_rq3 ->
    int8_dense_amx_rq): the rows the kernel profiles group by."""
    return re.sub(r"\d+$", "", str(name)).rstrip("_")
