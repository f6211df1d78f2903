"""Detector evaluation: ROC metrics, threshold metrics, the recording oracle (budget, sample, positions)."""

from __future__ import annotations

import pytest
import torch

from misleader.detect.evaluate import RecordingOracle, flag_metrics, roc_metrics
from misleader.models import create_model
from misleader.oracle import ModelOracle
from misleader.oracle.base import QueryBudgetExceeded


def test_roc_metrics_separated_reversed_and_mixed():
    pos, neg = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 1.5])
    m = roc_metrics(pos, neg)
    assert m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["fpr_at_95_tpr"] == 0.0
    r = roc_metrics(neg, pos)
    assert r["auroc"] == 0.0 and r["fpr_at_95_tpr"] == 1.0
    same = roc_metrics(torch.ones(50), torch.ones(50))
    assert same["auroc"] == 0.5


def test_flag_metrics_first_and_half():
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    m = flag_metrics(scores, torch.arange(1, 7) * 10, threshold=0.5, min_queries=1)
    assert m["first_flag"] == 30 and m["half_flagged"] == 40 and m["flagged_fraction"] == pytest.approx(4 / 6)
    none = flag_metrics(torch.zeros(4), torch.arange(1, 5), threshold=0.5)
    assert none["first_flag"] is None and none["half_flagged"] is None


@pytest.mark.parametrize("output", ["probs", "labels"])
def test_recording_oracle_keeps_budget_answers_and_sampled_positions(output):
    torch.manual_seed(0)
    net = create_model("lenet5_fifth", in_channels=1, num_classes=4)
    inner = ModelOracle(net, num_classes=4, input_shape=(1, 32, 32), output=output, budget=10)
    plain = ModelOracle(net, num_classes=4, input_shape=(1, 32, 32), output=output)
    rec = RecordingOracle(inner, sample=torch.tensor([2, 7, 9]))
    x = torch.rand(6, 1, 32, 32)
    assert torch.equal(rec.query(x), plain.query(x))
    rec.query(x[:4])
    with pytest.raises(QueryBudgetExceeded):
        rec.query(x[:1])
    rows, pos = rec.stream()
    assert pos.tolist() == [2, 7, 9] and inner.queries_used == 10
    assert torch.equal(rows[0], x[1]) and torch.equal(rows[1], x[:4][0]) and torch.equal(rows[2], x[:4][2])


def test_record_stream_tells_the_attack_its_target_as_the_harness_does(tiny_victim, monkeypatch, one_thread):
    from misleader.attacks.base import Attack
    from misleader.detect.evaluate import record_stream

    seen = []
    orig = Attack.adapt_to_target

    def spy(self, meta):  # noqa: ANN001
        seen.append(dict(meta))
        return orig(self, meta)

    monkeypatch.setattr(Attack, "adapt_to_target", spy)
    rec = record_stream("knockoff-id", target=tiny_victim, budget=50, device="cpu")
    assert rec["queries_used"] == 50 and len(rec["rows"]) == 50 and rec["positions"].tolist() == list(range(1, 51))
    assert len(seen) == 1 and seen[0]["dataset"] == "digits"
