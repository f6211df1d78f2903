"""The auxiliary ("shadow") classifier of SAME: the victim's architecture trained on MAE reconstructions.

Paper: Xie et al., "SAME: Sample Reconstruction against Model Extraction Attacks", AAAI 2024,
https://arxiv.org/abs/2312.10578 (notes: ``shared/research/pow-same.md`` B1.3). It learns to classify
reconstructions x_hat of the defender's training images correctly, so on benign queries its answer on
x_hat agrees with the victim's on x; on extraction traffic (badly reconstructed) the two disagree.

Deviations from the reference code:
    * reconstructions are drawn once per ``views`` (each a fresh random 0.75 mask of every training image)
      and stored as uint8, instead of a fresh mask per batch of every epoch (CPU cost); ``views`` > 1 adds
      mask diversity;
    * it trains with the project's classifier loop (:func:`misleader.training.train.train_classifier`, SGD
      cosine) and keeps the epoch with the best accuracy on reconstructions of the *validation* split.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from misleader.detect.mae import MaskedAutoencoder, to_model_space, to_unit_space

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct_u8(mae: MaskedAutoencoder, x_u8: torch.Tensor, *, mask_ratio: float, generator: torch.Generator,
                   batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """MAE reconstructions of uint8 images (N, C, H, W), as uint8 (N, C, H, W) (CPU)."""
    from misleader.data.loader import to_unit

    mae.eval()
    out = []
    for xb in x_u8.split(batch_size):
        recon, _ = mae(to_model_space(to_unit(xb.to(device))), mask_ratio=mask_ratio, generator=generator)
        out.append((to_unit_space(recon) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def train_aux(aux: nn.Module, *, mae: MaskedAutoencoder, x_train: torch.Tensor, y_train: torch.Tensor,
              x_val: torch.Tensor, y_val: torch.Tensor, epochs: int, views: int = 1, mask_ratio: float = 0.75,
              lr: float = 0.05, batch_size: int = 128, generator: torch.Generator,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train ``aux`` (a zoo classifier) with cross-entropy on reconstructions of ``x_train`` (uint8), true labels.

    Returns:
        ``{"best_epoch", "best_val_accuracy", "history", "views"}`` (``aux`` holds the selected weights).
    """
    from misleader.training.train import RECIPES, train_classifier

    dev = torch.device(device)
    xs = torch.cat([reconstruct_u8(mae, x_train, mask_ratio=mask_ratio, generator=generator, device=dev)
                    for _ in range(max(1, views))])
    ys = y_train.repeat(max(1, views))
    xv = reconstruct_u8(mae, x_val, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(1), device=dev)
    recipe = replace(RECIPES["sgd"], lr=lr, batch_size=batch_size, schedule="cosine", augment="none")
    res = train_classifier(aux, x_train=xs, y_train=ys, x_val=xv, y_val=y_val, epochs=epochs, recipe=recipe,
                           device=dev, generator=generator, amp=False, desc="SAME aux")
    aux.load_state_dict(res.best_state)
    aux.eval()
    log.info("SAME aux: val accuracy on reconstructions %.4f (epoch %d)", res.best_val_accuracy, res.best_epoch)
    return {"best_epoch": res.best_epoch, "best_val_accuracy": res.best_val_accuracy, "history": res.history,
            "views": int(views)}


__all__ = ["reconstruct_u8", "train_aux"]
