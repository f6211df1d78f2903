"""A small corruption suite in the style of MNIST-C / CIFAR-10-C, built with kornia (honest users' shifted inputs).

References: Mu and Gilmer, "MNIST-C: A Robustness Benchmark for Computer Vision", 2019,
https://arxiv.org/abs/1906.02337; Hendrycks and Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019, https://arxiv.org/abs/1903.12261.

Four corruptions at three severities each (:data:`SEVERITIES`): additive Gaussian noise (std), Gaussian
blur (sigma, kernel ``2 * ceil(3 sigma) + 1``), contrast reduction towards the image mean (factor) and
rotation (degrees, the sign drawn per image). Images are float (N, C, H, W) in [0, 1]; outputs are
clamped to [0, 1].

Deviations from MNIST-C: a subset (no shot/impulse noise, glass/motion blur, shear, scale, translate,
brightness, stripe, fog, spatter, dotted line, zigzag, canny edges), and severities chosen here rather
than MNIST-C's single severity per corruption.
"""

from __future__ import annotations

import math
from typing import Callable

import kornia
import torch

#: corruption -> severity values (levels 1, 2, 3)
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.1, 0.2, 0.3),
    "gaussian_blur": (0.5, 1.0, 1.5),
    "contrast": (0.5, 0.3, 0.15),
    "rotation": (10.0, 20.0, 30.0),
}


def _noise(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    return x + s * torch.randn(x.shape, generator=g).to(x.device, x.dtype)


def _blur(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    k = 2 * math.ceil(3 * s) + 1
    return kornia.filters.gaussian_blur2d(x, (k, k), (s, s))


def _contrast(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + s * (x - mean)


def _rotation(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (len(x),), generator=g).to(x.device, x.dtype) * 2 - 1
    return kornia.geometry.transform.rotate(x, sign * s)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _noise, "gaussian_blur": _blur, "contrast": _contrast, "rotation": _rotation,
}


def corrupt(x: torch.Tensor, *, kind: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) float in [0, 1] corrupted by ``kind`` at ``severity`` (1..3); same shape, in [0, 1]."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    levels = SEVERITIES[kind]
    if not 1 <= severity <= len(levels):
        raise ValueError(f"severity must be in 1..{len(levels)}, got {severity}")
    return CORRUPTIONS[kind](x.float(), levels[severity - 1], generator).clamp(0.0, 1.0)


@torch.no_grad()
def corruption_accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                        seed: int = 0, batch_size: int = 1000) -> dict[str, float]:
    """Top-1 accuracy of ``predict`` ((B, C, H, W) in [0, 1] -> (B, K) scores) on every corruption and severity.

    ``x``: uint8 or float (N, C, H, W) test images; ``y``: (N,) labels. The same seed gives every model the
    same corrupted images. Returns ``{"clean": acc, "KIND@S": acc, ...}``.
    """
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def acc(images: torch.Tensor) -> float:
        hits = sum(int((predict(b).argmax(1).cpu() == t).sum()) for b, t in zip(images.split(batch_size),
                                                                                y.split(batch_size)))
        return hits / len(y)

    out = {"clean": acc(xf)}
    for kind, levels in SEVERITIES.items():
        for s in range(1, len(levels) + 1):
            out[f"{kind}@{s}"] = acc(corrupt(xf, kind=kind, severity=s, generator=torch.Generator().manual_seed(seed)))
    return out


__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corruption_accuracy"]
