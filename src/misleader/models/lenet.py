"""LeNet-5 and its reduced variants, as used by DAFL / DFME / MISLEADER on MNIST.

Inputs are 32x32 (MNIST is padded by the data layer). Unlike the reference code (hard-wired to
one input channel and 10 classes), ``in_channels`` and ``num_classes`` are honoured.

Parameter counts for 1x32x32 / 10 classes: lenet5 61,706; lenet5_half 15,738; lenet5_fifth 9,884.

The 2x2 max-pools are :class:`MaxPool2x2`: on CPU, PyTorch's NCHW ``max_pool2d`` kernel is slow for
these small maps (about 7x slower than the element-wise maximum of the four strided views at 28x28);
the module computes exactly the same values and the same gradients (see its docstring). For the same
reason each ReLU runs after its pool (the same function, see :class:`LeNet5`).
"""

from __future__ import annotations

import torch
from torch import nn

from misleader.models.base import register_model


class _MaxPool2x2Function(torch.autograd.Function):
    """``max_pool2d(x, 2, 2)`` by element-wise maxima; backward by PyTorch's own max-pool backward kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
        bottom = torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2])
        out = torch.maximum(top, bottom)
        ctx.save_for_backward(x, top, bottom)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, top, bottom = ctx.saved_tensors
        width = x.shape[-1]
        oh, ow = top.shape[-2:]
        # max_pool2d's index: the first maximum in row-major order within the window (NaN aside)
        row = bottom > top  # the (first) maximum is not in the top row
        # the first maximum is in the right column (bool algebra: torch.where is slow on CPU here)
        left_top, left_bottom = x[..., 0:2 * oh:2, 0:2 * ow:2], x[..., 1:2 * oh:2, 0:2 * ow:2]
        col = (row & (left_bottom != bottom)) | ((left_top != top) & ~row)
        base = (torch.arange(oh, device=x.device).mul_(2 * width).view(oh, 1)
                + torch.arange(ow, device=x.device).mul_(2).view(1, ow))
        offset_dtype = torch.int16 if width < 2**14 else torch.int64
        index = base + row.to(offset_dtype).mul_(width).add_(col)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                               index)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` with a faster CPU forward: the same values, and the same gradients.

    On a CPU tensor the output is the element-wise maximum of the four strided sub-grids (exactly
    the values of ``max_pool2d``, NaN included); the backward rebuilds max_pool2d's indices (the
    first maximum of each window in row-major order) and calls PyTorch's max-pool backward, so
    gradients are bit-identical, ties included, and double backward works. Odd trailing rows and
    columns are dropped as by ``max_pool2d``. Differs only in which NaN receives the gradient in a
    window holding a NaN. Other devices use ``max_pool2d`` itself.

    Shape: (N, C, H, W) -> (N, C, H // 2, W // 2).
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.device.type != "cpu" or x.ndim != 4 or x.shape[-2] < 2 or x.shape[-1] < 2:
            return super().forward(x)
        if not (torch.is_grad_enabled() and x.requires_grad):  # no backward: the same maxima, without the Function
            # (plain tensor operations, so that torch.jit.trace can record them for serving)
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
            top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
            return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))
        return _MaxPool2x2Function.apply(x)


class LeNet5(nn.Module):
    """conv5 c->a, pool, conv5 a->b, pool, conv5 b->c2, fc c2->f, fc f->K, ReLU.

    Each pool comes before its ReLU: ``relu(max_pool(x)) == max_pool(relu(x))`` exactly, with the same
    gradients (the first maximum of a window is the same element when the maximum is positive, and
    the gradient is zero otherwise), and the ReLU then touches a quarter of the elements.

    Shape: (N, C, 32, 32) -> (N, K).
    """

    def __init__(self, *, in_channels: int, num_classes: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c1, c2, c3, f = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), MaxPool2x2(), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 5), MaxPool2x2(), nn.ReLU(inplace=True),
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
