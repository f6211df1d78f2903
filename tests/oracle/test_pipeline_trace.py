"""The gateway's traced models (misleader.oracle.pipeline.traced) answer exactly as the eager ones."""

from __future__ import annotations

import torch
from torch import nn

from misleader.models import create_model
from misleader.oracle.load import open_accounted
from misleader.oracle.pipeline import traced


def test_lenets_are_traced_and_answer_bit_for_bit():
    for arch in ("lenet5", "lenet5_half", "lenet5_fifth"):
        torch.manual_seed(0)
        model = create_model(arch, in_channels=1, num_classes=10).eval()
        tm = traced(model, input_shape=(1, 32, 32), device=torch.device("cpu"))
        assert isinstance(tm, torch.jit.ScriptModule)
        x = torch.rand(77, 1, 32, 32)
        with torch.no_grad():
            assert torch.equal(tm(x), model(x))


def test_a_model_that_cannot_be_traced_is_kept():
    class Branchy(nn.Module):  # data-dependent control flow: the trace would answer differently
        def forward(self, x):
            return x.flatten(1)[:, :3] if float(x.mean()) > 0.5 else -x.flatten(1)[:, :3]

    m = Branchy()
    assert traced(m, input_shape=(1, 4, 4), device=torch.device("cpu")) is m


def test_traced_and_eager_oracles_agree_on_a_victim_and_an_ensemble(tiny_victim, tmp_path):
    from misleader.defenses import defense_spec

    spec = defense_spec("misleader")
    ens = tmp_path / "ens"
    spec(victim=tiny_victim, base=None, out=ens, data_dir=None, seed=0, device="cpu", force=False,
         **spec.test_params)
    for folder in (tiny_victim, ens):
        a, _ = open_accounted(folder, trace=True)
        b, _ = open_accounted(folder)
        x = torch.rand(50, *a.input_shape, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.query(x), b.query(x))
