"""Pipelines: step order, gates (hard gates evaluate the branch only where needed), seeded randomness,
composition through write_defense_folder (--base), result.json of the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from misleader import MisleaderError, load_oracle
from misleader.defenses.folder import write_defense_folder
from misleader.models import create_model
from misleader.oracle.steps import GateStep, OutputStep, StepContext, register_step

BRANCH_ROWS: list[int] = []


@register_step
class _Noise(OutputStep):
    """Test-only: mixes in seeded noise (stochastic; not in the step conformance test)."""

    type_name: ClassVar[str] = "_test_noise"
    stochastic: ClassVar[bool] = True

    def __init__(self, eps: float, g: torch.Generator) -> None:
        self.eps, self.g = eps, g
        self.l1_bound = 2 * eps

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "_Noise":
        return cls(float(spec["eps"]), ctx.generator)

    def __call__(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(probs.shape, generator=self.g, device=probs.device)
        return (1 - self.eps) * probs + self.eps * noise / noise.sum(1, keepdim=True)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "output", "type": self.type_name, "eps": self.eps}


@register_step
class _Gate(GateStep):
    """Test-only: rows whose top probability is below ``tau`` go to the branch (hard) or mix by 0.5 (soft)."""

    type_name: ClassVar[str] = "_test_gate"

    def __init__(self, tau: float, branch, soft: bool) -> None:  # noqa: ANN001
        self.tau, self._branch, self.soft = tau, branch, soft

    @property
    def hard(self) -> bool:  # type: ignore[override]
        return not self.soft

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "_Gate":
        return cls(float(spec["tau"]), ctx.build_branch(spec["branch"]), bool(spec.get("soft", False)))

    def weight(self, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        low = (probs.max(1).values < self.tau).float()
        return low * 0.5 if self.soft else low

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        BRANCH_ROWS.append(len(x))
        return self._branch(x)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "gate", "type": self.type_name, "tau": self.tau}


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5_fifth", in_channels=1, num_classes=10)


def test_composition_and_whole_pipeline_result(tiny_victim, tmp_path):
    x = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    # 1. a gate to a new model (the "surrogate") on top of the victim
    gate = {"kind": "gate", "type": "_test_gate", "tau": 0.5,
            "branch": [{"kind": "backend", "type": "model", "model": "sur"}]}
    r1 = write_defense_folder(out=tmp_path / "a", victim=tiny_victim, base=None, defense="gated", steps=[gate],
                              models={"sur": _tiny(5)}, params={"tau": 0.5}, seed=0, data_dir=None, device="cpu",
                              force=False)
    victim = load_oracle(tiny_victim)
    pv = victim.query(x)
    low = pv.max(1).values < 0.5
    BRANCH_ROWS.clear()
    pa = load_oracle(tmp_path / "a").query(x)
    assert BRANCH_ROWS == [int(low.sum())]  # the branch saw only the rows that needed it
    assert torch.equal(pa[~low], pv[~low])
    with torch.inference_mode():
        sur = torch.softmax(_tiny(5)(x[low]), 1)
    assert torch.allclose(pa[low], sur, atol=1e-6)
    # 2. noise on top of folder a (--base a): models copied in, steps appended
    r2 = write_defense_folder(out=tmp_path / "b", victim=tiny_victim, base=tmp_path / "a", defense="noisy",
                              steps=[{"kind": "output", "type": "_test_noise", "eps": 0.2}], models=None,
                              params={"eps": 0.2}, seed=7, data_dir=None, device="cpu", force=False)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["format"] == 2 and [s["type"] for s in m["steps"]] == ["model", "_test_gate", "_test_noise"]
    assert m["models"]["sur"]["checkpoint"] == "models/sur/model.json" and (tmp_path / "b/models/sur/model.json").exists()
    assert not Path(m["victim"]["path"]).is_absolute() and m["base"]["path"] == "../a"
    pb1, pb2 = load_oracle(tmp_path / "b").query(x), load_oracle(tmp_path / "b").query(x)
    assert torch.equal(pb1, pb2)  # reopened: same seed, same answers
    assert torch.allclose(pb1.sum(1), torch.ones(40), atol=1e-5)
    assert ((pb1 - pa).abs().sum(1) <= 0.4 + 1e-5).all() and not torch.equal(pb1, pa)
    # result.json: the whole pipeline against the victim
    assert r1["fidelity"] < 1.0 or not low.any()
    assert r2["mean_l1_to_victim"] > r1["mean_l1_to_victim"] > 0 and r2["stochastic"] and not r1["stochastic"]
    assert json.loads((tmp_path / "b" / "result.json").read_text())["test_accuracy"] == r2["test_accuracy"]


def test_soft_gate_mixes(tiny_victim, tmp_path):
    gate = {"kind": "gate", "type": "_test_gate", "tau": 1.01, "soft": True,
            "branch": [{"kind": "backend", "type": "model", "model": "sur"}]}
    write_defense_folder(out=tmp_path / "s", victim=tiny_victim, base=None, defense="soft", steps=[gate],
                         models={"sur": _tiny(5)}, params={}, seed=0, data_dir=None, device="cpu", force=False)
    x = torch.rand(6, 1, 32, 32)
    with torch.inference_mode():
        sur = torch.softmax(_tiny(5)(x), 1)
    assert torch.allclose(load_oracle(tmp_path / "s").query(x), 0.5 * load_oracle(tiny_victim).query(x) + 0.5 * sur,
                          atol=1e-6)


def test_bad_step_order_and_kind(tiny_victim, tmp_path):
    for steps, match in ([[{"kind": "backend", "type": "model", "model": "victim"}], "exactly one backend"],
                         [[{"kind": "backend", "type": "_test_noise", "eps": 0.1}], "is a output step"]):
        with pytest.raises(MisleaderError, match=match):
            write_defense_folder(out=tmp_path / "x", victim=tiny_victim, base=None, defense="bad", steps=steps,
                                 models=None, params={}, seed=0, data_dir=None, device="cpu", force=True)
        assert not (tmp_path / "x" / "result.json").exists()


def test_out_may_not_be_the_victim_or_a_foreign_folder(tiny_victim, tmp_path):
    from misleader.defenses import defend_undefended

    before = (tiny_victim / "result.json").read_text()
    with pytest.raises(MisleaderError, match="victim folder"):
        defend_undefended(victim=tiny_victim, out=tiny_victim, force=True)
    with pytest.raises(MisleaderError, match="victim folder"):
        defend_undefended(victim=tiny_victim, out=tiny_victim / "sub", force=True)
    assert (tiny_victim / "result.json").read_text() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    with pytest.raises(MisleaderError, match="not written by"):
        defend_undefended(victim=tiny_victim, out=tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "a.txt").read_text() == "keep"


def test_undefended_folder_moves_with_its_victim(tiny_victim, tmp_path):
    import shutil

    from misleader.defenses import defend_undefended

    shutil.copytree(tiny_victim, tmp_path / "runs" / "v")
    defend_undefended(victim=tmp_path / "runs" / "v", out=tmp_path / "runs" / "u")
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(load_oracle(tmp_path / "moved" / "u").query(x), load_oracle(tiny_victim).query(x))
    assert str(tmp_path) not in (tmp_path / "moved" / "u" / "manifest.json").read_text()



def test_base_built_on_another_victim_is_refused(tiny_victim, tmp_path):
    from misleader.defenses import defend_undefended
    from misleader.training.checkpoint import read_sidecar, save_model

    defend_undefended(victim=tiny_victim, out=tmp_path / "u")
    meta = {k: read_sidecar(tiny_victim)[k] for k in ("dataset", "num_classes", "input_shape", "split")}
    save_model(_tiny(9), tmp_path / "other", meta=meta)
    with pytest.raises(MisleaderError, match="another victim"):
        defend_undefended(victim=tmp_path / "other", base=tmp_path / "u", out=tmp_path / "x")
