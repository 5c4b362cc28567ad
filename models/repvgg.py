"""RepVGG (Ding et al. 2021): a VGG-style plain network trained with multi-branch blocks.

Train-time block: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)) (the identity BN only when
the block keeps shape: stride 1 and cin == cout). At inference the three branches are one 3x3
conv; intq finds and folds them from the exported graph (`passes/fold_repvgg.py`), so the
model here stays in its train-time form and no module is converted by name.

:func:`repvgg_a0` is RepVGG-A0 (a = 0.75, b = 2.5: stage widths 48, 48, 96, 192, 1280, depths
1, 2, 4, 14, 1, each stage starting with a stride-2 block) for 224x224;
:func:`repvgg_digits` a small one for the 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["RepVGG", "RepVGGBlock", "repvgg_a0", "repvgg_digits"]


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class RepVGGBlock(nn.Module):
    """The train-time multi-branch block (3x3 conv+BN, 1x1 conv+BN, identity BN), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride, groups)
        self.pointwise = _conv_bn(cin, cout, 1, stride, groups)
        self.identity = nn.BatchNorm2d(cin) if (stride == 1 and cin == cout) else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.relu(y)


class RepVGG(nn.Module):
    """Stages of RepVGG blocks (the first of each stage with `stride`), global average pool,
    linear head. Input ``[B, in_chans, H, W]``, output ``[B, num_classes]``."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        in_chans: int = 3,
        groups: int = 1,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = in_chans
        for w, d, s in zip(widths, depths, strides, strict=True):
            for j in range(d):
                # grouped convs need cin divisible by groups: never on the first (stem) block
                g = groups if (blocks and cin % groups == 0 and w % groups == 0) else 1
                blocks.append(RepVGGBlock(cin, w, s if j == 0 else 1, g))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(x)).flatten(1))


def repvgg_a0(num_classes: int = 1000, in_chans: int = 3) -> RepVGG:
    """RepVGG-A0 (train-time form) for 224x224 inputs."""
    return RepVGG([48, 48, 96, 192, 1280], [1, 2, 4, 14, 1], [2, 2, 2, 2, 2], num_classes, in_chans)


def repvgg_digits(
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (2, 2, 2),
    num_classes: int = 10,
    groups: int = 1,
) -> RepVGG:
    """A small RepVGG for the 1x8x8 digits: the first stage at 8x8, each later one halves."""
    strides = [1] + [2] * (len(widths) - 1)
    return RepVGG(widths, depths, strides, num_classes, in_chans=1, groups=groups)
