"""misleader train-victim: train a victim model and save a victim folder."""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common, positive_float, positive_int

log = logging.getLogger(__name__)


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("train-victim", help="train a victim model (writes model.safetensors, result.json)",
                       description="Train a victim classifier on a dataset's defender split, keep the best "
                                   "checkpoint on the validation split and report test accuracy. Re-running the "
                                   "same command resumes; other settings into the same --out are refused "
                                   "(--force starts over).")
    p.add_argument("--dataset", required=True, help="digits | mnist | fashion-mnist | cifar10 | cifar100 | svhn | npz:PATH")
    p.add_argument("--arch", required=True, help="architecture, e.g. lenet5, resnet34_8x (see `misleader models`)")
    p.add_argument("--epochs", type=positive_int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", default=None, help="adam | mnist | sgd | sgd-cosine (default: mnist for 1-channel data, sgd else)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--force", action="store_true",
                   help="start over in --out (by default a re-run resumes, and only with the same settings)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.training.victim import train_victim

    result = train_victim(dataset=args.dataset, arch=args.arch, epochs=args.epochs, out=args.out,
                          data_dir=args.data_dir, seed=args.seed, device=args.device, recipe=args.recipe,
                          batch_size=args.batch_size, lr=args.lr, amp=not args.no_amp, force=args.force)
    print(json.dumps({k: result[k] for k in ("test_accuracy", "val_accuracy", "seconds")}, indent=2))
    return 0
