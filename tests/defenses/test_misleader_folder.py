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
from misleader.metrics import accuracy, fidelity
from misleader.oracle import describe_target
from misleader.training.evaluate import query_all
from misleader.training.victim import load_target_data
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
def victim(tiny_victim) -> Path:
    """The session's tiny digits victim (tests/conftest.py)."""
    return tiny_victim


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
    assert manifest["format"] == 2 and manifest["dataset"] == "digits"
    assert manifest["steps"] == [{"kind": "backend", "type": "ensemble", "models": [ARCH, f"{ARCH}-2"],
                                  "weights": None}]
    params = manifest["params"]["members"]
    assert [m["name"] for m in params] == [ARCH, f"{ARCH}-2"]
    assert [m["lambda"] for m in params] == [1.0 * DEFAULT_MEMBER_SETTINGS[ARCH]["lam"], 0.0]
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {ARCH, f"{ARCH}-2"} and history[ARCH][0]["attacker_kl"] is not None
    assert json.loads((out / "result.json").read_text())["test_accuracy"] == res["test_accuracy"]

    members = [load_model(out / m["checkpoint"])[0] for m in manifest["models"].values()]
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
    # the printed summary is the stored result, and its numbers are the folder's own (recomputed here)
    saved = json.loads((tmp_path / "d" / "result.json").read_text())
    assert {"test_accuracy", "fidelity"} <= set(summary) and ARCH in summary["member_test_accuracy"]
    assert {k: saved[k] for k in summary} == summary
    data, _ = load_target_data(describe_target(tmp_path / "d"))
    pred = query_all(load_oracle(tmp_path / "d", output="probs"), data.x_test).argmax(1)
    victim_pred = query_all(load_oracle(victim, output="probs"), data.x_test).argmax(1)
    assert summary["test_accuracy"] == pytest.approx(accuracy(pred, data.y_test), abs=1e-6)
    assert summary["fidelity"] == pytest.approx(fidelity(pred, victim_pred), abs=1e-6)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["params"]["members"][0]["lambda"] == 0.2
    rc = main(["-q", "defend", "misleader", "--victim", str(victim), "--members", f"{ARCH},{ARCH}", "--epochs", "1",
               "--out", str(tmp_path / "e"), "--lambda", "0.1,0.2,0.3"])
    assert rc == 2 and "one per member" in capsys.readouterr().err
    assert main(["-q", "defend", "undefended", "--victim", str(victim), "--out", str(tmp_path / "u")]) == 0
    x = torch.rand(5, 1, 32, 32)
    assert torch.allclose(load_oracle(tmp_path / "u").query(x), load_oracle(victim).query(x), atol=1e-6)
    undefended = json.loads((tmp_path / "u" / "result.json").read_text())
    assert undefended["fidelity"] == 1.0 and undefended["mean_l1_to_victim"] == pytest.approx(0.0, abs=1e-6)
    assert undefended["test_accuracy"] == pytest.approx(accuracy(victim_pred, data.y_test), abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_smoke_run(victim, tmp_path):
    res = defend_misleader(victim=victim, members=[ARCH, "lenet5_half"], epochs=1, out=tmp_path / "g", seed=0,
                           device="cuda", member_settings=[FAST, FAST], generator_samples=64)
    assert res["members"][0]["val_accuracy"] > 0 and 0 <= res["test_accuracy"] <= 1
    for h in json.loads((tmp_path / "g" / "history.json").read_text()).values():
        assert all(math.isfinite(r["attacker_kl"]) for r in h)


def _interrupt_members_after_epoch_1(monkeypatch, *, validations_per_epoch: int):
    """Make the next defend_misleader stop in epoch 2 of its first member (epoch 1 is saved)."""
    import misleader.defenses.misleader.trainer as trainer_mod

    real, calls = trainer_mod.accuracy, {"n": 0}

    def interrupt(*a, **k):  # the member's (and with lambda > 0 the clone's) validation, once per epoch
        calls["n"] += 1
        if calls["n"] == validations_per_epoch + 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "accuracy", interrupt)
    return lambda: monkeypatch.setattr(trainer_mod, "accuracy", real)


KD = {**FAST, "lambda": 0.0}  # plain distillation: the folder logic at a third of the cost


@pytest.mark.parametrize("member_of", [False, True])
def test_seed_4_never_resumes_a_seed_0_member(victim, tmp_path, monkeypatch, member_of):
    out = tmp_path / "d"
    kw = dict(victim=victim, members=[ARCH], epochs=2, out=out, device="cpu", member_settings=[KD],
              generator_samples=16, member_of=tmp_path / "ens" if member_of else None)
    restore = _interrupt_members_after_epoch_1(monkeypatch, validations_per_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        defend_misleader(seed=0, **kw)
    restore()
    member_dir = out if member_of else out / "members" / ARCH
    assert (member_dir / "resume.safetensors").exists()
    with pytest.raises(MisleaderError, match=r"other settings \(seed: stored 0, requested 4\).*--force"):
        defend_misleader(seed=4, **kw)
    # --force starts over: the member is the one a clean seed-4 run trains, and it records seed 4
    defend_misleader(seed=4, force=True, **kw)
    defend_misleader(seed=4, **{**kw, "out": tmp_path / "clean", "member_of": tmp_path / "ens2" if member_of else None})
    clean_dir = tmp_path / "clean" if member_of else tmp_path / "clean" / "members" / ARCH
    assert (member_dir / "model.safetensors").read_bytes() == (clean_dir / "model.safetensors").read_bytes()
    assert json.loads((member_dir / "model.json").read_text())["seed"] == 4


def test_unreadable_member_resume_file_is_refused_and_force_starts_over(victim, tmp_path, monkeypatch):
    kw = dict(victim=victim, members=[ARCH], epochs=2, device="cpu", seed=0, member_settings=[KD],
              generator_samples=16, out=tmp_path / "d")
    restore = _interrupt_members_after_epoch_1(monkeypatch, validations_per_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        defend_misleader(**kw)
    restore()
    (tmp_path / "d" / "members" / ARCH / "resume.safetensors").write_bytes(b"not a resume file")
    with pytest.raises(MisleaderError, match=r"resume\.safetensors is unreadable.*--force"):
        defend_misleader(**kw)
    res = defend_misleader(force=True, **kw)
    assert res["members"][0]["epochs_run"] == 2 and (tmp_path / "d" / "result.json").exists()


def test_base_other_than_the_victim_is_refused(victim, tmp_path):
    with pytest.raises(MisleaderError, match="misleader distils the victim itself; compose by passing this folder"):
        defend_misleader(victim=victim, members=[ARCH], epochs=1, out=tmp_path / "d", base=tmp_path / "other")
    assert not (tmp_path / "d").exists()
