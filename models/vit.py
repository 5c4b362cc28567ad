"""DeiT-style Vision Transformer in plain PyTorch.

The model is written with explicit, export-friendly ops so that ``torch.onnx.export`` yields a
graph of Conv / MatMul / Add / LayerNormalization / Softmax / Gelu nodes that the intq frontend
can pattern-match:

* patch embedding: ``Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)``;
* a learned cls token and a learned position embedding (``1 + num_patches`` positions);
* pre-LN blocks: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``;
* attention written out: ``qkv`` Linear, reshape/permute to heads, ``(q @ k^T) * scale``,
  softmax over the last axis, ``@ v``, transpose/reshape, ``proj`` Linear;
* final LayerNorm and a Linear classifier on the cls token.

There is no dropout or drop-path: this module is meant for inference and for small from-scratch
training runs (see :mod:`intq.models.digits`). Weights are initialised like timm
(truncated normal, std 0.02, on Linear weights and on the cls/position embeddings; zero biases;
LayerNorm weight one and bias zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "Attention",
    "Mlp",
    "Block",
    "deit_tiny",
    "deit_small",
    "deit_base",
    "vit_digits",
    "spread_layernorm_channels",
]


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a :class:`VisionTransformer`.

    Attributes:
        img_size: height and width of the (square) input image, in pixels.
        patch_size: side of a square patch; must divide ``img_size``.
        in_chans: number of input channels.
        num_classes: number of output logits.
        embed_dim: token width; must be divisible by ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``embed_dim``.
        gelu_approximate: ``"none"`` (erf GELU) or ``"tanh"``, passed to :class:`torch.nn.GELU`.

    Raises:
        ValueError: on construction, if any field is out of range or the sizes are incompatible.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    gelu_approximate: str = "none"

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "embed_dim",
            "depth",
            "num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size ({self.img_size}) must be divisible by "
                f"patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(
                f"ViTConfig.gelu_approximate must be 'none' or 'tanh', "
                f"got {self.gelu_approximate!r}"
            )

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (excluding the cls token)."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP."""
        return int(self.embed_dim * self.mlp_ratio)


class Attention(nn.Module):
    """Multi-head self-attention with the computation spelled out op by op."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, N, C]`` -> ``[B, N, C]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, H, N, D]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    """``Linear -> GELU -> Linear``."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[..., dim]`` -> ``[..., dim]``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, gelu_approximate: str = "none"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, gelu_approximate)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, N, C]`` -> ``[B, N, C]``."""
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """DeiT/ViT classifier: patch embedding, cls token, position embedding, blocks, head.

    Args:
        config: the model's :class:`ViTConfig`.

    Input ``[B, in_chans, img_size, img_size]`` float; output ``[B, num_classes]`` logits.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = nn.Conv2d(
            config.in_chans, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_hidden, config.gelu_approximate)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style init: trunc-normal(std=.02) Linear weights, cls token and position
        embedding; zero Linear biases; LayerNorm weight 1 / bias 0. The patch Conv keeps
        PyTorch's default init, as in timm."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> normalised tokens ``[B, 1 + num_patches, embed_dim]``."""
        x = self.patch_embed(x)  # [B, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Image ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        return self.head(self.forward_features(x)[:, 0])


def _deit(img_size: int, num_classes: int, embed_dim: int, num_heads: int) -> VisionTransformer:
    return VisionTransformer(
        ViTConfig(
            img_size=img_size,
            patch_size=16,
            in_chans=3,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=12,
            num_heads=num_heads,
            mlp_ratio=4.0,
        )
    )


def deit_tiny(num_classes: int = 1000, img_size: int = 224) -> VisionTransformer:
    """DeiT-Ti: patch 16, dim 192, depth 12, 3 heads, MLP ratio 4 (~5.7M parameters)."""
    return _deit(img_size, num_classes, 192, 3)


def deit_small(num_classes: int = 1000, img_size: int = 224) -> VisionTransformer:
    """DeiT-S: patch 16, dim 384, depth 12, 6 heads, MLP ratio 4 (~22M parameters)."""
    return _deit(img_size, num_classes, 384, 6)


def deit_base(num_classes: int = 1000, img_size: int = 224) -> VisionTransformer:
    """DeiT-B: patch 16, dim 768, depth 12, 12 heads, MLP ratio 4 (~86M parameters)."""
    return _deit(img_size, num_classes, 768, 12)


DIGITS_CONFIG = ViTConfig(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=2.0,
)
"""The :func:`vit_digits` configuration: 8x8x1 images, 16 patches of 2x2 plus cls."""


def vit_digits(config: ViTConfig = DIGITS_CONFIG) -> VisionTransformer:
    """Small ViT for scikit-learn's 8x8 digits (16 patches of 2x2 + cls; dim 64, depth 4,
    4 heads, MLP ratio 2; 136k parameters). Trained by :func:`intq.models.digits.train_digits_vit`.
    """
    return VisionTransformer(config)


@torch.no_grad()
def spread_layernorm_channels(model: VisionTransformer, spread: float, seed: int = 0) -> None:
    """Give post-LayerNorm activations strong inter-channel variation without changing the
    function: per LayerNorm, channel c's gamma and beta are multiplied by f_c = 2^u_c,
    u_c ~ U(-spread, spread), and the reading Linear's input column c is divided by f_c
    (norm1 -> attn.qkv, norm2 -> mlp.fc1, norm -> head). In place."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(b.norm1, b.attn.qkv) for b in model.blocks] + [
        (b.norm2, b.mlp.fc1) for b in model.blocks
    ]
    pairs.append((model.norm, model.head))
    for norm, linear in pairs:
        f = 2.0 ** ((torch.rand(norm.weight.shape, generator=g) * 2 - 1) * spread)
        norm.weight.mul_(f)
        norm.bias.mul_(f)
        linear.weight.div_(f)
