"""misleader defend NAME: build a defense folder; one subcommand per registered defense.

The subcommands are derived from :data:`misleader.defenses.base.DEFENSES`: each gets the common flags
``--victim``, ``--base``, ``--out``, ``--force``, ``--seed``, ``--device``, ``--data-dir`` and the
defense's own (:attr:`~misleader.defenses.base.DefenseSpec.add_arguments`), and runs its builder
with ``params_from_args(args)``. ``misleader defend --help`` lists every defense.
"""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common

log = logging.getLogger(__name__)

#: result.json keys printed after a build (those present)
SUMMARY_KEYS = ("test_accuracy", "victim_test_accuracy", "fidelity", "mean_l1_to_victim", "member_test_accuracy",
                "train_seconds", "val_accuracy", "best_epoch", "seconds")


def add_parser(sub) -> None:  # noqa: ANN001
    from misleader.defenses import DEFENSES, defense_spec

    p = sub.add_parser("defend", help="defend a victim (writes manifest.json, result.json)",
                       description="Turn a victim folder (or, with --base, a defense folder) into a defended target "
                                   "folder that `misleader attack` and load_oracle() open. Defenses compose: "
                                   "--base DIR wraps what DIR serves.")
    methods = p.add_subparsers(dest="defense", metavar="DEFENSE")
    methods.required = True
    for name in DEFENSES.names():
        spec = defense_spec(name)
        m = methods.add_parser(name, help=spec.help, description=(spec.description or spec.help)
                               + (f"\n\npaper: {spec.paper}" if spec.paper else ""),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        m.add_argument("--victim", required=True, help="victim folder written by `misleader train-victim`")
        m.add_argument("--base", default=None, metavar="DIR",
                       help="defense folder whose pipeline this defense wraps (default: the victim)")
        m.add_argument("--out", required=True, help="output (defense) folder")
        m.add_argument("--force", action="store_true", help="start over when --out holds a run with other settings")
        if spec.add_arguments is not None:
            spec.add_arguments(m)
        add_common(m)
        m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.defenses import defense_spec

    spec = defense_spec(args.defense)
    params = spec.params_from_args(args) if spec.params_from_args is not None else {}
    result = spec(victim=args.victim, base=args.base, out=args.out, data_dir=args.data_dir, seed=args.seed,
                  device=args.device, force=args.force, **params)
    print(json.dumps({k: result[k] for k in SUMMARY_KEYS if k in result}, indent=2))
    return 0
