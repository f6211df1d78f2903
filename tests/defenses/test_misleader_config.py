"""MISLEADER settings (defenses/misleader/config.py): validation, presets, defaults."""

from __future__ import annotations

import pytest
from _misleader_helpers import ARCH, tiny_cfg

from misleader.defenses.misleader import DEFAULT_MEMBER_SETTINGS, PRESETS, MemberConfig, member_config
from misleader.errors import MisleaderError


def test_member_config_validation_and_presets():
    with pytest.raises(MisleaderError, match="lambda"):
        tiny_cfg(lam=-1)
    with pytest.raises(MisleaderError, match="alpha"):
        tiny_cfg(alpha=1.5)
    with pytest.raises(MisleaderError, match="unknown member setting"):
        member_config(ARCH, epochs=1, overrides={"lamda": 0.1})
    c = member_config("resnet18_8x", epochs=3, preset=PRESETS["cifar10-paper"], overrides={"T": 3, "lambda": None})
    assert (c.lam, c.temperature, c.alpha, c.batch_size) == (0.001, 3, 0.3, 256)
    assert DEFAULT_MEMBER_SETTINGS["mobilenet_v2"] == {"lam": 0.05, "temperature": 4.0, "alpha": 0.9}
    assert DEFAULT_MEMBER_SETTINGS["densenet121"] == {"lam": 0.01, "temperature": 2.0, "alpha": 0.3}
    assert PRESETS["mnist-cpu"].members == ("lenet5", "lenet5_half", "lenet5_fifth")
    assert MemberConfig.from_dict(c.to_dict()) == c

