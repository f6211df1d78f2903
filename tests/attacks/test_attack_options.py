"""Attack options: type checks, range checks, ``preset="auto"`` chosen from the target's public description."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from misleader.attacks.base import PUBLIC_META_KEYS, check_options
from misleader.attacks.dfme import DFME, PRESETS, DFMEConfig, image_affine
from misleader.attacks.dfms_hl import DFMSHL
from misleader.attacks.knockoff import KnockoffNets
from misleader.errors import MisleaderError
from _recording import RecordingOracle

MNIST = {"dataset": "mnist", "input_shape": [1, 32, 32], "num_classes": 10}
CIFAR = {"dataset": "cifar10", "input_shape": [3, 32, 32], "num_classes": 10}


@pytest.mark.parametrize("cls", [DFME, DFMSHL, KnockoffNets])
@pytest.mark.parametrize("bad,match", [
    ({"batch_size": "abc"}, "batch_size must be an integer, got 'abc'"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"amp": "yes"}, "amp must be true or false"),
    ({"momentum": "fast"}, "momentum must be a number"),
    ({"momentum": -0.5}, "momentum must be >= 0"),
    ({"batch_size": 0}, "batch_size must be > 0"),
    ({"no_such_option": 1}, "unknown .* option"),
])
def test_bad_option_values_are_one_line_errors(cls, bad, match):
    with pytest.raises(MisleaderError, match=match) as info:
        cls(**bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls,lr", [(DFME, "lr_clone"), (DFME, "lr_generator"), (DFMSHL, "clone_lr"),
                                    (DFMSHL, "gan_lr"), (KnockoffNets, "lr")])
@pytest.mark.parametrize("value", [-0.1, 0.0, float("nan")])
def test_learning_rates_must_be_positive(cls, lr, value):
    with pytest.raises(MisleaderError, match=lr):
        cls(**{lr: value})


def test_option_values_are_converted_to_the_fields_types():
    # YAML gives ints for floats, lists for tuples, a number for a 1-tuple, null for optional fields
    out = check_options("dfme", DFMEConfig, {"lr_clone": 1, "milestones": [0.5, 1], "image_center": 0.2,
                                             "image_scale": None, "batch_size": 64.0})
    assert out == {"lr_clone": 1.0, "milestones": (0.5, 1.0), "image_center": (0.2,), "image_scale": None,
                   "batch_size": 64}
    assert isinstance(out["lr_clone"], float) and isinstance(out["batch_size"], int)
    with pytest.raises(MisleaderError, match="milestones must be a list of numbers"):
        check_options("dfme", DFMEConfig, {"milestones": "soon"})
    with pytest.raises(MisleaderError, match="logit_recovery must be a string"):
        check_options("dfme", DFMEConfig, {"logit_recovery": 3})
    with pytest.raises(MisleaderError, match="image_space must be one of dataset, unit"):
        DFME(image_space="normalised")
    with pytest.raises(MisleaderError, match="optimizer must be one of sgd, adam"):
        KnockoffNets(optimizer="rmsprop")
    with pytest.raises(MisleaderError, match="lr_clone must be a number"):
        DFME(lr_clone=math.inf)


def test_auto_preset_follows_the_target_scale_and_keeps_the_users_options():
    a = DFME(batch_size=32)
    assert a.preset == "paper" and a.batch_size == 32  # nothing known yet: the reference settings
    a.adapt_to_target({**MNIST, "defense": "misleader", "victim": {"path": "/secret"}})
    assert a.preset == "small" and a.ngf == PRESETS["small"].ngf and a.batch_size == 32
    assert set(a._target) == set(PUBLIC_META_KEYS)  # the defense's manifest never reaches the attack
    a.adapt_to_target(CIFAR)
    assert a.preset == "paper" and a.batch_size == 32
    fixed = DFME(preset="misleader-authors")
    fixed.adapt_to_target(MNIST)
    assert fixed.preset == "misleader-authors"  # an explicit preset is never replaced
    d = DFMSHL()
    d.adapt_to_target(MNIST)
    assert d.preset == "small"
    d.adapt_to_target(CIFAR)
    assert d.preset == "paper"
    k = KnockoffNets(epochs=3)
    k.adapt_to_target(MNIST)
    assert k.preset == "fast" and k.epochs == 3
    k.adapt_to_target(CIFAR)
    assert k.preset == "sgd20" and k.epochs == 3
    with pytest.raises(MisleaderError, match="choose one of: auto"):
        DFME(preset="gpu-huge")


def test_image_map_uses_the_datasets_public_statistics():
    cfg = PRESETS["small"]
    assert image_affine(cfg, dataset="mnist", channels=1)[:2] == ([0.1307], [0.3081])
    center, scale, _ = image_affine(cfg, dataset="cifar10", channels=3)
    assert center == [0.4914, 0.4822, 0.4465] and scale == [0.2470, 0.2435, 0.2616]
    assert image_affine(cfg, dataset="npz:/x.npz", channels=1)[:2] == ([0.5], [0.5])  # unknown: (x + 1) / 2
    unit = DFMEConfig(image_space="unit")
    assert image_affine(unit, dataset="mnist", channels=1)[:2] == ([0.5], [0.5])
    own = DFMEConfig(image_center=(0.2,), image_scale=(0.1, 0.2, 0.3))
    assert image_affine(own, dataset="mnist", channels=3)[:2] == ([0.2] * 3, [0.1, 0.2, 0.3])
    with pytest.raises(MisleaderError, match="image_scale needs 1 or 3 values"):
        image_affine(DFMEConfig(image_scale=(0.1, 0.2)), dataset=None, channels=3)


def test_dfme_queries_live_in_the_public_normalisation_range():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    oracle = RecordingOracle(net, num_classes=5, input_shape=(1, 8, 8), budget=300)
    attack = DFME(**DFME.tiny_options())
    attack.adapt_to_target({"dataset": "mnist", "input_shape": [1, 8, 8], "num_classes": 5})
    res = attack.run(oracle, budget=300, clone=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)),
                     generator=torch.Generator().manual_seed(0))
    x = torch.cat(oracle.inputs)
    assert res.extra["image_center"] == [0.1307] and res.extra["image_source"] == "public statistics of mnist"
    assert x.min() >= 0.0 and x.max() <= 0.1307 + 0.3081 + 1e-6  # mean + std * tanh, clamped at 0
    assert abs(float(x.mean()) - 0.1307) < 0.1  # GeneratorA's final BatchNorm centres the image
    # the held-out score counts hits over the clone images of the last tenth of the iterations
    its = res.extra["iterations"]
    seen = max(1, its // 10) * attack.d_iter * attack.batch_size
    hits = res.extra["heldout_agreement"] * seen
    assert 0 <= hits <= seen and hits == pytest.approx(round(hits), abs=1e-6)


def test_run_attack_reports_a_bad_option_before_any_work(tiny_victim, tmp_path):
    from misleader.attacks.harness import run_attack

    with pytest.raises(MisleaderError, match="knockoff option epochs must be an integer, got 'abc'"):
        run_attack("knockoff", target=tiny_victim, budget=10, clone_arch="lenet5_fifth", out=tmp_path / "a",
                   device="cpu", options={"epochs": "abc"})
    assert not (tmp_path / "a").exists()
