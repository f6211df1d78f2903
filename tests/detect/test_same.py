"""SAME detector: MAE training, threshold calibration, deterministic scores, per-client statistic, folder I/O."""

from __future__ import annotations

import pytest
import torch

from misleader.detect.mae import MAEConfig, MAETrainConfig, MaskedAutoencoder, recon_loss, train_mae
from misleader.detect.same import (ALPHA_GRID, ClientTracker, SameDetector, calibrate_threshold, load_detector,
                                   parse_alpha, select_alpha, synthetic_outliers, train_same)
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


def test_select_alpha_picks_the_weighting_that_separates_the_outliers():
    g = torch.Generator().manual_seed(0)
    b1, b2 = 100 * torch.rand(500, generator=g), torch.rand(500, generator=g)
    # outliers differ from benign in s2 only (s1 is large noise on both): s2 alone (alpha 0) must win
    outl = {"a": (100 * torch.rand(300, generator=g), torch.rand(300, generator=g) + 0.5),
            "b": (100 * torch.rand(300, generator=g), torch.rand(300, generator=g) + 0.3)}
    sel = select_alpha(benign=(b1, b2), outliers=outl)
    assert sel["alpha"] == 0.0 and sel["grid"] == list(ALPHA_GRID)
    assert sel["auroc"]["0.0"]["mean"] > 0.8 > 0.6 > sel["auroc"]["1.0"]["mean"]
    # and s1 alone when only s1 separates (s2 now the large noise)
    sel1 = select_alpha(benign=(b2, b1), outliers={"a": (outl["a"][1], outl["a"][0])})
    assert sel1["alpha"] == 1.0
    # ties go to the alpha nearest the reference's 0.99
    tie = select_alpha(benign=(torch.zeros(10), torch.zeros(10)), outliers={"a": (torch.ones(5), torch.ones(5))})
    assert tie["alpha"] == 0.99
    with pytest.raises(MisleaderError):
        select_alpha(benign=(b1, b2), outliers={})


def test_synthetic_outliers_are_deterministic_images_in_range():
    xv = _blobs(50, 0).repeat(1, 1, 2, 2)  # (50, 1, 32, 32) uint8
    s1, s2 = synthetic_outliers(xv, n=40, seed=1), synthetic_outliers(xv, n=40, seed=1)
    assert set(s1) == {"generator_a", "dcgan", "gaussian_noise@3", "gaussian_blur@3", "contrast@3", "rotation@3"}
    for k, v in s1.items():
        assert v.shape == (40, 1, 32, 32) and v.dtype == torch.float32, k
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 and torch.equal(v, s2[k]), k
    assert not torch.equal(synthetic_outliers(xv, n=40, seed=2)["generator_a"], s1["generator_a"])


def test_parse_alpha():
    assert parse_alpha("auto") == "auto" and parse_alpha("0.5") == 0.5 and parse_alpha(1) == 1.0
    for bad in ("1.5", "x", -0.1):
        with pytest.raises(MisleaderError, match="alpha"):
            parse_alpha(bad)


def test_train_same_auto_alpha_is_recorded(tiny_victim, tmp_path, one_thread):
    out = tmp_path / "det"
    res = train_same(victim=tiny_victim, out=out, device="cpu", preset="tiny", limit=200, select_rows=60)
    sel = res["alpha_selection"]
    assert res["alpha"] in ALPHA_GRID and sel["alpha"] == res["alpha"]
    assert set(sel["auroc"]) == {str(a) for a in ALPHA_GRID} and sel["rows_per_set"]["dcgan"] == 60
    best = max(r["mean"] for r in sel["auroc"].values())
    assert sel["auroc"][str(res["alpha"])]["mean"] == best
    det = load_detector(out)
    assert det.alpha == res["alpha"] and det.threshold == pytest.approx(res["threshold"])
    assert res["val_fpr"] <= 0.05
