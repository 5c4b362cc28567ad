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
        "minmax" (largest |x| seen), "percentile" (the `percentile`-th percentile of |x|
        over a pooled sample of the calibration data) or "search" (of the 99.9/99.99/99.999th
        percentiles and the max, the range with the lowest int8 L2 error on that sample).
        Wide tensors (int16 residuals, int32 outputs)
        always use minmax: they have the headroom and clipping them would hurt.
    residual_dtype: width of the residual stream (adds and concats of activations).
    layernorm_frac_bits: fraction bits k of the normalised value inside IntLayerNorm.
    softmax_frac_bits / gelu_frac_bits: fraction bits F of the base-2 exponent fed to exp2_neg.
    num_threads: runtime threads (None: all cores of the machine running the artifact).
    softmax_out: attention probabilities as uniform uint8 (Shiftmax, scale 2^-8) or as log2
        codes p ~= 2^-k of `softmax_log2_bits` bits (RepQ-ViT's log2 quantizer; the product with
        V becomes shifts: IntLog2MatMul).
    reparam: "repq" calibrates post-LayerNorm activations per channel and folds the per-channel
        scales into the LayerNorm affine and the next linear layers (RepQLayerNormPass), so they
        quantize well per tensor; "none" leaves the float graph as exported.
    progress: print a progress bar over the calibration batches on stderr.
    """

    calibration: Literal["minmax", "percentile", "search"] = "percentile"
    percentile: float = 99.99
    residual_dtype: Literal["int16"] = "int16"
    layernorm_frac_bits: int = 10
    softmax_frac_bits: int = 12
    softmax_out: Literal["uniform", "log2"] = "uniform"
    softmax_log2_bits: int = 4
    gelu_frac_bits: int = 12
    num_threads: int | None = None
    opset: int = 18
    progress: bool = False
    reparam: Literal["none", "repq"] = "none"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.calibration not in ("minmax", "percentile", "search"):
            raise ConfigError(
                f"calibration must be 'minmax', 'percentile' or 'search', got {self.calibration!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.reparam not in ("none", "repq"):
            raise ConfigError(f"reparam must be 'none' or 'repq', got {self.reparam!r}")
        if self.softmax_out not in ("uniform", "log2"):
            raise ConfigError(f"softmax_out must be 'uniform' or 'log2', got {self.softmax_out!r}")
        if self.softmax_log2_bits not in (3, 4):
            raise ConfigError(f"softmax_log2_bits must be 3 or 4, got {self.softmax_log2_bits!r}")
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
        if self.opset < 17:
            raise ConfigError("opset must be >= 17 (LayerNormalization)")

    def with_(self, **kw: object) -> CompileConfig:
        return replace(self, **kw)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; expected one of {TARGETS}")
    return target
