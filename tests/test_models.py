"""intq.models: the ViT factories build and run, configs are validated, the digits split is
fixed, and a small ViT exports to a valid ONNX model."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from intq.models.digits import evaluate, load_digits_split, random_affine, train_classifier
from intq.models.vit import (
    DIGITS_CONFIG,
    VisionTransformer,
    ViTConfig,
    deit_base,
    deit_small,
    deit_tiny,
    vit_digits,
)

TINY = ViTConfig(
    img_size=8,
    patch_size=4,
    in_chans=1,
    num_classes=5,
    embed_dim=16,
    depth=1,
    num_heads=2,
    mlp_ratio=2.0,
)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_deit_tiny_forward():
    torch.manual_seed(0)
    model = deit_tiny().eval()
    assert model.config.embed_dim == 192 and model.config.num_heads == 3
    assert model.pos_embed.shape == (1, 197, 192)
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    assert 5.5e6 < _params(model) < 6.0e6  # DeiT-Ti: 5.7M


@torch.no_grad()
def test_deit_small_runs_small_images():
    model = deit_small(num_classes=10, img_size=32).eval()  # 4 patches + cls: a cheap forward
    cfg = model.config
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size) == (384, 6, 12, 16)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("factory", "dim", "heads", "n_params"),
    [(deit_small, 384, 6, 22.05e6), (deit_base, 768, 12, 86.57e6)],
)
@torch.no_grad()
def test_deit_small_base_at_224_on_meta(factory, dim, heads, n_params):
    with torch.device("meta"):  # no memory, no init cost
        model = factory().eval()
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    cfg = model.config
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.patch_size) == (dim, heads, 12, 16)
    assert abs(_params(model) - n_params) / n_params < 0.005


@torch.no_grad()
def test_vit_digits_forward():
    model = vit_digits().eval()
    assert model.config == DIGITS_CONFIG
    assert model.config.num_patches == 16
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_init_like_timm():
    torch.manual_seed(0)
    model = vit_digits()
    qkv = model.blocks[0].attn.qkv
    assert torch.all(qkv.bias == 0)
    assert qkv.weight.abs().max() <= 2.0  # timm truncates at +-2 (absolute), i.e. 100 std
    assert abs(qkv.weight.std().item() - 0.02) < 0.003
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"embed_dim": 64, "num_heads": 3},
            r"embed_dim \(64\) must be divisible by num_heads \(3\)",
        ),
        (
            {"img_size": 10, "patch_size": 4},
            r"img_size \(10\) must be divisible by patch_size \(4\)",
        ),
        ({"depth": 0}, "depth must be a positive int"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0"),
        ({"gelu_approximate": "fast"}, "gelu_approximate"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.depth = 2  # type: ignore[misc]


def test_digits_split_shapes_and_determinism():
    a = load_digits_split()
    b = load_digits_split()
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.y_train.shape == (1347,) and a.y_test.shape == (450,)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.mean, a.std) == (b.mean, b.std)
    # Normalised with the train statistics; stratified: every class in both halves.
    assert abs(a.x_train.mean().item()) < 1e-4 and abs(a.x_train.std().item() - 1) < 1e-3
    assert 0 < a.mean < 1 and 0 < a.std < 1
    assert torch.bincount(a.y_test, minlength=10).min() >= 40
    # Another seed gives another split; normalize() reproduces the stored inputs.
    c = load_digits_split(seed=1)
    assert not torch.equal(a.y_test, c.y_test)
    from sklearn.datasets import load_digits

    raw = load_digits().images
    x = a.normalize(raw)
    assert x.shape == (1797, 1, 8, 8)
    assert a.background == pytest.approx(-a.mean / a.std)


def test_random_affine():
    split = load_digits_split()
    x, fill = split.x_train[:32], split.background
    assert random_affine(x, fill, torch.Generator().manual_seed(0), prob=0.0) is x
    ident = random_affine(
        x, fill, torch.Generator().manual_seed(0), degrees=0, scale=0, translate=0
    )
    torch.testing.assert_close(ident, x)
    a = random_affine(x, fill, torch.Generator().manual_seed(1))
    b = random_affine(x, fill, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert a.min() >= x.min() - 1e-5  # blank pixels stay blank, never below it


def test_train_classifier_is_deterministic_and_learns():
    split = load_digits_split()
    small = dataclasses.replace(TINY, num_classes=10, embed_dim=16, depth=1)

    def run():
        torch.manual_seed(0)
        return train_classifier(
            VisionTransformer(small), split, epochs=2, lr=3e-3, seed=0, threads=1
        )

    m1, m2 = run(), run()
    assert not m1.training
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    acc = evaluate(m1, split.x_test, split.y_test)
    assert 20.0 < acc <= 100.0  # 10% is chance


def test_onnx_export_dynamo():
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = VisionTransformer(TINY).eval()
    x = torch.randn(2, 1, 8, 8)
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False)
    proto = prog.model_proto
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "MatMul", "Softmax"} <= ops, ops
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
