"""Per-query information-leakage meters for calibrated proof-of-work.

Paper: Dziedzic et al., ICLR 2022, https://arxiv.org/abs/2201.09243 (reference code
cleverhans-lab/model-extraction-iclr: ``analysis/pate.py``, ``analysis/private_knn.py``,
``active_learning.py``). One interface, :meth:`LeakageMeter.cost`: (N, C, H, W) queries ->
(N,) per-row cost, added up over a client's stream.

* ``pate``: GNMax over an ensemble of teachers trained on *disjoint* partitions of the defender's
  training split; a query's cost is its per-query epsilon (:mod:`misleader.pow.rdp`). The teachers
  are only a meter: answers still come from the victim.
* ``knn``: private kNN (Zhu et al. 2020): the defender's training points, represented by the
  victim's log-softmax outputs, vote with their true labels; the k nearest (L2) to the query's own
  victim output form the histogram; same per-query epsilon.
* ``entropy`` and ``gap``: the victim's softmax entropy (nats) and 1 - (top1 - top2), cheap proxies.

A meter folder holds ``config.json`` and ``meter.safetensors`` (no pickle); it refers to the victim
folder by path and sha256, checked when it is opened.

Deviations from the reference code:
  * MNIST teachers: 50 ``lenet5_half`` on 50 disjoint parts of the defender split (about 900 images
    each), 20 epochs of Adam with +-2 px crops, selected on 1,000 validation images, sigma = 2
    (the reference: 250 MnistNetPate, sigma = 10; the 50-teacher / sigma = 2 pair is its CIFAR-10
    setting) so that the meter trains in minutes on 2 CPU cores. Both are options.
  * private kNN scores each query on its own (per-query epsilon, added up like the PATE meter)
    with the capped bound; the reference composes RDP across queries with the uncapped bound.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from misleader.errors import MisleaderError
from misleader.pow.rdp import gnmax_epsilon
from misleader.registry import Registry
from misleader.utils import atomic_write_bytes, read_json, write_json

log = logging.getLogger(__name__)

METER_FORMAT = 1
WEIGHTS = "meter.safetensors"


class LeakageMeter(ABC):
    """Scores queries by how much their answers reveal.

    Args:
        victim: the victim classifier (inputs in [0, 1]) or ``None`` (then ``cost`` uses ``probs``).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, victim: nn.Module | None = None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.victim = victim.to(self.device).eval() if victim is not None else None

    @torch.inference_mode()
    def victim_probs(self, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """The victim's softmax on ``x`` (N, K); the given ``probs`` when the meter holds no victim."""
        if self.victim is not None:
            return torch.softmax(self.victim(x.to(self.device).float()).float(), 1).cpu()
        if probs is None or probs.dim() != 2:
            raise ValueError(f"the {self.name} meter holds no victim: pass the (N, K) probabilities")
        return probs.detach().float().cpu()

    @abstractmethod
    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row leakage. Shape: (N, C, H, W) in [0, 1] [, (N, K)] -> (N,) float64, >= 0."""

    def params(self) -> dict[str, Any]:
        """Settings saved in config.json (JSON values)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in meter.safetensors."""
        return {}


METERS: Registry[LeakageMeter] = Registry("meter")


@METERS.register("entropy")
class EntropyMeter(LeakageMeter):
    """Shannon entropy (nats) of the victim's softmax."""

    name = "entropy"

    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        p = self.victim_probs(x, probs).double().clamp_min(1e-12)
        return -(p * p.log()).sum(1)


@METERS.register("gap")
class GapMeter(LeakageMeter):
    """1 - (top-1 - top-2 probability) of the victim's softmax: 0 when certain, 1 on a tie."""

    name = "gap"

    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        top2 = self.victim_probs(x, probs).double().topk(2, dim=1).values
        return 1.0 - (top2[:, 0] - top2[:, 1])


class _GNMaxMeter(LeakageMeter):
    """Shared by the vote-based meters: per-query epsilon of GNMax on a (N, K) vote histogram."""

    def __init__(self, *, sigma: float, delta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if sigma <= 0 or not 0 < delta < 1:
            raise MisleaderError(f"meter needs sigma > 0 and 0 < delta < 1, got sigma={sigma}, delta={delta}")
        self.sigma, self.delta = float(sigma), float(delta)

    @abstractmethod
    def votes(self, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """(N, K) int64 vote counts."""

    def cost(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        return gnmax_epsilon(self.votes(x, probs), sigma=self.sigma, delta=self.delta)


@METERS.register("pate")
class PateMeter(_GNMaxMeter):
    """GNMax over teachers trained on disjoint partitions of the defender's data.

    Args:
        teachers: T classifiers (inputs in [0, 1]).
        num_classes: K.
    """

    name = "pate"

    def __init__(self, *, teachers: list[nn.Module], num_classes: int, sigma: float = 2.0, delta: float = 1e-5,
                 teacher_arch: str = "lenet5_half", **kwargs: Any) -> None:
        super().__init__(sigma=sigma, delta=delta, **kwargs)
        if not teachers:
            raise MisleaderError("the pate meter needs at least one teacher")
        self.teachers = [t.to(self.device).eval() for t in teachers]
        self.num_classes, self.teacher_arch = int(num_classes), teacher_arch

    @torch.inference_mode()
    def votes(self, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        xb = x.to(self.device).float()
        preds = torch.stack([t(xb).argmax(1) for t in self.teachers], 1).cpu()  # (N, T)
        return torch.nn.functional.one_hot(preds, self.num_classes).sum(1)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "delta": self.delta, "teachers": len(self.teachers),
                "teacher_arch": self.teacher_arch, "num_classes": self.num_classes,
                "mean": [float(v) for v in self.teachers[0].normalize.mean.flatten()],
                "std": [float(v) for v in self.teachers[0].normalize.std.flatten()]}

    def tensors(self) -> dict[str, torch.Tensor]:
        from misleader.training.checkpoint import _state_dict

        return {f"teacher{i}.{k}": v for i, t in enumerate(self.teachers) for k, v in _state_dict(t).items()}


@METERS.register("knn")
class KnnMeter(_GNMaxMeter):
    """Private kNN: the k nearest training points in the victim's log-softmax space vote their labels.

    Args:
        features: (M, K) victim log-softmax outputs on the defender's training split.
        labels: (M,) their true labels.
        victim: the victim (required: queries are placed by its outputs).
    """

    name = "knn"

    def __init__(self, *, features: torch.Tensor, labels: torch.Tensor, k: int = 300, sigma: float = 28.0,
                 delta: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(sigma=sigma, delta=delta, **kwargs)
        if features.dim() != 2 or len(features) != len(labels) or not 1 <= k <= len(labels):
            raise MisleaderError(f"knn meter: need (M, K) features, M labels and 1 <= k <= M (k={k}, M={len(labels)})")
        self.features = features.float().to(self.device)
        self.labels = labels.long().to(self.device)
        self.k = int(k)

    @torch.inference_mode()
    def votes(self, x: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        q = self.victim_probs(x, probs).clamp_min(1e-30).log().to(self.device)
        num_classes = self.features.shape[1]
        out = []
        for chunk in q.split(256):
            idx = torch.cdist(chunk, self.features).topk(self.k, dim=1, largest=False).indices
            out.append(torch.nn.functional.one_hot(self.labels[idx], num_classes).sum(1).cpu())
        return torch.cat(out)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "delta": self.delta, "k": self.k}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.cpu().contiguous(), "labels": self.labels.cpu().contiguous()}


# --------------------------------------------------------------------------- folders
def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def victim_reference(victim: str | Path) -> dict[str, str]:
    """``{"path", "sha256"}`` of a victim folder's weights (explicit reference, checked on open)."""
    from misleader.training.checkpoint import read_sidecar

    path = Path(victim).resolve()
    side = read_sidecar(path)
    return {"path": str(path), "sha256": str(side["sha256"])}


def save_meter(meter: LeakageMeter, out: str | Path, *, victim: dict[str, str], meta: dict[str, Any],
               info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out/meter.safetensors`` and ``out/config.json``; returns the config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in meter.tensors().items()}) if meter.tensors() else b""
    if blob:
        atomic_write_bytes(out / WEIGHTS, blob)
    config = {"format": METER_FORMAT, "kind": "pow-meter", "meter": meter.name, "victim": victim,
              "dataset": meta["dataset"], "num_classes": int(meta["num_classes"]),
              "input_shape": list(meta["input_shape"]), "split": meta.get("split", {}),
              "params": meter.params(), "weights_sha256": hashlib.sha256(blob).hexdigest() if blob else None,
              "info": info or {}}
    write_json(out / "config.json", config)
    return config


def open_victim(ref: dict[str, str], *, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load the victim a folder refers to, refusing one whose weights changed since."""
    from misleader.training.checkpoint import load_model, read_sidecar

    path = Path(ref["path"])
    side = read_sidecar(path)
    if side.get("sha256") != ref["sha256"]:
        raise MisleaderError(f"victim {path} changed since this folder was made (sha256 mismatch): "
                             "re-run the command that made it")
    return load_model(path, device=device)


def load_meter(folder: str | Path, *, device: torch.device | str = "cpu") -> tuple[LeakageMeter, dict[str, Any]]:
    """Open a meter folder written by :func:`save_meter` (``misleader pow train-meter``)."""
    from misleader.models import create_model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MisleaderError(f"{folder} is not a PoW meter folder (no config.json): make one with "
                             "`misleader pow train-meter --victim V --out DIR`, or pass the folder it wrote")
    config = read_json(folder / "config.json")
    if config.get("kind") != "pow-meter" or config.get("format") != METER_FORMAT:
        raise MisleaderError(f"{folder} is not a PoW meter folder: make one with `misleader pow train-meter`")
    victim, _ = open_victim(config["victim"], device=device)
    p = config["params"]
    name = config["meter"]
    tensors: dict[str, torch.Tensor] = {}
    if config.get("weights_sha256"):
        blob = (folder / WEIGHTS).read_bytes()
        if hashlib.sha256(blob).hexdigest() != config["weights_sha256"]:
            raise MisleaderError(f"{folder / WEIGHTS} is corrupted (sha256 mismatch): re-run `misleader pow train-meter`")
        tensors = st_load(blob)
    if name in ("entropy", "gap"):
        return METERS.get(name)(victim=victim, device=device), config
    if name == "knn":
        return KnnMeter(features=tensors["features"], labels=tensors["labels"], k=p["k"], sigma=p["sigma"],
                        delta=p["delta"], victim=victim, device=device), config
    if name == "pate":
        teachers = []
        in_ch = int(config["input_shape"][0])
        for i in range(int(p["teachers"])):
            t = create_model(p["teacher_arch"], in_channels=in_ch, num_classes=p["num_classes"], mean=p["mean"],
                             std=p["std"])
            prefix = f"teacher{i}."
            t.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            teachers.append(t)
        return PateMeter(teachers=teachers, num_classes=p["num_classes"], sigma=p["sigma"], delta=p["delta"],
                         teacher_arch=p["teacher_arch"], victim=victim, device=device), config
    raise MisleaderError(f"{folder}/config.json: unknown meter {name!r} (known: {', '.join(METERS.names())})")


def train_meter(*, victim: str | Path, meter: str, out: str | Path, data_dir: str | Path | None = None,
                seed: int = 0, device: str = "auto", teachers: int = 50, teacher_arch: str = "lenet5_half",
                teacher_epochs: int = 20, sigma: float | None = None, delta: float = 1e-5, k: int = 300,
                force: bool = False) -> dict[str, Any]:
    """Build a meter folder for ``victim`` (``misleader pow train-meter``); returns its config."""
    from misleader.data.loader import to_unit
    from misleader.models import create_model
    from misleader.training.train import MNIST_RECIPE, RECIPES, train_classifier
    from misleader.training.evaluate import predict_probs
    from misleader.training.victim import load_target_data
    from misleader.utils import resolve_device, seed_everything

    out = Path(out)
    if (out / "config.json").exists() and not force:
        log.info("%s already holds a meter; pass --force to rebuild it", out)
        return read_json(out / "config.json")
    METERS.get(meter)
    dev = resolve_device(device)
    gen = seed_everything(seed)
    ref = victim_reference(victim)
    victim_model, meta = open_victim(ref, device=dev)
    data, splits = load_target_data(meta, data_dir=data_dir)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"seed": seed}
    if meter in ("entropy", "gap"):
        m: LeakageMeter = METERS.get(meter)(victim=victim_model, device=dev)
    elif meter == "knn":
        x_tr = data.x_train[splits.train]
        probs = predict_probs(victim_model, x_tr, device=dev, amp=False)
        m = KnnMeter(features=probs.clamp_min(1e-30).log(), labels=data.y_train[splits.train], k=k,
                     sigma=28.0 if sigma is None else sigma, delta=delta, victim=victim_model, device=dev)
        info["train_points"] = int(len(x_tr))
    else:
        if teachers < 1 or len(splits.train) // teachers < 10:
            raise MisleaderError(f"--teachers {teachers}: each teacher needs at least 10 training images "
                                 f"({len(splits.train)} available)")
        mean, std = data.channel_stats()
        recipe = MNIST_RECIPE if data.in_channels == 1 else RECIPES["sgd"]
        recipe = replace(recipe, batch_size=64)
        parts = splits.train[torch.randperm(len(splits.train), generator=gen)].tensor_split(teachers)
        val = splits.val[:1000]
        models, accs = [], []
        for i, part in enumerate(parts):
            t = create_model(teacher_arch, in_channels=data.in_channels, num_classes=data.num_classes, mean=mean,
                             std=std)
            res = train_classifier(t, x_train=data.x_train[part], y_train=data.y_train[part],
                                   x_val=data.x_train[val], y_val=data.y_train[val], epochs=teacher_epochs,
                                   recipe=recipe, device=dev, generator=gen, amp=False, desc=f"teacher {i}")
            t.load_state_dict(res.best_state)
            models.append(t.eval())
            accs.append(res.best_val_accuracy)
            log.info("teacher %d/%d: %d images, val accuracy %.4f", i + 1, teachers, len(part), res.best_val_accuracy)
        x_test = data.x_test[:2000]
        votes = predict_probs(models, to_unit(x_test), device=dev, amp=False)  # soft vote, for the report only
        m = PateMeter(teachers=models, num_classes=data.num_classes, sigma=2.0 if sigma is None else sigma,
                      delta=delta, teacher_arch=teacher_arch, victim=victim_model, device=dev)
        info.update(teachers=teachers, teacher_images_min=min(len(p) for p in parts),
                    teacher_images_max=max(len(p) for p in parts), teacher_epochs=teacher_epochs,
                    teacher_val_accuracy_mean=sum(accs) / len(accs), teacher_val_accuracy_min=min(accs),
                    ensemble_test_accuracy_2000=float((votes.argmax(1) == data.y_test[:2000]).float().mean()))
    info["seconds"] = time.perf_counter() - t0
    meta = {"dataset": meta["dataset"], "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "split": meta.get("split", {})}
    config = save_meter(m, out, victim=ref, meta=meta, info=info)
    log.info("meter %s written to %s (%.1fs)", meter, out, info["seconds"])
    return config


__all__ = ["METERS", "EntropyMeter", "GapMeter", "KnnMeter", "LeakageMeter", "PateMeter", "load_meter",
           "save_meter", "train_meter"]
