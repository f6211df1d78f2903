"""Cost of one MISLEADER member step versus one plain knowledge-distillation step of the same member.

Both steps do what :func:`misleader.defenses.misleader.train_member` does per batch: index the
uint8 training tensor and convert to [0, 1]; get the victim's logits (``--teacher cached``: a
lookup, as in the MNIST runs where the clean batches are not augmented; ``--teacher forward``: a
forward pass of the victim, as with clean augmentation on CIFAR); then

* plain KD (``lambda = 0``): one update of the member on the clean batch;
* MISLEADER: the strong augmentation of a second batch, ``a_iter`` clone update(s), the defense
  update with the attacker term (:meth:`MemberTrainer.step`).

The two kinds of step alternate within each round (the order flips every round) so that load from
other processes hits both alike; the ratio is of the medians. Variants: the default inner loop
(``a_iter = 1``), ``a_iter = 5`` real steps, and the reference's literal accumulate-5 loop.

``--clock cpu`` times with the calling thread's CPU time instead of wall time (CPU, 1 thread): on a
machine shared with other jobs it leaves out the time the core was given to them (cache and memory
contention still count).

The *arithmetic floor* is timed in the same rounds: a train-mode forward + backward of a member on
B images (``fb_B``), on 2B images (``fb_2B``) and a no-grad forward on B (``f_B``). A MISLEADER step
(``a_iter = 1``) needs at least ``fb_2B`` (d on the clean and augmented batches, one forward and one
backward), ``fb_B`` (the clone update) and ``f_B`` (the updated clone on the augmented batch); plain
KD needs ``fb_B``. ``floor_ratio = (fb_2B + fb_B + f_B) / fb_B`` is what the step ratio approaches
with free augmentation, losses and optimiser steps.

``--baseline`` also times, in the same rounds, ``kd_baseline`` and ``misleader_baseline``: the same
steps with the implementation before the issue-10 speed-ups (the strong augmentation built from
kornia modules only, whose crop resizes image by image, and LeNet's reference layout conv, ReLU,
``nn.MaxPool2d``); a before/after comparison under the same load.

Usage::

    python bench/bench_misleader_step.py                      # lenet5 members, MNIST shapes, CPU, 1 thread
    python bench/bench_misleader_step.py --arch resnet18_8x --teacher-arch resnet34_8x --channels 3 --device cuda

Writes ``bench/results/misleader_step_<arch>_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from misleader.data.augment import augment, strong_augmentation
from misleader.data.loader import to_unit
from misleader.defenses.misleader import REFERENCE_INNER, MemberTrainer, member_config
from misleader.models import create_model
from misleader.utils import autocast, environment, resolve_device, write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _baseline_model(arch: str, *, in_channels: int, num_classes: int) -> torch.nn.Module:
    """``create_model``; LeNet-5 family: with the reference layout conv, ReLU, ``nn.MaxPool2d(2, 2)``."""
    from torch import nn

    from misleader.models.lenet import LeNet5

    model = create_model(arch, in_channels=in_channels, num_classes=num_classes)
    net = getattr(model, "net", model)
    if isinstance(net, LeNet5):
        f = net.features
        net.features = nn.Sequential(f[0], nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                                     f[3], nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), f[6], f[7])
    return model


def _baseline_strong(channels: int) -> torch.nn.Module:
    """The strong augmentation built from kornia modules only (kornia's per-image crop-resize), clamped."""
    import kornia.augmentation as K
    from torch import nn

    class Clamped(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
            return super().forward(x).clamp(0.0, 1.0)

    mods = [K.RandomResizedCrop((32, 32), scale=(0.8, 1.0), p=1.0), K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0, hue=0.0,
                          p=1.0)]
    if channels == 3:
        mods.append(K.RandomGrayscale(p=0.2))
    mods.append(K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), resample="nearest",
                               padding_mode="zeros", p=1.0))
    return Clamped(*mods)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="lenet5", help="member (and inner clone) architecture")
    p.add_argument("--teacher-arch", default="lenet5", help="victim architecture (random weights: cost only)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--teacher", choices=["cached", "forward"], default="cached")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (CPU device, 1 thread only), which "
                        "leaves out the time other processes hold the core: steadier on a loaded machine")
    p.add_argument("--baseline", action="store_true",
                   help="also time the pre-speed-up implementation (kornia-only augmentation, "
                        "reference LeNet layout)")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (dev.type != "cpu" or args.threads != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (then the thread's CPU time is the step's)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    c, bs = args.channels, args.batch_size
    n = bs * 8
    data = (torch.rand(n, c, 32, 32) * 255).to(torch.uint8).to(dev)
    labels = torch.randint(0, 10, (n,)).to(dev)
    teacher = create_model(args.teacher_arch, in_channels=c, num_classes=10).to(dev).eval()
    with torch.no_grad(), autocast(dev):
        t_cache = torch.cat([teacher(to_unit(b)).float() for b in data.split(bs)])
    strong = strong_augmentation(image_size=32, channels=c).to(dev)
    g = torch.Generator().manual_seed(0)

    variants = {"kd": {"lam": 0.0}, "misleader": {}, "misleader_a_iter5": {"a_iter": 5},
                "misleader_reference_accumulate5": dict(REFERENCE_INNER)}
    augs = {name: strong for name in variants}
    build = {name: create_model for name in variants}
    if args.baseline:
        variants.update(kd_baseline={"lam": 0.0}, misleader_baseline={})
        augs.update(kd_baseline=None, misleader_baseline=_baseline_strong(c).to(dev))
        build.update(kd_baseline=_baseline_model, misleader_baseline=_baseline_model)
    trainers = {}
    for name, ov in variants.items():
        cfg = member_config(args.arch, epochs=1, overrides={"batch_size": bs, **ov})
        d = build[name](args.arch, in_channels=c, num_classes=10)
        s = build[name](args.arch, in_channels=c, num_classes=10) if cfg.lam > 0 else None
        trainers[name] = MemberTrainer(config=cfg, defense=d, clone=s, device=dev, total_steps=10**6)

    floor_model = create_model(args.arch, in_channels=c, num_classes=10).to(dev).train()

    def floor_part(kind: str) -> float:
        idx = torch.randint(0, n, (2 * bs if kind == "fb_2B" else bs,), generator=g).to(dev)
        x = to_unit(data[idx])
        _sync(dev)
        t0 = clock()
        if kind == "f_B":
            with torch.no_grad(), autocast(dev):
                floor_model(x)
        else:
            with autocast(dev):
                out = floor_model(x)
            out.float().logsumexp(1).mean().backward()
            floor_model.zero_grad(set_to_none=True)
        _sync(dev)
        return clock() - t0

    def one_step(name: str, i: int) -> tuple[float, float]:
        tr = trainers[name]
        _sync(dev)
        t0 = clock()
        idx = torch.randint(0, n, (bs,), generator=g).to(dev)
        x, y = to_unit(data[idx]), labels[idx]
        if args.teacher == "cached":
            t_logits = t_cache[idx]
        else:
            with torch.no_grad(), autocast(dev):
                t_logits = teacher(x).float()
        x_aug = None
        t_aug = 0.0
        if tr.uses_clone:
            ta = clock()
            aidx = torch.randint(0, n, (bs,), generator=g).to(dev)
            x_aug = augment(augs[name], to_unit(data[aidx]), generator=g)
            _sync(dev)
            t_aug = clock() - ta
        tr.step(x, y, t_logits, x_aug)
        _sync(dev)
        return clock() - t0, t_aug

    times: dict[str, list[float]] = {k: [] for k in variants}
    floor_parts = ("fb_B", "fb_2B", "f_B")
    floor_times: dict[str, list[float]] = {k: [] for k in floor_parts}
    aug_times: dict[str, list[float]] = {}
    names = list(variants)
    load = [os.getloadavg()]
    for r in range(args.warmup + args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            dt, ta = one_step(name, r)
            if r >= args.warmup:
                times[name].append(dt)
                if name in ("misleader", "misleader_baseline"):
                    aug_times.setdefault(name, []).append(ta)
        for kind in floor_parts:
            dt = floor_part(kind)
            if r >= args.warmup:
                floor_times[kind].append(dt)
    load.append(os.getloadavg())
    med = {k: statistics.median(v) for k, v in times.items()}
    fmed = {k: statistics.median(v) for k, v in floor_times.items()}
    result = {
        "benchmark": "misleader_step",
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "arch": args.arch, "teacher_arch": args.teacher_arch, "teacher": args.teacher, "batch_size": bs,
        "channels": c, "device": str(dev), "threads": torch.get_num_threads(), "rounds": args.rounds,
        "clock": args.clock,
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "mean_ms": {k: round(statistics.fmean(v) * 1e3, 3) for k, v in times.items()},
        "augmentation_median_ms": round(statistics.median(aug_times["misleader"]) * 1e3, 3),
        "ratio_to_kd": {k: round(v / med["kd"], 3) for k, v in med.items()
                        if k != "kd" and "baseline" not in k},
        "floor_median_ms": {k: round(v * 1e3, 3) for k, v in fmed.items()},
        "floor_ratio": round((fmed["fb_2B"] + fmed["fb_B"] + fmed["f_B"]) / fmed["fb_B"], 3),
        "loadavg_start_end": [list(map(float, x)) for x in load],
        "environment": environment(),
    }
    if args.baseline:
        result["baseline"] = {
            "augmentation_median_ms": round(statistics.median(aug_times["misleader_baseline"]) * 1e3, 3),
            "misleader_ratio_to_kd": round(med["misleader_baseline"] / med["kd_baseline"], 3),
            "speedup_kd": round(med["kd_baseline"] / med["kd"], 3),
            "speedup_misleader": round(med["misleader_baseline"] / med["misleader"], 3),
        }
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / \
        f"misleader_step_{args.arch}_{dev.type}_{args.teacher}.json"
    write_json(out, result)
    shown = ("median_ms", "augmentation_median_ms", "ratio_to_kd", "floor_median_ms", "floor_ratio",
             "loadavg_start_end", "baseline")
    print(json.dumps({k: result[k] for k in shown if k in result}, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
