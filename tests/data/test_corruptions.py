"""The kornia corruption suite: shapes, range, determinism, severity ordering."""

from __future__ import annotations

import pytest
import torch

from misleader.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corruption_accuracy


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_keeps_shape_and_range_is_deterministic_and_grows_with_severity(kind):
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = [corrupt(x, kind=kind, severity=s, generator=torch.Generator().manual_seed(1))
            for s in range(1, len(SEVERITIES[kind]) + 1)]
    again = corrupt(x, kind=kind, severity=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(outs[0], again)
    dist = [float((o - x).abs().mean()) for o in outs]
    for o in outs:
        assert o.shape == x.shape and float(o.min()) >= 0 and float(o.max()) <= 1
    assert dist[0] > 0 and dist == sorted(dist)


def test_bad_kind_or_severity():
    with pytest.raises(ValueError):
        corrupt(torch.rand(1, 1, 8, 8), kind="fog", severity=1, generator=torch.Generator())
    with pytest.raises(ValueError):
        corrupt(torch.rand(1, 1, 8, 8), kind="contrast", severity=4, generator=torch.Generator())


def test_corruption_accuracy_of_an_oracle_that_knows_the_labels_only_on_clean_images():
    x = (torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    y = torch.arange(20) % 3
    clean = x.float() / 255

    def predict(b):  # right on the clean images, class 0 elsewhere
        hit = [(clean == img).flatten(1).all(1).nonzero() for img in b]
        return torch.stack([torch.nn.functional.one_hot(y[h[0, 0]] if len(h) else torch.tensor(0), 3).float()
                            for h in hit])

    res = corruption_accuracy(predict, x, y, batch_size=7)
    assert res["clean"] == 1.0
    assert len(res) == 1 + sum(len(v) for v in SEVERITIES.values())
    assert res["gaussian_noise@3"] == pytest.approx(float((y == 0).float().mean()))
