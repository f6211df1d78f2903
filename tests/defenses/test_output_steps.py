"""Output steps (RandP, MAD, GRAD², postprocessors) and the Adaptive Misinformation gate, called on tensors."""

from __future__ import annotations

import pytest
import torch
from _output_ctx import K, build_step, random_probs, random_x, tiny_net

from misleader.defenses.grad2 import redirect, redirection_coefficients
from misleader.defenses.randp import project_l1_ball, project_l2_ball
from misleader.errors import MisleaderError
from misleader.oracle.steps import StepContext

ALL = [("randp", {"epsilon": 0.5}), ("randp", {"epsilon": 0.5, "form": "logit", "dist": "l2", "strat": "gaussian"}),
       ("mad", {"epsilon": 0.5, "surrogate": "s"}), ("grad2", {"epsilon": 0.5, "surrogates": ["a", "b"]}),
       ("reverse_sigmoid", {"beta": 0.7, "gamma": 0.4}), ("round", {"decimals": 2}), ("top_k", {"k": 2}),
       ("labels", {}), ("gaussian", {"scale": 0.3}),
       ("adaptive_misinfo", {"tau": 0.8, "nu": 50.0, "misinfo": "m", "detector": "d"})]


@pytest.mark.parametrize("type_name,spec", ALL)
def test_manifest_round_trip_and_seeded_answers(type_name: str, spec: dict) -> None:
    step = build_step(type_name, spec, seed=5)
    entry = step.to_manifest()
    assert entry["type"] == type_name and all(entry[k] == v for k, v in spec.items())
    again = build_step(type_name, {k: v for k, v in entry.items()}, seed=5)
    y, x = random_probs(32), random_x(32)
    run = (lambda s: s.apply(y, x)) if step.kind == "gate" else (lambda s: s(y, x))
    a, b = run(step), run(again)
    assert torch.equal(a, b)  # same folder seed -> same answers (randomness only from ctx.generator)
    assert a.dtype == torch.float32 and a.shape == y.shape
    if step.stochastic and type_name != "grad2":  # grad2 draws only which surrogate answers
        assert not torch.equal(run(step), a)  # the generator moves on


def test_bad_manifest_entries_raise_one_line_errors() -> None:
    with pytest.raises(MisleaderError, match="epsilon"):
        build_step("randp", {})
    with pytest.raises(MisleaderError, match="oracle"):
        build_step("mad", {"epsilon": 0.5, "surrogate": "s", "oracle": "nope"})
    with pytest.raises(MisleaderError, match="unknown keys"):
        build_step("round", {"digits": 2})


def test_randp_mass_form_moves_eps_half_to_one_non_argmax_class() -> None:
    y = random_probs(200)
    out = build_step("randp", {"epsilon": 0.6})(y, random_x(200))
    diff = out - 0.7 * y  # (1 - eps/2) y; the rest is eps/2 on the target
    t = diff.argmax(dim=1)
    assert torch.allclose(diff.gather(1, t[:, None]), torch.full((200, 1), 0.3), atol=1e-6)
    assert not torch.any(t == y.argmax(dim=1))
    assert len(set(t.tolist())) == K  # uniform over the other classes: every class shows up
    l1 = (out - y).abs().sum(dim=1)
    assert torch.allclose(l1, 0.6 * (1 - y.gather(1, t[:, None])[:, 0]), atol=1e-5)


def test_l1_and_l2_ball_projections() -> None:
    v = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    p1, p2 = project_l1_ball(v, radius=1.5), project_l2_ball(v, radius=1.5)
    assert torch.all(p1.abs().sum(dim=1) <= 1.5 + 1e-9) and torch.all(p2.norm(dim=1) <= 1.5 + 1e-9)
    outside = v.abs().sum(dim=1) > 1.5
    assert torch.allclose(p1[outside].abs().sum(dim=1), torch.full((int(outside.sum()),), 1.5, dtype=v.dtype))
    # the L1 projection is the closest point of the ball: no random point of the ball's surface is closer
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        r = torch.randn(2000, 7, generator=g, dtype=torch.float64)
        r = 1.5 * r / r.abs().sum(dim=1, keepdim=True)
        assert (r - v[i]).norm(dim=1).min() >= (p1[i] - v[i]).norm() - 1e-9
    inside = v[:1] / v[:1].abs().sum() * 0.5
    assert torch.equal(project_l1_ball(inside, radius=1.5), inside)


def test_grad2_coefficients_match_a_finite_difference_of_the_objective() -> None:
    model = tiny_net(7)
    x, y = random_x(6).double(), random_probs(6, seed=3).double()
    c = redirection_coefficients(model, x, y, target="all_ones")

    def j(yy: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = (yy * torch.log_softmax(model(x), dim=1)).sum(dim=1).mean()
            grads = torch.autograd.grad(loss, list(model.parameters()))
        return -sum(g.sum() for g in grads)

    d = torch.zeros_like(y)
    d[2, 4] = 1.0
    assert torch.allclose(j(y + d) - j(y), c[2, 4].double(), rtol=1e-4, atol=1e-6)


def test_grad2_lp_moves_mass_to_the_smallest_coefficient_from_the_largest() -> None:
    y = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    c = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    out = redirect(y, c, epsilon=1.0)  # m = 0.5: take 0.5 from class 0 (largest c), give it to class 3
    assert torch.allclose(out.float(), torch.tensor([[0.0, 0.3, 0.15, 0.55]]))
    out = redirect(y, c, epsilon=1.9)  # m = 0.95: classes 0, 2, then 0.3 of class 1... capped by 1 - y_3
    assert torch.allclose(out.float(), torch.tensor([[0.0, 0.0, 0.0, 1.0]]), atol=1e-6)  # float32 inputs


def test_grad2_step_keeps_its_l1_budget() -> None:
    step = build_step("grad2", {"epsilon": 0.4, "surrogates": ["a"], "target": "min_ip"})
    y = random_probs(64)
    with torch.inference_mode():  # the step works inside an oracle's inference mode
        out = step(y, random_x(64))
    assert torch.all((out - y).abs().sum(dim=1) <= 0.4 + 1e-5)
    assert torch.allclose((out - y).abs().sum(dim=1).max(), torch.tensor(0.4), atol=1e-5)


def test_labels_are_one_hot_per_row_in_a_mixed_batch() -> None:
    y = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    out = build_step("labels", {}, k=3)(y, random_x(3))
    assert torch.equal(out, torch.eye(3)[[0, 2, 1]])
    art = torch.zeros_like(y)  # the peer toolkit's ClassLabels: labels[:, argmaxes] = 1 for the whole batch
    art[:, y.argmax(dim=1)] = 1
    assert not torch.equal(out, art) and torch.all(out.sum(dim=1) == 1)


def test_top_k_renormalises_and_never_leaves_an_all_zero_row() -> None:
    y = torch.tensor([[0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    out = build_step("top_k", {"k": 1, "cutoff": 0.5}, k=3)(y, random_x(2))
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    out = build_step("top_k", {"k": 2}, k=3)(y[:1], random_x(1))
    assert torch.allclose(out, torch.tensor([[0.4, 0.35, 0.0]]) / 0.75)


def test_round_keeps_rows_summing_to_one() -> None:
    y = torch.full((1, 3), 1 / 3)
    out = build_step("round", {"decimals": 1}, k=3)(y, random_x(1))
    assert torch.allclose(out.sort(dim=1).values, torch.tensor([[0.3, 0.3, 0.4]]))


def test_reverse_sigmoid_matches_the_formula() -> None:
    y = random_probs(8).double()
    out = build_step("reverse_sigmoid", {"beta": 0.5, "gamma": 0.3})(y.float(), random_x(8))
    p = y.clamp(1e-9, 1 - 1e-9)
    want = (p - 0.5 * (torch.sigmoid(0.3 * torch.log(p / (1 - p))) - 0.5)).clamp(0, 1)
    assert torch.allclose(out.double(), want / want.sum(dim=1, keepdim=True), atol=1e-6)


def test_adaptive_misinformation_gate_weight_and_mix() -> None:
    gate = build_step("adaptive_misinfo", {"tau": 0.5, "nu": 20.0, "misinfo": "m"})
    y = torch.tensor([[0.9] + [0.1 / 9] * 9, [0.2] + [0.8 / 9] * 9])
    x = random_x(2)
    w = gate.weight(y, x)
    assert torch.allclose(w, torch.sigmoid(20 * (0.5 - torch.tensor([0.9, 0.2]))))
    mis = gate.branch(x)
    assert torch.allclose(gate.apply(y, x), (1 - w[:, None]) * y + w[:, None] * mis)
    assert not gate.hard


def _spy_folder_writer(calls: list, monkeypatch):
    """Wrap the real ``write_defense_folder`` to record the builder's call."""
    import misleader.defenses.folder as folder

    real = folder.write_defense_folder

    def write_defense_folder(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(folder, "write_defense_folder", write_defense_folder)


@pytest.mark.parametrize("name", ["randp", "mad", "grad2", "am", "post"])
def test_builders_pass_their_steps_and_record_serve_cost(name: str, tiny_victim, tmp_path, monkeypatch) -> None:
    from misleader.defenses.base import defense_spec
    from misleader.oracle.steps import STEPS

    torch.set_num_threads(1)
    calls: list = []
    _spy_folder_writer(calls, monkeypatch)
    spec = defense_spec(name)
    result = spec.build(victim=tiny_victim, base=None, out=tmp_path / name, data_dir=None, seed=0, device="cpu",
                        force=False, **spec.test_params)
    (call,) = calls
    assert call["defense"] == name and call["base"] is None and len(call["steps"]) == 1
    entry = call["steps"][0]
    step_cls = STEPS.get(entry["type"])
    for model_name in call["models"] or {}:
        assert model_name in str(entry)  # every saved model is named by the step that loads it
    ctx = StepContext(folder=tmp_path, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                      num_classes=10, input_shape=(1, 32, 32), load_model=lambda n: call["models"][n])
    step = step_cls.from_manifest(entry, ctx=ctx)
    assert step.to_manifest() == entry
    assert result["serve"]["rows_per_s"] > 0 and result["serve"]["base_rows_per_s"] > 0
    bound = step.l1_bound
    assert 0.0 <= result["max_l1_to_victim"] <= (bound + 1e-5 if bound is not None else 2.0)


def test_grad2_works_with_frozen_served_models() -> None:
    model = tiny_net(7).float()
    x, y = random_x(5), random_probs(5, seed=1)
    want = redirection_coefficients(model, x, y, target="all_ones")
    model.requires_grad_(False)  # a loader may freeze the models it serves
    assert torch.equal(redirection_coefficients(model, x, y, target="all_ones"), want)
