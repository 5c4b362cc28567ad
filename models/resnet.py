"""ResNet (He et al. 2016) with basic blocks: configurable width and depth.

:func:`resnet18` is the ImageNet ResNet-18 geometry (7x7/2 stem, 3x3/2 max pool, stages of
[2, 2, 2, 2] basic blocks at widths 64..512, global average pool, linear head) at 224x224;
:func:`resnet_digits` is a small one for the 8x8 digits (3x3 stem, no pooling stem, three
stages). Exported in eval mode, torch folds each conv's BatchNorm into the conv; the integer
graph is Conv / Relu (requantization saturation) / IntAdd residuals / MaxPool / global mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet_digits"]


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); shortcut = 1x1 conv + BN when the
    shape changes (stride or width), else the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """Stem -> stages of BasicBlocks (the first block of stage i > 0 has stride 2) -> global
    average pool -> linear. Input ``[B, in_chans, H, W]``, output ``[B, num_classes]``."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        in_chans: int = 3,
        imagenet_stem: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {widths} and depths {depths} must be equal, non-empty")
        w0 = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()
            )
        blocks: list[nn.Module] = []
        cin = w0
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for j in range(d):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(self.blocks(self.stem(x)))
        return self.fc(y.flatten(1))


def resnet18(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-18 (11.7 M parameters at 1000 classes), for 224x224 inputs."""
    return ResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_chans, imagenet_stem=True)


def resnet_digits(
    widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 1, 1), num_classes: int = 10
) -> ResNet:
    """A small ResNet for the 1x8x8 digits: 3x3 stem, stages at 8x8, 4x4, 2x2."""
    return ResNet(widths, depths, num_classes, in_chans=1, imagenet_stem=False)
