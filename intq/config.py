"""Validated compile configuration (one dataclass, checked on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from intq.errors import ConfigError

TARGETS = ("cpu-int8", "cuda-int8", "npu-int8")


@dataclass(frozen=True)
class CompileConfig:
    """Knobs of `intq.compile`. Defaults are what the tests and benchmarks use.

    calibration: how an int8 activation's range is taken from the calibration data:
        "minmax" (largest |x| seen) or "percentile" (the `percentile`-th percentile of |x|
        over a pooled sample of the calibration data). Wide tensors (int16 residuals, int32 outputs)
        always use minmax: they have the headroom and clipping them would hurt.
    residual_dtype: width of the residual stream (adds and concats of activations).
    layernorm_frac_bits: fraction bits k of the normalised value inside IntLayerNorm.
    softmax_frac_bits / gelu_frac_bits: fraction bits F of the base-2 exponent fed to exp2_neg.
    num_threads: runtime threads (None: all cores of the machine running the artifact).
    cpu_mcpu: LLVM CPU name cpu-int8 compiles for, e.g. "cascadelake" (VNNI kernels) to build on
        one machine for another; None: the host CPU.
    """

    calibration: Literal["minmax", "percentile"] = "percentile"
    percentile: float = 99.99
    residual_dtype: Literal["int16"] = "int16"
    layernorm_frac_bits: int = 10
    softmax_frac_bits: int = 12
    gelu_frac_bits: int = 12
    num_threads: int | None = None
    opset: int = 18
    cpu_mcpu: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.calibration not in ("minmax", "percentile"):
            raise ConfigError(
                f"calibration must be 'minmax' or 'percentile', got {self.calibration!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.residual_dtype != "int16":
            raise ConfigError("residual_dtype: only 'int16' is implemented")
        for name in ("layernorm_frac_bits", "softmax_frac_bits", "gelu_frac_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 4 <= v <= 20:
                raise ConfigError(f"{name} must be an int in [4, 20], got {v!r}")
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ConfigError(
                f"num_threads must be a positive int or None, got {self.num_threads!r}"
            )
        if self.cpu_mcpu is not None and (
            not isinstance(self.cpu_mcpu, str) or not self.cpu_mcpu.strip()
        ):
            raise ConfigError(f"cpu_mcpu must be an LLVM CPU name or None, got {self.cpu_mcpu!r}")
        if self.opset < 17:
            raise ConfigError("opset must be >= 17 (LayerNormalization)")

    def with_(self, **kw: object) -> CompileConfig:
        return replace(self, **kw)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; expected one of {TARGETS}")
    return target
