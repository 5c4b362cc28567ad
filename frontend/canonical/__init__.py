"""Canonicalisation: rewrite a float ONNX model into the one form the quantizer expects.

After `canonicalize` the graph has no Constant, Identity or Dropout nodes; constant
subexpressions (incl. Shape of static tensors, so Reshape targets) are initializers; linear
layers are `MatMul(x, W)` [+ `Add(b)`] with W a constant (no Gemm); layer norms are
`LayerNormalization(axis=-1)`; GELUs are `Gelu` (opset 20); attention scores are
`MatMul(Q, K^T) -> Mul(c > 0) -> Softmax` (scalar scalings moved behind the MatMul); an
additive key mask from a [B, S] integer input is `Softmax(Where(Cast(Reshape(M), BOOL), x, NEG))`.
"""

from __future__ import annotations

import onnx

from intq.errors import GraphError
from intq.frontend.canonical.constant_to_initializer import ConstantToInitializer
from intq.frontend.canonical.eliminate_identity import EliminateIdentity
from intq.frontend.canonical.fold_constants import FoldConstants
from intq.frontend.canonical.fold_scalar_into_matmul import FoldScalarIntoMatMul
from intq.frontend.canonical.fuse_gelu import FuseGelu
from intq.frontend.canonical.fuse_layernorm import FuseLayerNorm
from intq.frontend.canonical.gather_before_rowwise import GatherBeforeRowwise
from intq.frontend.canonical.gemm_to_matmul_add import GemmToMatMulAdd
from intq.frontend.canonical.key_mask import CanonicalKeyMask
from intq.frontend.export import infer_shapes
from intq.ir import remove_unused
from intq.passes.base import Pass, PassManager, PassResult

__all__ = [
    "PASSES",
    "canonicalize",
    "ConstantToInitializer",
    "EliminateIdentity",
    "FoldConstants",
    "GemmToMatMulAdd",
    "FuseLayerNorm",
    "FuseGelu",
    "FoldScalarIntoMatMul",
    "CanonicalKeyMask",
    "GatherBeforeRowwise",
]

PASSES: tuple[type[Pass], ...] = (
    ConstantToInitializer,
    EliminateIdentity,
    FoldConstants,
    GemmToMatMulAdd,
    FuseLayerNorm,
    FuseGelu,
    FoldScalarIntoMatMul,
    CanonicalKeyMask,
    GatherBeforeRowwise,
)


def prune_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info entries of tensors that no longer exist."""
    live = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for vi in [vi for vi in graph.value_info if vi.name not in live]:
        graph.value_info.remove(vi)


def canonicalize(model: onnx.ModelProto) -> PassResult:
    """Run all canonicalisation passes on a copy of `model` to a fixpoint, then drop unused
    nodes / initializers, re-infer shapes and check the model. `skipped` lists (once each)
    every candidate a pass matched but left alone, with the reason."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    res = PassManager([p() for p in PASSES], fixpoint=True)(m)
    m = res.model
    removed = remove_unused(m.graph)
    prune_value_info(m.graph)
    m = infer_shapes(m)
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        raise GraphError(f"canonicalized model fails onnx.checker: {e}") from e
    skipped = list(dict.fromkeys(res.skipped))
    return PassResult(m, res.modified or removed > 0, res.rewrites, skipped)
