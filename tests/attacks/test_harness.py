"""The attack harness and the ``attack`` CLI: result files, accounting, skipping, errors, defense targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from misleader.attacks.harness import run_attack
from misleader.attacks.knockoff import KnockoffNets
from misleader.cli import main
from misleader.errors import MisleaderError
from misleader.metrics import accuracy
from misleader.training.checkpoint import load_model
from misleader.training.evaluate import predict_probs
from misleader.training.victim import load_target_data

RESULT_KEYS = {"clone_accuracy", "clone_accuracy_best", "fidelity", "queries_used", "budget", "target_test_accuracy",
               "seconds", "attack", "labels", "pool", "clone_arch", "target_kind"}
FAST = {"epochs": 3, "lr": 0.05, "momentum": 0.9}


@pytest.fixture(scope="module")
def attack_dir(tiny_victim, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "ko"
    res = run_attack("knockoff", target=tiny_victim, budget=150, clone_arch="lenet5_fifth", out=out, device="cpu",
                     labels="hard", options=FAST)
    return out, res


def test_result_files_and_keys(attack_dir, tiny_victim):
    out, res = attack_dir
    assert RESULT_KEYS <= set(res)
    saved = json.loads((out / "result.json").read_text())
    assert saved["clone_accuracy"] == res["clone_accuracy"] and saved["labels"] == "hard"
    assert res["queries_used"] == res["budget"] == 150 and res["target_kind"] == "victim" and res["pool"] == "attacker"
    assert res["options"]["epochs"] == 3 and res["seconds"] > 0
    assert res["eval_seconds"] > 0  # three evaluations ran
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history if "epoch" in r] == [1, 2, 3]
    assert all(r["queries"] == 150 for r in history)
    assert res["clone_accuracy_best"] == max(r["clone_accuracy"] for r in history) >= res["clone_accuracy"]
    # the saved clone is the final clone: reload it and recompute the reported numbers
    clone, meta = load_model(out / "clone.json")
    assert meta["attack"] == "knockoff" and meta["dataset"] == "digits"
    data, _ = load_target_data(meta)
    acc = accuracy(predict_probs(clone, data.x_test), data.y_test)
    assert acc == pytest.approx(res["clone_accuracy"], abs=1e-6)
    victim, _ = load_model(tiny_victim)
    assert res["target_test_accuracy"] == pytest.approx(accuracy(predict_probs(victim, data.x_test), data.y_test))


def test_finished_folder_is_not_rerun(attack_dir, tiny_victim, monkeypatch):
    out, res = attack_dir
    monkeypatch.setattr(KnockoffNets, "run", lambda *a, **k: pytest.fail("a finished attack must not run again"))
    again = run_attack("knockoff", target=tiny_victim, budget=150, clone_arch="lenet5_fifth", out=out, device="cpu",
                       labels="hard", options=FAST)
    assert again == json.loads((out / "result.json").read_text())


def test_same_seed_same_result_different_seed_differs(tiny_victim, tmp_path):
    kw = dict(target=tiny_victim, budget=100, clone_arch="lenet5_fifth", device="cpu", options={"epochs": 2})
    a = run_attack("knockoff", out=tmp_path / "a", seed=3, **kw)
    b = run_attack("knockoff", out=tmp_path / "b", seed=3, **kw)
    c = run_attack("knockoff", out=tmp_path / "c", seed=4, **kw)
    wa, wb, wc = ((tmp_path / n / "clone.safetensors").read_bytes() for n in "abc")
    assert wa == wb and wa != wc
    assert a["clone_accuracy"] == b["clone_accuracy"] and a["fidelity"] == b["fidelity"]


def test_accounting_violation_is_caught(tiny_victim, tmp_path, monkeypatch):
    real = KnockoffNets.run

    def lying_run(self, oracle, **kw):  # noqa: ANN001
        res = real(self, oracle, **kw)
        res.queries_used -= 1
        return res

    monkeypatch.setattr(KnockoffNets, "run", lying_run)
    with pytest.raises(RuntimeError, match="accounting"):
        run_attack("knockoff", target=tiny_victim, budget=20, clone_arch="lenet5_fifth", out=tmp_path / "x",
                   device="cpu", options={"epochs": 0})
    assert not (tmp_path / "x" / "result.json").exists()


def test_user_errors(tiny_victim, tmp_path, monkeypatch):
    kw = dict(target=tiny_victim, budget=10, clone_arch="lenet5_fifth", out=tmp_path / "e", device="cpu")
    with pytest.raises(MisleaderError, match="unknown attack"):
        run_attack("knockof", **kw)
    with pytest.raises(MisleaderError, match="accepts"):
        run_attack("knockoff", options={"epoch": 3}, **kw)
    with pytest.raises(MisleaderError, match="labels"):
        run_attack("knockoff", labels="top1", **kw)
    with pytest.raises(MisleaderError, match="architecture"):
        run_attack("knockoff", **{**kw, "clone_arch": "lenet6"})
    with pytest.raises(MisleaderError, match="--pool attacker"):
        run_attack("knockoff", pool="digits", **kw)
    with pytest.raises(MisleaderError, match="neither"):
        run_attack("knockoff", **{**kw, "target": tmp_path})
    monkeypatch.setattr(KnockoffNets, "requires", frozenset({"probs"}))  # a probability-only attack (as DFME)
    with pytest.raises(MisleaderError, match="--labels soft"):
        run_attack("knockoff", labels="hard", **kw)
    assert not (tmp_path / "e").exists()


def test_defense_folder_target(tiny_victim, tmp_path):
    """A hand-made defense folder (two members = the victim twice) is attacked like a victim."""
    from misleader.oracle import describe_target

    meta = describe_target(tiny_victim)
    d = tmp_path / "def"
    for name in ("a", "b"):
        shutil.copytree(tiny_victim, d / "members" / name)
    manifest = {"kind": "defense", "defense": "misleader", "dataset": meta["dataset"], "num_classes": 10,
                "input_shape": meta["input_shape"], "split": meta["split"], "combine": "mean_softmax",
                "members": [{"arch": "lenet5_fifth", "checkpoint": f"members/{n}/model.json"} for n in "ab"]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "result.json").write_text(json.dumps({"victim_test_accuracy": 0.5}))
    res = run_attack("knockoff", target=d, budget=60, clone_arch="lenet5_fifth", out=tmp_path / "o", device="cpu",
                     options={"epochs": 1})
    plain = run_attack("knockoff", target=tiny_victim, budget=60, clone_arch="lenet5_fifth", out=tmp_path / "p",
                       device="cpu", options={"epochs": 1})
    assert res["target_kind"] == "defense" and res["defense"] == "misleader" and res["victim_test_accuracy"] == 0.5
    # two identical members answer exactly as the victim: same target accuracy, same clone
    assert res["target_test_accuracy"] == plain["target_test_accuracy"]
    assert res["clone_accuracy"] == pytest.approx(plain["clone_accuracy"], abs=1e-6)


def test_cli(tiny_victim, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["-q", "attack", "knockoff", "--target", str(tiny_victim), "--budget", "50", "--clone-arch",
               "lenet5_fifth", "--out", str(out), "--labels", "hard", "--seed", "1", "--device", "cpu",
               "-o", "epochs=1", "-o", "strategy=adaptive", "-o", "pull-size=8", "--eval-every", "25"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries_used"] == 50 and printed["labels"] == "hard"
    saved = json.loads((out / "result.json").read_text())
    assert saved["options"]["strategy"] == "adaptive" and saved["options"]["pull_size"] == 8 and saved["seed"] == 1
    phases = [r.get("phase") for r in json.loads((out / "history.json").read_text())]
    assert phases.count("query") == 2 and "train" in phases
    rc = main(["-q", "attack", "knockoff", "--target", str(tiny_victim), "--budget", "5", "--clone-arch",
               "lenet5_fifth", "--out", str(tmp_path / "bad"), "-o", "strategy=greedy", "--device", "cpu"])
    assert rc == 2 and "strategy" in capsys.readouterr().err


def test_out_is_checked_before_the_attack_runs(tiny_victim, tmp_path, monkeypatch):
    import os

    ran = []
    monkeypatch.setattr(KnockoffNets, "run", lambda *a, **k: ran.append(1))
    kw = dict(target=tiny_victim, budget=10, clone_arch="lenet5_fifth", device="cpu", options={"epochs": 0})
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    bad = {tmp_path / "file": "existing file", tmp_path / "file" / "sub": "under", Path("/proc/foo"): "cannot be written"}
    if os.geteuid() != 0:  # root writes anywhere
        bad[ro / "out"] = "cannot be written"
    for out, match in bad.items():
        with pytest.raises(MisleaderError, match=match):
            run_attack("knockoff", out=out, **kw)
    assert not ran


def test_rerun_resumes_only_with_the_same_settings(tiny_victim, tmp_path, capsys):
    kw = dict(target=tiny_victim, clone_arch="lenet5_fifth", device="cpu", options={"epochs": 0}, out=tmp_path / "a")
    first = run_attack("knockoff", budget=20, **kw)
    assert run_attack("knockoff", budget=20, **kw) == first  # finished, same settings: the stored result
    stored = (tmp_path / "a" / "result.json").read_bytes()
    with pytest.raises(MisleaderError, match="budget: stored 20, requested 30") as info:
        run_attack("knockoff", budget=30, **kw)
    assert "\n" not in str(info.value) and "--force" in str(info.value)
    with pytest.raises(MisleaderError, match="epochs"):
        run_attack("knockoff", budget=20, **{**kw, "options": {"epochs": 1}})
    rc = main(["-q", "attack", "knockoff", "--target", str(tiny_victim), "--budget", "30", "--clone-arch",
               "lenet5_fifth", "--out", str(tmp_path / "a"), "--device", "cpu", "-o", "epochs=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "budget" in err and "Traceback" not in err
    assert (tmp_path / "a" / "result.json").read_bytes() == stored  # refusals leave the finished run alone
    assert run_attack("knockoff", budget=30, force=True, **kw)["budget"] == 30
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(MisleaderError, match="not written by"):
        run_attack("knockoff", budget=20, **{**kw, "out": tmp_path / "foreign"}, force=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_pool_choice_sees_only_public_metadata(tiny_victim, tmp_path, monkeypatch):
    seen = []

    def spy(cls, meta):  # noqa: ANN001
        seen.append(dict(meta))
        return "attacker"

    monkeypatch.setattr(KnockoffNets, "choose_pool", classmethod(spy))
    run_attack("knockoff", target=tiny_victim, budget=10, clone_arch="lenet5_fifth", out=tmp_path / "p",
               device="cpu", options={"epochs": 0})
    assert seen == [{"dataset": "digits", "input_shape": [1, 32, 32], "num_classes": 10}]


def test_cli_attack_out_errors_are_one_line(tiny_victim, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in ("/proc/foo", str(tmp_path / "f")):
        rc = main(["-q", "attack", "knockoff", "--target", str(tiny_victim), "--budget", "10", "--clone-arch",
                   "lenet5_fifth", "--out", out, "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err
