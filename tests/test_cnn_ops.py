"""CNN ops: grouped / depthwise / strided IntConv, IntMaxPool and IntAvgPool lowered to TVM for
cpu-int8 equal the numpy reference element for element; the reference itself is checked
against an independent float computation (torch pooling / convolution)."""

import numpy as np
import pytest
import torch
from test_codegen_ops import check, ri

from intq.errors import GraphError
from intq.ops import make_node
from intq.reference import ReferenceInterpreter


@pytest.mark.parametrize(
    "c,m,group,k,stride,pad",
    [
        (8, 8, 8, 3, 1, 1),  # depthwise 3x3
        (8, 8, 8, 3, 2, 1),  # depthwise strided
        (12, 6, 3, 3, 1, 1),  # grouped
        (8, 16, 4, 1, 2, 0),  # grouped 1x1 strided
        (6, 12, 6, 5, 1, 2),  # depthwise multiplier 2, 5x5
    ],
)
def test_grouped_conv(c, m, group, k, stride, pad):
    x = ri(-128, 127, (2, c, 9, 7), np.int8)
    w = ri(-127, 127, (m, c // group, k, k), np.int8)
    b = ri(-5000, 5000, (m,), np.int32)
    node = make_node(
        "IntConv", ["x", "w", "b"], ["y"], "conv", strides=[stride] * 2, pads=[pad] * 4, group=group
    )
    want = check([node], {"x": x}, {"w": w, "b": b})
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)),
        torch.from_numpy(w.astype(np.float64)),
        torch.from_numpy(b.astype(np.float64)),
        stride=stride,
        padding=pad,
        groups=group,
    )
    np.testing.assert_array_equal(want, ref.numpy().astype(np.int64))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
@pytest.mark.parametrize("k,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_maxpool(dtype, k, stride, pad):
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    x = ri(lo, hi, (2, 3, 9, 8), dtype)
    x[0, 0] = lo  # an all-minimum plane: padding must not change the result
    node = make_node(
        "IntMaxPool", ["x"], ["y"], "mp", kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4
    )
    want = check([node], {"x": x}, {})
    assert want.dtype == dtype
    ref = torch.nn.functional.max_pool2d(
        torch.from_numpy(x.astype(np.float64)), k, stride=stride, padding=pad
    )
    np.testing.assert_array_equal(want, ref.numpy().astype(dtype))


@pytest.mark.parametrize("include_pad", [0, 1])
@pytest.mark.parametrize("k,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (4, 3, 2)])
def test_avgpool(include_pad, k, stride, pad):
    x = ri(-(2**20), 2**20, (2, 3, 10, 9), np.int32)
    node = make_node(
        "IntAvgPool",
        ["x"],
        ["y"],
        "ap",
        kernel_shape=[k, k],
        strides=[stride] * 2,
        pads=[pad] * 4,
        count_include_pad=include_pad,
    )
    want = check([node], {"x": x}, {})
    ref = torch.nn.functional.avg_pool2d(
        torch.from_numpy(x.astype(np.float64)),
        k,
        stride=stride,
        padding=pad,
        count_include_pad=bool(include_pad),
    ).numpy()
    np.testing.assert_array_equal(want, np.floor(ref + 0.5).astype(np.int64))  # round half up


def test_avgpool_rounds_half_up():
    x = np.array([[[[1, 2], [-3, -2]]]], np.int8)  # window sums 1+2 = 3 and -5 over 2 taps
    node = make_node("IntAvgPool", ["x"], ["y"], "ap", kernel_shape=[1, 2], strides=[1, 2])
    y = ReferenceInterpreter_run(node, x)
    np.testing.assert_array_equal(y.reshape(-1), [2, -2])  # 1.5 -> 2, -2.5 -> -2


def test_pool_pads_must_be_smaller_than_kernel():
    node = make_node("IntMaxPool", ["x"], ["y"], "mp", kernel_shape=[2, 2], pads=[2, 2, 2, 2])
    with pytest.raises(GraphError, match="smaller than the kernel"):
        ReferenceInterpreter_run(node, np.zeros((1, 1, 4, 4), np.int8))


def ReferenceInterpreter_run(node, x):  # noqa: N802 - mirrors the class it wraps
    from onnx import TensorProto, helper

    from intq.ir import INTQ_DOMAIN

    g = helper.make_graph(
        [node],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.INT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(INTQ_DOMAIN, 1)]
    )
    return ReferenceInterpreter(m).run({"x": x})["y"]


def test_small_cnn_end_to_end():
    """A CNN with every CNN op (strided, depthwise and grouped conv, ReLU / ReLU6 folded into
    requantization, residual add, max / average / global average pooling) compiles integer-only
    and TVM equals the reference bit for bit."""
    import intq

    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU6())
            self.gc = nn.Conv2d(8, 8, 1, groups=2)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.avg = nn.AvgPool2d(2, 2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

        def forward(self, x):
            y = self.stem(x)
            y = torch.relu(y + self.gc(self.dw(y)))
            return self.head(self.avg(self.pool(y)))

    torch.manual_seed(0)
    model = Net().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    cal = [rng.standard_normal((2, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    lib = intq.compile(model, x, calibration=cal)
    assert intq.check_integer_only(lib.integer_onnx) == []
    ops = {n.op_type for n in lib.integer_onnx.graph.node}
    assert {"IntConv", "IntMaxPool", "IntAvgPool", "IntMean", "IntAdd"} <= ops, ops
    np.testing.assert_array_equal(lib.run(x), intq.reference_run(lib.integer_onnx, x))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    deq = np.asarray(lib.dequantize(lib.run(x)))
    assert np.abs(deq - ref).max() < 0.1 * np.abs(ref).max()
