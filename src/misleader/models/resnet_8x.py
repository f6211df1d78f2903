"""CIFAR-style ResNets ("ResNet-N-8x") as used by DFAD, DFME and MISLEADER.

Paper: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385. The CIFAR layout (3x3 stride-1 stem, no max-pool, stage widths
64/128/256/512, one linear layer) follows the DFAD / DFME ``network/resnet_8x.py``. Parameter and
buffer names match that file (``conv1``, ``bn1``, ``layer1``..``layer4``, ``linear``; blocks have
``conv1``/``bn1``/``conv2``/``bn2``[/``conv3``/``bn3``]/``shortcut``), so a reference state_dict loads
into :class:`ResNet8x` directly.

Parameter counts for 3x32x32 / 10 classes: resnet18_8x 11,173,962; resnet34_8x 21,282,122;
resnet50_8x 23,520,842.

Deviations from the reference code:
    * Global average pooling is adaptive (``adaptive_avg_pool2d(., 1)``) instead of a fixed
      ``avg_pool2d(4)``, so 28x28 and larger inputs work; at 32x32 the two are identical.
    * ``in_channels`` is honoured (the reference hard-codes 3).
    * ``forward`` has no normalisation or feature-return flag: normalisation lives in
      :class:`misleader.models.base.Classifier`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from misleader.models.base import register_model


def _shortcut(in_planes: int, out_planes: int, *, stride: int) -> nn.Module:
    """Identity when shapes agree, else a 1x1 strided projection + BN (keys ``0.*`` and ``1.*``)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a residual connection, ReLU after the sum.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (and of the projection shortcut).

    Shape: (N, in_planes, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, *, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * planes``, plus a residual connection.

    Args:
        in_planes: input channels.
        planes: bottleneck width; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 convolution (and of the projection shortcut).

    Shape: (N, in_planes, H, W) -> (N, 4 * planes, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 4

    def __init__(self, *, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet8x(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, four stages (64/128/256/512), global average pool, linear.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: input image channels.
        num_classes: number of output logits.

    Shape: (N, in_channels, H, W) -> (N, num_classes). Stages 2-4 halve the resolution, so
    32x32 ends at 4x4 and 28x28 at 4x4 too (28 -> 14 -> 7 -> 4).
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, planes=64, num_blocks=num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, planes=128, num_blocks=num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, planes=256, num_blocks=num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, planes=512, num_blocks=num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], *, planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        """One stage: the first block carries the stride, the rest keep the resolution."""
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(in_planes=self.in_planes, planes=planes, stride=s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised images -> (N, K) logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("resnet18_8x")
def resnet18_8x(*, in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-18 (BasicBlock, 2-2-2-2); 11.17M parameters at 3x32x32 / 10 classes."""
    return ResNet8x(
        block=BasicBlock, num_blocks=(2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes
    )


@register_model("resnet34_8x")
def resnet34_8x(*, in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-34 (BasicBlock, 3-4-6-3); 21.28M parameters at 3x32x32 / 10 classes."""
    return ResNet8x(
        block=BasicBlock, num_blocks=(3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes
    )


@register_model("resnet50_8x")
def resnet50_8x(*, in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-50 (Bottleneck, 3-4-6-3); 23.52M parameters at 3x32x32 / 10 classes."""
    return ResNet8x(
        block=Bottleneck, num_blocks=(3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes
    )
