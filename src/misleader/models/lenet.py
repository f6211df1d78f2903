"""LeNet-5 and its reduced variants, as used by DAFL / DFME / MISLEADER on MNIST.

Inputs are 32x32 (MNIST is padded by the data layer). Unlike the reference code (hard-wired to
one input channel and 10 classes), ``in_channels`` and ``num_classes`` are honoured.

Parameter counts for 1x32x32 / 10 classes: lenet5 61,706; lenet5_half 15,738; lenet5_fifth 9,884.
"""

from __future__ import annotations

from torch import nn

from misleader.models.base import register_model


class LeNet5(nn.Module):
    """conv5 c->a, pool, conv5 a->b, pool, conv5 b->c2, fc c2->f, fc f->K, ReLU.

    Shape: (N, C, 32, 32) -> (N, K).
    """

    def __init__(self, *, in_channels: int, num_classes: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c1, c2, c3, f = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c2, c3, 5), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3, f), nn.ReLU(inplace=True), nn.Linear(f, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(*, in_channels: int, num_classes: int) -> nn.Module:
    return LeNet5(in_channels=in_channels, num_classes=num_classes, widths=(6, 16, 120, 84))


@register_model("lenet5_half")
def lenet5_half(*, in_channels: int, num_classes: int) -> nn.Module:
    return LeNet5(in_channels=in_channels, num_classes=num_classes, widths=(3, 8, 60, 42))


@register_model("lenet5_fifth")
def lenet5_fifth(*, in_channels: int, num_classes: int) -> nn.Module:
    return LeNet5(in_channels=in_channels, num_classes=num_classes, widths=(4, 10, 30, 30))
