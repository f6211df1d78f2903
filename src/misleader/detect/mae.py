"""A small ViT masked autoencoder (MAE), the reconstruction half of the SAME detector.

Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
https://arxiv.org/abs/2111.06377; as used by SAME (Xie et al., AAAI 2024, https://arxiv.org/abs/2312.10578),
whose ``ml_models/mae.py`` adapts IcarusWizard/MAE. Notes: ``shared/research/pow-same.md`` part B1.

Images in [0, 1] are mapped to [-1, 1] (the reference normalises and clamps to [-1, 1]); each image is
cut into ``patch`` x ``patch`` patches (tokens), a random ``mask_ratio`` of them is dropped per sample,
a ViT encoder sees the rest (plus a class token), and a ViT decoder fills the dropped positions with a
learned mask token and predicts every patch's pixels.

Training loss (``loss``):

* ``"all"`` (the reference): the mean squared error over *all* pixels divided by the mask ratio;
* ``"masked"`` (the MAE paper): the mean squared error over the masked patches only.

Deviations from the reference code:
    * width, depth, heads and patch size are configurable (the reference: patch 2, width 192, 12 encoder
      blocks x 3 heads, 4 decoder blocks); the MNIST CPU preset is far smaller (see :data:`PRESETS`);
    * masking draws from a caller-supplied ``torch.Generator`` (the reference uses the global RNG);
    * the decoder has its own width (``dec_dim``), with a linear map from the encoder (IcarusWizard: equal widths);
    * the model is selected on the validation split's reconstruction loss (the reference keeps the last epoch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

LOSSES = ("all", "masked")


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of the masked autoencoder (stored in the detector's JSON)."""

    in_channels: int = 1
    image_size: int = 32
    patch: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dec_dim: int = 64
    dec_depth: int = 1
    dec_heads: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise MisleaderError(f"MAE patch size {self.patch} must divide the image size {self.image_size}")
        if self.dim % self.heads or self.dec_dim % self.dec_heads:
            raise MisleaderError("MAE widths must be multiples of their head counts (dim % heads == 0)")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MisleaderError(f"MAE config: unknown key(s) {', '.join(unknown)}: re-create the detector")
        return cls(**d)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth))


class MaskedAutoencoder(nn.Module):
    """ViT MAE. ``forward(x, mask_ratio=, generator=) -> (recon, mask)``.

    Shapes: x (N, C, H, W) in [-1, 1]; recon (N, C, H, W) in model space ([-1, 1] nominally);
    mask (N, T) float, 1 where the patch was hidden from the encoder.
    """

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pdim = cfg.in_channels * cfg.patch * cfg.patch
        self.embed = nn.Linear(pdim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.encoder = _blocks(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.enc_norm = nn.LayerNorm(cfg.dim)
        self.to_dec = nn.Linear(cfg.dim, cfg.dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        self.dec_pos = nn.Parameter(torch.zeros(1, cfg.tokens + 1, cfg.dec_dim))
        self.decoder = _blocks(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio)
        self.dec_norm = nn.LayerNorm(cfg.dec_dim)
        self.head = nn.Linear(cfg.dec_dim, pdim)
        for p in (self.cls_token, self.pos, self.mask_token, self.dec_pos):
            nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, C*p*p)."""
        p, c = self.cfg.patch, self.cfg.in_channels
        n, _, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """(N, T, C*p*p) -> (N, C, H, W)."""
        p, c, s = self.cfg.patch, self.cfg.in_channels, self.cfg.image_size // self.cfg.patch
        n = t.shape[0]
        return t.reshape(n, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, s * p, s * p)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n, t = x.shape[0], self.cfg.tokens
        tokens = self.embed(self.patchify(x)) + self.pos
        keep = t - int(round(t * mask_ratio))
        if keep < t:
            noise = torch.rand(n, t, generator=generator, device="cpu" if generator is None else generator.device)
            order = noise.to(x.device).argsort(dim=1)  # random permutation per sample
        else:
            order = torch.arange(t, device=x.device).expand(n, t)
        restore = order.argsort(dim=1)
        kept = order[:, :keep]
        h = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        h = torch.cat([self.cls_token.expand(n, -1, -1), h], dim=1)
        for blk in self.encoder:
            h = blk(h)
        h = self.to_dec(self.enc_norm(h))
        fill = self.mask_token.expand(n, t - keep, -1)
        body = torch.cat([h[:, 1:], fill], dim=1)
        body = body.gather(1, restore.unsqueeze(-1).expand(-1, -1, body.shape[-1]))
        d = torch.cat([h[:, :1], body], dim=1) + self.dec_pos
        for blk in self.decoder:
            d = blk(d)
        recon = self.unpatchify(self.head(self.dec_norm(d))[:, 1:])
        mask = torch.ones(n, t, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        return recon, mask

    def loss(self, x: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, *, kind: str,
             mask_ratio: float) -> torch.Tensor:
        """Training loss (scalar): ``all`` = pixel MSE / mask_ratio (reference), ``masked`` = MSE on masked patches."""
        if kind == "all":
            return ((recon - x) ** 2).mean() / max(mask_ratio, 1e-8)
        if kind == "masked":
            per_patch = ((self.patchify(recon) - self.patchify(x)) ** 2).mean(dim=-1)  # (N, T)
            return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        raise MisleaderError(f"MAE loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the reference's input range)."""
    return x.float() * 2 - 1


def to_unit_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (what a classifier is fed)."""
    return ((x + 1) / 2).clamp(0.0, 1.0)


@dataclass(frozen=True)
class MAETrainConfig:
    """How the MAE is trained (AdamW, linear warm-up then cosine, as the reference)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    mask_ratio: float = 0.75
    loss: str = "all"


def _lr_lambda(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def recon_loss(mae: MaskedAutoencoder, x_u8: torch.Tensor, *, mask_ratio: float, kind: str, seed: int = 0,
               batch_size: int = 512, device: torch.device | str = "cpu") -> float:
    """Mean training loss of ``mae`` on uint8 images (N, C, H, W) with a fixed masking seed."""
    from misleader.data.loader import to_unit

    mode = mae.training
    mae.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for xb in x_u8.split(batch_size):
        xm = to_model_space(to_unit(xb.to(device)))
        recon, mask = mae(xm, mask_ratio=mask_ratio, generator=g)
        total += float(mae.loss(xm, recon, mask, kind=kind, mask_ratio=mask_ratio)) * len(xb)
        n += len(xb)
    mae.train(mode)
    return total / max(n, 1)


def train_mae(mae: MaskedAutoencoder, *, x_train: torch.Tensor, x_val: torch.Tensor, cfg: MAETrainConfig,
              generator: torch.Generator, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train ``mae`` on uint8 images ``x_train`` (N, C, H, W); keep the epoch with the lowest validation loss.

    Returns:
        ``{"history": [{"epoch", "train_loss", "val_loss"}], "best_epoch", "best_val_loss"}``.
    """
    from misleader.data.loader import TensorLoader
    from misleader.utils import progress

    if cfg.loss not in LOSSES:
        raise MisleaderError(f"MAE loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    dev = torch.device(device)
    mae.to(dev)
    loader = TensorLoader(x_train, torch.zeros(len(x_train)), batch_size=cfg.batch_size, shuffle=True,
                          generator=generator, device=dev)
    opt = torch.optim.AdamW(mae.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    warm = cfg.warmup_epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, warmup=warm, total=total))
    history: list[dict[str, Any]] = []
    best = (math.inf, 0, None)
    bar = progress(total=total, desc="SAME mae", unit="step")
    for epoch in range(cfg.epochs):
        mae.train()
        run, seen = 0.0, 0
        for xb, _ in loader:
            xm = to_model_space(xb)
            recon, mask = mae(xm, mask_ratio=cfg.mask_ratio, generator=generator)
            loss = mae.loss(xm, recon, mask, kind=cfg.loss, mask_ratio=cfg.mask_ratio)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(xb)
            seen += len(xb)
            bar.update(1)
        val = recon_loss(mae, x_val, mask_ratio=cfg.mask_ratio, kind=cfg.loss, device=dev)
        history.append({"epoch": epoch + 1, "train_loss": run / max(seen, 1), "val_loss": val})
        log.info("SAME mae epoch %d/%d: train %.5f, val %.5f", epoch + 1, cfg.epochs, run / max(seen, 1), val)
        if val < best[0]:
            best = (val, epoch + 1, {k: v.detach().clone() for k, v in mae.state_dict().items()})
    bar.close()
    if best[2] is not None:
        mae.load_state_dict(best[2])
    mae.eval()
    return {"history": history, "best_epoch": best[1], "best_val_loss": best[0]}


__all__ = ["LOSSES", "MAEConfig", "MAETrainConfig", "MaskedAutoencoder", "recon_loss", "to_model_space",
           "to_unit_space", "train_mae"]
