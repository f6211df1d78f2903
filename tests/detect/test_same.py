"""SAME detector: MAE training, threshold calibration, deterministic scores, per-client statistic, folder I/O."""

from __future__ import annotations

import pytest
import torch

from misleader.detect.mae import MAEConfig, MAETrainConfig, MaskedAutoencoder, recon_loss, train_mae
from misleader.detect.same import ClientTracker, SameDetector, calibrate_threshold, load_detector, train_same
from misleader.errors import MisleaderError
from misleader.models import create_model

TINY = MAEConfig(in_channels=1, image_size=16, patch=4, dim=32, depth=1, heads=2, dec_dim=32, dec_depth=1, dec_heads=2)


def _blobs(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 1, 16, 16): a bright square at a random place (a tiny, learnable image family)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    pos = torch.randint(0, 10, (n, 2), generator=g)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r:r + 6, c:c + 6] = 255
    return x


@pytest.mark.parametrize("kind", ["all", "masked"])
def test_mae_reconstruction_improves(one_thread, kind):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TINY)
    x, xv = _blobs(256, 0), _blobs(64, 1)
    before = recon_loss(mae, xv, mask_ratio=0.75, kind=kind)
    info = train_mae(mae, x_train=x, x_val=xv, generator=torch.Generator().manual_seed(0),
                     cfg=MAETrainConfig(epochs=4, batch_size=32, lr=3e-3, warmup_epochs=1, loss=kind))
    after = recon_loss(mae, xv, mask_ratio=0.75, kind=kind)
    assert after < 0.5 * before, (before, after)
    assert info["best_val_loss"] == pytest.approx(after, rel=1e-5)


def test_mae_masking_hides_the_ratio():
    mae = MaskedAutoencoder(TINY)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    recon, mask = mae(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and mask.shape == (3, 16)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    assert mae.unpatchify(mae.patchify(x)).equal(x)
    _, mask0 = mae(x, mask_ratio=0.0)
    assert mask0.sum() == 0


def test_calibration_hits_target_fpr_on_held_out_benign():
    g = torch.Generator().manual_seed(0)
    val, held_out = torch.randn(4000, generator=g), torch.randn(20000, generator=g)
    for fpr in (0.05, 0.1, 0.01):
        t = calibrate_threshold(val, fpr=fpr)
        assert int((val > t).sum()) <= fpr * len(val) + 1e-9
        assert abs(float((held_out > t).float().mean()) - fpr) < max(0.01, 0.25 * fpr)
    assert calibrate_threshold(torch.arange(100.0), fpr=0.05) == 94.0
    with pytest.raises(MisleaderError):
        calibrate_threshold(torch.zeros(0))


def _detector(seed: int) -> SameDetector:
    torch.manual_seed(seed)
    mae = MaskedAutoencoder(TINY)
    aux = create_model("lenet5_fifth", in_channels=1, num_classes=10, mean=[0.5], std=[0.5])
    vic = create_model("lenet5_fifth", in_channels=1, num_classes=10, mean=[0.5], std=[0.5])
    return SameDetector(mae=mae, aux=aux, victim=vic, alpha=0.5)


def test_scores_are_deterministic_for_a_seed_and_batch_independent():
    d1, d2 = _detector(0), _detector(0)
    cfg32 = MAEConfig(**{**TINY.to_dict(), "image_size": 32})
    for d in (d1, d2):
        torch.manual_seed(0)
        d.mae = MaskedAutoencoder(cfg32).eval()
    x32 = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    s1, s2 = d1.score(x32), d2.score(x32)
    assert s1.shape == (10,) and torch.equal(s1, s2)
    d1.batch_size = 3
    assert torch.allclose(d1.score(x32), s1, atol=1e-6)
    m, k = d1.parts(x32)
    assert torch.allclose(s1, 0.5 * m + 0.5 * k, atol=1e-6) and (k >= -1e-7).all()


def test_client_tracker_running_statistic():
    tr = ClientTracker(threshold=0.5, ema_decay=0.5)
    tr.update("a", torch.tensor([0.1, 0.9]))
    st = tr.update("a", torch.tensor([0.7, 0.3]))
    assert st.queries == 4 and st.flagged == 2 and st.flagged_fraction == 0.5
    assert st.mean_score == pytest.approx(0.5)
    assert tr.stats("b").queries == 0
    back = ClientTracker.from_dict(tr.to_dict())
    assert back.stats("a").to_dict() == st.to_dict()


def test_train_same_end_to_end_on_digits(tiny_victim, tmp_path, one_thread):
    out = tmp_path / "det"
    res = train_same(victim=tiny_victim, out=out, device="cpu", mae_epochs=1, aux_epochs=1, limit=300,
                     target_fpr=0.1)
    assert res["val_fpr"] <= 0.1
    det = load_detector(out)
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(det.score(x), load_detector(out).score(x))
    assert det.threshold == pytest.approx(res["threshold"])
    (out / "mae.safetensors").write_bytes(b"tampered")
    with pytest.raises(MisleaderError, match="sha256"):
        load_detector(out)
