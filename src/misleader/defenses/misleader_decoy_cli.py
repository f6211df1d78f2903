"""``misleader-decoy``: MISLEADER whose members also answer generator-like inputs consistently wrongly (issue 11).

``misleader defend misleader-decoy --victim DIR --preset mnist-cpu --mu 1 --out DIR`` trains a MISLEADER
ensemble (arXiv 2506.02362, https://arxiv.org/abs/2506.02362) in which every member adds the decoy term
``mu * KL(q || d)`` on a bank of images from randomly initialised DFME / DCGAN generators, ``q`` being the
victim's softmax relabelled by a secret derangement shared by all members (see
:mod:`misleader.defenses.misleader.decoy`). The derangement and the bank seed are drawn from ``--seed``;
they are written only to the folder's private files (plan, fingerprint, member settings), never to what
the server describes. Everything else (members, epochs, presets, lambda / T / alpha, resuming) is
MISLEADER's, via :func:`misleader.defenses.misleader.defend_misleader`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from misleader.defenses.base import DefenseSpec, register_defense
from misleader.defenses.misleader.decoy import RELABELS, DecoyConfig, random_collapse, random_derangement
from misleader.defenses.misleader_cli import _csv, _float_list, _per_member, _positive_int
from misleader.defenses.misleader_cli import add_arguments as _misleader_arguments
from misleader.defenses.misleader_cli import params_from_args as _misleader_params
from misleader.errors import MisleaderError

PAPER_URL = "https://arxiv.org/abs/2506.02362"


def add_arguments(m: argparse.ArgumentParser) -> None:
    """MISLEADER's flags plus the decoy term's."""
    _misleader_arguments(m)
    m.add_argument("--mu", type=_float_list, default=None, metavar="M1,M2,..",
                   help="decoy-term weight per member (one value for all, or one per member; default 1)")
    m.add_argument("--bank-size", type=_positive_int, default=None, help="decoy bank images (default 8000)")
    m.add_argument("--bank-generators", type=_positive_int, default=None,
                   help="randomly initialised generators making the bank (default 80)")
    m.add_argument("--bank-families", type=_csv, default=None,
                   help="generator families of the bank, comma-separated (default generator_a,dcgan)")
    m.add_argument("--relabel", choices=RELABELS, default=None,
                   help="the secret relabelling of decoy answers: permutation (default; invertible, so an attacker "
                        "with a few real images can undo it) or collapse (merges the classes into --decoy-classes)")
    m.add_argument("--decoy-classes", type=_positive_int, default=None,
                   help="with --relabel collapse: how many classes the decoy answers use (default 2)")
    m.add_argument("--anchors", action="store_true",
                   help="also distil the victim on shifted real images (lower contrast, blur, noise) so that honest "
                        "users' shifted inputs keep their true answers instead of getting decoys")
    m.add_argument("--refresh-rounds", type=_positive_int, default=None, metavar="R",
                   help="refresh the bank R times with a sample of the defender's own DFME queries against the "
                        "previous round's ensemble, retraining each time (default: no refresh)")
    m.add_argument("--refresh-budget", type=_positive_int, default=None,
                   help="queries of each refresh DFME run (default 1000000)")
    m.add_argument("--refresh-sample", type=_positive_int, default=None,
                   help="queries of each refresh run kept for the bank (default 24000)")
    m.add_argument("--adversarial", action="store_true",
                   help="also train a generator inside training towards member/clone disagreement, with the decoy "
                        "target on its images (needs lambda > 0)")


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags -> :func:`build` keyword arguments."""
    p = _misleader_params(args)
    if p.pop("member_of", None) is not None:
        raise MisleaderError("misleader-decoy trains its members in one call: leave out --member-of")
    p.update(mu=args.mu, bank_size=args.bank_size, generators=args.bank_generators, families=args.bank_families,
             adversarial=True if args.adversarial else None, relabel=args.relabel, decoy_classes=args.decoy_classes,
             anchors=True if args.anchors else None,
             refresh_rounds=args.refresh_rounds, refresh_budget=args.refresh_budget,
             refresh_sample=args.refresh_sample)
    return {k: v for k, v in p.items() if v is not None}


def decoy_settings(*, victim_meta: dict[str, Any], seed: int, mu: float, bank_size: int | None = None,
                   generators: int | None = None, families: Sequence[str] | None = None,
                   bank_batch: int | None = None, adversarial: bool | None = None, relabel: str | None = None,
                   decoy_classes: int | None = None, anchors: bool | None = None) -> dict[str, Any]:
    """One member's decoy dict: the secret map and bank seed drawn from ``seed`` (the same for every member)."""
    from misleader.defenses.misleader.folder import member_seed
    from misleader.utils import make_generator

    k = int(victim_meta["num_classes"])
    if relabel == "collapse":
        perm = random_collapse(k, decoy_classes or 2, generator=make_generator(member_seed(seed, "decoy-collapse")))
    else:
        if decoy_classes is not None:
            raise MisleaderError("decoy_classes goes with relabel collapse")
        perm = random_derangement(k, generator=make_generator(member_seed(seed, "decoy-permutation")))
    mappings = [[0.5, 0.5]]
    mean, std = victim_meta.get("mean"), victim_meta.get("std")
    if mean and std:  # DFME's "normalised" pixel mapping: the victim's normalisation range
        mappings.append([sum(mean) / len(mean), sum(std) / len(std)])
    d: dict[str, Any] = {"perm": perm, "mu": float(mu), "bank_seed": member_seed(seed, "decoy-bank"),
                         "mappings": mappings}
    for key, value in (("bank_size", bank_size), ("generators", generators), ("bank_batch", bank_batch),
                       ("families", list(families) if families is not None else None), ("adversarial", adversarial),
                       ("relabel", relabel), ("anchors", anchors)):
        if value is not None:
            d[key] = value
    return DecoyConfig.from_dict(d).to_dict()


def build(*, victim: Any, base: Any = None, out: Any, seed: int = 0, force: bool = False,
          members: Sequence[str] | None = None, epochs: int | None = None, preset: str | None = None,
          mu: float | Sequence[float] | None = None, bank_size: int | None = None, generators: int | None = None,
          families: Sequence[str] | None = None, bank_batch: int | None = None, adversarial: bool | None = None,
          relabel: str | None = None, decoy_classes: int | None = None, anchors: bool | None = None,
          refresh_rounds: int | None = None, refresh_budget: int | None = None, refresh_sample: int | None = None,
          member_settings: Sequence[dict] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train the decoy ensemble with :func:`~misleader.defenses.misleader.defend_misleader`; returns its result.json.

    ``mu``: one weight for all members or one per member (default 1). ``members`` / ``epochs`` default to the
    preset's (``preset`` default: the one for the victim's dataset). ``relabel``: ``"permutation"`` (default) or
    ``"collapse"`` onto ``decoy_classes`` classes (default 2); see :class:`~misleader.defenses.misleader.decoy.DecoyConfig`.
    ``anchors``: also distil on shifted real images (:func:`~misleader.defenses.misleader.decoy.shift_batch`).
    ``refresh_rounds``: train in rounds whose banks grow with the defender's own DFME queries
    (:mod:`misleader.defenses.misleader.decoy_refresh`; ``refresh_budget`` queries per run, default 1M,
    ``refresh_sample`` of them kept, default 24,000).
    """
    from misleader.defenses.misleader import AUTO_PRESET, defend_misleader, get_preset
    from misleader.training.checkpoint import read_sidecar

    vmeta = read_sidecar(victim)
    pre_name = preset if preset is not None else AUTO_PRESET.get(vmeta.get("dataset"))
    if members is None or epochs is None:
        if pre_name is None:
            raise MisleaderError("pass members and epochs, or a preset that supplies them")
        pre = get_preset(pre_name)
        members = list(members or pre.members)
        epochs = epochs or pre.epochs
    n = len(members)
    mus = _per_member(None if mu is None else ([float(mu)] if isinstance(mu, (int, float)) else list(mu)), n, "--mu")
    settings = [dict(s) for s in member_settings] if member_settings is not None else [{} for _ in members]
    if len(settings) != n:
        raise MisleaderError(f"member_settings has {len(settings)} entries for {n} members: give one per member")
    for s, m in zip(settings, mus):
        s["decoy"] = decoy_settings(victim_meta=vmeta, seed=seed, mu=1.0 if m is None else m, bank_size=bank_size,
                                    generators=generators, families=families, bank_batch=bank_batch,
                                    adversarial=adversarial, relabel=relabel, decoy_classes=decoy_classes,
                                    anchors=anchors)
    if refresh_rounds:
        from misleader.defenses.misleader.decoy_refresh import train_with_refresh

        if base is not None and Path(base).resolve() != Path(victim).resolve():
            raise MisleaderError(f"--base {base}: misleader-decoy distils the victim itself; compose by passing this "
                                 "folder as --base to the next defense")
        if kwargs.pop("member_of", None) is not None:
            raise MisleaderError("misleader-decoy --refresh-rounds trains its members in one call: leave out --member-of")
        return train_with_refresh(victim=victim, out=out, seed=seed, rounds=refresh_rounds,
                                  budget=refresh_budget or 1_000_000, sample=refresh_sample or 24_000,
                                  member_settings=settings, force=force, members=members, epochs=epochs,
                                  preset=preset, **kwargs)
    if refresh_budget is not None or refresh_sample is not None:
        raise MisleaderError("refresh_budget and refresh_sample go with refresh_rounds")
    return defend_misleader(victim=victim, base=base, out=out, seed=seed, force=force, members=members, epochs=epochs,
                            preset=preset, member_settings=settings, **kwargs)


def check_params(*, members: Sequence[str] | None = None, epochs: int | None = None, preset: str | None = None,
                 mu: float | Sequence[float] | None = None, bank_size: int | None = None,
                 generators: int | None = None, families: Sequence[str] | None = None,
                 bank_batch: int | None = None, adversarial: bool | None = None, relabel: str | None = None,
                 decoy_classes: int | None = None, anchors: bool | None = None, refresh_rounds: int | None = None,
                 refresh_budget: int | None = None, refresh_sample: int | None = None,
                 member_settings: Sequence[dict] | None = None, batch_size: int | None = None) -> None:
    """Validate the spec settings without training (the decoy settings with a placeholder derangement)."""
    from misleader.defenses.misleader_cli import check_params as misleader_check

    for name, value in (("refresh_rounds", refresh_rounds), ("refresh_budget", refresh_budget),
                        ("refresh_sample", refresh_sample)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MisleaderError(f"{name} must be a positive integer, got {value!r}")
    if not refresh_rounds and (refresh_budget is not None or refresh_sample is not None):
        raise MisleaderError("refresh_budget and refresh_sample go with refresh_rounds")
    if members is not None and epochs is not None:
        misleader_check(members=members, epochs=epochs, preset=preset, member_settings=member_settings,
                        batch_size=batch_size)
    for m in ([mu] if isinstance(mu, (int, float)) or mu is None else list(mu)):
        if relabel == "collapse":
            if decoy_classes is not None and decoy_classes < 2:
                raise MisleaderError(f"decoy_classes must be >= 2, got {decoy_classes}")
            d: dict[str, Any] = {"perm": [1, 2, 1], "relabel": "collapse", "mu": 1.0 if m is None else m}
        else:
            if decoy_classes is not None:
                raise MisleaderError("decoy_classes goes with relabel collapse")
            d = {"perm": [1, 0], "mu": 1.0 if m is None else m, **({"relabel": relabel} if relabel else {})}
        for key, value in (("bank_size", bank_size), ("generators", generators), ("bank_batch", bank_batch),
                           ("families", families), ("adversarial", adversarial), ("anchors", anchors)):
            if value is not None:
                d[key] = value
        DecoyConfig.from_dict(d)


build.check_params = check_params  # type: ignore[attr-defined]

MISLEADER_DECOY = register_defense(DefenseSpec(
    name="misleader-decoy", build=build, add_arguments=add_arguments, params_from_args=params_from_args,
    paper=PAPER_URL,
    help="MISLEADER + decoy term: secretly relabelled (permuted or collapsed) answers on generator-like inputs",
    description="Train a MISLEADER ensemble whose members also learn mu * KL(q || d) on a bank of images from "
                "randomly initialised DFME / DCGAN generators, q being the victim's softmax relabelled by a secret "
                "derangement or, with --relabel collapse, a secret map onto a few classes (drawn from --seed, shared by "
                "all members, stored only in the folder's private files); --refresh-rounds grows the bank with the "
                "defender's own DFME queries. "
                "Honest users on real images get the distilled answers; a data-free attacker copies the relabelled "
                "function. Same folder layout and flags as `misleader defend misleader`, plus --mu and the bank's.\n\n"
                "example: misleader defend misleader-decoy --victim runs/v_mnist --preset mnist-cpu --mu 1 "
                "--out runs/d_decoy",
    test_params={"members": ["lenet5_fifth"], "epochs": 1, "member_settings": [{"batch_size": 128, "lam": 0.0}],
                 "generator_samples": 16, "bank_size": 64, "generators": 2}))

__all__ = ["MISLEADER_DECOY", "add_arguments", "build", "check_params", "decoy_settings", "params_from_args"]
