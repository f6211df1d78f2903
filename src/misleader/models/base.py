"""Model registry and the wrapper that puts normalisation inside the model.

Every model in the zoo takes images in [0, 1] of shape (N, C, H, W): the dataset's mean/std are
buffers of the first layer, so a checkpoint carries its own statistics and no caller can get them
wrong (DESIGN.md, "Models take images in [0, 1]").
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from misleader.registry import Registry

#: name -> factory(*, in_channels: int, num_classes: int) -> nn.Module (takes normalised input)
MODELS: Registry[nn.Module] = Registry("architecture")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a backbone factory ``fn(*, in_channels, num_classes) -> nn.Module``."""
    return MODELS.register(name)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored as buffers.

    Shape: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``: a zoo backbone behind its input normalisation.

    Args:
        arch: registered architecture name.
        net: the backbone (expects normalised input).
        mean, std: per-channel statistics of the training data (length ``in_channels``).

    Shape: (N, C, H, W) in [0, 1] -> (N, K) logits.
    """

    def __init__(self, *, arch: str, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(mean=mean, std=std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build a registered architecture wrapped with its normalisation layer.

    Raises:
        MisleaderError: unknown architecture (the message lists the known ones).
    """
    factory = MODELS.get(arch)
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return Classifier(arch=arch, net=factory(in_channels=in_channels, num_classes=num_classes), mean=mean, std=std)


def list_models() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
