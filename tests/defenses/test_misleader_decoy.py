"""The decoy variant of MISLEADER (issue 11): derangement, bank, loss, trainer hook, folder privacy."""

from __future__ import annotations

import json

import pytest
import torch

from misleader.defenses.misleader.decoy import (DecoyConfig, decoy_loss, decoy_targets, is_derangement, make_bank,
                                                random_derangement)
from misleader.errors import MisleaderError
from misleader.utils import make_generator

from _misleader_helpers import replace_cfg, tiny_cfg, tiny_model, train_tiny


def _decoy(**kw) -> dict:
    d = {"perm": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0], "mu": 1.0, "bank_size": 32, "generators": 2, "bank_seed": 5}
    d.update(kw)
    return d


@pytest.mark.parametrize("seed", range(20))
def test_random_derangement_has_no_fixed_point(seed):
    p = random_derangement(10, generator=make_generator(seed))
    assert is_derangement(p) and sorted(p) == list(range(10))


def test_is_derangement_rejects_fixed_points_and_non_permutations():
    assert not is_derangement([0, 2, 1])
    assert not is_derangement([1, 1, 0])
    assert is_derangement([1, 2, 0])
    with pytest.raises(MisleaderError, match="fixed points"):
        DecoyConfig.from_dict(_decoy(perm=[0, 1, 2, 3, 4, 5, 6, 7, 9, 8]))
    with pytest.raises(MisleaderError, match="unknown decoy"):
        DecoyConfig.from_dict(_decoy(nope=1))


def test_bank_is_deterministic_in_unit_range_and_uses_both_families():
    cfg = DecoyConfig.from_dict(_decoy(mappings=[[0.5, 0.5], [0.1, 0.3]]))
    a, b = make_bank(cfg, channels=1, size=32), make_bank(cfg, channels=1, size=32)
    assert a.shape == (32, 1, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # the second mapping (normalised range) keeps odd images <= 0.4
    assert float(a[1::2].max()) <= 0.4 + 1e-6 and float(a[0::2].max()) > 0.4
    other = make_bank(DecoyConfig.from_dict(_decoy(bank_seed=6)), channels=1, size=32)
    assert not torch.equal(a, other)


def test_targets_are_the_victims_softmax_relabelled_by_pi():
    teacher = tiny_model(3)
    x = torch.rand(8, 1, 32, 32)
    perm = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    q = decoy_targets(teacher, x, perm)
    with torch.no_grad():
        p = torch.softmax(teacher.eval()(x), 1)
    for c in range(10):
        assert torch.allclose(q[:, perm[c]], p[:, c])
    assert torch.equal(q.argmax(1), torch.tensor(perm)[p.argmax(1)])
    assert float(decoy_loss(q.log(), q)) == pytest.approx(0.0, abs=1e-6)
    sharp = torch.softmax(5 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), 1)
    q_sharp = sharp[:, torch.argsort(torch.tensor(perm))]
    assert torch.equal(q_sharp.argmax(1), torch.tensor(perm)[sharp.argmax(1)])
    assert float(decoy_loss(sharp.log(), q_sharp)) > 1.0


def test_default_config_dict_and_training_are_unchanged():
    """The faithful path: no 'decoy' key in the settings, and decoy={} trains bit-identically to the default."""
    c = tiny_cfg(lam=0.5)
    assert "decoy" not in c.to_dict()
    explicit = replace_cfg(c, decoy={})
    r1, d1, _ = train_tiny(c)
    r2, d2, _ = train_tiny(explicit)
    assert all(torch.equal(a, b) for a, b in zip(d1.state_dict().values(), d2.state_dict().values()))
    assert "decoy_kl" not in r1.history[0]
    # and mu > 0 changes the member
    r3, d3, _ = train_tiny(replace_cfg(c, decoy=_decoy()))
    assert r3.history[0]["decoy_kl"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(d1.state_dict().values(), d3.state_dict().values()))


def test_decoy_term_pulls_members_towards_the_relabelled_victim_on_the_bank():
    cfg_d = _decoy(bank_size=64, mu=5.0)
    c = tiny_cfg(lam=0.0, epochs=3)
    _, plain, teacher = train_tiny(c)
    _, dec, _ = train_tiny(replace_cfg(c, decoy=cfg_d))
    dc = DecoyConfig.from_dict(cfg_d)
    bank = make_bank(dc, channels=1, size=32)
    q = decoy_targets(teacher, bank, dc.perm)
    with torch.no_grad():
        kl_plain = float(decoy_loss(plain.eval()(bank), q))
        kl_dec = float(decoy_loss(dec.eval()(bank), q))
    assert kl_dec < kl_plain


def test_bad_decoy_settings_are_a_one_line_error():
    with pytest.raises(MisleaderError, match="bad MISLEADER settings"):
        tiny_cfg(decoy={"mu": 1.0})


def test_folder_members_share_pi_and_pi_is_not_served(tiny_victim, tmp_path):
    from misleader import load_oracle
    from misleader.defenses import defense_spec

    spec = defense_spec("misleader-decoy")
    out = tmp_path / "dec"
    params = {**spec.test_params, "members": ["lenet5_fifth", "lenet5_fifth"],
              "member_settings": [{"batch_size": 128, "lam": 0.0}] * 2}
    spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=3, device="cpu", force=False, **params)
    plan = json.loads((out / "plan.json").read_text())
    perms = [c["decoy"]["perm"] for c in plan["configs"]]
    assert len(perms) == 2 and perms[0] == perms[1] and is_derangement(perms[0])
    seeds = {c["decoy"]["bank_seed"] for c in plan["configs"]}
    assert len(seeds) == 1
    manifest = (out / "manifest.json").read_text()
    assert "perm" not in manifest and "decoy" not in manifest and "bank_seed" not in manifest
    described = json.dumps(load_oracle(out).describe())
    assert "perm" not in described and str(perms[0]) not in described
    # another seed draws another secret
    out2 = tmp_path / "dec2"
    spec(victim=tiny_victim, base=None, out=out2, data_dir=None, seed=4, device="cpu", force=False,
         **spec.test_params)
    perm2 = json.loads((out2 / "plan.json").read_text())["configs"][0]["decoy"]["perm"]
    assert is_derangement(perm2)


def test_select_candidate_rule():
    from misleader.defenses.misleader.decoy_select import select_candidate

    s = [{"target": "a", "val_accuracy": 0.99, "heldout_clone_val_accuracy": 0.9},
         {"target": "b", "val_accuracy": 0.985, "heldout_clone_val_accuracy": 0.1},
         {"target": "c", "val_accuracy": 0.95, "heldout_clone_val_accuracy": 0.05}]
    assert select_candidate(s, victim_val_accuracy=0.99, tolerance=0.006)["target"] == "b"
    assert select_candidate(s, victim_val_accuracy=0.99, tolerance=0.001)["target"] == "a"
    assert select_candidate(s, victim_val_accuracy=0.999, tolerance=0.001)["target"] == "a"  # none qualifies
    # a permutation decoy whose clone is consistently wrong is judged by what a relabelling gives back
    s2 = [{"target": "perm", "val_accuracy": 0.99, "heldout_clone_val_accuracy": 0.01,
           "heldout_clone_val_accuracy_relabelled": 0.9},
          {"target": "collapse", "val_accuracy": 0.99, "heldout_clone_val_accuracy": 0.1,
           "heldout_clone_val_accuracy_relabelled": 0.12}]
    assert select_candidate(s2, victim_val_accuracy=0.99)["target"] == "collapse"


def test_relabelled_accuracy_undoes_a_permutation_but_not_a_collapse():
    from misleader.metrics import relabelled_accuracy

    y = torch.arange(10).repeat(20)
    assert relabelled_accuracy(torch.tensor([9, 4, 8, 5, 0, 1, 7, 2, 6, 3])[y], y, num_classes=10) == 1.0
    assert relabelled_accuracy(torch.tensor([4, 4, 4, 4, 1, 1, 1, 1, 4, 4])[y], y, num_classes=10) == pytest.approx(0.2)


def test_select_scores_on_validation_with_the_defenders_own_dfme(tiny_victim, tmp_path, monkeypatch):
    """Scoring never touches the test split: the loaded data's test images are poisoned and nothing changes."""
    from misleader.defenses.misleader import decoy_select
    from misleader.training import victim as victim_mod

    real = victim_mod.load_target_data

    def no_test(meta, *, data_dir=None):
        data, splits = real(meta, data_dir=data_dir)
        data.x_test.fill_(0)
        data.y_test.fill_(-1)
        return data, splits

    monkeypatch.setattr(victim_mod, "load_target_data", no_test)
    res = decoy_select.select([tiny_victim], victim=tiny_victim, queries=28 * 3,
                              dfme_options={"batch_size": 4, "nz": 8, "ngf": 4})
    sc = res["scores"][0]
    assert res["chosen"] == str(tiny_victim) and sc["queries"] == 84
    assert sc["val_accuracy"] == pytest.approx(res["victim_val_accuracy"])
    assert 0 <= sc["heldout_clone_val_accuracy"] <= 1 and sc["seed"] >= decoy_select.DEFENDER_SEED


def test_adversarial_generator_option_trains_and_needs_the_clone():
    r, _, _ = train_tiny(tiny_cfg(lam=0.5, decoy=_decoy(adversarial=True, adv_batch=8, adv_ngf=4, adv_nz=8)))
    row = r.history[0]
    assert row["decoy_adv_kl"] > 0 and row["adv_disagreement"] >= 0 and row["decoy_kl"] > 0
    with pytest.raises(MisleaderError, match="inner clone"):
        train_tiny(tiny_cfg(lam=0.0, decoy=_decoy(adversarial=True)))


def test_spec_validation_accepts_the_decoy_defense_and_rejects_bad_settings(tmp_path):
    from misleader.experiments.spec import load_spec

    good = ("name: t\ndataset: digits\nvictim: {arch: lenet5_fifth, epochs: 1}\n"
            "defenses:\n  - {name: misleader-decoy, members: [lenet5_fifth], epochs: 1, mu: 0.5, adversarial: true}\n"
            "attacks:\n  - {name: dfme-seeded, budgets: [1k], options: {preset: cpu, seeds: 10}}\n"
            "clone_archs: [lenet5_fifth]\nseeds: [0]\n")
    (tmp_path / "a.yaml").write_text(good)
    load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(good.replace("mu: 0.5", "mu: -1"))
    with pytest.raises(MisleaderError, match="mu"):
        load_spec(tmp_path / "b.yaml")


# --------------------------------------------------------------------------- collapsing relabelling

@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("m", [2, 3, 5])
def test_random_collapse_uses_m_classes_without_fixed_points(seed, m):
    from misleader.defenses.misleader.decoy import random_collapse

    f = random_collapse(10, m, generator=make_generator(seed))
    assert len(f) == 10 and len(set(f)) == m and all(v != c for c, v in enumerate(f))
    assert f == random_collapse(10, m, generator=make_generator(seed))
    DecoyConfig.from_dict(_decoy(perm=f, relabel="collapse"))
    with pytest.raises(MisleaderError, match="decoy_classes"):
        random_collapse(10, 10, generator=make_generator(seed))


def test_collapse_targets_add_the_merged_classes_and_the_permutation_dict_is_unchanged():
    teacher = tiny_model(3)
    x = torch.rand(8, 1, 32, 32)
    f = [4, 4, 4, 4, 1, 1, 1, 1, 4, 4]
    q = decoy_targets(teacher, x, f)
    with torch.no_grad():
        p = torch.softmax(teacher.eval()(x), 1)
    assert torch.allclose(q[:, 4], p[:, [0, 1, 2, 3, 8, 9]].sum(1)) and torch.allclose(q[:, 1], p[:, 4:8].sum(1))
    assert torch.allclose(q.sum(1), torch.ones(8)) and bool((q[:, [0, 2, 3, 5, 6, 7, 8, 9]] == 0).all())
    # a collapsing map is refused as a permutation, a permutation's settings keep their old dict (no new key)
    with pytest.raises(MisleaderError, match="permutation"):
        DecoyConfig.from_dict(_decoy(perm=f))
    for bad in ([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [2] * 9 + [0]):
        with pytest.raises(MisleaderError, match="onto 2"):  # a fixed point; a bijection; fixed point 2
            DecoyConfig.from_dict(_decoy(perm=bad, relabel="collapse"))
    assert "relabel" not in DecoyConfig.from_dict(_decoy()).to_dict()
    assert DecoyConfig.from_dict(_decoy(perm=f, relabel="collapse")).to_dict()["relabel"] == "collapse"


def test_decoy_settings_draw_a_collapse_from_the_seed():
    from misleader.defenses.misleader_decoy_cli import check_params, decoy_settings

    meta = {"num_classes": 10, "mean": [0.1], "std": [0.3]}
    a = decoy_settings(victim_meta=meta, seed=3, mu=1.0, relabel="collapse", decoy_classes=3)
    assert a["relabel"] == "collapse" and len(set(a["perm"])) == 3
    assert a == decoy_settings(victim_meta=meta, seed=3, mu=1.0, relabel="collapse", decoy_classes=3)
    with pytest.raises(MisleaderError, match="goes with relabel collapse"):
        decoy_settings(victim_meta=meta, seed=3, mu=1.0, decoy_classes=3)
    with pytest.raises(MisleaderError, match="goes with relabel collapse"):
        check_params(mu=1.0, decoy_classes=3)
    check_params(mu=1.0, relabel="collapse", decoy_classes=2)


# --------------------------------------------------------------------------- refresh rounds

def test_refresh_rounds_grow_the_bank_with_the_defenders_dfme_and_publish_the_last_round(tiny_victim, tmp_path):
    import hashlib

    from misleader import load_oracle
    from misleader.defenses import defense_spec
    from misleader.defenses.misleader.decoy import bank_file_name

    spec = defense_spec("misleader-decoy")
    out = tmp_path / "ref"
    params = {**spec.test_params, "refresh_rounds": 1, "refresh_budget": 1792, "refresh_sample": 40}
    res = spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=3, device="cpu", force=False, **params)
    summary = res["refresh"]["summary"]
    assert [r["round"] for r in summary] == [0, 1] and summary[0]["extra_banks"] == []
    info = summary[0]["defender_dfme"]
    assert summary[1]["extra_banks"] == [info["sha256"]] and info["images"] == 40 and info["dfme_seed"] == 20_300
    data = (out / "rounds" / bank_file_name(info["sha256"])).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    # round 1's members learned from the stored bank; the folder serves round 1's ensemble
    plan = json.loads((out / "plan.json").read_text())
    assert all(c["decoy"]["extra_banks"] == [info["sha256"]] for c in plan["configs"])
    x = torch.rand(16, *load_oracle(out).input_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_oracle(out).query(x), load_oracle(out / "rounds" / "r1").query(x))
    assert not torch.equal(load_oracle(out).query(x), load_oracle(out / "rounds" / "r0").query(x))
    from misleader.oracle.manifest import read_target

    assert read_target(out).models["victim"].sidecar == read_target(out / "rounds" / "r1").models["victim"].sidecar
    assert read_target(out).models["victim"].sidecar.exists()
    # a rerun resumes (nothing retrained) and other refresh settings are refused
    stamp = (out / "result.json").stat().st_mtime_ns
    assert spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=3, device="cpu", force=False,
                **params)["refresh"] == res["refresh"]
    assert (out / "result.json").stat().st_mtime_ns == stamp
    with pytest.raises(MisleaderError, match="refresh"):
        spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=3, device="cpu", force=False,
             **{**params, "refresh_sample": 41})


def test_a_stored_bank_is_checked_before_use(tmp_path):
    from misleader.defenses.misleader.decoy import load_bank_file, save_bank_file

    x = torch.rand(5, 1, 8, 8)
    digest = save_bank_file(x, tmp_path)
    assert torch.allclose(load_bank_file(tmp_path, digest, shape=(1, 8, 8)), x, atol=1 / 255)
    with pytest.raises(MisleaderError, match="holds"):
        load_bank_file(tmp_path, digest, shape=(1, 8, 9))
    path = next(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(MisleaderError, match="altered"):
        load_bank_file(tmp_path, digest, shape=(1, 8, 8))
    with pytest.raises(MisleaderError, match="not found"):
        load_bank_file(tmp_path, "0" * 64, shape=(1, 8, 8))
    with pytest.raises(MisleaderError, match="sha256"):
        DecoyConfig.from_dict(_decoy(extra_banks=["abc"]))


# --------------------------------------------------------------------------- anchors

def test_shift_batch_draws_each_shift_in_range_from_the_generator():
    from misleader.defenses.misleader.decoy import shift_batch

    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a = shift_batch(x, generator=make_generator(1))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1 and not torch.equal(a, x)
    assert torch.equal(a, shift_batch(x, generator=make_generator(1)))
    assert not torch.equal(a, shift_batch(x, generator=make_generator(2)))
    # every image is changed; contrast and blur keep the mean (up to the clamp), noise does not keep the pixels
    assert bool(((a - x).abs().flatten(1).amax(1) > 0).all())


def test_anchors_distil_shifted_clean_images_and_leave_the_default_settings_alone(tiny_victim, tmp_path):
    from misleader.defenses import defense_spec

    assert "anchors" not in DecoyConfig.from_dict(_decoy()).to_dict()
    spec = defense_spec("misleader-decoy")
    out = tmp_path / "anc"
    spec(victim=tiny_victim, base=None, out=out, data_dir=None, seed=3, device="cpu", force=False,
         **{**spec.test_params, "anchors": True})
    plan = json.loads((out / "plan.json").read_text())
    assert all(c["decoy"]["anchors"] is True for c in plan["configs"])
    hist = json.loads((out / "members" / "lenet5_fifth" / "history.json").read_text())
    assert all(row.get("anchor_kd") is not None and row["anchor_kd"] > 0 for row in hist)
