"""FoldRepVGGPass: hand-built ONNX multi-branch blocks (fires / must not fire) checked in
onnxruntime, and exported torch RepVGG models (random and briefly trained) checked against
torch: every fold leaves the float outputs unchanged to 1e-5 relative."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from test_fold_batchnorm import F32, RNG, bn, bn_params, copy, make_model, ops, run_ort

from intq.passes.fold_batchnorm import FoldBatchNormPass
from intq.passes.fold_repvgg import FoldRepVGGPass

REL = 1e-5


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def apply(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    before = run_ort(model, feeds)
    res = FoldRepVGGPass()(copy(model))
    onnx.checker.check_model(res.model, full_check=True)
    for a, b in zip(before, run_ort(res.model, feeds), strict=True):
        assert rel_err(b, a) <= REL
    return res


def conv(x, y, w, b, k, stride=1, group=1, pad=None):
    pads = [k // 2] * 4 if pad is None else pad
    return helper.make_node(
        "Conv", [x, w, b], [y], name=f"conv_{y}", strides=[stride] * 2, pads=pads, group=group
    )


def block(c=8, m=8, stride=1, group=1, identity="bn", k1=1, pad1=None, outputs=("y",), extra=()):
    """Add(Add(conv3x3(x), convk1(x)), identity(x)) as exported (BN folded into the convs)."""
    inits = {
        "w3": RNG.standard_normal((m, c // group, 3, 3)).astype(F32),
        "b3": RNG.standard_normal(m).astype(F32),
        "w1": RNG.standard_normal((m, c // group, k1, k1)).astype(F32),
        "b1": RNG.standard_normal(m).astype(F32),
    }
    nodes = [
        conv("x", "t3", "w3", "b3", 3, stride, group),
        conv("x", "t1", "w1", "b1", k1, stride, group, pad1),
    ]
    nodes.append(helper.make_node("Add", ["t3", "t1"], ["s"], name="add1"))
    if identity == "bn":
        inits.update(bn_params(c, "i_"))
        nodes += [
            bn("x", "tid", prefix="i_"),
            helper.make_node("Add", ["s", "tid"], ["y"], name="add2"),
        ]
    elif identity == "plain":
        nodes.append(helper.make_node("Add", ["x", "s"], ["y"], name="add2"))
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["y"], name="id"))
    nodes += list(extra)
    return make_model(nodes, {"x": [2, c, 7, 6]}, list(outputs), inits)


def feeds(c=8):
    return {"x": RNG.standard_normal((2, c, 7, 6)).astype(F32)}


# ------------------------------------------------------------------------------ fires
@pytest.mark.parametrize(
    "kw",
    [
        {},  # 3x3 + 1x1 + identity BN
        {"identity": "plain"},  # identity without BN
        {"identity": None, "stride": 2, "m": 12},  # downsampling block: no identity
        {"group": 4},  # grouped, identity BN
        {"group": 8},  # depthwise, identity BN
        {"identity": None, "group": 2, "stride": 2, "m": 6},
    ],
)
def test_folds_block(kw):
    m = block(**kw)
    before = ops(m)
    res = apply(m, feeds())
    assert res.modified and not res.skipped, res.skipped
    after = ops(res.model)
    assert after.count("Conv") == 1 and "Add" not in after and "BatchNormalization" not in after
    assert before.count("Conv") == 2
    conv_node = next(n for n in res.model.graph.node if n.op_type == "Conv")
    a = {x.name: helper.get_attribute_value(x) for x in conv_node.attribute}
    assert a["group"] == kw.get("group", 1) and a["strides"] == [kw.get("stride", 1)] * 2


# ------------------------------------------------------------------------ must not fire
def assert_unchanged(m, reason, feeds_=None):
    res = apply(m, feeds_ or feeds())
    assert ops(res.model) == ops(m) and not res.modified
    assert any(reason in s for s in res.skipped), res.skipped


def test_not_when_pads_not_centred():
    # a 3x3 "1x1 branch" padded [0, 0, 2, 2]: same output shape, shifted window
    assert_unchanged(block(k1=3, pad1=[0, 0, 2, 2], identity=None), "not centred")


def test_not_when_identity_broadcasts_channels():
    """x [N, 1, H, W] + convs of x to 8 channels: Add broadcasts, but it is no identity kernel."""
    assert_unchanged(block(c=1, m=8, identity="plain"), "needs M == C", feeds(c=1))


def test_not_when_kernel_even():
    assert_unchanged(block(k1=2, pad1=[0, 0, 1, 1], identity=None), "is not odd")


def test_not_when_branch_read_elsewhere():
    relu = helper.make_node("Relu", ["t1"], ["r"], name="relu")
    assert_unchanged(block(outputs=("y", "r"), extra=[relu]), "read outside the block")


def test_not_on_resnet_residual():
    """y = conv(relu(conv(x))) + x: the branches read different tensors."""
    inits = {
        "wa": RNG.standard_normal((8, 8, 3, 3)).astype(F32),
        "ba": RNG.standard_normal(8).astype(F32),
        "wb": RNG.standard_normal((8, 8, 3, 3)).astype(F32),
        "bb": RNG.standard_normal(8).astype(F32),
    }
    nodes = [
        conv("x", "a", "wa", "ba", 3),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv("r", "b", "wb", "bb", 3),
        helper.make_node("Add", ["b", "x"], ["y"], name="res"),
    ]
    m = make_model(nodes, {"x": [2, 8, 7, 6]}, ["y"], inits)
    assert_unchanged(m, "not a branch of")


def test_not_when_strides_differ():
    """3x3/2 unpadded and 1x1/3 give the same 3x3 output from 7x7 but are not one conv."""
    inits = {
        "w3": RNG.standard_normal((8, 8, 3, 3)).astype(F32),
        "w1": RNG.standard_normal((8, 8, 1, 1)).astype(F32),
        "b": np.zeros(8, F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w3", "b"], ["t3"], name="c3", strides=[2, 2], pads=[0] * 4),
        helper.make_node("Conv", ["x", "w1", "b"], ["t1"], name="c1", strides=[3, 3], pads=[0] * 4),
        helper.make_node("Add", ["t3", "t1"], ["y"], name="add"),
    ]
    m = make_model(nodes, {"x": [2, 8, 7, 7]}, ["y"], inits)
    assert_unchanged(m, "not centred", {"x": RNG.standard_normal((2, 8, 7, 7)).astype(F32)})


# ------------------------------------------------------------------------------- torch
def _export_folded(model, x):
    from intq.frontend import canonicalize, infer_shapes, to_onnx

    proto = canonicalize(infer_shapes(to_onnx(model, (x,)))).model
    bn_res = FoldBatchNormPass()(proto)
    before = ops(bn_res.model)
    res = FoldRepVGGPass()(copy(bn_res.model))
    onnx.checker.check_model(res.model, full_check=True)
    (got,) = run_ort(res.model, {res.model.graph.input[0].name: x.numpy()})
    return before, ops(res.model), res, got


@pytest.mark.parametrize("groups", [1, 4])
def test_torch_repvgg_random_and_trained(groups):
    from intq.models.repvgg import repvgg_digits

    torch.manual_seed(0)
    model = repvgg_digits(widths=(8, 16), depths=(2, 2), groups=groups)
    x = torch.randn(8, 1, 8, 8)
    for trained in (False, True):
        if trained:  # a few real optimizer steps in train mode: real BN statistics
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            model.train()
            for _ in range(20):
                xb, yb = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            ref = model(x).numpy()
        before, after, res, got = _export_folded(model, x)
        assert rel_err(got, ref) <= REL, (trained, rel_err(got, ref))
        # 4 blocks, 2 of them keep shape (identity BN); each: 2 convs + 1-2 Adds -> 1 conv
        assert before.count("BatchNormalization") == 2 and "BatchNormalization" not in after
        assert before.count("Conv") == 8 and after.count("Conv") == 4
        assert len(res.rewrites) == 4
