"""MobileNetV2, CIFAR variant of huyvnphan/PyTorch_CIFAR10 (used by MISLEADER's ensemble).

Paper: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
https://arxiv.org/abs/1801.04381. CIFAR changes of the reference (``cifar10_models/mobilenetv2.py``):
the 3x3 stem has stride 1 (ImageNet: 2) and the 24-channel stage has stride 1 (ImageNet: 2), so a
32x32 input ends at 4x4. Width multiplier 1.0, last channel 1280, classifier Dropout(0.2) + Linear.
Parameter and buffer names match the reference (``features.*``, ``classifier.1.*``), so one of its
state_dicts loads directly.

Parameter count for 3x32x32 / 10 classes: 2,236,682.

Deviations from the reference code:
    * ``in_channels`` is honoured (the reference hard-codes 3).
    * The width multiplier is not exposed (always 1.0, the only value the project uses).
"""

from __future__ import annotations

import torch
from torch import nn

from misleader.models.base import register_model

#: (expansion t, output channels c, repeats n, first stride s) per stage; CIFAR strides.
_CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 1 instead of ImageNet's 2
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU(nn.Sequential):
    """Bias-free conv (``same`` padding, optional groups) -> BN -> ReLU6.

    Shape: (N, in_planes, H, W) -> (N, out_planes, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self, *, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Pointwise expand (skipped when t = 1) -> depthwise 3x3 -> linear pointwise projection.

    The input is added back when the stride is 1 and the channel count is unchanged.

    Args:
        inp: input channels.
        oup: output channels.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: hidden width = round(inp * expand_ratio).

    Shape: (N, inp, H, W) -> (N, oup, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, *, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_planes=inp, out_planes=hidden, kernel_size=1))
        layers += [
            ConvBNReLU(in_planes=hidden, out_planes=hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (width 1.0).

    Args:
        in_channels: input image channels.
        num_classes: number of output logits.

    Shape: (N, in_channels, H, W) -> (N, num_classes); 32x32 inputs reach 4x4 before the global
    mean, 28x28 reach 4x4 as well.
    """

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        channels = 32
        self.last_channel = 1280
        features: list[nn.Module] = [ConvBNReLU(in_planes=in_channels, out_planes=channels, stride=1)]
        for t, c, n, s in _CIFAR_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(inp=channels, oup=c, stride=stride, expand_ratio=t))
                channels = c
        features.append(ConvBNReLU(in_planes=channels, out_planes=self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised images -> (N, K) logits."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@register_model("mobilenet_v2")
def mobilenet_v2(*, in_channels: int, num_classes: int) -> nn.Module:
    """CIFAR MobileNetV2; 2.24M parameters at 3x32x32 / 10 classes."""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes)
