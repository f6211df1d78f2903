"""What the output-defense builders (RandP, MAD, GRAD², AM, postprocessors) share.

* :func:`finish_output_defense`: writes the folder through
  :func:`misleader.defenses.folder.write_defense_folder` (manifest format 2, the whole pipeline's
  accuracy / fidelity / mean L1), then adds to ``result.json`` the serve cost (rows/s of the folder
  against its base's, measured in the same process on the same test rows) and the largest L1 observed.
* :func:`random_victim_copy`: MAD's surrogate, a randomly initialised copy of the victim's architecture.
* :func:`distill_surrogates`: GRAD²'s (and MAD's ``distilled``) surrogates, trained on the base's answers
  over a transfer set the defender chooses (:func:`transfer_dataset`).
* :func:`train_adaptive_misinfo`: AM's outlier-exposure detector and misinformation model.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from misleader.errors import MisleaderError
from misleader.models import Classifier, create_model
from misleader.utils import make_generator, read_json, resolve_device, write_json

log = logging.getLogger(__name__)

#: the defender's default transfer / outlier-exposure set per victim dataset (another dataset than its own)
OTHER_DATASET = {"mnist": "fashion-mnist", "fashion-mnist": "mnist", "cifar10": "cifar100", "cifar100": "cifar10",
                 "digits": "noise"}
#: rows the serve cost and the max L1 are measured on
SERVE_ROWS = 4096
SERVE_BATCH = 256


def victim_meta(victim: str | Path) -> dict[str, Any]:
    """The victim's checkpoint sidecar (arch, dataset, num_classes, input_shape, split, ...)."""
    from misleader.training.checkpoint import read_sidecar

    return read_sidecar(Path(victim))


def _fresh_model(meta: dict[str, Any], *, seed: int) -> Classifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(meta["arch"], in_channels=int(meta["input_shape"][0]), num_classes=int(meta["num_classes"]),
                            mean=meta.get("mean"), std=meta.get("std"))


def random_victim_copy(*, victim: str | Path, seed: int) -> Classifier:
    """A randomly initialised model of the victim's architecture and normalisation (MAD's reference surrogate)."""
    return _fresh_model(victim_meta(victim), seed=seed).eval()


def transfer_dataset(*, victim: str | Path, data_dir: str | Path | None, name: str, limit: int | None,
                     seed: int) -> tuple[torch.Tensor, str]:
    """uint8 images (N, C, H, W) of the defender's transfer / OE set and its resolved name.

    ``name``: ``auto`` (:data:`OTHER_DATASET` of the victim's dataset), ``defender`` (the victim's own
    training split), ``noise`` (uniform random images, as many as the training split) or a dataset name.
    """
    from misleader.data.datasets import load_dataset
    from misleader.training.victim import load_target_data

    meta = victim_meta(victim)
    data, splits = load_target_data(meta, data_dir=data_dir)
    if name == "auto":
        name = OTHER_DATASET.get(meta["dataset"], "defender")
    g = make_generator(seed)
    if name == "defender":
        x = data.x_train[splits.train]
    elif name == "noise":
        x = torch.randint(0, 256, (len(splits.train), *data.input_shape), generator=g, dtype=torch.uint8)
    else:
        x = load_dataset(name, data_dir=data_dir).x_train
    if tuple(x.shape[1:]) != tuple(meta["input_shape"]):
        raise MisleaderError(f"transfer set {name!r} has images {tuple(x.shape[1:])} but the victim takes "
                             f"{tuple(meta['input_shape'])}: choose a dataset of the same shape (e.g. fashion-mnist "
                             "for an MNIST victim)")
    if limit is not None and limit < len(x):
        x = x[torch.randperm(len(x), generator=g)[:limit]]
    return x, name


def _soft_labels(*, victim: Path, base: Path | None, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The base's (or the victim's) answers (N, K) on ``x``: what the surrogates are distilled from."""
    from misleader.oracle.load import load_oracle
    from misleader.training.evaluate import query_all

    oracle = load_oracle(base if base is not None else victim, device=device)
    return query_all(oracle, x, batch_size=SERVE_BATCH).float()


def distill_surrogates(*, victim: str | Path, base: str | Path | None, data_dir: str | Path | None, seed: int,
                       device: str, epochs: list[int], transfer: str = "auto", limit: int | None = None,
                       batch_size: int = 128, lr: float = 0.1) -> tuple[list[Classifier], str]:
    """Distil copies of the victim's architecture from the base's answers on the transfer set.

    One run of ``max(epochs)`` epochs (SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine,
    batch 128: GRAD²'s recipe), snapshotted after each epoch listed in ``epochs`` (the paper's MIN-IP
    surrogates at 10/20/30/40 epochs are one run's snapshots here).

    Returns:
        (surrogates in the order of ``epochs``, the transfer set's resolved name).
    """
    if not epochs or min(epochs) < 1:
        raise MisleaderError(f"surrogate epochs must be >= 1, got {epochs}")
    dev = resolve_device(device)
    x, used = transfer_dataset(victim=victim, data_dir=data_dir, name=transfer, limit=limit, seed=seed)
    soft = _soft_labels(victim=Path(victim), base=Path(base) if base else None, x=x, device=dev)
    model = _fresh_model(victim_meta(victim), seed=seed + 1).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = steps_per_epoch * max(epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = make_generator(seed + 2)
    snapshots: dict[int, Classifier] = {}
    for epoch in range(1, max(epochs) + 1):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb, pb = x[idx].to(dev).float().div_(255), soft[idx].to(dev)
            loss = -(pb * F.log_softmax(model(xb), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("surrogate distillation on %s: epoch %d/%d loss %.4f", used, epoch, max(epochs), float(loss.detach()))
        if epoch in epochs:
            snap = _fresh_model(victim_meta(victim), seed=0)
            snap.load_state_dict(model.state_dict())
            snapshots[epoch] = snap.eval()
    return [snapshots[e] for e in epochs], used


def train_adaptive_misinfo(*, victim: str | Path, data_dir: str | Path | None, seed: int, device: str, epochs: int,
                           oe: str = "auto", oe_lambda: float = 1.0, limit: int | None = None,
                           batch_size: int = 128) -> tuple[Classifier, Classifier, str]:
    """Train AM's OE detector and misinformation model jointly (Adam 1e-3; see ``adaptive_misinfo``).

    Returns:
        (detector, misinformation model, the OE set's resolved name).
    """
    from misleader.defenses.adaptive_misinfo import misinformation_loss, oe_loss
    from misleader.training.victim import load_target_data

    if epochs < 1:
        raise MisleaderError(f"am: epochs must be >= 1, got {epochs}")
    dev = resolve_device(device)
    meta = victim_meta(victim)
    data, splits = load_target_data(meta, data_dir=data_dir)
    x_id, y_id = data.x_train[splits.train], data.y_train[splits.train]
    g = make_generator(seed)
    if limit is not None and limit < len(x_id):
        keep = torch.randperm(len(x_id), generator=g)[:limit]
        x_id, y_id = x_id[keep], y_id[keep]
    x_oe, used = transfer_dataset(victim=victim, data_dir=data_dir, name=oe, limit=len(x_id), seed=seed + 3)
    if used == "defender":
        raise MisleaderError("am: the outlier-exposure set must differ from the defender's data: pass --oe DATASET")
    det, mis = (_fresh_model(meta, seed=seed + i).to(dev).train() for i in (1, 2))
    opt = torch.optim.Adam([*det.parameters(), *mis.parameters()], lr=1e-3)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x_id), generator=g).split(batch_size):
            oe_idx = torch.randint(0, len(x_oe), (len(idx),), generator=g)
            xb, yb = x_id[idx].to(dev).float().div_(255), y_id[idx].to(dev)
            xo = x_oe[oe_idx].to(dev).float().div_(255)
            d_out = det(torch.cat([xb, xo]))
            d_id, d_oe = d_out[: len(xb)], d_out[len(xb):]
            target = torch.cat([yb, d_oe.detach().argmax(dim=1)])
            loss = F.cross_entropy(d_id, yb) + oe_lambda * oe_loss(d_oe) + misinformation_loss(mis(torch.cat([xb, xo])), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log.info("adaptive misinformation: epoch %d/%d loss %.4f", epoch, epochs, float(loss.detach()))
    return det.eval(), mis.eval(), used


def _timed_answers(oracle, x: torch.Tensor) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    from misleader.data.loader import to_unit

    t0 = time.perf_counter()
    out = torch.cat([oracle.query(to_unit(c)).cpu() for c in x.split(SERVE_BATCH)])
    return out, time.perf_counter() - t0


def serve_cost(*, out: Path, base: Path, victim: Path, data_dir: str | Path | None, device: str) -> dict[str, Any]:
    """Rows/s of folder ``out`` and of ``base`` on the same test rows (same process), and the max L1 observed.

    Returns:
        ``{"serve": {"rows_per_s", "base_rows_per_s", "ratio", "rows", "batch_size"},
        "max_l1_to_victim", "max_l1_to_base"}``.
    """
    from misleader.oracle.load import load_oracle
    from misleader.training.evaluate import predict_probs
    from misleader.training.victim import load_target_data

    dev = resolve_device(device)
    data, _ = load_target_data(victim_meta(victim), data_dir=data_dir)
    x = data.x_test[:SERVE_ROWS]
    base_oracle, oracle = load_oracle(base, device=dev), load_oracle(out, device=dev)
    _timed_answers(base_oracle, x[:SERVE_BATCH]), _timed_answers(oracle, x[:SERVE_BATCH])  # warm-up
    p_base, t_base = _timed_answers(base_oracle, x)
    p_out, t_out = _timed_answers(oracle, x)
    from misleader.training.checkpoint import load_model

    p_victim = predict_probs(load_model(victim, device=dev)[0], x, device=dev, amp=False)
    return {"serve": {"rows_per_s": len(x) / t_out, "base_rows_per_s": len(x) / t_base, "ratio": t_base / t_out,
                      "rows": len(x), "batch_size": SERVE_BATCH},
            "max_l1_to_victim": float((p_out - p_victim).abs().sum(dim=1).max()),
            "max_l1_to_base": float((p_out - p_base).abs().sum(dim=1).max())}


def finish_output_defense(*, defense: str, steps: list[dict[str, Any]], models: dict[str, nn.Module] | None,
                          params: dict[str, Any], victim: str | Path, base: str | Path | None, out: str | Path,
                          data_dir: str | Path | None, seed: int, device: str, force: bool) -> dict[str, Any]:
    """Write the folder (base pipeline + ``steps``), then add the serve cost and max L1 to its ``result.json``."""
    from misleader.defenses.folder import write_defense_folder

    victim, out = Path(victim).resolve(), Path(out)
    result = write_defense_folder(out=out, victim=victim, base=Path(base) if base else None, defense=defense,
                                  steps=steps, models=models, params=params, seed=seed, data_dir=data_dir,
                                  device=device, force=force)
    result = dict(result)
    result.update(serve_cost(out=out, base=Path(base) if base else victim, victim=victim, data_dir=data_dir,
                             device=device))
    log.info("%s: %.0f rows/s (base %.0f, ratio %.2f), max L1 to the victim %.3f", defense,
             result["serve"]["rows_per_s"], result["serve"]["base_rows_per_s"], result["serve"]["ratio"],
             result["max_l1_to_victim"])
    write_json(out / "result.json", result)
    return read_json(out / "result.json")
