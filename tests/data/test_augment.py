"""kornia augmentation pipelines: shapes, range, effect and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from misleader.data.augment import AUGMENTATIONS, augment, identity, strong_augmentation, weak_augmentation


def _images(channels: int, n: int = 16, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    # smooth-ish images with structure (a gradient plus noise), so geometric transforms visibly change them
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(n, channels, size, size)
    return (0.6 * ramp + 0.4 * torch.rand(n, channels, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_keeps_shape_range_and_changes_images(channels, seed):
    x = _images(channels)
    y = augment(strong_augmentation(channels=channels), x, generator=torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    per_image = (y - x).abs().flatten(1).mean(1)
    assert (per_image > 0.01).all()  # every image changed (crop + affine always apply)


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_reproducible_with_generator(channels):
    x = _images(channels)
    module = strong_augmentation(channels=channels)
    a = augment(module, x, generator=torch.Generator().manual_seed(7))
    b = augment(module, x, generator=torch.Generator().manual_seed(7))
    c = augment(module, x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augment_leaves_global_rng_alone_and_advances_generator():
    x = _images(3)
    module = strong_augmentation()
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    first = augment(module, x, generator=g)
    second = augment(module, x, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.allclose(first, second)  # the generator moved on


def test_unseeded_augment_uses_global_rng():
    x = _images(3)
    module = strong_augmentation()
    torch.manual_seed(1)
    a = augment(module, x)
    torch.manual_seed(1)
    assert torch.equal(a, augment(module, x))


def test_one_channel_pipeline_has_no_saturation_or_grayscale():
    names = [type(m).__name__ for m in strong_augmentation(channels=1)]
    assert "RandomGrayscale" not in names
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomAffine"]
    names3 = [type(m).__name__ for m in strong_augmentation(channels=3)]
    assert names3 == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale",
                      "RandomAffine"]


def test_strong_rejects_wrong_channels_or_size():
    with pytest.raises(ValueError, match="channel"):
        strong_augmentation(channels=3)(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        strong_augmentation(channels=1)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError):
        strong_augmentation(channels=2)


def test_weak_is_a_padded_shift_plus_flip():
    x = _images(3)
    y = augment(weak_augmentation(image_size=32, hflip=False), x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # a crop from the zero-padded image: every output pixel is an input pixel or zero
    values = set(x.unique().tolist()) | {0.0}
    assert set(y.unique().tolist()) <= values
    no_op = weak_augmentation(image_size=32, padding=0, hflip=False)
    assert torch.equal(no_op(x), x)


def test_identity_and_registry():
    x = _images(1)
    assert identity()(x) is x
    assert AUGMENTATIONS.names() == ["none", "strong", "weak"]
    out = AUGMENTATIONS.create("weak", image_size=32, channels=1)(x)
    assert out.shape == x.shape


def test_empty_batch():
    x = torch.zeros(0, 3, 32, 32)
    assert augment(strong_augmentation(), x, generator=torch.Generator().manual_seed(0)).shape == x.shape
