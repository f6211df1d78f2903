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


#: strong augmentation with the geometric steps made neutral on spatially constant images
NO_GEOMETRY = {"hflip": False, "degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0)}


def test_one_channel_pipeline_changes_only_brightness_and_contrast():
    """1 channel in, 1 channel out in [0, 1]; on flat images (where crop and flip are no-ops) the jitter
    changes the level but keeps every image flat, and no grayscale step exists (its rate is ignored)."""
    n = 64
    flat = torch.linspace(0.1, 0.9, n).view(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()
    g = torch.Generator
    plain = augment(strong_augmentation(channels=1, jitter=0.0, **NO_GEOMETRY), flat,
                    generator=g().manual_seed(0))
    torch.testing.assert_close(plain, flat)
    y = augment(strong_augmentation(channels=1, **NO_GEOMETRY), flat, generator=g().manual_seed(0))
    assert y.shape == flat.shape and y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y, y[:, :, :1, :1].expand_as(y))  # still flat: no per-pixel colour op
    assert (y - flat).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.9  # the levels moved
    x = _images(1)
    a = augment(strong_augmentation(channels=1, grayscale_p=0.0), x, generator=g().manual_seed(3))
    b = augment(strong_augmentation(channels=1, grayscale_p=0.9), x, generator=g().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_grayscale_rate_is_about_p_on_three_channels(p):
    n = 600
    gen = torch.Generator().manual_seed(1)
    colour = torch.rand(n, 3, 1, 1, generator=gen) * 0.8 + 0.1
    colour[:, 1] = colour[:, 0] * 0.3 + 0.05  # channels clearly different: only grayscale makes them equal
    x = colour.expand(n, 3, 32, 32).contiguous()
    y = augment(strong_augmentation(channels=3, jitter=0.0, grayscale_p=p, **NO_GEOMETRY), x,
                generator=torch.Generator().manual_seed(2))
    spread = (y.amax(dim=1) - y.amin(dim=1)).amax(dim=(1, 2))  # largest channel difference per image
    gray = spread < 1e-4
    rate = float(gray.float().mean())
    assert abs(rate - p) < 0.06, rate  # 600 draws: the standard error is at most 0.02


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
