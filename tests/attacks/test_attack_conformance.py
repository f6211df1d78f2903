"""Every registered attack x every kind of target honours the attack contract (base.py, DESIGN.md).

For each attack in ``ATTACKS`` (at test time: new attacks join automatically) and each target (an
undefended victim folder and a MISLEADER-style defense folder), run the attack through the harness
with its smallest configuration (the attack's ``tiny_options()`` classmethod, else ``TINY`` below,
else its defaults) and a budget of a few hundred queries, and check: the oracle never answered more
than the budget, the attack's own count equals the oracle's, the clone has the right output shape,
``result.json`` has the contract's keys and the history's query counts rise to the attack's count,
and the reported accuracy and fidelity are recomputed from the saved clone on the test split. The
defense folder is built by hand (a manifest over two tiny victims of different architectures trained
one epoch on digits) so that it is fast and does not depend on the defense's training code; it is opened
by the same ``load_oracle`` as a trained one.
"""

from __future__ import annotations

import json

import pytest
import torch

import misleader.oracle.load as oracle_load
from misleader.attacks import ATTACKS
from misleader.metrics import accuracy, fidelity
from misleader.oracle import load_oracle
from misleader.training.checkpoint import load_model
from misleader.training.evaluate import predict_probs, query_all
from misleader.training.victim import load_target_data

BUDGET = 300
RESULT_KEYS = {"clone_accuracy", "clone_accuracy_best", "fidelity", "queries_used", "budget", "target_test_accuracy",
               "seconds", "attack", "labels", "pool", "clone_arch", "target_kind", "options"}
#: fallbacks for attacks without a tiny_options() classmethod
TINY: dict[str, dict] = {"knockoff": {"epochs": 1}}


def tiny_options(name: str) -> dict:
    cls = ATTACKS.get(name)
    fn = getattr(cls, "tiny_options", None)
    return dict(fn()) if callable(fn) else dict(TINY.get(name, {}))


@pytest.fixture(scope="module")
def defense_dir(tiny_victim, tmp_path_factory):
    from misleader.oracle import describe_target
    from misleader.training.victim import train_victim

    meta = describe_target(tiny_victim)
    d = tmp_path_factory.mktemp("conformance") / "defense"
    members = []
    for i, arch in enumerate(["lenet5_fifth", "lenet5_half"]):
        train_victim(dataset="digits", arch=arch, epochs=1, out=d / "members" / arch, device="cpu", seed=10 + i)
        members.append({"name": arch, "arch": arch, "checkpoint": f"members/{arch}/model.json"})
    manifest = {"kind": "defense", "defense": "misleader", "dataset": "digits", "num_classes": 10,
                "input_shape": meta["input_shape"], "split": meta["split"], "combine": "mean_softmax",
                "members": members}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture(params=["victim", "defense"])
def target(request, tiny_victim):
    return tiny_victim if request.param == "victim" else request.getfixturevalue("defense_dir")


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_contract(name, target, tmp_path, monkeypatch):
    from misleader.attacks.harness import run_attack

    opened = []
    real_open = oracle_load.open_accounted

    def spy_open(*args, **kwargs):  # noqa: ANN002, ANN003
        o, acct = real_open(*args, **kwargs)
        if kwargs.get("budget") is not None:  # the attacker's oracle (the referee's has none)
            opened.append((o, acct))
        return o, acct

    monkeypatch.setattr(oracle_load, "open_accounted", spy_open)
    cls = ATTACKS.get(name)
    labels = "soft" if "probs" in cls.requires else "hard"
    pool = "attacker" if cls.needs_pool else None
    res = run_attack(name, target=target, budget=BUDGET, clone_arch="lenet5_fifth", out=tmp_path / name,
                     device="cpu", labels=labels, pool=pool, options=tiny_options(name), seed=0)
    (oracle, acct), = opened
    assert oracle.budget == acct.budget == BUDGET and oracle.output == ("probs" if labels == "soft" else "labels")
    assert acct.used == res["queries_used"] <= BUDGET
    assert res["queries_used"] > 0
    assert RESULT_KEYS <= set(res)
    assert res["target_kind"] == ("defense" if (target / "manifest.json").exists() else "victim")
    assert 0.0 <= res["clone_accuracy"] <= res["clone_accuracy_best"] <= 1.0 and 0.0 <= res["fidelity"] <= 1.0
    assert json.loads((tmp_path / name / "result.json").read_text()) == json.loads(json.dumps(res))
    # the history follows the attack: query counts never fall, stay within the budget and end at its count
    history = json.loads((tmp_path / name / "history.json").read_text())
    qs = [r["queries"] for r in history]
    assert qs and qs == sorted(qs) and qs[-1] == res["queries_used"] and all(0 <= q <= BUDGET for q in qs)
    assert res["clone_accuracy_best"] == max(r["clone_accuracy"] for r in history if "clone_accuracy" in r)
    # the reported numbers are the saved clone's on the target's test split (recomputed here)
    clone, meta = load_model(tmp_path / name / "clone.json")
    data, _ = load_target_data(meta)
    probs = predict_probs(clone, data.x_test)
    assert probs.shape == (len(data.y_test), 10) and torch.isfinite(probs).all()
    pred = probs.argmax(1)
    target_pred = query_all(load_oracle(target, output="probs"), data.x_test).argmax(1)
    assert res["clone_accuracy"] == pytest.approx(accuracy(pred, data.y_test), abs=1e-6)
    assert res["fidelity"] == pytest.approx(fidelity(pred, target_pred), abs=1e-6)
    assert res["target_test_accuracy"] == pytest.approx(accuracy(target_pred, data.y_test), abs=1e-6)
