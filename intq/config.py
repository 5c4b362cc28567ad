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
    softmax_kernel: integer softmax family: "shiftmax" (I-ViT: base-2 exponent, shift +
        polynomial exp2) or "ibert" (I-BERT: natural exponent, i-exp = -ln2 decomposition +
        second-order polynomial).
    gelu_kernel: integer GELU family: "shiftgelu" (I-ViT: x sigmoid(1.702 x) from exp2) or
        "ibert" (I-BERT i-GELU: erf from a second-order polynomial, int16 input) or "poly"
        (erf from a degree-9 fixed-point polynomial on [0, 3], int16 input; IntPolyGELU).
    smooth_alpha: SmoothQuant migration strength for matmuls with a constant weight whose input
        is a wide (int16/int32) per-tensor activation: None (off) or alpha in [0, 1]. The
        activation is requantized to int8 per input channel k at s * m_k and W's row k is
        multiplied by m_k = amax_x[k]^alpha / amax_W[k]^(1 - alpha) before weight quantization
        (exact algebra; outlier channels no longer set everyone's int8 step).
    deferred_softmax: a softmax read only as P in P @ V emits uint8 numerators e / e(0)
        (IntSoftmaxNumerator) and the matmul divides by their row sum (IntRowNormalize), so
        probabilities keep 8 bits relative to the row's largest one instead of to 1.
    softmax_numerator_bits: with deferred_softmax, the numerators' width: 8 (uint8, 255 =
        the row's largest) or 16 (int16 up to min(32767, (2^31 - 1) // (127 K)) for K keys,
        so P @ V's int32 accumulator cannot overflow; small probabilities of peaked rows no
        longer round to 0).
    linear_input: width of the activation entering a linear layer (MatMul with a constant
        [K, N] weight). "int8"; or "int16" with at most q levels each side, q the largest with
        q (127 K + max_n |b_n| / (amax_x s_W[n])) < 2^31, so the int32 accumulator of the
        int16 x int8 products plus the bias cannot overflow (q = 32767 up to K = 516; 11 010
        at K = 1536). Matmuls of two activations (attention) stay int8.
    (LayerNorm is one kernel in both families: integer statistics and the Newton isqrt.)
    cpu_mcpu: LLVM CPU name cpu-int8 compiles for, e.g. "cascadelake" (VNNI kernels) to build on
        one machine for another; None: the host CPU.
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
    softmax_kernel: Literal["shiftmax", "ibert"] = "shiftmax"
    gelu_kernel: Literal["shiftgelu", "ibert", "poly"] = "shiftgelu"
    smooth_alpha: float | None = None
    deferred_softmax: bool = False
    linear_input: Literal["int8", "int16"] = "int8"
    softmax_numerator_bits: Literal[8, 16] = 8
    opset: int = 18
    progress: bool = False
    reparam: Literal["none", "repq"] = "none"
    cpu_mcpu: str | None = None
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
        if self.softmax_kernel not in ("shiftmax", "ibert"):
            raise ConfigError(
                f"softmax_kernel must be 'shiftmax' or 'ibert', got {self.softmax_kernel!r}"
            )
        if self.gelu_kernel not in ("shiftgelu", "ibert", "poly"):
            raise ConfigError(
                f"gelu_kernel must be 'shiftgelu', 'ibert' or 'poly', got {self.gelu_kernel!r}"
            )
        if self.smooth_alpha is not None and not (
            isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0
        ):
            raise ConfigError(f"smooth_alpha must be None or in [0, 1], got {self.smooth_alpha!r}")
        if self.softmax_numerator_bits not in (8, 16):
            raise ConfigError(
                f"softmax_numerator_bits must be 8 or 16, got {self.softmax_numerator_bits!r}"
            )
        if self.linear_input not in ("int8", "int16"):
            raise ConfigError(f"linear_input must be 'int8' or 'int16', got {self.linear_input!r}")
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
