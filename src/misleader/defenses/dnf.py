"""DNF: Dynamic Neural Fortresses (Luan et al., ICLR 2025, https://openreview.net/forum?id=029hDSVoXK).

Early-exit heads are attached to the *frozen* victim after each of its stages (ResNet-8x: the stem with
layer1, layer2, layer3, layer4; LeNet-5: each conv block), each ``GAP -> FC(c -> hidden) -> ReLU -> FC(hidden
-> K)`` with ``hidden = 10 K``. A query row is answered by the first head whose **softmax** maximum clears
its threshold, otherwise by the victim's own last layer (the ``early_exit`` backend step). Rows are
dropped from the batch as they exit, so a row that exits at head ``i`` costs only stages ``1..i``.

Head training (reference ``data-free/resnet_8x.py``, ``dfme_cifar100.py``), with ``w`` = 0.1 (data-free):

* in-distribution rows (the defender's training split):
  ``CE(h_i, y) - w H(h_i)`` for the early heads (kept unconfident: benign queries go deep) and
  ``CE(h_E, y) + w H(h_E)`` for the last head;
* OOD rows (labelled by ``argmax h_1``): ``CE(h_i, y_ood) + w H(h_i)`` for the early heads (confident: attack
  queries exit early with low-fidelity answers) and ``CE(h_E, y_ood) - w H(h_E)`` for the last one.

Thresholds: the reference's ``[0.9, 0.92, 0.94, 0.96]`` (evenly spaced between 0.9 and 0.96 for other head
counts) are raised where needed, head by head, so that at most ``(1 - final_fraction) / E`` of the benign
*validation* rows clear head ``i``; hence at least ``final_fraction`` (95%) of them reach the final exit
(checked after calibration and recorded in ``result.json``).

Deviations from the reference code:
    * The OOD term is used in every epoch (the reference's ``if epoch/2==0`` is true only at epoch 0).
    * Thresholds apply to the softmax maximum also when serving (the reference's fast path thresholds the
      maximum *logit*), and serving really stops early per row (the reference's DFME harness runs the
      all-exits path, so it saves no compute).
    * Thresholds are calibrated on the validation split as above (the reference hard-codes them).
    * OOD images come from a pool drawn once from an *untrained*, noise-perturbed DFME generator
      (:func:`misleader.defenses.retrain.ood_images`; ``ood_samples`` of them, 128 in the paper preset); the
      reference uses one fixed batch of 128 from a *pre-trained* DFME generator (``generator.pt``) that is
      not available to us.
    * The optimiser's learning rate is what it says (the reference creates SGD with 0.001 and
      ``adjust_learning_rate`` sets 0.1: the paper preset uses 0.1); the CPU preset uses Adam 1e-3.
    * Heads are trained and the thresholds calibrated here (the reference ships ``train_ture=False`` and
      loads ``model.pth``); the heads are kept from the last epoch (no selection).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.training.resume import RESUME_FILE
from misleader.defenses.retrain import (
    RecipeSettings,
    finish_result,
    fit,
    load_tensors,
    load_victim_data,
    params_checker,
    ood_images,
    resolve_preset,
    save_tensors,
    settings_dict,
)
from misleader.errors import MisleaderError
from misleader.oracle.steps import BackendStep, StepContext, register_step

log = logging.getLogger(__name__)

PAPER_URL = "https://openreview.net/forum?id=029hDSVoXK"
REFERENCE_THRESHOLDS = (0.9, 0.92, 0.94, 0.96)


@dataclass(frozen=True)
class DNFSettings(RecipeSettings):
    """Head training and calibration settings (see :data:`PRESETS`). Of :class:`RecipeSettings` only the epochs,
    batch size and optimiser are used (constant learning rate, no augmentation)."""

    entropy_weight: float = 0.1
    hidden: int | None = None  # None: 10 K
    ood_samples: int = 2048
    ood_batch: int = 128
    ood_ngf: int = 32  # width of the untrained DFME generator that draws the OOD images (64 in DFME)
    ood_eval: int = 1024  # fresh OOD images on which result.json reports the exit fractions
    final_fraction: float = 0.95


#: ``mnist-cpu``: minutes on 2 CPU cores (default for 1-channel victims); ``cifar10-paper``: the reference's
#: 20 epochs of SGD at lr 0.1 (momentum 0.9, weight decay 5e-4) with one OOD batch of 128.
PRESETS: dict[str, DNFSettings] = {
    "mnist-cpu": DNFSettings(epochs=2, batch_size=128, optimizer="adam", lr=1e-3),
    "cifar10-paper": DNFSettings(epochs=20, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, ood_samples=128,
                                 ood_ngf=64),
}


# --------------------------------------------------------------------------- backbone stages and heads

class _Stem(nn.Module):
    """ResNet-8x stem (normalise, conv1, bn1, ReLU) followed by layer1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.normalize, self.net = model.normalize, model.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.layer1(F.relu(self.net.bn1(self.net.conv1(self.normalize(x)))))


def backbone_stages(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """``(stages, final)`` of a zoo classifier: ``final(stage_E(...stage_1(x)))`` equals ``model(x)``.

    Raises:
        MisleaderError: the architecture has no stage split here (LeNet-5 family and ResNet-8x have).
    """
    from misleader.models.lenet import LeNet5
    from misleader.models.resnet_8x import ResNet8x

    net = getattr(model, "net", None)
    if isinstance(net, LeNet5):
        f = net.features
        return [nn.Sequential(model.normalize, *f[0:3]), nn.Sequential(*f[3:6]), nn.Sequential(*f[6:])], net.classifier
    if isinstance(net, ResNet8x):
        return ([_Stem(model), net.layer2, net.layer3, net.layer4],
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.linear))
    raise MisleaderError(f"DNF has no exit points for architecture {getattr(model, 'arch', type(model).__name__)!r}: "
                         "use a LeNet-5 or ResNet-8x victim")


class ExitHeads(nn.Module):
    """One head per stage: ``GAP -> Linear(c, hidden) -> ReLU -> Linear(hidden, K)``; (N, c, h, w) -> (N, K)."""

    def __init__(self, *, channels: Sequence[int], hidden: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
            for c in channels)


def stage_channels(stages: Sequence[nn.Module], input_shape: Sequence[int], device: torch.device) -> list[int]:
    """Channel count after each stage (one dummy forward)."""
    h, out = torch.zeros(1, *input_shape, device=device), []
    with torch.no_grad():
        for s in stages:
            h = s(h)
            out.append(int(h.shape[1]))
    return out


class EarlyExitNet:
    """Stages, heads and thresholds: per row, the first head whose softmax maximum is > its threshold answers.

    Shapes: (N, C, H, W) -> logits (N, K) and exit index (N,) (``len(heads)`` = the victim's last layer).
    """

    def __init__(self, stages: Sequence[nn.Module], final: nn.Module, heads: ExitHeads,
                 thresholds: Sequence[float]) -> None:
        self.stages, self.final, self.heads = list(stages), final, list(heads.heads)
        self.thresholds = [float(t) for t in thresholds]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        logits: torch.Tensor | None = None
        exits = torch.full((n,), len(self.heads), dtype=torch.int64, device=x.device)
        rows, h = torch.arange(n, device=x.device), x
        for i, (stage, head, t) in enumerate(zip(self.stages, self.heads, self.thresholds)):
            h = stage(h)
            out = head(h).float()
            if logits is None:
                logits = out.new_empty(n, out.shape[1])
            go = torch.softmax(out, 1).amax(1) > t
            logits[rows[go]] = out[go]
            exits[rows[go]] = i
            rows, h = rows[~go], h[~go]
            if len(rows) == 0:
                return logits, exits
        assert logits is not None
        logits[rows] = self.final(h).float()
        return logits, exits


@register_step
class EarlyExitBackend(BackendStep):
    """The DNF backend: per-row early exits on the softmax maximum (module docstring).

    Manifest entry (the heads file lies inside the folder, checked against its sha256)::

        {"kind": "backend", "type": "early_exit", "model": "victim", "file": "dnf/heads.safetensors",
         "sha256": "...", "channels": [6, 16, 120], "hidden": 100, "thresholds": [0.97, 0.99, 0.995]}
    """

    type_name: ClassVar[str] = "early_exit"
    test_spec: ClassVar[dict[str, Any] | None] = {"model": "m0", "hidden": 8, "thresholds": [0.3, 0.5, 0.9]}

    @classmethod
    def conformance_entry(cls, *, ctx: StepContext) -> dict[str, Any] | None:
        """:attr:`test_spec` with randomly initialised heads written to ``ctx.folder`` (conformance test)."""
        spec = dict(cls.test_spec or {})
        stages, _ = backbone_stages(ctx.load_model(spec["model"]))
        channels = stage_channels(stages, ctx.input_shape, ctx.device)
        from misleader.utils import forked_rng

        with forked_rng(ctx.generator, ctx.device):
            heads = ExitHeads(channels=channels, hidden=spec["hidden"], num_classes=ctx.num_classes)
        return {**spec, "channels": channels, **save_tensors(heads, out=ctx.folder, rel="dnf/heads.safetensors")}

    def __init__(self, net: EarlyExitNet, *, entry: dict[str, Any], device: torch.device) -> None:
        self.net, self.entry = net, entry
        self.__device = device

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], *, ctx: StepContext) -> "EarlyExitBackend":
        where = "backend step 'early_exit'"
        name, channels, hidden, th = spec.get("model"), spec.get("channels"), spec.get("hidden"), spec.get("thresholds")
        if not isinstance(name, str):
            raise MisleaderError(f"{where}: 'model' must be a model name, got {name!r}: fix the manifest")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise MisleaderError(f"{where}: 'hidden' must be a positive integer, got {hidden!r}: fix the manifest")
        model = ctx.load_model(name)
        stages, final = backbone_stages(model)
        expect = stage_channels(stages, ctx.input_shape, ctx.device)
        if channels != expect:
            raise MisleaderError(f"{where}: 'channels' {channels!r} do not match model {name!r}'s stages {expect}")
        if not (isinstance(th, list) and len(th) == len(expect)
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in th)):
            raise MisleaderError(f"{where}: 'thresholds' must be {len(expect)} numbers in [0, 1], got {th!r}")
        heads = ExitHeads(channels=expect, hidden=hidden, num_classes=ctx.num_classes)
        load_tensors(heads, folder=ctx.folder, entry=spec, where=where)
        net = EarlyExitNet(stages, final, heads.to(ctx.device).eval(), th)
        entry = {"model": name, "file": spec["file"], "sha256": spec["sha256"], "channels": expect, "hidden": hidden,
                 "thresholds": [float(t) for t in th]}
        return cls(net, entry=entry, device=ctx.device)

    def exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs (N, K), exit index (N,))`` (index ``len(thresholds)``: the victim's last layer)."""
        logits, idx = self.net(x.to(self.__device, non_blocking=True).float())
        return torch.softmax(logits, 1), idx

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.exits(x)[0]

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "backend", "type": self.type_name, **self.entry}


# --------------------------------------------------------------------------- training and calibration

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy of (N, K) logits."""
    logp = torch.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1).mean()


def head_loss(outs: Sequence[torch.Tensor], y: torch.Tensor, *, w: float, ood: bool) -> torch.Tensor:
    """The DNF objective over all heads (module docstring); ``ood`` flips the entropy signs."""
    loss = outs[0].new_zeros(())
    for i, o in enumerate(outs):
        sign = -1.0 if (i < len(outs) - 1) != ood else 1.0
        loss = loss + F.cross_entropy(o, y) + sign * w * entropy(o)
    return loss


class _HeadTask:
    """One epoch of head training on the frozen stages (a FitTask)."""

    def __init__(self, *, stages, heads: ExitHeads, data, ood: torch.Tensor, s: DNFSettings,  # noqa: ANN001
                 device: torch.device, generator: torch.Generator) -> None:
        from misleader.data.loader import TensorLoader

        self.stages, self.heads, self.data, self.ood, self.s, self.device, self.g = stages, heads, data, ood, s, device, generator
        self.loader = TensorLoader(data.x_train, data.y_train, batch_size=s.batch_size, shuffle=True, generator=generator,
                                   device=device, drop_last=len(data.x_train) > s.batch_size)
        from misleader.training.train import make_optimizer

        self.opt = make_optimizer(heads.parameters(), s.recipe())

    def _outs(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], x
        with torch.no_grad():
            for st in self.stages:
                h = st(h)
                feats.append(h)
        return [head(f) for head, f in zip(self.heads.heads, feats)]

    def run_epoch(self, epoch: int, *, bar: Any) -> dict[str, Any]:
        self.heads.train()
        total, n = 0.0, 0
        for xb, yb in self.loader:
            idx = torch.randint(len(self.ood), (min(self.s.ood_batch, len(self.ood)),), generator=self.g)
            xo = self.ood[idx].to(self.device)
            outs_o = self._outs(xo)
            yo = outs_o[0].argmax(1).detach()
            loss = (head_loss(self._outs(xb), yb, w=self.s.entropy_weight, ood=False)
                    + head_loss(outs_o, yo, w=self.s.entropy_weight, ood=True))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total, n = total + float(loss.detach()), n + 1
            bar.update(1)
        self.heads.eval()
        conf = head_confidences(self.stages, self.heads, self.data.x_val, device=self.device)
        return {"train_loss": total / max(n, 1), "val_mean_confidence": [float(c.mean()) for c in conf]}

    def snapshot(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.heads.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.snapshot(), "opt": self.opt.state_dict(), "gen": self.g.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.g.set_state(state["gen"])


@torch.no_grad()
def head_confidences(stages, heads: ExitHeads, x: torch.Tensor, *, device: torch.device,  # noqa: ANN001
                     batch_size: int = 1024) -> list[torch.Tensor]:
    """Per head, the softmax maximum on every row of ``x`` (uint8 or [0, 1] images): E tensors of (N,)."""
    from misleader.data.loader import to_unit

    out: list[list[torch.Tensor]] = [[] for _ in heads.heads]
    for c in x.split(batch_size):
        h = to_unit(c).to(device)
        for i, (st, head) in enumerate(zip(stages, heads.heads)):
            h = st(h)
            out[i].append(torch.softmax(head(h).float(), 1).amax(1).cpu())
    return [torch.cat(o) for o in out]


def calibrate_thresholds(conf: Sequence[torch.Tensor], *, final_fraction: float,
                         base: Sequence[float]) -> list[float]:
    """Per head ``max(base_i, c_i)`` where at most ``floor(n (1 - final_fraction) / E)`` rows have confidence
    ``> c_i``; by the union bound at least ``final_fraction`` of the rows clear no head."""
    e, n = len(conf), len(conf[0])
    k = int(n * (1 - final_fraction) / e)
    out = []
    for c, b in zip(conf, base):
        top = c.sort(descending=True).values
        out.append(max(float(b), float(top[k]) if k < n else 0.0))
    return out


def base_thresholds(e: int) -> list[float]:
    """The reference's thresholds for 4 heads; evenly spaced in [0.9, 0.96] otherwise."""
    if e == len(REFERENCE_THRESHOLDS):
        return list(REFERENCE_THRESHOLDS)
    return [0.9 + 0.06 * i / max(e - 1, 1) for i in range(e)]


def exit_fractions(idx: torch.Tensor, e: int) -> list[float]:
    """Fraction of rows answered by each exit (E heads, then the final layer)."""
    return [float((idx == i).float().mean()) for i in range(e + 1)]


def defend_dnf(*, victim: str | Path, base: str | Path | None = None, out: str | Path, data_dir: str | Path | None = None,
               seed: int = 0, device: str = "auto", force: bool = False, preset: str | None = None,
               **overrides: Any) -> dict[str, Any]:
    """Train DNF exit heads on the frozen victim, calibrate their thresholds, write the folder ``out``.

    Returns:
        ``result.json``: the whole pipeline's test accuracy, fidelity, mean L1, plus ``train_seconds``,
        ``thresholds``, ``val_final_fraction`` (benign validation rows reaching the final exit),
        ``test_exit_fractions``, ``ood_exit_fractions`` and ``serve_rows_per_second``.
    """
    from misleader.defenses.folder import claim_defense_out, write_defense_folder
    from misleader.utils import forked_rng, make_generator, resolve_device

    if base is not None and Path(base).resolve() != Path(victim).resolve():
        raise MisleaderError("defend dnf replaces the backend with early exits on the victim: it cannot wrap --base; "
                             "build other defenses with --base on the DNF folder instead")
    out, dev = Path(out), resolve_device(device)
    vd = load_victim_data(victim, data_dir=data_dir, device=dev)
    shape, k = tuple(vd.meta["input_shape"]), int(vd.meta["num_classes"])
    name, s = resolve_preset(PRESETS, preset=preset, in_channels=int(shape[0]), overrides=overrides, what="dnf")
    params = {"preset": name, **settings_dict(s)}
    done = claim_defense_out(out=out, victim=victim, base=None, defense="dnf", params=params, seed=seed, force=force)
    if done is not None and "train_seconds" in done:
        return done
    g = make_generator(seed)
    for p in vd.model.parameters():
        p.requires_grad_(False)
    stages, final = backbone_stages(vd.model)
    channels = stage_channels(stages, shape, dev)
    with forked_rng(g, dev):  # the heads' initialisation, from the run's seed
        heads = ExitHeads(channels=channels, hidden=s.hidden or 10 * k, num_classes=k).to(dev)
    ood = ood_images(s.ood_samples, shape=shape, generator=g, device=dev, ngf=s.ood_ngf)
    task = _HeadTask(stages=stages, heads=heads, data=vd, ood=ood, s=s, device=dev, generator=g)
    res = fit(task, epochs=s.epochs, steps_per_epoch=len(task.loader), resume_path=out / RESUME_FILE,
              settings={"params": params, "seed": seed}, desc="dnf heads", select_best=False)
    heads.load_state_dict(res.best)
    heads.eval()
    e = len(channels)
    th = calibrate_thresholds(head_confidences(stages, heads, vd.x_val, device=dev), final_fraction=s.final_fraction,
                              base=base_thresholds(e))
    net = EarlyExitNet(stages, final, heads, th)
    from misleader.data.loader import to_unit

    with torch.no_grad():
        val_idx = torch.cat([net(to_unit(c).to(dev))[1].cpu() for c in vd.x_val.split(1024)])
        ood_test = ood_images(s.ood_eval, shape=shape, generator=g, device=dev, ngf=s.ood_ngf)
        ood_idx = torch.cat([net(c.to(dev))[1].cpu() for c in ood_test.split(1024)])
    ref = save_tensors(heads, out=out, rel="dnf/heads.safetensors")
    step = {"kind": "backend", "type": "early_exit", "model": "victim", **ref, "channels": channels,
            "hidden": s.hidden or 10 * k, "thresholds": th}
    result = write_defense_folder(out=out, victim=victim, base=None, defense="dnf", steps=[], backend=step, models=None,
                                  params=params, seed=seed, data_dir=data_dir, device=dev, force=force)
    from misleader.oracle.load import load_oracle
    from misleader.training.evaluate import query_all
    from misleader.training.victim import load_target_data

    data, _ = load_target_data(vd.meta, data_dir=data_dir)
    with torch.no_grad():
        test_idx = torch.cat([net(to_unit(c).to(dev))[1].cpu() for c in data.x_test.split(256)])
    rates = {}
    for what, folder in (("dnf", out), ("victim", Path(victim))):
        t0 = time.perf_counter()
        query_all(load_oracle(folder, device=dev), data.x_test, batch_size=256)
        rates[what] = len(data.x_test) / (time.perf_counter() - t0)
    extra = {"train_seconds": res.seconds, "history": res.history, "thresholds": th,
             "val_final_fraction": float((val_idx == e).float().mean()),
             "val_exit_fractions": exit_fractions(val_idx, e), "test_exit_fractions": exit_fractions(test_idx, e),
             "ood_exit_fractions": exit_fractions(ood_idx, e), "serve_rows_per_second": rates["dnf"],
             "victim_serve_rows_per_second": rates["victim"], "serve_batch": 256}
    result = finish_result(out, result, extra=extra, x_test=data.x_test, device=dev, stochastic=False)
    (out / RESUME_FILE).unlink(missing_ok=True)
    log.info("dnf %s: val rows reaching the final exit %.4f, thresholds %s", out, extra["val_final_fraction"], th)
    return result


defend_dnf.check_params = params_checker(PRESETS, what="dnf")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- CLI and registry

def add_arguments(m: argparse.ArgumentParser) -> None:
    from misleader.commands.common import positive_int

    m.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="mnist-cpu (default for 1-channel victims) or cifar10-paper (default otherwise)")
    m.add_argument("--epochs", type=positive_int, default=None, help="head-training epochs (default: the preset's)")
    m.add_argument("--batch-size", type=positive_int, default=None)
    m.add_argument("--lr", type=float, default=None)
    m.add_argument("--entropy-weight", type=float, default=None, help="w of the entropy terms (default 0.1)")
    m.add_argument("--final-fraction", type=float, default=None,
                   help="fraction of benign validation rows that must reach the final exit (default 0.95)")


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "entropy_weight": args.entropy_weight, "final_fraction": args.final_fraction}


DNF = register_defense(DefenseSpec(
    name="dnf", build=defend_dnf, add_arguments=add_arguments, params_from_args=params_from_args, paper=PAPER_URL,
    help="DNF: early-exit heads on the frozen victim; attack-like queries exit early",
    description="Dynamic Neural Fortresses (ICLR 2025): trains exit heads after each stage of the frozen victim "
                "with an in-distribution / OOD entropy objective, calibrates their softmax thresholds on the "
                "validation split (>= 95% of benign rows reach the final exit) and serves per-row early exits.\n\n"
                "example: misleader defend dnf --victim runs/v_mnist --out runs/d_dnf",
    test_params={"epochs": 1, "batch_size": 64, "ood_samples": 64, "ood_batch": 32, "ood_ngf": 8, "ood_eval": 64}))

__all__ = ["DNF", "DNFSettings", "EarlyExitBackend", "EarlyExitNet", "ExitHeads", "PRESETS", "backbone_stages",
           "calibrate_thresholds", "defend_dnf"]
