"""Batched image augmentation with kornia, on the tensors' own device.

The *strong* pipeline is MISLEADER's simulated attacker query distribution P_g ("MISLEADER",
arXiv 2506.02362; the attacker loader of the authors' code LabRAI/misleader, see
``shared/research/misleader-code.md`` section 3), applied in this order:

1. ``RandomResizedCrop(image_size, scale=(0.8, 1.0))`` (ratio 3/4 to 4/3, bilinear)
2. ``RandomHorizontalFlip(p=0.5)`` (the reference applies it to MNIST too)
3. ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)``, no hue
4. ``RandomGrayscale(p=0.2)``
5. ``RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1))``

The *weak* pipeline is the reference's clean CIFAR loader: ``RandomCrop(size, padding=4)`` with zero
fill plus an optional horizontal flip.

All pipelines take and return float (N, C, H, W) in [0, 1] with the same shape; normalisation is the
model's first layer (DESIGN.md), so it is not part of augmentation.

Deviations from the reference (torchvision on PIL images, one image at a time):

- Batched float tensors instead of uint8 PIL images: no rounding to 8 bits between steps, and
  bilinear crop-resize with ``align_corners=True`` (no antialiasing, which hardly matters for the
  mild 0.8-1.0 crops). Crop and flip are drawn by kornia's modules and applied together in one
  batched ``grid_sample`` (:class:`ResizedCropFlip`; kornia resizes each image's crop separately):
  the same draws and the same images up to float rounding (``tests/data/test_augment_fused.py``).
  ColorJitter and RandomAffine are drawn by kornia's modules too and applied without their module machinery
  (:class:`Jitter`: kornia's own colour functions in the drawn order; :class:`AffineNearest`: kornia's matrix
  and a separable sampling grid): bit-identical images, tested against the kornia modules (issue 10: the
  strong pipeline went from 9.2 to ~N ms per 256 MNIST images on one CPU thread).
- ColorJitter's random order of brightness / contrast / saturation is drawn once per batch, not
  once per image (the factors are still drawn per image).
- One-channel images (MNIST family): only brightness and contrast are jittered and the grayscale
  step is skipped. This is what torchvision does on a PIL "L" image in effect (saturation and
  grayscale are no-ops on a gray image).
- ``RandomAffine`` uses nearest-neighbour resampling and zero fill, torchvision's defaults, and is
  applied to every image (kornia's default ``p`` is 0.5; torchvision has no ``p``).
- The output is clamped to [0, 1].

Randomness: kornia draws its parameters from torch's *global* RNG (on the CPU, or on the module's
device after ``module.to(device)``); it takes no ``torch.Generator``. Call :func:`augment` with a
generator to get reproducible augmentations without disturbing the global RNG: it forks the global
RNG state (CPU and the tensor's device), seeds it from the generator, and restores it afterwards.
"""

from __future__ import annotations

from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from misleader.registry import Registry

AUGMENTATIONS: Registry[nn.Module] = Registry("augmentation")


class Pipeline(nn.Sequential):
    """``nn.Sequential`` of kornia augmentations that checks its input and clamps its output to [0, 1]."""

    def __init__(self, *modules: nn.Module, image_size: int | None, channels: int | None) -> None:
        super().__init__(*modules)
        self.image_size = image_size
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"augmentation expects a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}"
            )
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"this augmentation was built for {self.channels} channel(s), got {x.shape[1]}")
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this augmentation was built for {self.image_size}x{self.image_size} images, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        if len(x) == 0:
            return x
        return super().forward(x).clamp(0.0, 1.0)


class ResizedCropFlip(nn.Module):
    """kornia's ``RandomResizedCrop`` (bilinear, ``align_corners=True``) then ``RandomHorizontalFlip(p=0.5)``,
    resampled in one batched ``grid_sample``.

    kornia's slice mode resizes each image's crop with its own ``interpolate`` call (one call per image,
    most of the strong pipeline's time on CPU). Here the parameters are drawn by the same kornia
    modules, in the same order (crop, then flip), so the random draws are exactly kornia's; the crop
    box ``[x1, x2] x [y1, y2]`` (inclusive pixel corners) maps output column ``j`` to
    ``x1 + j (x2 - x1) / (W - 1)`` (``x2 - j (x2 - x1) / (W - 1)`` when flipped, which is the flip of
    the resized crop) and likewise for rows, sampled bilinearly: the same function as kornia's
    crop-resize-flip up to float rounding (tested against kornia: ``tests/data/test_augment_fused.py``).

    Shape: float (N, C, H, W) -> (N, C, *size).
    """

    def __init__(self, size: tuple[int, int], *, scale: tuple[float, float], hflip: bool) -> None:
        super().__init__()
        self.size = tuple(size)
        self.crop = K.RandomResizedCrop(self.size, scale=tuple(scale), p=1.0)
        self.flip = K.RandomHorizontalFlip(p=0.5) if hflip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, c, h, w = x.shape
        oh, ow = self.size
        # (N, 4, 2) corners (x, y): top-left, top-right, bottom-right, bottom-left
        src = self.crop.forward_parameters(x.shape)["src"].to(device=x.device, dtype=x.dtype)
        x1, y1 = src[:, 0, 0], src[:, 0, 1]
        x2, y2 = src[:, 2, 0], src[:, 2, 1]
        # Output column j samples the input pixel coordinate x1 + j (x2 - x1) / (W_out - 1) (flipped:
        # x2 - j (x2 - x1) / (W_out - 1)); grid_sample (align_corners=True) wants it normalised,
        # 2 p / (W_in - 1) - 1. With u_j = -1 + 2 j / (W_out - 1) that is s u_j + t with
        # s = +-(x2 - x1) / (W_in - 1) and t = (x1 + x2) / (W_in - 1) - 1. The grid is separable.
        sx = (x2 - x1) / max(w - 1, 1)
        if self.flip is not None:
            flipped = self.flip.forward_parameters((n, c, oh, ow))["batch_prob"].to(x.device).bool()
            sx = torch.where(flipped, -sx, sx)
        u = torch.linspace(-1.0, 1.0, ow, device=x.device, dtype=x.dtype) if ow > 1 else x.new_zeros(1)
        v = torch.linspace(-1.0, 1.0, oh, device=x.device, dtype=x.dtype) if oh > 1 else x.new_zeros(1)
        gx = sx[:, None] * u + ((x1 + x2) / max(w - 1, 1) - 1)[:, None]  # (N, W_out)
        gy = ((y2 - y1) / max(h - 1, 1))[:, None] * v + ((y1 + y2) / max(h - 1, 1) - 1)[:, None]  # (N, H_out)
        # the grid is separable: column j's x and row i's y, written by two broadcast copies
        grid = torch.empty(n, oh, ow, 2, device=x.device, dtype=x.dtype)
        grid[..., 0] = gx[:, None, :]
        grid[..., 1] = gy[:, :, None]
        # the crop lies inside the image: border padding only guards against rounding at the edges
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class Jitter(nn.Module):
    """kornia's ``ColorJitter(brightness, contrast, saturation, hue=0)`` without the module machinery around it.

    The parameters are drawn by a ``K.ColorJitter`` (``forward_parameters``: the same draws); the steps are
    kornia's own functions (multiplicative brightness, contrast around the gray mean, saturation against the
    gray image), applied in the drawn order, a step skipped when all its factors are neutral, with kornia's
    clamps before and after: the same images (``tests/data/test_augment_fused.py``) for a fraction of the
    module's per-call cost.

    Shape: float (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, *, brightness: float, contrast: float, saturation: float) -> None:
        super().__init__()
        self.jitter = K.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=0.0, p=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                                    adjust_saturation_with_gray_subtraction)

        params = self.jitter.forward_parameters(x.shape)
        steps = (("brightness_factor", adjust_brightness_accumulative, 1.0),
                 ("contrast_factor", adjust_contrast_with_mean_subtraction, 1.0),
                 ("saturation_factor", adjust_saturation_with_gray_subtraction, 1.0))
        out = x.clamp(0.0, 1.0)
        for idx in params["order"].tolist():
            if idx >= len(steps):  # hue: always neutral here (hue=0)
                continue
            key, fn, neutral = steps[idx]
            factor = params[key].to(device=x.device, dtype=x.dtype)
            if bool((factor != neutral).any()):
                out = fn(out, factor)
        return out.clamp(0.0, 1.0)


def _inverse_3x3(m: torch.Tensor) -> torch.Tensor:
    """kornia's closed-form inverse of (B, 3, 3) matrices (the one its ``warp_affine`` uses), else ``linalg.inv``."""
    try:
        from kornia.core.utils import _inverse_3x3_closed_form
    except ImportError:  # another kornia: the same inverse up to float rounding
        return torch.linalg.inv(m)
    return _inverse_3x3_closed_form(m)


class AffineNearest(nn.Module):
    """kornia's ``RandomAffine`` (nearest resampling, zero fill, ``align_corners=False``), with a separable grid.

    The parameters and the matrix are kornia's own (``forward_parameters`` and ``compute_transformation`` of a
    ``K.RandomAffine``: the same draws, in the same order), normalised and inverted as kornia's ``warp_affine``
    does; the sampling grid ``x' = (m00 x + m01 y) + m02`` (likewise ``y'``) is built from one row vector and
    one column vector per image instead of kornia's full-size products: the same float operations in the same
    order, so the same grid and, with nearest resampling, the same images (``tests/data/test_augment_fused.py``).
    kornia builds its grid with six full-size operations, most of the strong pipeline's time on a CPU.

    Shape: float (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, *, degrees: float, translate: tuple[float, float], scale: tuple[float, float]) -> None:
        super().__init__()
        self.affine = K.RandomAffine(degrees=degrees, translate=translate, scale=scale, resample="nearest",
                                     padding_mode="zeros", p=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from kornia.geometry.conversions import convert_affinematrix_to_homography, normalize_homography

        n, _, h, w = x.shape
        params = self.affine.forward_parameters(x.shape)
        m = self.affine.compute_transformation(x, params, self.affine.flags)[:, :2, :]
        dst_norm = normalize_homography(convert_affinematrix_to_homography(m), (h, w), (h, w), align_corners=False)
        inv = _inverse_3x3(dst_norm)  # (N, 3, 3): normalised output coordinates -> normalised input coordinates
        xs = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=x.device, dtype=x.dtype)
        ys = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=x.device, dtype=x.dtype)
        grid = torch.empty(n, h, w, 2, device=x.device, dtype=x.dtype)
        for k in range(2):  # (m_k0 x_j + m_k1 y_i) + m_k2, as kornia sums it
            g = torch.add((inv[:, k, 0, None] * xs)[:, None, :], (inv[:, k, 1, None] * ys)[:, :, None])
            grid[..., k] = g.add_(inv[:, k, 2, None, None])
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@AUGMENTATIONS.register("strong")
def strong_augmentation(
    *,
    image_size: int = 32,
    channels: int = 3,
    crop_scale: Sequence[float] = (0.8, 1.0),
    hflip: bool = True,
    jitter: float = 0.4,
    grayscale_p: float = 0.2,
    degrees: float = 15,
    translate: float = 0.1,
    scale: Sequence[float] = (0.9, 1.1),
) -> nn.Module:
    """MISLEADER's strong augmentation (the simulated attacker query distribution), see the module doc.

    Args:
        image_size: height = width of the images (input and output).
        channels: 1 (grayscale: brightness/contrast only, no grayscale step) or 3.
        crop_scale: area fraction range of RandomResizedCrop.
        hflip: random horizontal flip with p = 0.5.
        jitter: brightness, contrast (and for 3 channels saturation) strength; 0 disables.
        grayscale_p: probability of RandomGrayscale (3 channels only).
        degrees: RandomAffine rotation range (+-degrees).
        translate: RandomAffine translation as a fraction of the size.
        scale: RandomAffine scale range.

    Returns:
        A module mapping float (N, C, H, W) in [0, 1] to the same shape, clamped to [0, 1].
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = (image_size, image_size)
    mods: list[nn.Module] = [ResizedCropFlip(size, scale=tuple(crop_scale), hflip=hflip)]
    if jitter > 0:
        # kornia's ColorJitter skips a step whose factors are all neutral: saturation=0 is safe on 1 channel.
        saturation = jitter if channels == 3 else 0.0
        mods.append(Jitter(brightness=jitter, contrast=jitter, saturation=saturation))
    if channels == 3 and grayscale_p > 0:
        mods.append(K.RandomGrayscale(p=grayscale_p))
    mods.append(AffineNearest(degrees=degrees, translate=(translate, translate), scale=tuple(scale)))
    return Pipeline(*mods, image_size=image_size, channels=channels)


@AUGMENTATIONS.register("weak")
def weak_augmentation(
    *, image_size: int = 32, padding: int = 4, hflip: bool = True, **_: object
) -> nn.Module:
    """Random crop from the zero-padded image (torchvision's ``RandomCrop(size, padding)``) + optional flip.

    Extra keyword arguments (such as ``channels``) are accepted and ignored, so every registered
    augmentation can be built with the same keywords.
    """
    mods: list[nn.Module] = []
    if padding > 0:
        mods.append(K.RandomCrop((image_size, image_size), padding=padding, fill=0, padding_mode="constant",
                                 p=1.0))
    if hflip:
        mods.append(K.RandomHorizontalFlip(p=0.5))
    return Pipeline(*mods, image_size=image_size, channels=None)


@AUGMENTATIONS.register("none")
def identity(**_: object) -> nn.Module:
    """No augmentation (``nn.Identity``); keyword arguments are accepted and ignored."""
    return nn.Identity()


def _seed_device(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "manual_seed"):
            mod.manual_seed(seed)


def augment(module: nn.Module, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply ``module`` to ``x``; with a ``generator``, reproducibly and without touching the global RNG.

    kornia samples from torch's global RNG. Given a generator, this forks the global RNG state of the
    CPU and of ``x``'s device, seeds both from one draw of ``generator``, applies the module and
    restores the previous state, so the result depends only on the generator's state (and it
    advances the generator by one draw). Without a generator the global RNG is used as is.
    """
    if generator is None:
        return module(x)
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    dev = x.device
    if dev.type == "cpu":
        ctx = torch.random.fork_rng(devices=[])
    else:
        index = dev.index if dev.index is not None else torch.get_device_module(dev.type).current_device()
        ctx = torch.random.fork_rng(devices=[index], device_type=dev.type)
    with ctx:
        torch.random.default_generator.manual_seed(seed)
        _seed_device(dev, seed)
        return module(x)
