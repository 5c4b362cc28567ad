"""Frontend: model intake (`to_onnx`, `infer_shapes`) and canonicalisation (`canonicalize`)."""

from __future__ import annotations

from intq.frontend.canonical import (
    PASSES,
    ConstantToInitializer,
    EliminateIdentity,
    FoldConstants,
    FoldScalarIntoMatMul,
    FuseGelu,
    FuseLayerNorm,
    GatherBeforeRowwise,
    GemmToMatMulAdd,
    canonicalize,
)
from intq.frontend.export import infer_shapes, to_onnx

__all__ = [
    "to_onnx",
    "infer_shapes",
    "canonicalize",
    "PASSES",
    "ConstantToInitializer",
    "EliminateIdentity",
    "FoldConstants",
    "GemmToMatMulAdd",
    "FuseLayerNorm",
    "FuseGelu",
    "FoldScalarIntoMatMul",
    "GatherBeforeRowwise",
]
