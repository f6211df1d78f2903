"""MISLEADER's entry in the defense registry: its own CLI flags and the call to ``defend_misleader``.

``misleader defend misleader --victim DIR --members a,b,c --epochs N --out DIR`` trains a MISLEADER
ensemble (arXiv 2506.02362, https://arxiv.org/abs/2506.02362); the training code lives in
:mod:`misleader.defenses.misleader`. The common flags (``--victim``, ``--base``, ``--out``, ``--force``,
``--seed``, ``--device``, ``--data-dir``) come from :mod:`misleader.commands.defend`.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.errors import MisleaderError

PAPER_URL = "https://arxiv.org/abs/2506.02362"


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.01,0.05,0.1, got {s!r}") from None


def _positive_int(s: str) -> int:
    from misleader.commands.common import positive_int

    return positive_int(s)


def _preset_names() -> list[str]:
    from misleader.defenses.misleader import PRESETS

    return list(PRESETS)


def add_arguments(m: argparse.ArgumentParser) -> None:
    """MISLEADER's own flags (the common ones are added by ``misleader defend``)."""
    m.add_argument("--members", type=_csv, default=None,
                   help="member architectures, comma-separated (e.g. lenet5,lenet5_half,lenet5_fifth); "
                        "default: the preset's")
    m.add_argument("--epochs", type=_positive_int, default=None, help="epochs per member (default: the preset's)")
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
    m.add_argument("--a-iter", type=_positive_int, default=None, help="inner clone steps per batch (default 1)")
    m.add_argument("--reference-inner", action="store_true",
                   help="the authors' literal inner loop: 5 accumulated identical gradients, one step at lr 0.01")
    m.add_argument("--batch-size", type=_positive_int, default=None)
    m.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    m.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for LeNets on a busy machine)")


def _per_member(values: list[float] | None, n: int, flag: str) -> list[float | None]:
    if values is None:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise MisleaderError(f"{flag} has {len(values)} values for {n} members: give one value, or one per member")
    return values


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags -> ``defend_misleader`` keyword arguments (presets resolved, per-member settings)."""
    from misleader.defenses.misleader import REFERENCE_INNER, get_preset

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
        s: dict[str, Any] = {"lam": lam, "temperature": t, "alpha": a}
        if args.reference_inner:
            s.update(REFERENCE_INNER)
        if args.a_iter is not None:
            s["a_iter"] = args.a_iter
        if args.no_amp:
            s["amp"] = False
        settings.append(s)
    return {"members": members, "epochs": epochs, "preset": args.preset, "member_settings": settings,
            "batch_size": args.batch_size, "member_of": args.member_of}


def build(*, victim: Any, base: Any = None, force: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`misleader.defenses.misleader.defend_misleader` (which refuses a ``base`` other than the victim)."""
    from misleader.defenses.misleader import defend_misleader

    return defend_misleader(victim=victim, base=base, force=force, **kwargs)


def check_params(*, members: Sequence[str], epochs: int, preset: str | None = None,
                 member_settings: Sequence[dict] | None = None, batch_size: int | None = None) -> None:
    """Validate MISLEADER's spec settings without training (preset, member settings' names and types);
    its keyword parameters are the settings a spec entry may give (:func:`misleader.experiments.spec.defense_params`)."""
    import typing

    from misleader.defenses.misleader import MemberConfig, get_preset, member_config
    from misleader.defenses.misleader.config import _ALIASES
    from misleader.experiments.spec import check_value

    pre = get_preset(preset) if preset is not None else None
    if member_settings is not None and len(member_settings) != len(members):
        raise MisleaderError(f"member_settings has {len(member_settings)} entries for {len(members)} members: "
                             "give one per member")
    hints = typing.get_type_hints(MemberConfig)
    for i, arch in enumerate(members):
        overrides = {**(member_settings[i] if member_settings else {}),
                     **({"batch_size": batch_size} if batch_size is not None else {})}
        for key, value in overrides.items():  # types first: MemberConfig's own checks assume numbers
            name = _ALIASES.get(key, key)
            if name in hints and value is not None:
                check_value(value, hints[name], f"member_settings[{i}].{name}")
        try:
            member_config(arch, epochs=epochs, preset=pre, overrides=overrides)
        except ValueError as exc:
            raise MisleaderError(f"member_settings[{i}]: {exc}") from None


build.check_params = check_params  # type: ignore[attr-defined]  (spec validation, see experiments.spec)

MISLEADER = register_defense(DefenseSpec(
    name="misleader", build=build, add_arguments=add_arguments, params_from_args=params_from_args, paper=PAPER_URL,
    help="MISLEADER: ensemble of distilled members trained against an inner clone",
    description="Train a MISLEADER ensemble (arXiv 2506.02362): each member is distilled from the victim on "
                "the defender split while maximising its KL divergence from an inner clone trained on strongly "
                "augmented queries; members are combined by soft voting. Writes members/NAME/, manifest.json, "
                "history.json and result.json (test_accuracy, victim_test_accuracy, fidelity, "
                "mean_l1_to_victim, members). Re-running the same command resumes.\n\n"
                "example: misleader defend misleader --victim runs/v_mnist --preset mnist-cpu --out runs/d_mnist\n"
                "parallel: one call per member, on any machine,\n"
                "  misleader defend misleader --victim V --members lenet5 --epochs 6 --out M1 --member-of ENS\n"
                "  (trains into M1 and copies it to ENS/members/lenet5; copy M1 there by hand from another machine),\n"
                "then  misleader defend misleader --victim V --members lenet5,lenet5_half,lenet5_fifth --epochs 6 "
                "--out ENS\n  assembles ENS, reusing the finished members (checked to have the same settings).",
    test_params={"members": ["lenet5_fifth"], "epochs": 1, "member_settings": [{"batch_size": 128}],
                 "generator_samples": 16}))

__all__ = ["MISLEADER", "add_arguments", "build", "params_from_args"]
