"""DNF: thresholds send >= 95% of benign validation rows to the final exit; per-row early exit skips later
stages; thresholds of 1 answer exactly like the victim."""

from __future__ import annotations

import pytest
import torch

from misleader.data.loader import to_unit
from misleader.defenses.dnf import (
    EarlyExitBackend,
    EarlyExitNet,
    ExitHeads,
    backbone_stages,
    calibrate_thresholds,
    defend_dnf,
    stage_channels,
)
from misleader.defenses.retrain import load_victim_data
from misleader.oracle.manifest import read_target
from misleader.oracle.pipeline import build_pipeline
from misleader.utils import read_json


@pytest.fixture(scope="module")
def dnf_folder(tiny_victim, tmp_path_factory):
    out = tmp_path_factory.mktemp("dnf") / "d"
    from misleader.defenses.dnf import DNF

    defend_dnf(victim=tiny_victim, out=out, device="cpu", **DNF.test_params)
    return out


def test_calibrated_thresholds_send_95_percent_of_validation_rows_to_the_final_exit(dnf_folder, tiny_victim):
    res = read_json(dnf_folder / "result.json")
    vd = load_victim_data(tiny_victim, data_dir=None, device=torch.device("cpu"))
    backend = [s for s, _, _ in build_pipeline(read_target(dnf_folder), device=torch.device("cpu")).trace(
        to_unit(vd.x_val[:2]))][0]
    assert isinstance(backend, EarlyExitBackend)
    with torch.no_grad():
        _, idx = backend.exits(to_unit(vd.x_val))
    e = len(backend.entry["thresholds"])
    frac = float((idx == e).float().mean())
    assert frac >= 0.95 and frac == pytest.approx(res["val_final_fraction"])
    assert res["train_seconds"] > 0 and sum(res["test_exit_fractions"]) == pytest.approx(1.0)
    assert 0.0 <= res["mean_l1_to_victim"] <= 2.0 and res["serve_rows_per_second"] > 0


def test_calibration_union_bound_on_confident_heads():
    g = torch.Generator().manual_seed(0)
    conf = [torch.rand(1000, generator=g) ** 0.2 for _ in range(3)]  # heads confident on most rows
    th = calibrate_thresholds(conf, final_fraction=0.95, base=[0.9, 0.93, 0.96])
    reach = torch.stack([c <= t for c, t in zip(conf, th)]).all(0).float().mean()
    assert reach >= 0.95 and all(t >= b for t, b in zip(th, [0.9, 0.93, 0.96]))


def test_rows_that_exit_early_skip_later_stages_and_unit_thresholds_equal_the_victim(tiny_victim):
    vd = load_victim_data(tiny_victim, data_dir=None, device=torch.device("cpu"))
    stages, final = backbone_stages(vd.model)
    heads = ExitHeads(channels=stage_channels(stages, (1, 32, 32), torch.device("cpu")), hidden=20, num_classes=10)
    calls = []
    hook = final.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x = to_unit(vd.x_val[:17])
    with torch.no_grad():
        _, idx = EarlyExitNet(stages, final, heads, [0.0, 1.0, 1.0])(x)
        assert (idx == 0).all() and calls == []
        logits, idx = EarlyExitNet(stages, final, heads, [1.0, 1.0, 1.0])(x)
        assert (idx == 3).all() and calls == [17]
        assert torch.allclose(logits, vd.model(x), atol=1e-5)
    hook.remove()
