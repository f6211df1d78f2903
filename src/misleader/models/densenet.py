"""DenseNet-121 (DenseNet-BC), CIFAR variant of huyvnphan/PyTorch_CIFAR10 (used by MISLEADER's ensemble).

Paper: Huang et al., "Densely Connected Convolutional Networks", CVPR 2017,
https://arxiv.org/abs/1608.06993. Growth rate 32, blocks (6, 12, 24, 16), 64 initial features,
bottleneck width 4 x growth, compression 0.5 in the transitions. CIFAR change of the reference
(``cifar10_models/densenet.py``): the stem is a 3x3 stride-1 conv (ImageNet: 7x7 stride 2) + BN + ReLU,
followed by the unchanged 3x3 stride-2 max-pool, so a 32x32 input enters the first block at 16x16
and the last one at 2x2. Parameter and buffer names match the reference (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ..., ``features.norm5``, ``classifier``), so one of its
state_dicts loads directly.

Parameter count for 3x32x32 / 10 classes: 6,956,426.

Deviations from the reference code:
    * ``in_channels`` is honoured (the reference hard-codes 3).
    * Dropout inside the dense layers (``drop_rate``, 0 in the reference's DenseNet-121) and the
      other depths (161/169/201) are not provided.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from misleader.models.base import register_model


class DenseLayer(nn.Sequential):
    """BN-ReLU-conv1x1 (to ``bn_size * growth_rate``) -> BN-ReLU-conv3x3 (to ``growth_rate``), concatenated.

    Shape: (N, C, H, W) -> (N, C + growth_rate, H, W).
    """

    def __init__(self, *, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        width = bn_size * growth_rate
        super().__init__(
            OrderedDict(
                norm1=nn.BatchNorm2d(num_input_features),
                relu1=nn.ReLU(inplace=True),
                conv1=nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False),
                norm2=nn.BatchNorm2d(width),
                relu2=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # norm1 comes first, so the in-place ReLU never touches ``x`` itself.
        return torch.cat([x, super().forward(x)], dim=1)


class DenseBlock(nn.Sequential):
    """``num_layers`` dense layers named ``denselayer1``..``denselayerN``.

    Shape: (N, C, H, W) -> (N, C + num_layers * growth_rate, H, W).
    """

    def __init__(self, *, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(
                num_input_features=num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
            )
            self.add_module(f"denselayer{i + 1}", layer)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (channel compression) -> 2x2 average pool.

    Shape: (N, C_in, H, W) -> (N, C_out, H // 2, W // 2).
    """

    def __init__(self, *, num_input_features: int, num_output_features: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(num_input_features),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False),
                pool=nn.AvgPool2d(kernel_size=2, stride=2),
            )
        )


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC.

    Args:
        in_channels: input image channels.
        num_classes: number of output logits.
        growth_rate: channels added per dense layer (``k`` in the paper).
        block_config: dense layers per block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width as a multiple of ``growth_rate``.

    Shape: (N, in_channels, H, W) -> (N, num_classes); H, W >= 16 (32x32 and 28x28 in practice).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(
                    in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False
                ),
                norm0=nn.BatchNorm2d(num_init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers=num_layers, num_input_features=channels, growth_rate=growth_rate, bn_size=bn_size
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                transition = Transition(num_input_features=channels, num_output_features=channels // 2)
                self.features.add_module(f"transition{i + 1}", transition)
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised images -> (N, K) logits."""
        out = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("densenet121")
def densenet121(*, in_channels: int, num_classes: int) -> nn.Module:
    """CIFAR DenseNet-121; 6.96M parameters at 3x32x32 / 10 classes."""
    return DenseNet(in_channels=in_channels, num_classes=num_classes)
