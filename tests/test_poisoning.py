"""Selection never reads the test split: poisoning it leaves every selected checkpoint bit-identical.

The victim (best epoch on validation), the MISLEADER members (selected on validation) and the attack's
clone are trained twice on the embedded digits: once as shipped, once with every test image inverted
and every test label flipped. Test accuracies differ (they are measured on the poisoned split); the
saved weights must not.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from misleader.data import DATASETS


def _poisoned(factory):  # noqa: ANN001, ANN202
    def load(**kwargs):  # noqa: ANN003, ANN202
        ds = factory(**kwargs)
        return replace(ds, x_test=255 - ds.x_test, y_test=(ds.y_test + 1) % ds.num_classes)

    return load


def _weights(root: Path) -> dict[str, str]:
    """sha256 of every weight file under ``root`` (relative path -> digest)."""
    files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _train(out: Path) -> tuple[dict[str, str], dict[str, float]]:
    from misleader.defenses import build_defense
    from misleader.training.victim import train_victim

    victim = train_victim(dataset="digits", arch="lenet5_fifth", epochs=2, out=out / "victim", device="cpu", seed=0)
    defense = build_defense("misleader", victim=out / "victim", out=out / "defense", members=["lenet5_fifth"],
                            epochs=1, preset="digits-cpu", device="cpu", seed=0,
                            generator_samples=8)  # diagnostics only: small to keep the test fast
    return _weights(out), {"victim": victim["test_accuracy"], "defense": defense["test_accuracy"]}


#: tiny runs of every attack (name, labels, pool, budget, options)
ATTACK_RUNS = [
    ("knockoff", "soft", "attacker", 96, {"epochs": 2}),
    ("dfme", "soft", None, 800, {"preset": "cpu", "batch_size": 16, "ngf": 8}),
    ("dfms-hl", "hard", "proxy", 600, {"preset": "cpu", "val_size": 64, "pretrain_proxy": 128, "pretrain_fake": 64,
                                       "pretrain_epochs": 1, "gan_epochs": 1, "ngf": 8, "ndf": 8, "batch_size": 32}),
]


def _attack(target: Path, out: Path, proxy: Path) -> tuple[dict[str, str], dict[str, float]]:
    from misleader.attacks.harness import run_attack

    accs = {}
    for name, labels, pool, budget, options in ATTACK_RUNS:
        res = run_attack(name, target=target, budget=budget, clone_arch="lenet5_fifth", out=out / name, device="cpu",
                         seed=0, labels=labels, pool=f"npz:{proxy}" if pool == "proxy" else pool, options=options)
        accs[name] = res["clone_accuracy"]
    return _weights(out), accs


def test_poisoned_test_split_changes_no_victim_or_defense_checkpoint(tmp_path, monkeypatch, one_thread):
    clean, clean_acc = _train(tmp_path / "clean")
    monkeypatch.setitem(DATASETS._items, "digits", _poisoned(DATASETS.get("digits")))
    poisoned, poisoned_acc = _train(tmp_path / "poisoned")
    assert {k.split("/")[0] for k in clean} == {"victim", "defense"}, sorted(clean)
    assert any("members/" in k for k in clean), sorted(clean)
    assert poisoned == clean
    # the poisoning did reach the measurements: otherwise this test could not fail
    assert all(poisoned_acc[k] != pytest.approx(clean_acc[k]) for k in clean_acc), (clean_acc, poisoned_acc)


def test_poisoned_test_split_changes_no_attack_checkpoint(tiny_victim, tmp_path, monkeypatch, one_thread):
    import numpy as np

    rng = np.random.default_rng(0)  # DFMS-HL's proxy: any images from another source
    proxy = tmp_path / "proxy.npz"
    np.savez(proxy, x_train=rng.integers(0, 256, (256, 32, 32), dtype=np.uint8), y_train=np.arange(256) % 10,
             x_test=np.zeros((2, 32, 32), np.uint8), y_test=np.arange(2))
    clean, clean_acc = _attack(tiny_victim, tmp_path / "clean", proxy)
    monkeypatch.setitem(DATASETS._items, "digits", _poisoned(DATASETS.get("digits")))
    poisoned, poisoned_acc = _attack(tiny_victim, tmp_path / "poisoned", proxy)
    assert {k.split("/")[0] for k in clean} == {name for name, *_ in ATTACK_RUNS}, sorted(clean)
    assert poisoned == clean
    assert all(poisoned_acc[k] != pytest.approx(clean_acc[k]) for k in clean_acc), (clean_acc, poisoned_acc)
