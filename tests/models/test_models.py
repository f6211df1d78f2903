"""The model zoo and the attack generators: shapes, gradients, parameter counts, registries."""

from __future__ import annotations

import pytest
import torch

from misleader.errors import MisleaderError
from misleader.models import (
    GENERATORS,
    MODELS,
    DCGANDiscriminator,
    DCGANGenerator,
    GeneratorA,
    count_parameters,
    create_model,
    list_models,
    tanh_to_unit,
)

LENETS = ("lenet5", "lenet5_half", "lenet5_fifth")

#: Exact counts measured from our implementations: (in_channels, count) at 32x32 / 10 classes.
#: LeNets are the 1-channel MNIST models; everything else is 3-channel CIFAR.
EXACT_PARAMS: dict[str, tuple[int, int]] = {
    "lenet5": (1, 61_706),
    "lenet5_half": (1, 15_738),
    "lenet5_fifth": (1, 9_884),
    "resnet18_8x": (3, 11_173_962),
    "resnet34_8x": (3, 21_282_122),
    "resnet50_8x": (3, 23_520_842),
    "mobilenet_v2": (3, 2_236_682),
    "densenet121": (3, 6_956_426),
}

#: Figures from /work/shared/research/misleader-code.md section 4 (the reference code's sizes).
NOTE_PARAMS: dict[str, float] = {
    "lenet5": 61.7e3,
    "lenet5_half": 15.7e3,
    "lenet5_fifth": 9.9e3,
    "resnet18_8x": 11.17e6,
    "resnet34_8x": 21.28e6,
    "mobilenet_v2": 2.24e6,
    "densenet121": 6.96e6,
}


def _forward_cases() -> list[tuple[str, int, int]]:
    """(arch, in_channels, num_classes): every combination for the cheap LeNets, one 3-channel case
    per CIFAR model, plus the 1-channel case for resnet18_8x."""
    cases: list[tuple[str, int, int]] = []
    for name in list_models():
        if name in LENETS:
            cases += [(name, c, k) for c in (1, 3) for k in (10, 100)]
        else:
            cases.append((name, 3, 100))
    cases.append(("resnet18_8x", 1, 10))
    return cases


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("arch", "in_channels", "num_classes"), _forward_cases())
def test_forward_shape(arch: str, in_channels: int, num_classes: int) -> None:
    model = create_model(arch, in_channels=in_channels, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list_models())
def test_backward_gives_finite_grads(arch: str) -> None:
    model = create_model(arch, in_channels=3, num_classes=10).train()
    out = model(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{arch}: non-finite gradient for {name}"


@pytest.mark.parametrize("arch", ["resnet18_8x", "mobilenet_v2", "densenet121"])
def test_cifar_models_accept_28x28(arch: str) -> None:
    """Global pooling is adaptive, so MNIST-sized inputs work without padding."""
    model = create_model(arch, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("arch", sorted(set(EXACT_PARAMS) | set(list_models())))
def test_parameter_count(arch: str) -> None:
    """Every registered model has its measured size (a new model must declare one; a dropped one fails)."""
    assert arch in EXACT_PARAMS, f"{arch} is registered but has no parameter count in EXACT_PARAMS"
    in_channels, expected = EXACT_PARAMS[arch]
    # Count the backbone from its factory; create_model only adds parameter-free normalisation.
    model = MODELS.get(arch)(in_channels=in_channels, num_classes=10)
    n = count_parameters(model)
    assert n == expected
    if arch in NOTE_PARAMS:
        assert abs(n - NOTE_PARAMS[arch]) / NOTE_PARAMS[arch] < 0.01


def test_create_model_adds_no_parameters() -> None:
    backbone = MODELS.get("lenet5")(in_channels=1, num_classes=10)
    wrapped = create_model("lenet5", in_channels=1, num_classes=10)
    assert count_parameters(wrapped) == count_parameters(backbone)


@pytest.mark.parametrize(
    ("arch", "keys"),
    [
        (
            "resnet18_8x",
            ["conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.bn2.running_var", "linear.weight"],
        ),
        ("mobilenet_v2", ["features.0.0.weight", "features.2.conv.3.weight", "classifier.1.weight"]),
        ("densenet121", ["features.conv0.weight", "features.denseblock4.denselayer16.conv2.weight",
                         "features.transition3.conv.weight", "features.norm5.weight", "classifier.weight"]),
    ],
)
def test_state_dict_names_follow_the_reference(arch: str, keys: list[str]) -> None:
    state = MODELS.get(arch)(in_channels=3, num_classes=10).state_dict()
    for key in keys:
        assert key in state


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(MisleaderError) as info:
        create_model("resnet1000", in_channels=3, num_classes=10)
    for name in list_models():
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize(("nz", "ngf", "img_size", "nc"), [(256, 64, 32, 3), (100, 16, 28, 1)])
def test_generator_a_shapes_range_and_pre_x(nz: int, ngf: int, img_size: int, nc: int) -> None:
    gen = GeneratorA(nz=nz, ngf=ngf, img_size=img_size, nc=nc)
    z = torch.randn(4, nz)
    with torch.no_grad():
        out = gen(z)
        pre = gen(z, pre_x=True)
    assert out.shape == pre.shape == (4, nc, img_size, img_size)
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(torch.tanh(pre), out)
    unit = gen.to_unit(out)
    assert unit.min() >= 0 and unit.max() <= 1
    torch.testing.assert_close(unit, tanh_to_unit(out))


def test_generator_a_backward_from_pre_x() -> None:
    """DFME pushes an estimated image gradient into the pre-tanh output."""
    gen = GeneratorA(nz=32, ngf=8, img_size=32, nc=3)
    x = gen(torch.randn(3, 32), pre_x=True)
    x.backward(torch.randn_like(x))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gen.parameters())


def test_generator_a_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        GeneratorA(img_size=30)


def test_tanh_to_unit() -> None:
    torch.testing.assert_close(tanh_to_unit(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_dcgan_shapes_and_ranges() -> None:
    gen = DCGANGenerator(nz=100, ngf=16, nc=3)
    disc = DCGANDiscriminator(nc=3, ndf=16)
    z = torch.randn(4, 100)
    with torch.no_grad():
        img = gen(z)
        torch.testing.assert_close(gen(z.view(4, 100, 1, 1)), img)
        prob = disc(img)
    assert img.shape == (4, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    assert prob.shape == (4,)
    assert ((prob > 0) & (prob < 1)).all()


def test_dcgan_gan_step_gives_finite_grads() -> None:
    gen, disc = DCGANGenerator(nz=16, ngf=8, nc=1), DCGANDiscriminator(nc=1, ndf=8)
    prob = disc(gen(torch.randn(3, 16)))
    torch.nn.functional.binary_cross_entropy(prob, torch.ones(3)).backward()
    for module in (gen, disc):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("cls", [DCGANGenerator, DCGANDiscriminator])
def test_dcgan_rejects_unsupported_size(cls: type) -> None:
    with pytest.raises(ValueError, match="img_size=32"):
        cls(img_size=28)


def test_generator_registry() -> None:
    assert {"generator_a", "dcgan"} <= set(GENERATORS.names())
    assert isinstance(GENERATORS.create("generator_a", nz=8, ngf=4, img_size=28, nc=1), GeneratorA)
    assert isinstance(GENERATORS.create("dcgan", nz=8, ngf=4, nc=1), DCGANGenerator)
    assert "generator_a" not in list_models() and "dcgan" not in list_models()
    with pytest.raises(MisleaderError, match="generator_a"):
        GENERATORS.get("generatorA")
