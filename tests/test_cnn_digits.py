"""Digits accuracy of integer-only CNNs: a small ResNet, and a RepVGG trained multi-branch and
compiled folded, each within 0.5 points of its FP32 accuracy on the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

import intq
from intq.models.cnn_digits import digits_cnn_report


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "repvgg"])
def test_digits_cnn_within_half_point(kind):
    r = digits_cnn_report(kind, epochs=15)
    print(r.line())
    assert r.fp32_acc > 90.0  # the model did learn
    assert r.int_acc >= r.fp32_acc - 0.5, r.line()
    assert intq.check_integer_only(r.lib.integer_onnx) == []
    if kind == "repvgg":  # compiled folded: one conv per block, no branch left
        assert "BatchNormalization" not in r.float_ops
        assert r.float_ops.count("Conv") == 6 and r.float_ops.count("Add") == 1  # fc bias
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    want = intq.reference_run(r.lib.integer_onnx, x)
    np.testing.assert_array_equal(r.lib.run(x), want)
