"""Log2 attention (RepQ-ViT's log2 quantizer): op semantics, TVM == reference, end to end."""

import numpy as np
import pytest
import torch

import intq
from intq.config import CompileConfig
from intq.errors import ConfigError, GraphError
from intq.models.vit import VisionTransformer, ViTConfig
from intq.ops import log2attn, make_node
from intq.ops.core import SOFTMAX_RECIP_BITS
from intq.reference import reference_run
from tests.test_codegen_ops import check, ri


def test_log2_code_is_round_to_nearest_of_minus_log2():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.integers(1, 1 << 30, 20000), [1, 2, 3, 1 << 30, (1 << 30) - 1]])
    for bits in (3, 4):
        z = log2attn.zero_code(bits)
        got = log2attn.log2_code(p, bits)
        exact = SOFTMAX_RECIP_BITS - np.log2(p.astype(np.float64))
        want = np.minimum(np.floor(exact + 0.5), z)  # no p here sits on a half-way point
        assert np.array_equal(got, want)
    assert log2attn.log2_code(np.array([0]), 4)[0] == 15


def test_bits_are_validated():
    with pytest.raises(GraphError, match="code bits"):
        log2attn.zero_code(5)
    with pytest.raises(ConfigError, match="softmax_log2_bits"):
        CompileConfig(softmax_log2_bits=8)
    with pytest.raises(ConfigError, match="softmax_out"):
        CompileConfig(softmax_out="log10")


@pytest.mark.parametrize("bits", [3, 4])
def test_softmax_log2_tvm_equals_reference(bits):
    x = ri(-(1 << 20), 1 << 16, (2, 3, 7, 19), np.int32)
    x[0, 0, 0] = 0  # a row of ties
    x[1, 2, 3, 5] = 1 << 24  # one dominant logit
    codes = check(
        [make_node("IntSoftmaxLog2", ["x"], ["y"], "sm", frac_bits=12, bits=bits)], {"x": x}, {}
    )
    assert codes.max() <= log2attn.zero_code(bits)
    assert codes[1, 2, 3, 5] == 0  # probability ~1 -> code 0


@pytest.mark.parametrize("bits", [3, 4])
def test_log2_matmul_tvm_equals_reference(bits):
    z = log2attn.zero_code(bits)
    a = ri(0, z, (2, 3, 5, 33), np.uint8)
    v = ri(-128, 127, (2, 3, 33, 9), np.int8)
    a[0, 0, 0, :] = 0  # every weight 2^(Z-1): the accumulation bound
    v[0, 0] = -128
    y = check(
        [make_node("IntLog2MatMul", ["a", "v"], ["y"], "mm", bits=bits)], {"a": a, "v": v}, {}
    )
    # the definition: sum of V shifted by (Z-1-k), code Z contributes nothing
    w = np.where(a < z, 2.0 ** (z - 1 - a.astype(np.float64)), 0.0)
    assert np.array_equal(y, (w @ v.astype(np.float64)).astype(np.int64))


def test_log2_matmul_rejects_lengths_that_could_overflow():
    too_long = log2attn.log2_matmul_max_tokens(4) + 1
    a = np.zeros((1, too_long), np.uint8)
    v = np.zeros((too_long, 2), np.int8)
    with pytest.raises(GraphError, match="int32 accumulation bound"):
        log2attn._log2_mm_shape([a.shape, v.shape], [a.dtype, v.dtype], {"bits": 4})


def test_vit_with_log2_attention_compiles_bit_exact():
    cfg = ViTConfig(
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
    )
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(4)]
    lib = intq.compile(model, data[0], calibration=data, config=CompileConfig(softmax_out="log2"))
    ops = [n.op_type for n in lib.integer_onnx.graph.node]
    assert ops.count("IntSoftmaxLog2") == 2 and ops.count("IntLog2MatMul") == 2
    assert "IntSoftmax" not in ops
    x = data[2].numpy()
    assert np.array_equal(lib.run(x), reference_run(lib.integer_onnx, x))
    # the log2 model still computes the same function approximately
    with torch.no_grad():
        ref = model(data[2]).numpy()
    got = lib.dequantize(lib.run(x))
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9
