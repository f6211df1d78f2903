"""training/resume.py: safetensors + JSON resume files, never unpickled; unreadable files are one-line errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from misleader.errors import MisleaderError
from misleader.training.resume import (
    decode_resume_state,
    encode_resume_state,
    flat_settings,
    load_resume_state,
    save_resume_state,
)


def _adam_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_keeps_types_int_keys_tuples_and_exact_values(tmp_path):
    model, opt = _adam_state()
    gen = torch.Generator().manual_seed(3)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": 2,
             "history": [{"val_accuracy": 0.1 + 0.2, "clone": None, "nan": math.nan, "inf": -math.inf}],
             "tuple": (1, "a", 2.5), "flag": True}
    save_resume_state(tmp_path / "r.safetensors", state)
    back = load_resume_state(tmp_path / "r.safetensors")
    assert set(back["opt"]["state"]) == {0, 1}  # int keys survive
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999) and back["tuple"] == (1, "a", 2.5)
    assert back["history"][0]["val_accuracy"] == 0.1 + 0.2 and back["history"][0]["clone"] is None
    assert math.isnan(back["history"][0]["nan"]) and back["history"][0]["inf"] == -math.inf
    assert back["flag"] is True and back["epoch"] == 2
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])  # loads into a fresh optimiser
    g2 = torch.Generator()
    g2.set_state(back["gen"])
    assert torch.equal(torch.rand(5, generator=g2), torch.rand(5, generator=gen))


def test_missing_file_is_none_and_unsupported_values_are_refused(tmp_path):
    assert load_resume_state(tmp_path / "absent.safetensors") is None
    with pytest.raises(TypeError, match="set"):
        encode_resume_state({"x": {1, 2}})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "no_metadata"])
def test_corrupt_file_is_a_one_line_error_naming_it_and_force(tmp_path, damage):
    path = tmp_path / "resume.safetensors"
    blob = encode_resume_state({"w": torch.ones(3), "epoch": 1})
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = bytes(range(256)) * 4
    elif damage == "empty":
        blob = b""
    else:
        from safetensors.torch import save

        blob = save({"w": torch.ones(3)})
    path.write_bytes(blob)
    with pytest.raises(MisleaderError) as info:
        load_resume_state(path)
    msg = str(info.value)
    assert str(path) in msg and "--force" in msg and "\n" not in msg


class _Planted:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    planted = _Planted()
    planted.target = str(tmp_path / "pwned")
    (tmp_path / "resume.safetensors").write_bytes(pickle.dumps({"state": planted}))
    with pytest.raises(MisleaderError, match="unreadable"):
        load_resume_state(tmp_path / "resume.safetensors")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(MisleaderError):
        decode_resume_state(pickle.dumps(planted), where="x")
    assert not (tmp_path / "pwned").exists()


def test_flat_settings_names_each_leaf():
    assert flat_settings({"a": 1, "r": {"lr": 0.1, "m": {"x": [1]}}, "e": {}}) == {"a": 1, "r.lr": 0.1, "r.m.x": [1],
                                                                                "e": {}}
