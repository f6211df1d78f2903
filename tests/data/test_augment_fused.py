"""The strong augmentation's batched crop + flip is kornia's RandomResizedCrop + RandomHorizontalFlip.

:class:`~misleader.data.augment.ResizedCropFlip` draws its parameters with kornia's own modules, in
kornia's order, and resamples all images in one ``grid_sample``. Against the kornia pipeline it
replaces (same global seed): the same random draws (the RNG ends in the same state) and the same
images up to float rounding, so the augmentation distribution is unchanged.
"""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
from torch import nn

from misleader.data.augment import ResizedCropFlip, strong_augmentation


def _kornia_strong(channels: int, *, hflip: bool = True, crop_scale=(0.8, 1.0)) -> nn.Module:
    """The strong pipeline as it was built from kornia modules only (per-image crop-resize)."""
    mods = [K.RandomResizedCrop((32, 32), scale=crop_scale, p=1.0)]
    if hflip:
        mods.append(K.RandomHorizontalFlip(p=0.5))
    mods.append(K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0, hue=0.0,
                              p=1.0))
    if channels == 3:
        mods.append(K.RandomGrayscale(p=0.2))
    mods.append(K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), resample="nearest",
                               padding_mode="zeros", p=1.0))
    return nn.Sequential(*mods)


def _images(channels: int, n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    return (0.5 * ramp + 0.5 * torch.rand(n, channels, 32, 32, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strong_pipeline_equals_the_kornia_pipeline(channels, seed):
    x = _images(channels)
    torch.manual_seed(seed)
    ref = _kornia_strong(channels)(x).clamp(0, 1)
    state_ref = torch.get_rng_state()
    torch.manual_seed(seed)
    out = strong_augmentation(channels=channels)(x)
    assert torch.equal(torch.get_rng_state(), state_ref)  # the same draws, nothing more
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("hflip", [True, False])
def test_crop_flip_equals_kornia_crop_then_flip(hflip):
    x = _images(1)
    seq = [K.RandomResizedCrop((32, 32), scale=(0.5, 1.0), p=1.0)]
    if hflip:
        seq.append(K.RandomHorizontalFlip(p=0.5))
    torch.manual_seed(11)
    ref = nn.Sequential(*seq)(x)
    torch.manual_seed(11)
    out = ResizedCropFlip((32, 32), scale=(0.5, 1.0), hflip=hflip)(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    if hflip:  # some images flipped, some not (p = 0.5 over 48 images)
        torch.manual_seed(11)
        plain = ResizedCropFlip((32, 32), scale=(0.5, 1.0), hflip=False)(x)
        flipped = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-3
        assert 0 < int(flipped.sum()) < len(x)
        torch.testing.assert_close(out[flipped], plain[flipped].flip(-1), atol=2e-5, rtol=0)


def test_full_crop_is_the_identity():
    x = _images(3, n=4)
    out = ResizedCropFlip((32, 32), scale=(1.0, 1.0), hflip=False)
    out.crop = K.RandomResizedCrop((32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0), p=1.0)
    torch.testing.assert_close(out(x), x, atol=1e-5, rtol=0)  # float32 grid rounding only


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_jitter_and_affine_equal_kornias_modules_exactly(channels, seed):
    """The jitter and the nearest affine warp give kornia's images bit for bit, from the same draws."""
    from misleader.data.augment import AffineNearest, Jitter

    x = _images(channels, n=40)
    sat = 0.4 if channels == 3 else 0.0
    for ours, theirs in (
            (Jitter(brightness=0.4, contrast=0.4, saturation=sat),
             K.ColorJitter(brightness=0.4, contrast=0.4, saturation=sat, hue=0.0, p=1.0)),
            (AffineNearest(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1)),
             K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), resample="nearest",
                            padding_mode="zeros", p=1.0))):
        torch.manual_seed(seed)
        ref = theirs(x)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        out = ours(x)
        assert torch.equal(out, ref) and torch.equal(torch.get_rng_state(), state)
