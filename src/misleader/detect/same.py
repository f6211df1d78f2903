"""SAME: detect model-extraction queries by sample reconstruction (score, threshold, per-client statistic).

Paper: Xie, Zhang, Zhao, Zhang, Chen, "SAME: Sample Reconstruction against Model Extraction Attacks",
AAAI 2024, https://arxiv.org/abs/2312.10578. Reference code: xythink/SAME (incomplete, does not run);
notes: ``shared/research/pow-same.md`` part B.

For a query x in [0, 1] (N, C, H, W), with the MAE (:mod:`misleader.detect.mae`) at mask ratio 0 giving the
reconstruction x_hat and the auxiliary classifier (:mod:`misleader.detect.aux`):

    s1 = mean pixel MSE(x_hat, x)             (in the reference's [-1, 1] space)
    s2 = KL(victim(x) || aux(x_hat)) / K      (KL of the softmax outputs, averaged over the K classes)
    score = alpha * s1 + (1 - alpha) * s2     (higher = more likely extraction traffic)

``alpha`` is chosen by default (``alpha="auto"``, :func:`select_alpha`) on data the defender has, never on
attack data: the benign *validation* rows against defender-made synthetic outliers
(:func:`synthetic_outliers`) -- images of randomly initialised generators of the DFME (GeneratorA) and
DFMS (DCGAN) families, made by :func:`misleader.defenses.misleader.decoy.make_bank`, and the strongest
severity of each corruption of :mod:`misleader.data.corruptions` applied to validation images. For each
alpha of :data:`ALPHA_GRID` the validation AUROC against every outlier set is computed; the alpha with the
highest *mean* AUROC over the sets wins (ties: the one nearest the reference's 0.99). The per-alpha table
is stored in ``detector.json`` (``alpha_selection``). A number (e.g. ``0.99``, the default of the
reference's ``evaluate_main.py`` command line; its class default is 0.1) fixes alpha instead. Why: with the
reference's 0.99 the ``mnist-cpu`` detector reached AUROC 0.885 for Knockoff with a Fashion-MNIST pool,
below the 0.95 goal, while 0.1-0.9 scored 0.96-0.97 on that attack stream (``docs/results/same/``) -- a
diagnostic that must not pick alpha; the selection above replaces it with a choice the defender can make.
On the grid's MNIST LeNet5 victim (``mnist-cpu``, seed 0) it picks 0.5 (mean validation AUROC 0.914; 0.1:
0.912, 0.99: 0.775; ``docs/results/same/detector_mnist_lenet5_auto.json``).
Caveats: the generator images are a prior about *data-free* attackers (not any attack's queries), and the
corrupted images are what honest users with shifted inputs send: an alpha that separates them well also
flags such users more. The threshold is the benign validation split's ``1 - target_fpr`` score quantile
(default 5%; the same validation rows serve the alpha choice and the threshold; the test split stays
unseen): a query is *flagged* when its score is above it. :class:`ClientTracker` keeps the
running per-client statistic a server can hold (queries, mean score, fraction flagged).

A detector folder (``misleader detect same train --out S``) holds safetensors + JSON only::

    S/detector.json   kind "same-detector": MAE config, alpha, threshold, target FPR, victim reference
                      (path relative to S + sha256), sha256 of both weight files, training summary
    S/mae.safetensors the masked autoencoder
    S/aux/model.json  the auxiliary classifier (a zoo checkpoint: model.json + model.safetensors)
    S/result.json     the training summary (written last)

Deviations from the reference code:
    * the reference only logs scores (no threshold, no decision): the threshold and per-client statistic
      are ours, as the paper's composition with reject / proof-of-work schemes needs them;
    * everything trains on the defender split and selects on the validation split (see the two modules).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from misleader.detect.mae import MAEConfig, MAETrainConfig, MaskedAutoencoder, to_model_space, to_unit_space
from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

DETECTOR_FILE = "detector.json"
MAE_FILE = "mae.safetensors"
AUX_DIR = "aux"
#: the reference's alpha (``evaluate_main.py`` command line); ``alpha="auto"`` (the default) selects instead
DEFAULT_ALPHA = 0.99
DEFAULT_FPR = 0.05
#: the alphas ``alpha="auto"`` chooses from (:func:`select_alpha`)
ALPHA_GRID = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
#: rows per synthetic outlier set in the selection
SELECT_ROWS = 1000


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class SamePreset:
    """A training configuration: MAE architecture and schedule, auxiliary classifier schedule."""

    mae: MAEConfig
    train: MAETrainConfig
    aux_epochs: int
    aux_views: int = 1
    aux_lr: float = 0.05


#: ``tiny``: seconds (tests, smoke runs); ``mnist-cpu``: minutes on 2 CPU cores; ``paper``: the reference's CIFAR-10 setting (patch 2, width 192,
#: 12 x 3-head encoder, 4-block decoder, 500 epochs with 50 warm-up, AdamW lr 0.01; aux 80 epochs).
PRESETS: dict[str, SamePreset] = {
    "tiny": SamePreset(
        mae=MAEConfig(in_channels=1, image_size=32, patch=8, dim=32, depth=1, heads=2, dec_dim=32, dec_depth=1,
                      dec_heads=2, mlp_ratio=2.0),
        train=MAETrainConfig(epochs=1, batch_size=64, lr=2e-3, warmup_epochs=1), aux_epochs=1),
    "mnist-cpu": SamePreset(
        mae=MAEConfig(in_channels=1, image_size=32, patch=4, dim=64, depth=2, heads=4, dec_dim=64, dec_depth=1,
                      dec_heads=4, mlp_ratio=2.0),
        train=MAETrainConfig(epochs=3, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=1, mask_ratio=0.75,
                             loss="all"),
        aux_epochs=2, aux_views=1, aux_lr=0.05),
    "paper": SamePreset(
        mae=MAEConfig(in_channels=3, image_size=32, patch=2, dim=192, depth=12, heads=3, dec_dim=192, dec_depth=4,
                      dec_heads=3, mlp_ratio=4.0),
        train=MAETrainConfig(epochs=500, batch_size=128, lr=1e-2, weight_decay=0.05, warmup_epochs=50,
                             mask_ratio=0.75, loss="all"),
        aux_epochs=80, aux_views=1, aux_lr=0.1),
}


# --------------------------------------------------------------------------- scoring


class SameDetector(nn.Module):
    """MAE + auxiliary classifier + the victim: ``score(x) -> (N,)``; ``flag(x) -> (N,) bool``.

    Args:
        mae: the trained masked autoencoder.
        aux: the auxiliary classifier (input in [0, 1], logits out).
        victim: the victim classifier (input in [0, 1], logits out).
        alpha: weight of the reconstruction term.
        threshold: scores above it are flagged (``None``: not calibrated).
        batch_size: rows per forward pass (memory bound only).
    """

    def __init__(self, *, mae: MaskedAutoencoder, aux: nn.Module, victim: nn.Module, alpha: float = DEFAULT_ALPHA,
                 threshold: float | None = None, batch_size: int = 1024) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise MisleaderError(f"SAME alpha must be in [0, 1], got {alpha}")
        self.mae, self.aux, self.victim = mae.eval(), aux.eval(), victim.eval()
        self.alpha = float(alpha)
        self.threshold = None if threshold is None else float(threshold)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def parts(self, x: torch.Tensor, *, victim_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s1, s2)`` per row: reconstruction MSE and KL(victim || aux) / K. x (N, C, H, W) in [0, 1] -> 2 x (N,)."""
        dev = next(self.mae.parameters()).device
        s1s, s2s = [], []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size].to(dev).float()
            xm = to_model_space(xb)
            recon, _ = self.mae(xm, mask_ratio=0.0)
            s1s.append(((recon - xm) ** 2).flatten(1).mean(dim=1))
            pv = (victim_probs[i:i + self.batch_size].to(dev).float() if victim_probs is not None
                  else torch.softmax(self.victim(xb).float(), dim=1))
            log_pa = F.log_softmax(self.aux(to_unit_space(recon)).float(), dim=1)
            kl = (pv * (torch.log(pv.clamp_min(1e-12)) - log_pa)).sum(dim=1) / pv.shape[1]
            s2s.append(kl)
        return torch.cat(s1s).cpu(), torch.cat(s2s).cpu()

    def score(self, x: torch.Tensor, *, victim_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha * s1 + (1 - alpha) * s2`` per row: (N, C, H, W) in [0, 1] -> (N,) float32 on CPU."""
        s1, s2 = self.parts(x, victim_probs=victim_probs)
        return (self.alpha * s1 + (1 - self.alpha) * s2).float()

    def flag(self, x: torch.Tensor, *, victim_probs: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) bool: score above the calibrated threshold."""
        if self.threshold is None:
            raise MisleaderError("this SAME detector has no threshold: calibrate it (calibrate_threshold) first")
        return self.score(x, victim_probs=victim_probs) > self.threshold


def score_u8(detector: SameDetector, x_u8: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Scores of uint8 images (N, C, H, W) -> (N,), converted chunk by chunk."""
    from misleader.data.loader import to_unit

    return torch.cat([detector.score(to_unit(xb)) for xb in x_u8.split(chunk)]) if len(x_u8) else torch.zeros(0)


def calibrate_threshold(scores: torch.Tensor, *, fpr: float = DEFAULT_FPR) -> float:
    """The smallest benign-score order statistic t with at most ``fpr`` of ``scores`` strictly above it.

    Example:
        >>> calibrate_threshold(torch.arange(100.0), fpr=0.05)
        94.0
    """
    if not 0.0 <= fpr < 1.0:
        raise MisleaderError(f"target false-positive rate must be in [0, 1), got {fpr}")
    s = scores.detach().double().flatten().sort().values
    if len(s) == 0:
        raise MisleaderError("cannot calibrate a threshold on no scores: give it benign validation data")
    k = max(1, math.ceil((1.0 - fpr) * len(s) - 1e-9))  # at least k of n at or below t
    return float(s[k - 1])


# --------------------------------------------------------------------------- alpha selection (defender data only)


@torch.no_grad()
def synthetic_outliers(x_val: torch.Tensor, *, n: int = SELECT_ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Defender-made outlier sets, each (n, C, H, W) float32 in [0, 1]; no attack's data, no other dataset.

    * ``generator_a`` / ``dcgan``: images of randomly initialised generators of the DFME / DFMS families
      (:func:`misleader.defenses.misleader.decoy.make_bank`, ``(x + 1) / 2`` mapping, ngf 32, 100 images per
      generator), one bank per family;
    * ``<corruption>@3``: the strongest severity of each :data:`misleader.data.corruptions.SEVERITIES`
      corruption applied to ``n`` validation images drawn without replacement.

    Args:
        x_val: validation images (M, C, H, W), uint8 or float in [0, 1].
        n: rows per set (at most M for the corruptions).
        seed: seeds the banks and the corruptions.
    """
    from misleader.data.corruptions import SEVERITIES, corrupt
    from misleader.defenses.misleader.decoy import DecoyConfig, make_bank

    xf = x_val.float() / 255.0 if x_val.dtype == torch.uint8 else x_val.float()
    c, h = int(xf.shape[1]), int(xf.shape[2])
    out: dict[str, torch.Tensor] = {}
    for i, family in enumerate(("generator_a", "dcgan")):
        # perm is the decoy relabelling, unused by make_bank (any valid derangement)
        cfg = DecoyConfig(perm=(1, 0), bank_seed=seed * 100 + i, bank_size=n, generators=max(1, n // 100),
                          families=(family,), ngf=32, mappings=((0.5, 0.5),))
        out[family] = make_bank(cfg, channels=c, size=h)
    g = torch.Generator().manual_seed(seed + 7919)
    pick = torch.randperm(len(xf), generator=g)[:n]
    for kind, levels in SEVERITIES.items():
        out[f"{kind}@{len(levels)}"] = corrupt(xf[pick], kind=kind, severity=len(levels), generator=g)
    return out


def select_alpha(*, benign: tuple[torch.Tensor, torch.Tensor], outliers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 grid: tuple[float, ...] = ALPHA_GRID) -> dict[str, Any]:
    """The alpha of ``grid`` with the highest mean AUROC of benign vs each outlier set (ties: nearest 0.99).

    Args:
        benign: ``(s1, s2)`` (M,) each: the score parts of benign validation rows (:meth:`SameDetector.parts`).
        outliers: set name -> ``(s1, s2)`` (N,) each, of defender-made outliers (:func:`synthetic_outliers`).

    Returns:
        ``{"alpha", "criterion", "grid", "auroc": {alpha: {set: auroc, "mean": m, "min": w}}}`` (alpha as str).
    """
    from misleader.detect.evaluate import roc_metrics

    if not outliers:
        raise MisleaderError("alpha selection needs at least one outlier set")
    table: dict[str, dict[str, float]] = {}
    for a in grid:
        neg = a * benign[0] + (1 - a) * benign[1]
        row = {name: roc_metrics(a * p1 + (1 - a) * p2, neg)["auroc"] for name, (p1, p2) in outliers.items()}
        vals = list(row.values())
        table[str(a)] = dict(row, mean=sum(vals) / len(vals), min=min(vals))
    best = max(table[str(a)]["mean"] for a in grid)
    chosen = min((a for a in grid if table[str(a)]["mean"] == best), key=lambda a: abs(a - DEFAULT_ALPHA))
    log.info("SAME alpha selection: %s", {a: round(r["mean"], 4) for a, r in table.items()})
    return {"alpha": float(chosen), "criterion": "max mean validation AUROC over the synthetic outlier sets",
            "grid": list(grid), "auroc": table}


def parse_alpha(value: str | float) -> float | str:
    """``"auto"`` or a float in [0, 1] (one-line error otherwise)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise MisleaderError(f"SAME alpha must be 'auto' or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= a <= 1.0:
        raise MisleaderError(f"SAME alpha must be 'auto' or a number in [0, 1], got {value!r}")
    return a


# --------------------------------------------------------------------------- per-client statistic


@dataclass
class ClientStats:
    """Running statistic of one client: ``queries``, score sum, ``flagged`` rows, and an EMA of the score."""

    queries: int = 0
    score_sum: float = 0.0
    flagged: int = 0
    ema: float | None = None

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.queries if self.queries else 0.0

    @property
    def flagged_fraction(self) -> float:
        return self.flagged / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "score_sum": self.score_sum, "flagged": self.flagged, "ema": self.ema,
                "mean_score": self.mean_score, "flagged_fraction": self.flagged_fraction}


@dataclass
class ClientTracker:
    """Per-client running SAME statistics a server keeps (JSON round-trip: :meth:`to_dict` / :meth:`from_dict`).

    Args:
        threshold: the detector's calibrated threshold (a row is flagged when its score is above it).
        ema_decay: weight of the past in the per-row exponential moving average of the score.
    """

    threshold: float
    ema_decay: float = 0.99
    clients: dict[str, ClientStats] = field(default_factory=dict)

    def update(self, client: str, scores: torch.Tensor) -> ClientStats:
        """Add one batch of ``scores`` (N,) for ``client``; return its updated statistic."""
        st = self.clients.setdefault(str(client), ClientStats())
        s = scores.detach().double().flatten().cpu()
        st.queries += len(s)
        st.score_sum += float(s.sum())
        st.flagged += int((s > self.threshold).sum())
        for v in s.tolist():
            st.ema = v if st.ema is None else self.ema_decay * st.ema + (1 - self.ema_decay) * v
        return st

    def stats(self, client: str) -> ClientStats:
        return self.clients.get(str(client), ClientStats())

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "ema_decay": self.ema_decay,
                "clients": {c: {"queries": s.queries, "score_sum": s.score_sum, "flagged": s.flagged, "ema": s.ema}
                            for c, s in self.clients.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClientTracker":
        return cls(threshold=float(d["threshold"]), ema_decay=float(d.get("ema_decay", 0.99)),
                   clients={str(c): ClientStats(**v) for c, v in d.get("clients", {}).items()})


# --------------------------------------------------------------------------- folder I/O


def _sha256(path: Path) -> str:
    from misleader.oracle.manifest import check_regular_file

    return hashlib.sha256(check_regular_file(path).read_bytes()).hexdigest()


def save_detector_files(folder: Path, *, mae: MaskedAutoencoder, aux: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``mae.safetensors``, ``aux/`` and ``detector.json`` (``meta`` + config + sha256s) into ``folder``."""
    from safetensors.torch import save as st_save

    from misleader.training.checkpoint import save_model
    from misleader.utils import atomic_write_bytes, write_json

    folder = Path(folder)
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in mae.state_dict().items()})
    atomic_write_bytes(folder / MAE_FILE, blob)
    save_model(aux, folder / AUX_DIR, meta={k: meta[k] for k in ("dataset", "num_classes", "input_shape")}
               | {"role": "SAME auxiliary classifier", "split": meta.get("split")})
    doc = dict(meta, format=1, kind="same-detector", mae={"config": mae.cfg.to_dict(), "weights": MAE_FILE,
                                                          "sha256": hashlib.sha256(blob).hexdigest()},
               aux={"checkpoint": f"{AUX_DIR}/model.json", "sha256": _sha256(folder / AUX_DIR / "model.safetensors")})
    write_json(folder / DETECTOR_FILE, doc)
    return doc


def read_detector_meta(folder: str | Path) -> dict[str, Any]:
    """The checked ``detector.json`` of a detector folder (one-line errors naming the fix)."""
    from misleader.oracle.manifest import read_json_file

    folder = Path(folder)
    path = folder / DETECTOR_FILE
    if not path.is_file():
        raise MisleaderError(f"{folder} is not a SAME detector folder (no {DETECTOR_FILE}): pass the --out folder of "
                             "`misleader detect same train`")
    meta = read_json_file(path, what="SAME detector file")
    if not isinstance(meta, dict) or meta.get("kind") != "same-detector":
        raise MisleaderError(f"{path} is not a SAME detector file: re-create it with `misleader detect same train`")
    return meta


def copy_detector(src: str | Path, dst: str | Path) -> None:
    """Copy a detector folder's files (checked) into ``dst`` (e.g. inside a defense folder)."""
    import shutil

    src, dst = Path(src), Path(dst)
    meta = read_detector_meta(src)
    load_detector_parts(src, meta=meta)  # integrity check before copying
    (dst / AUX_DIR).mkdir(parents=True, exist_ok=True)
    for rel in (MAE_FILE, DETECTOR_FILE, f"{AUX_DIR}/model.json", f"{AUX_DIR}/model.safetensors"):
        shutil.copyfile(src / rel, dst / rel)


def load_detector_parts(folder: str | Path, *, meta: dict[str, Any] | None = None,
                        device: torch.device | str = "cpu") -> tuple[MaskedAutoencoder, nn.Module, dict[str, Any]]:
    """``(mae, aux, meta)`` of a detector folder, both weight files checked against their recorded sha256."""
    from safetensors.torch import load as st_load

    from misleader.oracle.manifest import check_regular_file
    from misleader.training.checkpoint import load_model

    folder = Path(folder)
    meta = meta if meta is not None else read_detector_meta(folder)
    try:
        cfg = MAEConfig.from_dict(dict(meta["mae"]["config"]))
        mae_sha, aux_sha = str(meta["mae"]["sha256"]), str(meta["aux"]["sha256"])
    except (KeyError, TypeError) as exc:
        raise MisleaderError(f"{folder / DETECTOR_FILE} lacks {exc}: re-create it with `misleader detect same train`") from None
    blob = check_regular_file(folder / MAE_FILE, what="MAE weights").read_bytes()
    if hashlib.sha256(blob).hexdigest() != mae_sha:
        raise MisleaderError(f"{folder / MAE_FILE} is corrupted or replaced (sha256 mismatch): re-create the detector")
    mae = MaskedAutoencoder(cfg)
    try:
        mae.load_state_dict(st_load(blob))
    except RuntimeError as exc:
        raise MisleaderError(f"{folder / MAE_FILE} does not fit its config: {str(exc)[:160]}") from None
    aux, _ = load_model(folder / AUX_DIR / "model.json", device=device, expect_sha256=aux_sha)
    return mae.to(device).eval(), aux, meta


def load_detector(folder: str | Path, *, victim: nn.Module | None = None, device: torch.device | str = "cpu",
                  alpha: float | None = None, threshold: float | None = None) -> SameDetector:
    """Open a detector folder as a :class:`SameDetector` (the victim from its checked reference unless given)."""
    from misleader.oracle.manifest import read_victim_reference
    from misleader.training.checkpoint import load_model

    folder = Path(folder)
    mae, aux, meta = load_detector_parts(folder, device=device)
    if victim is None:
        ref = read_victim_reference(folder.resolve(), meta.get("victim"), folder / DETECTOR_FILE)
        victim, _ = load_model(ref.sidecar, device=device, expect_sha256=ref.sha256)
    return SameDetector(mae=mae, aux=aux, victim=victim.to(device),
                        alpha=float(meta.get("alpha", DEFAULT_ALPHA)) if alpha is None else alpha,
                        threshold=meta.get("threshold") if threshold is None else threshold)


# --------------------------------------------------------------------------- training


def train_same(*, victim: str | Path, out: str | Path, data_dir: str | Path | None = None, seed: int = 0,
               device: str = "auto", preset: str = "mnist-cpu", alpha: float | str = "auto",
               target_fpr: float = DEFAULT_FPR, mae_epochs: int | None = None, aux_epochs: int | None = None,
               loss: str | None = None, limit: int | None = None, select_rows: int = SELECT_ROWS,
               force: bool = False) -> dict[str, Any]:
    """Train the MAE and auxiliary classifier on the victim's defender split; calibrate the threshold; write ``out``.

    Args:
        victim: victim folder (``train-victim``); its dataset and split are used.
        out: detector folder.
        preset: a key of :data:`PRESETS`; ``mae_epochs``, ``aux_epochs``, ``loss`` override it.
        alpha: weight of the reconstruction term of the score, or ``"auto"``: chosen from :data:`ALPHA_GRID` on
            benign validation rows vs defender-made outliers (:func:`select_alpha`; ``select_rows`` per set).
        target_fpr: the threshold's false-positive rate on the validation split.
        limit: use only the first ``limit`` training rows (smoke runs, tests).

    Returns:
        ``result.json``: threshold, validation FPR, MAE and aux training summaries, seconds.
    """
    from misleader.fingerprint import claim_out_dir
    from misleader.models import create_model
    from misleader.oracle.manifest import read_target
    from misleader.training.checkpoint import load_model
    from misleader.training.victim import load_target_data
    from misleader.utils import read_json, resolve_device, seed_everything, write_json

    if preset not in PRESETS:
        raise MisleaderError(f"unknown SAME preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    train_cfg = replace(p.train, **{k: v for k, v in (("epochs", mae_epochs), ("loss", loss)) if v is not None})
    a_epochs = p.aux_epochs if aux_epochs is None else int(aux_epochs)
    alpha = parse_alpha(alpha)
    t = read_target(victim)
    if t.kind != "victim":
        raise MisleaderError(f"--victim {victim} is a defense folder: train the detector on the victim folder")
    vref = t.models["victim"]
    settings = {"command": "detect same train", "victim_sha256": vref.sha256, "preset": preset,
                "train": train_cfg.__dict__, "aux_epochs": a_epochs, "alpha": alpha, "target_fpr": target_fpr,
                "limit": limit, "seed": int(seed)}
    if alpha == "auto":
        settings["select_rows"] = int(select_rows)
    out = Path(out)
    if claim_out_dir(out, settings, force=force, command="misleader detect same train") and (out / "result.json").exists():
        return read_json(out / "result.json")
    dev = resolve_device(device)
    gen = seed_everything(seed)
    t0 = time.perf_counter()
    vmodel, vmeta = load_model(vref.sidecar, device=dev, expect_sha256=vref.sha256)
    data, splits = load_target_data(t.meta, data_dir=data_dir)
    tr = splits.train if limit is None else splits.train[:limit]
    x_tr, y_tr = data.x_train[tr], data.y_train[tr]
    x_val, y_val = data.x_train[splits.val], data.y_train[splits.val]
    shape = tuple(int(s) for s in t.input_shape)
    cfg = replace(p.mae, in_channels=shape[0], image_size=shape[1])
    if shape[1] != shape[2]:
        raise MisleaderError(f"the SAME MAE needs square images, the victim takes {list(shape)}")
    mae = MaskedAutoencoder(cfg)
    from misleader.detect.aux import train_aux
    from misleader.detect.mae import train_mae

    mae_info = train_mae(mae, x_train=x_tr, x_val=x_val, cfg=train_cfg, generator=gen, device=dev)
    aux = create_model(str(vmeta["arch"]), in_channels=shape[0], num_classes=t.num_classes, mean=vmeta.get("mean"),
                       std=vmeta.get("std"))
    aux_info = train_aux(aux, mae=mae, x_train=x_tr, y_train=y_tr, x_val=x_val, y_val=y_val, epochs=a_epochs,
                         views=p.aux_views, mask_ratio=train_cfg.mask_ratio, lr=p.aux_lr, generator=gen, device=dev)
    det = SameDetector(mae=mae, aux=aux.to(dev), victim=vmodel, alpha=0.0 if alpha == "auto" else alpha)
    selection = None
    if alpha == "auto":
        from misleader.data.loader import to_unit

        vparts = [det.parts(to_unit(xb)) for xb in x_val.split(4096)]
        b1, b2 = torch.cat([a for a, _ in vparts]), torch.cat([b for _, b in vparts])
        sets = synthetic_outliers(x_val, n=min(int(select_rows), len(x_val)), seed=seed)
        selection = select_alpha(benign=(b1, b2), outliers={k: det.parts(v) for k, v in sets.items()})
        selection["rows_per_set"] = {k: int(len(v)) for k, v in sets.items()}
        selection["benign_rows"] = int(len(b1))
        det.alpha = alpha = selection["alpha"]
        val_scores = (alpha * b1 + (1 - alpha) * b2).float()
    else:
        val_scores = score_u8(det, x_val)
    threshold = calibrate_threshold(val_scores, fpr=target_fpr)
    meta = {"dataset": t.meta["dataset"], "num_classes": t.num_classes, "input_shape": list(shape),
            "split": t.meta.get("split"), "alpha": alpha, "threshold": threshold, "target_fpr": target_fpr,
            "victim": {"path": os.path.relpath(vref.sidecar.parent.resolve(), out.resolve()), "sha256": vref.sha256},
            "preset": preset, "mae_train": train_cfg.__dict__, "aux_epochs": a_epochs, "seed": int(seed),
            "alpha_selection": selection}
    save_detector_files(out, mae=mae, aux=aux, meta=meta)
    result = {"threshold": threshold, "target_fpr": target_fpr,
              "val_fpr": int((val_scores > threshold).sum()) / len(val_scores), "alpha": alpha, "preset": preset,
              "mae": {"best_epoch": mae_info["best_epoch"], "best_val_loss": mae_info["best_val_loss"],
                      "history": mae_info["history"], "loss": train_cfg.loss},
              "aux": {k: aux_info[k] for k in ("best_epoch", "best_val_accuracy", "views")},
              "val_score_mean": float(val_scores.mean()), "train_size": int(len(tr)), "alpha_selection": selection,
              "seconds": time.perf_counter() - t0, "device": str(dev), "threads": torch.get_num_threads()}
    write_json(out / "result.json", result)
    log.info("SAME detector %s: threshold %.5f (val FPR %.3f), aux val acc %.4f, %.0fs", out, threshold,
             result["val_fpr"], aux_info["best_val_accuracy"], result["seconds"])
    return result


__all__ = ["ALPHA_GRID", "ClientStats", "ClientTracker", "DEFAULT_ALPHA", "DEFAULT_FPR", "PRESETS", "SameDetector",
           "SamePreset",
           "calibrate_threshold", "copy_detector", "load_detector", "load_detector_parts", "read_detector_meta",
           "parse_alpha", "save_detector_files", "score_u8", "select_alpha", "synthetic_outliers", "train_same"]
