"""MISLEADER defense: loss signs, the two updates, KD reduction, soft voting, files, seeds, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from misleader import load_oracle
from misleader.cli import main
from misleader.defenses import DEFENSES, defend_undefended
from misleader.defenses.misleader import (
    DEFAULT_MEMBER_SETTINGS,
    PRESETS,
    REFERENCE_INNER,
    MemberConfig,
    MemberTrainer,
    attacker_term,
    clone_loss,
    defend_misleader,
    kd_loss,
    kl_rows,
    member_config,
    member_names,
    train_member,
)
from misleader.errors import MisleaderError
from misleader.models import create_model
from misleader.training.checkpoint import load_model
from misleader.utils import derive_seed, make_generator

ARCH = "lenet5_fifth"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest and keeps the shared 2-core machine usable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int, arch: str = ARCH) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, in_channels=1, num_classes=10)


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _cfg(**kw) -> MemberConfig:
    base = {"arch": ARCH, "lam": 1.0, "temperature": 4.0, "alpha": 0.9, "epochs": 1, "batch_size": 16}
    base.update(kw)
    return MemberConfig(**base)


def _kl_d_s(d, s, x) -> float:
    with torch.no_grad():
        return float(kl_rows(d(x), s(x)).mean())


# --------------------------------------------------------------------------- losses


@settings(max_examples=30, deadline=None)
@given(t=st.floats(0.5, 8.0), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_kd_loss_matches_the_reference_formula(t, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    d, te = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    ref = (torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(d / t, 1), F.softmax(te / t, 1)) * alpha * t * t
           + (1 - alpha) * F.cross_entropy(d, y))
    assert torch.allclose(kd_loss(d, te, y, temperature=t, alpha=alpha), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-5, 5))
def test_attacker_term_is_a_kl_that_flows_only_into_d(seed, shift):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(6, 10, generator=g) * 2).requires_grad_()
    s = (torch.randn(6, 10, generator=g) * 2).requires_grad_()
    term = attacker_term(d, s)
    ref = F.kl_div(F.log_softmax(s, 1), F.softmax(d, 1), reduction="batchmean")  # the reference's kl_div(log s, d)
    assert term >= 0 and torch.allclose(term, ref, rtol=1e-4, atol=1e-6)
    term.backward()
    assert s.grad is None and d.grad is not None and d.grad.abs().sum() > 0
    assert float(attacker_term(d.detach(), d.detach() + shift)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    d2, s2 = d.detach().requires_grad_(), s.detach().requires_grad_()
    clone_loss(s2, d2).backward()
    assert d2.grad is None and s2.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the two updates


def _trainer(cfg: MemberConfig, d_seed: int = 1, s_seed: int = 2) -> MemberTrainer:
    return MemberTrainer(config=cfg, defense=_model(d_seed), clone=_model(s_seed), device=torch.device("cpu"),
                         total_steps=100)


def test_defense_step_increases_kl_to_a_fixed_clone_when_lambda_is_large():
    x, y = _batch(0)
    x_aug, _ = _batch(1)
    t = _model(3)(x).detach()
    grew = {}
    for lam in (0.0, 50.0):
        tr = _trainer(_cfg(lam=lam, grad_clip=None, lr=0.05))  # same d and s for both lambdas
        before = _kl_d_s(tr.defense, tr.clone, x_aug)
        s_before = [p.clone() for p in tr.clone.parameters()]
        tr.defense_step(x, y, t, x_aug)
        after = _kl_d_s(tr.defense, tr.clone, x_aug)
        assert all(torch.equal(a, b) for a, b in zip(s_before, tr.clone.parameters()))  # s held fixed
        grew[lam] = after - before
    assert grew[50.0] > 0
    assert grew[50.0] > grew[0.0] + 1e-4


@pytest.mark.parametrize("mode", ["steps", "accumulate"])
def test_clone_step_decreases_kl_and_leaves_the_defense_alone(mode):
    x_aug, _ = _batch(1)
    tr = _trainer(_cfg(inner_mode=mode, a_iter=3))
    d_before = [p.clone() for p in tr.defense.parameters()]
    before = _kl_d_s(tr.defense, tr.clone, x_aug)
    tr.clone_step(x_aug)
    assert _kl_d_s(tr.defense, tr.clone, x_aug) < before
    assert all(torch.equal(a, b) for a, b in zip(d_before, tr.defense.parameters()))


def test_step_is_the_clone_step_then_the_defense_step():
    x, y = _batch(0)
    x_aug, _ = _batch(1, n=24)
    t = _model(3)(x).detach()
    a, b = _trainer(_cfg(a_iter=2)), _trainer(_cfg(a_iter=2))
    out = a.step(x, y, t, x_aug)
    b.clone_step(x_aug)
    b.defense_step(x, y, t, x_aug)
    for pa, pb in zip(list(a.defense.parameters()) + list(a.clone.parameters()),
                      list(b.defense.parameters()) + list(b.clone.parameters())):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert set(out) == {"loss", "kd_loss", "attacker_kl", "clone_kl"}
    assert math.isclose(float(out["loss"]), float(out["kd_loss"] - a.config.lam * out["attacker_kl"]), rel_tol=1e-5)


def test_accumulate_mode_reproduces_the_reference_update_and_default_equals_it():
    """Reference: 5 accumulated identical gradients, clip 5, lr 0.01, wd 5e-4 == 1 step, clip 1, lr 0.05, wd 1e-4."""
    x_aug, _ = _batch(1)
    ref = _trainer(_cfg(**REFERENCE_INNER))
    ours = _trainer(_cfg())
    for _ in range(3):  # several steps: the momentum buffers must agree too
        ref.clone_step(x_aug)
        ours.clone_step(x_aug)
    for pa, pb in zip(ref.clone.parameters(), ours.clone.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


# --------------------------------------------------------------------------- training a member


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=g)


def _train(cfg: MemberConfig, seed: int = 0, **kw):
    x, y = _data()
    xv, yv = _data(32, seed=1)
    gen = make_generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(gen))
        d, s = create_model(ARCH, in_channels=1, num_classes=10), create_model(ARCH, in_channels=1, num_classes=10)
    teacher = _model(99)
    res = train_member(config=cfg, teacher=teacher, defense=d, clone=s, x_train=x, y_train=y, x_val=xv, y_val=yv,
                       device=torch.device("cpu"), generator=gen, **kw)
    return res, d, teacher


def test_same_seed_same_result_and_history_records_the_four_numbers():
    cfg = _cfg(epochs=2, patience=0)
    a, _, _ = _train(cfg, seed=3)
    b, _, _ = _train(cfg, seed=3)
    c, _, _ = _train(cfg, seed=4)
    assert all(torch.equal(a.defense_state[k], b.defense_state[k]) for k in a.defense_state)
    assert a.history == [dict(r, seconds=a.history[i]["seconds"]) for i, r in enumerate(b.history)]
    assert not all(torch.equal(a.defense_state[k], c.defense_state[k]) for k in a.defense_state)
    for row in a.history:
        for key in ("val_accuracy", "clone_val_accuracy", "kd_loss", "attacker_kl", "clone_kl"):
            assert isinstance(row[key], float) and math.isfinite(row[key])


def test_lambda_zero_is_plain_kd():
    """lambda = 0: the member follows a hand-written KD loop step for step, whatever the clone settings."""
    cfg = _cfg(lam=0.0, epochs=2, patience=0)
    res, _, teacher = _train(cfg, seed=5)
    other, _, _ = _train(replace_cfg(cfg, a_iter=4, clone_lr=0.3, strong_augment={"degrees": 40}), seed=5)
    assert all(torch.equal(res.defense_state[k], other.defense_state[k]) for k in res.defense_state)
    assert res.history[0]["attacker_kl"] is None and res.history[0]["clone_val_accuracy"] is None

    # the reference KD loop: SGD + per-step cosine + clip 5 on alpha T^2 KL + (1 - alpha) CE, clean batches
    x, y = _data()
    gen = make_generator(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(gen))
        d = create_model(ARCH, in_channels=1, num_classes=10)
    clean = make_generator(derive_seed(gen))
    opt = torch.optim.SGD(d.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    steps = len(x) // cfg.batch_size
    total = cfg.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    teacher.eval()
    best, best_state = -1.0, None
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=clean)
        for i in range(steps):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = x[idx].float() / 255
            with torch.no_grad():
                t = teacher(xb)
            loss = (cfg.alpha * cfg.temperature**2 * F.kl_div(F.log_softmax(d(xb) / cfg.temperature, 1),
                                                              F.softmax(t / cfg.temperature, 1), reduction="batchmean")
                    + (1 - cfg.alpha) * F.cross_entropy(d(xb), y[idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), 5.0)
            opt.step()
            sched.step()
    final = d.state_dict()
    assert all(torch.allclose(final[k], res.last_defense_state[k], atol=1e-5) for k in final)


def replace_cfg(cfg: MemberConfig, **kw) -> MemberConfig:
    return MemberConfig.from_dict({**cfg.to_dict(), **kw})


def test_resume_after_an_interrupt_gives_the_same_member(tmp_path):
    cfg = _cfg(epochs=3, patience=0)
    full, _, _ = _train(cfg, seed=7)

    def stop_at_third(row):  # on_epoch runs before the epoch's resume state is saved
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(cfg, seed=7, resume_path=tmp_path / "resume.pt", on_epoch=stop_at_third)
    assert (tmp_path / "resume.pt").exists()
    resumed, _, _ = _train(cfg, seed=7, resume_path=tmp_path / "resume.pt")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert all(torch.equal(full.last_defense_state[k], resumed.last_defense_state[k]) for k in full.defense_state)
    assert resumed.best_epoch == full.best_epoch
    with pytest.raises(MisleaderError, match="other settings"):
        _train(replace_cfg(cfg, lam=2.0), seed=7, resume_path=tmp_path / "resume.pt")


def test_member_config_validation_and_presets():
    with pytest.raises(MisleaderError, match="lambda"):
        _cfg(lam=-1)
    with pytest.raises(MisleaderError, match="alpha"):
        _cfg(alpha=1.5)
    with pytest.raises(MisleaderError, match="unknown member setting"):
        member_config(ARCH, epochs=1, overrides={"lamda": 0.1})
    c = member_config("resnet18_8x", epochs=3, preset=PRESETS["cifar10-paper"], overrides={"T": 3, "lambda": None})
    assert (c.lam, c.temperature, c.alpha, c.batch_size) == (0.001, 3, 0.3, 256)
    assert DEFAULT_MEMBER_SETTINGS["mobilenet_v2"] == {"lam": 0.05, "temperature": 4.0, "alpha": 0.9}
    assert DEFAULT_MEMBER_SETTINGS["densenet121"] == {"lam": 0.01, "temperature": 2.0, "alpha": 0.3}
    assert PRESETS["mnist-cpu"].members == ("lenet5", "lenet5_half", "lenet5_fifth")
    assert MemberConfig.from_dict(c.to_dict()) == c


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
    # other settings for a finished member: refused with a fix
    with pytest.raises(MisleaderError, match="delete that folder"):
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
