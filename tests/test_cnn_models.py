"""Integer CNNs end to end: ResNet-18 and RepVGG-A0 at 224x224 (random weights, random BN
statistics) compiled for cpu-int8 equal the numpy reference bit for bit and are integer-only;
the RepVGG blocks are folded from the exported graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import intq
from intq.models.repvgg import repvgg_a0
from intq.models.resnet import resnet18


def randomize_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh BN is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


def compile_and_compare(model: torch.nn.Module, seed: int) -> intq.CompiledModel:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    cal = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(2)]
    lib = intq.compile(model, x, calibration=cal)
    assert intq.check_integer_only(lib.integer_onnx) == []
    got = lib.run(x)
    want = intq.reference_run(lib.integer_onnx, x)
    want = want[0] if isinstance(want, list) else want
    np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    deq = np.asarray(lib.dequantize(got))
    # sanity on the quantization (not a tolerance on TVM): logits track the float model
    assert np.corrcoef(deq.reshape(-1), ref.reshape(-1))[0, 1] > 0.9
    return lib


@pytest.mark.slow
def test_resnet18_224_bit_exact():
    torch.manual_seed(0)
    lib = compile_and_compare(randomize_bn(resnet18(), 1), 0)
    ops = {n.op_type for n in lib.integer_onnx.graph.node}
    assert {"IntConv", "IntMaxPool", "IntAdd", "IntMean", "IntMatMul"} <= ops


@pytest.mark.slow
def test_repvgg_a0_224_bit_exact():
    torch.manual_seed(0)
    lib = compile_and_compare(randomize_bn(repvgg_a0(), 2), 0)
    float_ops = [n.op_type for n in lib.float_onnx.graph.node]
    # 22 blocks -> 22 convs, no branch left: no BatchNormalization, no Add
    assert float_ops.count("Conv") == 22 and float_ops.count("Add") == 1  # the fc bias
    assert "BatchNormalization" not in float_ops
