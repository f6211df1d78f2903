"""misleader defend: turn a victim folder into a defended target folder.

``misleader defend misleader --victim DIR --members a,b,c --epochs N --out DIR`` trains a MISLEADER
ensemble (arXiv 2506.02362); ``misleader defend undefended --victim DIR --out DIR`` writes a folder
that answers like the victim (the baseline).
"""

from __future__ import annotations

import argparse
import json
import logging

from misleader.commands.common import add_common, positive_int
from misleader.errors import MisleaderError

log = logging.getLogger(__name__)


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.01,0.05,0.1, got {s!r}") from None


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("defend", help="defend a victim (writes manifest.json, result.json)",
                       description="Turn a victim folder into a defended target folder that `misleader attack` "
                                   "and load_oracle() open.")
    methods = p.add_subparsers(dest="defense", metavar="DEFENSE")
    methods.required = True

    m = methods.add_parser(
        "misleader", help="MISLEADER: ensemble of distilled members trained against an inner clone",
        description="Train a MISLEADER ensemble (arXiv 2506.02362): each member is distilled from the victim on "
                    "the defender split while maximising its KL divergence from an inner clone trained on strongly "
                    "augmented queries; members are combined by soft voting. Writes members/NAME/, manifest.json, "
                    "history.json and result.json (test_accuracy, victim_test_accuracy, fidelity, "
                    "mean_l1_to_victim, members). Re-running the same command resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(_preset_names()) + "\n"
               "example: misleader defend misleader --victim runs/v_mnist --preset mnist-cpu --out runs/d_mnist\n"
               "parallel: one call per member, on any machine,\n"
               "  misleader defend misleader --victim V --members lenet5 --epochs 6 --out M1 --member-of ENS\n"
               "  (trains into M1 and copies it to ENS/members/lenet5; copy M1 there by hand from another machine),\n"
               "then  misleader defend misleader --victim V --members lenet5,lenet5_half,lenet5_fifth --epochs 6 "
               "--out ENS\n  assembles ENS, reusing the finished members (checked to have the same settings).")
    m.add_argument("--victim", required=True, help="victim folder written by `misleader train-victim`")
    m.add_argument("--members", type=_csv, default=None,
                   help="member architectures, comma-separated (e.g. lenet5,lenet5_half,lenet5_fifth); "
                        "default: the preset's")
    m.add_argument("--epochs", type=positive_int, default=None, help="epochs per member (default: the preset's)")
    m.add_argument("--out", required=True, help="output (defense) folder; with --member-of, this member's folder")
    m.add_argument("--preset", default=None,
                   help="training scale: " + ", ".join(_preset_names())
                        + " (default: the one for the victim's dataset)")
    m.add_argument("--member-of", default=None, metavar="DIR",
                   help="train the single member given by --members into --out and add it to the ensemble folder DIR")
    m.add_argument("--lambda", dest="lam", type=_float_list, default=None, metavar="L1,L2,..",
                   help="attacker-term weight per member (one value for all, or one per member)")
    m.add_argument("--temperature", type=_float_list, default=None, metavar="T1,T2,..",
                   help="distillation temperature per member")
    m.add_argument("--alpha", type=_float_list, default=None, metavar="A1,A2,..",
                   help="soft-target weight per member")
    m.add_argument("--a-iter", type=positive_int, default=None, help="inner clone steps per batch (default 1)")
    m.add_argument("--reference-inner", action="store_true",
                   help="the authors' literal inner loop: 5 accumulated identical gradients, one step at lr 0.01")
    m.add_argument("--batch-size", type=positive_int, default=None)
    m.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    m.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for LeNets on a busy machine)")
    add_common(m)
    m.set_defaults(func=run_misleader)

    u = methods.add_parser("undefended", help="the victim itself, as a defense folder (baseline)")
    u.add_argument("--victim", required=True, help="victim folder")
    u.add_argument("--out", required=True, help="output folder")
    u.set_defaults(func=run_undefended)


def _preset_names() -> list[str]:
    from misleader.defenses.misleader import PRESETS

    return list(PRESETS)


def _per_member(values: list[float] | None, n: int, flag: str) -> list[float | None]:
    if values is None:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise MisleaderError(f"{flag} has {len(values)} values for {n} members: give one value, or one per member")
    return values


def run_misleader(args: argparse.Namespace) -> int:
    from misleader.defenses.misleader import REFERENCE_INNER, defend_misleader, get_preset

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    members, epochs = args.members, args.epochs
    if args.preset is not None:
        pre = get_preset(args.preset)
        members = members or list(pre.members)
        epochs = epochs or pre.epochs
    if not members or epochs is None:
        raise MisleaderError("pass --members and --epochs (e.g. --members lenet5,lenet5_half,lenet5_fifth --epochs 6), "
                             "or a --preset that supplies them")
    n = len(members)
    settings = []
    for lam, t, a in zip(_per_member(args.lam, n, "--lambda"), _per_member(args.temperature, n, "--temperature"),
                         _per_member(args.alpha, n, "--alpha")):
        s = {"lam": lam, "temperature": t, "alpha": a}
        if args.reference_inner:
            s.update(REFERENCE_INNER)
        if args.a_iter is not None:
            s["a_iter"] = args.a_iter
        if args.no_amp:
            s["amp"] = False
        settings.append(s)
    result = defend_misleader(victim=args.victim, members=members, epochs=epochs, out=args.out,
                              data_dir=args.data_dir, seed=args.seed, device=args.device, preset=args.preset,
                              member_settings=settings, batch_size=args.batch_size, member_of=args.member_of)
    keys = ("test_accuracy", "victim_test_accuracy", "fidelity", "mean_l1_to_victim", "member_test_accuracy",
            "train_seconds", "val_accuracy", "best_epoch", "seconds")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    return 0


def run_undefended(args: argparse.Namespace) -> int:
    from misleader.defenses import defend_undefended

    result = defend_undefended(victim=args.victim, out=args.out)
    print(json.dumps({k: result[k] for k in ("target", "test_accuracy")}, indent=2))
    return 0
