"""ACT: the folder answers batches of any size through a fresh random watermark net per batch; the trained
watermark can be served instead, and its weights file is checked against the manifest."""

from __future__ import annotations

import pytest
import torch

from misleader import load_oracle
from misleader.defenses.act import ACT, defend_act
from misleader.errors import MisleaderError
from misleader.utils import read_json


def test_act_random_watermark_answers_any_batch_size_and_differs_per_batch(tiny_victim, tmp_path):
    res = defend_act(victim=tiny_victim, out=tmp_path / "a", device="cpu", **ACT.test_params)
    steps = read_json(tmp_path / "a" / "manifest.json")["steps"]
    assert [s["type"] for s in steps] == ["random_perturbation", "model"] and steps[0]["norm"] == "none"
    assert res["train_seconds"] > 0 and res["mean_l1_between_answers"] > 0
    oracle = load_oracle(tmp_path / "a")
    x = torch.rand(7, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for n in (1, 7, 40):
        p = oracle.query(torch.rand(n, 1, 32, 32))
        assert p.shape == (n, 10) and torch.allclose(p.sum(1), torch.ones(n), atol=1e-5)
    assert not torch.equal(oracle.query(x), oracle.query(x))


def test_act_trained_watermark_is_served_and_checked(tiny_victim, tmp_path):
    out = tmp_path / "t"
    defend_act(victim=tiny_victim, out=out, device="cpu", serve="trained", **ACT.test_params)
    steps = read_json(out / "manifest.json")["steps"]
    assert steps[0]["type"] == "trained_watermark"
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_oracle(out).query(x), load_oracle(out).query(x))
    f = out / steps[0]["file"]
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(MisleaderError, match="sha256"):
        load_oracle(out)
