"""MISLEADER folders (defenses/misleader/folder.py): member names, files, oracle, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _misleader_helpers import ARCH
from hypothesis import given, settings
from hypothesis import strategies as st

from misleader import load_oracle
from misleader.cli import main
from misleader.defenses import DEFENSES, defend_undefended
from misleader.defenses.misleader import DEFAULT_MEMBER_SETTINGS, defend_misleader, member_names
from misleader.errors import MisleaderError
from misleader.training.checkpoint import load_model


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["lenet5", "lenet5_half", "lenet5_fifth"]), min_size=1, max_size=6))
def test_member_names_are_unique_and_stable(archs):
    names = member_names(archs)
    assert len(set(names)) == len(names) and names[0] == archs[0]
    assert member_names(archs) == names


# --------------------------------------------------------------------------- folders, oracle, CLI


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    from misleader.training.victim import train_victim

    out = tmp_path_factory.mktemp("victim")
    train_victim(dataset="digits", arch=ARCH, epochs=4, out=out, device="cpu", seed=0)
    return out


FAST = {"batch_size": 128, "lr": 0.05}


def test_defend_writes_a_folder_that_load_oracle_opens_as_the_soft_vote(victim, tmp_path):
    out = tmp_path / "ens"
    res = defend_misleader(victim=victim, members=[ARCH, ARCH], epochs=1, out=out, seed=0, device="cpu",
                           member_settings=[FAST, {**FAST, "lambda": 0.0}], generator_samples=32)
    for key in ("test_accuracy", "victim_test_accuracy", "fidelity", "mean_l1_to_victim", "members",
                "member_test_accuracy", "diagnostics"):
        assert key in res
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "defense" and manifest["defense"] == "misleader"
    assert manifest["combine"] == "mean_softmax" and manifest["dataset"] == "digits"
    assert [m["name"] for m in manifest["members"]] == [ARCH, f"{ARCH}-2"]
    assert [m["lambda"] for m in manifest["members"]] == [1.0 * DEFAULT_MEMBER_SETTINGS[ARCH]["lam"], 0.0]
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {ARCH, f"{ARCH}-2"} and history[ARCH][0]["attacker_kl"] is not None
    assert json.loads((out / "result.json").read_text())["test_accuracy"] == res["test_accuracy"]

    members = [load_model(out / m["checkpoint"])[0] for m in manifest["members"]]
    oracle = load_oracle(out, budget=50)
    x = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    probs = oracle.query(x)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    assert torch.allclose(probs, mean, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(20), atol=1e-5)
    assert oracle.queries_used == 20 and oracle.num_classes == 10

    # resumable: a second call trains nothing and returns the same numbers
    again = defend_misleader(victim=victim, members=[ARCH, ARCH], epochs=1, out=out, seed=0, device="cpu",
                             member_settings=[FAST, {**FAST, "lambda": 0.0}], generator_samples=32)
    assert again["test_accuracy"] == res["test_accuracy"] and again["members"] == res["members"]
    # other settings for the folder: refused with a fix that names the setting
    with pytest.raises(MisleaderError, match=r"other settings \(members\.lenet5_fifth\.lam: stored 0\.15, requested 3\.0\)"):
        defend_misleader(victim=victim, members=[ARCH, ARCH], epochs=1, out=out, seed=0, device="cpu",
                         member_settings=[{**FAST, "lambda": 3.0}, {**FAST, "lambda": 0.0}], generator_samples=32)


def test_members_trained_separately_are_assembled(victim, tmp_path):
    ens = tmp_path / "ens"
    one = defend_misleader(victim=victim, members=[ARCH], epochs=1, out=tmp_path / "m1", seed=1, device="cpu",
                           member_settings=[FAST], member_of=ens, generator_samples=32)
    assert "val_accuracy" in one and not (ens / "result.json").exists()
    published = (ens / "members" / ARCH / "model.safetensors").read_bytes()
    assert published == (tmp_path / "m1" / "model.safetensors").read_bytes()
    res = defend_misleader(victim=victim, members=[ARCH, "lenet5_half"], epochs=1, out=ens, seed=1, device="cpu",
                           member_settings=[FAST, FAST], generator_samples=32)
    assert [m["name"] for m in res["members"]] == [ARCH, "lenet5_half"]
    assert res["members"][0]["seconds"] == one["seconds"]  # reused, not retrained
    assert load_oracle(ens).query(torch.rand(3, 1, 32, 32)).shape == (3, 10)


def test_cli_defend_and_undefended(victim, tmp_path, capsys):
    rc = main(["-q", "defend", "misleader", "--victim", str(victim), "--members", ARCH, "--epochs", "1",
               "--out", str(tmp_path / "d"), "--lambda", "0.2", "--batch-size", "256", "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["test_accuracy"] <= 1 and ARCH in summary["member_test_accuracy"]
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["members"][0]["lambda"] == 0.2
    rc = main(["-q", "defend", "misleader", "--victim", str(victim), "--members", f"{ARCH},{ARCH}", "--epochs", "1",
               "--out", str(tmp_path / "e"), "--lambda", "0.1,0.2,0.3"])
    assert rc == 2 and "one per member" in capsys.readouterr().err
    assert main(["-q", "defend", "undefended", "--victim", str(victim), "--out", str(tmp_path / "u")]) == 0
    x = torch.rand(5, 1, 32, 32)
    assert torch.allclose(load_oracle(tmp_path / "u").query(x), load_oracle(victim).query(x), atol=1e-6)
    assert DEFENSES.names() == ["misleader", "undefended"]
    assert defend_undefended(victim=victim)["fidelity"] == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smoke_run(victim, tmp_path):
    res = defend_misleader(victim=victim, members=[ARCH, "lenet5_half"], epochs=1, out=tmp_path / "g", seed=0,
                           device="cuda", member_settings=[FAST, FAST], generator_samples=64)
    assert res["members"][0]["val_accuracy"] > 0 and 0 <= res["test_accuracy"] <= 1
    for h in json.loads((tmp_path / "g" / "history.json").read_text()).values():
        assert all(math.isfinite(r["attacker_kl"]) for r in h)
