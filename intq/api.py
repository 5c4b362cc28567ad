"""The public verb `compile` and the `CompiledModel` it returns.

The pipeline, top to bottom:
    1. export       model -> float ONNX                         (frontend.to_onnx)
    2. canonicalise one form for LN / GELU / linear / attention  (frontend.canonicalize)
       fold          BatchNorm into the preceding conv / linear     (passes.fold_batchnorm)
                     RepVGG multi-branch blocks into one conv       (passes.fold_repvgg)
       reparam       per-channel LN scales into LN + linears (opt.) (passes.repq_reparam)
    3. calibrate    float ranges of every tensor in onnxruntime  (passes.calibration)
    4. quantize     float graph -> integer-only ONNX graph       (passes.quantize)
    5. verify       integer-only check                           (intq.check)
    6. lower        integer ONNX -> TVM Relax -> target code     (codegen)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from intq import boundary
from intq.check import check_integer_only
from intq.config import CompileConfig, check_target
from intq.errors import IntegerOnlyViolation


class CompiledModel:
    """An integer-only compiled model: run it, inspect its integer graph, export it."""

    def __init__(
        self,
        integer_onnx: onnx.ModelProto,
        float_onnx: onnx.ModelProto,
        build: Any,
        target: str,
        config: CompileConfig,
    ) -> None:
        self.integer_onnx = integer_onnx
        self.float_onnx = float_onnx
        self.target = target
        self.config = config
        self._build = build
        self.signature: boundary.Signature = build.signature
        self._executor_instance: Any = None

    @property
    def _executor(self) -> Any:
        """The in-process executor, made on first use (a cuda-int8 model compiles on a machine
        without a GPU; only running it needs one)."""
        if self._executor_instance is None:
            self._executor_instance = self._build.executor()
        return self._executor_instance

    @property
    def output_scales(self) -> list[float | list[float] | None]:
        return self._executor.output_scales

    @property
    def input_scales(self) -> list[float | None]:
        return [i.scale for i in self.signature.inputs]

    def run(self, *inputs: Any) -> np.ndarray | list[np.ndarray]:
        """Run on the same float inputs the original model takes; returns integer outputs (one
        array, or a list when the model has several). Any batch size is accepted."""
        return self._executor.run(*inputs)

    def dequantize(self, outputs: np.ndarray | list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """Float values of `run`'s integer outputs (output * scale)."""
        return boundary.dequantize_outputs(self.signature, outputs)

    def export(self, path: str | os.PathLike[str]) -> str:
        """Write the deployable artifact (a shared library with the signature embedded) to
        `path` atomically: an interrupted export leaves no file at `path`."""
        return self._build.export(os.fspath(path))

    def error_report(self, batches: Iterable[Any]) -> Any:
        """Per-tensor SQNR of the integer model against the float model on `batches`
        (an `intq.report.ErrorReport`: `.to_text()`, `.plot(path)`, `.output_sqnr_db`)."""
        from intq.report import error_report

        return error_report(self.float_onnx, self.integer_onnx, batches)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target!r}, inputs=[{self.signature.describe()}])"


def compile(  # noqa: A001 - the public verb
    model: Any,
    example_inputs: Any,
    calibration: Iterable[Any],
    target: str = "cpu-int8",
    config: CompileConfig | None = None,
) -> CompiledModel:
    """Compile `model` (torch.nn.Module, onnx.ModelProto or .onnx path) into an integer-only
    model for `target`, calibrating activation ranges on `calibration` (an iterable of input
    batches: arrays/tensors, or tuples of them for several inputs)."""
    from intq.codegen.build import build as codegen_build
    from intq.frontend import canonicalize, infer_shapes, to_onnx
    from intq.passes.calibration import calibrate, channel_ranges
    from intq.passes.fold_batchnorm import FoldBatchNormPass
    from intq.passes.fold_repvgg import FoldRepVGGPass
    from intq.passes.quantize import QuantizePass
    from intq.passes.repq_reparam import RepQLayerNormPass

    cfg = config or CompileConfig()
    check_target(target)
    float_model = canonicalize(infer_shapes(to_onnx(model, example_inputs, opset=cfg.opset))).model
    float_model = FoldBatchNormPass().run(float_model).model
    float_model = FoldRepVGGPass().run(float_model).model
    if cfg.reparam == "repq":
        calibration = list(calibration)  # read twice: per-channel ranges, then calibration
        names = RepQLayerNormPass.candidates(float_model)
        ranges = channel_ranges(float_model, calibration, names, progress=cfg.progress)
        float_model = RepQLayerNormPass(ranges).run(float_model).model
    cal = calibrate(
        float_model,
        calibration,
        percentile=cfg.percentile,
        progress=cfg.progress,
        search=cfg.calibration == "search",
    )
    integer_model = QuantizePass(cal, cfg).run(float_model).model
    offenders = check_integer_only(integer_model)
    if offenders:
        raise IntegerOnlyViolation(
            "integer graph is not integer-only: " + "; ".join(map(str, offenders[:5]))
        )
    build = codegen_build(integer_model, target, cfg)
    return CompiledModel(integer_model, float_model, build, target, cfg)
