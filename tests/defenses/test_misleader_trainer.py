"""MISLEADER member training (defenses/misleader/trainer.py): the two updates, seeds, plain KD, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _misleader_helpers import (
    ARCH,
    kl_d_s,
    replace_cfg,
    tiny_batch,
    tiny_cfg,
    tiny_data,
    tiny_model,
    tiny_trainer,
    train_tiny,
)

from misleader.defenses.misleader import REFERENCE_INNER
from misleader.errors import MisleaderError
from misleader.models import create_model
from misleader.utils import derive_seed, make_generator


def test_defense_step_increases_kl_to_a_fixed_clone_when_lambda_is_large():
    x, y = tiny_batch(0)
    x_aug, _ = tiny_batch(1)
    t = tiny_model(3)(x).detach()
    grew = {}
    for lam in (0.0, 50.0):
        tr = tiny_trainer(tiny_cfg(lam=lam, grad_clip=None, lr=0.05))  # same d and s for both lambdas
        before = kl_d_s(tr.defense, tr.clone, x_aug)
        s_before = [p.clone() for p in tr.clone.parameters()]
        tr.defense_step(x, y, t, x_aug)
        after = kl_d_s(tr.defense, tr.clone, x_aug)
        assert all(torch.equal(a, b) for a, b in zip(s_before, tr.clone.parameters()))  # s held fixed
        grew[lam] = after - before
    assert grew[50.0] > 0
    assert grew[50.0] > grew[0.0] + 1e-4


@pytest.mark.parametrize("mode", ["steps", "accumulate"])
def test_clone_step_decreases_kl_and_leaves_the_defense_alone(mode):
    x_aug, _ = tiny_batch(1)
    tr = tiny_trainer(tiny_cfg(inner_mode=mode, a_iter=3))
    d_before = [p.clone() for p in tr.defense.parameters()]
    before = kl_d_s(tr.defense, tr.clone, x_aug)
    tr.clone_step(x_aug)
    assert kl_d_s(tr.defense, tr.clone, x_aug) < before
    assert all(torch.equal(a, b) for a, b in zip(d_before, tr.defense.parameters()))


def test_step_is_the_clone_step_then_the_defense_step():
    x, y = tiny_batch(0)
    x_aug, _ = tiny_batch(1, n=24)
    t = tiny_model(3)(x).detach()
    a, b = tiny_trainer(tiny_cfg(a_iter=2)), tiny_trainer(tiny_cfg(a_iter=2))
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
    x_aug, _ = tiny_batch(1)
    ref = tiny_trainer(tiny_cfg(**REFERENCE_INNER))
    ours = tiny_trainer(tiny_cfg())
    for _ in range(3):  # several steps: the momentum buffers must agree too
        ref.clone_step(x_aug)
        ours.clone_step(x_aug)
    for pa, pb in zip(ref.clone.parameters(), ours.clone.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_same_seed_same_result_and_history_records_the_four_numbers():
    cfg = tiny_cfg(epochs=2, patience=0)
    a, _, _ = train_tiny(cfg, seed=3)
    b, _, _ = train_tiny(cfg, seed=3)
    c, _, _ = train_tiny(cfg, seed=4)
    assert all(torch.equal(a.defense_state[k], b.defense_state[k]) for k in a.defense_state)
    assert a.history == [dict(r, seconds=a.history[i]["seconds"]) for i, r in enumerate(b.history)]
    assert not all(torch.equal(a.defense_state[k], c.defense_state[k]) for k in a.defense_state)
    for row in a.history:
        for key in ("val_accuracy", "clone_val_accuracy", "kd_loss", "attacker_kl", "clone_kl"):
            assert isinstance(row[key], float) and math.isfinite(row[key])


def test_lambda_zero_is_plain_kd():
    """lambda = 0: the member follows a hand-written KD loop step for step, whatever the clone settings."""
    cfg = tiny_cfg(lam=0.0, epochs=2, patience=0)
    res, _, teacher = train_tiny(cfg, seed=5)
    other, _, _ = train_tiny(replace_cfg(cfg, a_iter=4, clone_lr=0.3, strong_augment={"degrees": 40}), seed=5)
    assert all(torch.equal(res.defense_state[k], other.defense_state[k]) for k in res.defense_state)
    assert res.history[0]["attacker_kl"] is None and res.history[0]["clone_val_accuracy"] is None

    # the reference KD loop: SGD + per-step cosine + clip 5 on alpha T^2 KL + (1 - alpha) CE, clean batches
    x, y = tiny_data()
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



def test_resume_after_an_interrupt_gives_the_same_member(tmp_path):
    cfg = tiny_cfg(epochs=3, patience=0)
    full, _, _ = train_tiny(cfg, seed=7)

    def stop_at_third(row):  # on_epoch runs before the epoch's resume state is saved
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tiny(cfg, seed=7, resume_path=tmp_path / "resume.safetensors", on_epoch=stop_at_third)
    assert (tmp_path / "resume.safetensors").exists()
    resumed, _, _ = train_tiny(cfg, seed=7, resume_path=tmp_path / "resume.safetensors")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert all(torch.equal(full.last_defense_state[k], resumed.last_defense_state[k]) for k in full.defense_state)
    assert resumed.best_epoch == full.best_epoch
    with pytest.raises(MisleaderError, match="other settings"):
        train_tiny(replace_cfg(cfg, lam=2.0), seed=7, resume_path=tmp_path / "resume.safetensors")

