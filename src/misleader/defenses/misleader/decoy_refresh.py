"""Refresh rounds of the decoy variant: the bank grows with the queries of the defender's own DFME runs (issue 11).

Method: the decoy variant of MISLEADER (:mod:`misleader.defenses.misleader.decoy`; MISLEADER: arXiv 2506.02362,
https://arxiv.org/abs/2506.02362) with the bank "refreshed during training" (issue 11, item 1), in the spirit
of the audit's proposal 2 (a generator trained against the defense, ``shared/research/misleader-audit.md``).

Why: a bank of *randomly initialised* generators covers where a DFME generator starts, not where it goes.
DFME's generator maximises the disagreement between its clone and the answers, so once the clone has copied
the decoy answers it moves to wherever the answers are not decoys; against the prototype (a permutation
decoy on a random bank, mu 1) a faithful DFME goes from 6 % at 200k queries to 93 % at 2M (MNIST, measured:
RESULTS.md). Each round here closes part of that gap with data the defender makes itself:

* round 0: the decoy ensemble on the random bank (``rounds/r0``);
* round r >= 1: the defender runs DFME (this project's, at its defaults for the target, seeds of its own,
  :data:`REFRESH_SEED` + r + 100 * seed) with ``budget`` queries against the round r - 1 ensemble and keeps a
  uniform sample of ``sample`` of its queries (``rounds/bank-*.safetensors``, uint8, named by sha256); the
  round r ensemble trains from scratch on the random bank plus every stored sample so far
  (``extra_banks``, their targets the victim's answers relabelled as for the random bank).

The last round is published as the defense (its members and manifest copied into the folder; the rounds
stay in ``rounds/`` with the defender's clone accuracy of each on the validation split, ``rounds.json``).
No attack data, no test data and no other dataset is used: the queries are the defender's own synthetic
DFME queries, and the seeds are disjoint from the evaluation attacks' (0, 1, 2, ...) and from the selection's
(:data:`misleader.defenses.misleader.decoy_select.DEFENDER_SEED`).

Resumable: the folder's fingerprint covers every setting; a finished round (its folder's ``result.json``) and a
stored bank (``rounds/r<r>.bank.json``) are reused on a rerun, and an interrupted round's members resume from their
last epoch; an interrupted refresh DFME run starts again from its first query.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from misleader.errors import MisleaderError
from misleader.utils import read_json, write_json

log = logging.getLogger(__name__)

#: the defender's refresh DFME seeds start here (selection: 10,000; evaluation attacks: small seeds): round ``r`` of a
#: defense with seed ``s`` runs DFME with seed ``REFRESH_SEED + r + 100 * s`` (its sample positions: that seed + 1)
REFRESH_SEED = 20_000
#: rounds at most (the seeds above stay distinct between rounds and defense seeds)
MAX_ROUNDS = 99


def record_dfme(target: Path, *, victim_meta: dict[str, Any], budget: int, sample: int, seed: int,
                data_dir: str | Path | None, device: str) -> tuple[torch.Tensor, torch.nn.Module, float]:
    """The defender's DFME against ``target``: ``(sampled queries (sample, C, H, W), its clone (eval mode), seconds)``."""
    from misleader.attacks.dfme import DFME
    from misleader.detect.evaluate import RecordingOracle
    from misleader.models import create_model
    from misleader.oracle.load import open_accounted
    from misleader.utils import make_generator, resolve_device

    dev = resolve_device(device)
    attack = DFME(preset="auto")
    attack.adapt_to_target({k: victim_meta[k] for k in ("dataset", "input_shape", "num_classes") if k in victim_meta})
    gen = make_generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clone = create_model("lenet5", in_channels=int(victim_meta["input_shape"][0]),
                             num_classes=int(victim_meta["num_classes"]))
    oracle, acct = open_accounted(target, output="probs", budget=budget, device=dev)
    keep = torch.randperm(budget, generator=make_generator(seed + 1))[:min(sample, budget)] + 1
    rec = RecordingOracle(oracle, sample=keep)
    t0 = time.perf_counter()
    res = attack.run(rec.sealed(), budget=budget, clone=clone, generator=gen, device=dev)
    if acct.used != res.queries_used:
        raise RuntimeError(f"refresh DFME: accounting broke ({acct.used} counted, {res.queries_used} reported)")
    rows, _ = rec.stream()
    return rows, res.clone.eval(), time.perf_counter() - t0


def val_accuracy(model: torch.nn.Module, victim_meta: dict[str, Any], *, data_dir: str | Path | None) -> float:
    """Top-1 accuracy of ``model`` on the victim's validation split (batches moved to the model's device)."""
    from misleader.training.victim import load_target_data

    data, splits = load_target_data(victim_meta, data_dir=data_dir)
    dev = next(model.parameters()).device
    x, y = data.x_train[splits.val], data.y_train[splits.val]
    with torch.no_grad():
        hits = sum(int((model((b.float() / 255.0).to(dev)).argmax(1).cpu() == t).sum())
                   for b, t in zip(x.split(1000), y.split(1000)))
    return hits / len(y)


def _publish(round_dir: Path, out: Path) -> None:
    """Copy the last round's defense (members, manifest, plan, history) into ``out``; ``result.json`` is written by the
    caller, last. The manifest's victim reference (a path relative to its folder) is rewritten relative to ``out``."""
    import os

    for child in round_dir.iterdir():
        if child.name in ("result.json", "fingerprint.json"):
            continue
        if child.name == "manifest.json":
            manifest = read_json(child)
            ref = manifest.get("victim")
            if isinstance(ref, dict) and isinstance(ref.get("path"), str) and not Path(ref["path"]).is_absolute():
                victim = (round_dir / ref["path"]).resolve()
                manifest["victim"] = {**ref, "path": os.path.relpath(victim, out.resolve())}
            write_json(out / "manifest.json", manifest)
            continue
        dest = out / child.name
        if child.is_dir():
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(child, dest)
        else:
            shutil.copy2(child, dest)


def train_with_refresh(*, victim: str | Path, out: str | Path, seed: int, rounds: int, budget: int, sample: int,
                       member_settings: Sequence[dict[str, Any]], force: bool = False,
                       data_dir: str | Path | None = None, device: str = "auto", **misleader_kw: Any) -> dict[str, Any]:
    """Train the decoy ensemble in ``rounds + 1`` rounds (module docstring) into ``out``; returns its result.json.

    Args:
        victim: the victim folder.
        out: the defense folder (the last round is published here; the rounds stay in ``out/rounds``).
        seed: the defense's seed (members, pi, bank; the refresh DFME's seeds derive from it).
        rounds: refresh rounds (>= 1).
        budget: queries of each refresh DFME run.
        sample: of which this many (uniform) are kept for the bank.
        member_settings: one dict per member, each with its ``decoy`` settings (as the misleader-decoy builder makes).
        force: start over in ``out``.
        **misleader_kw: the rest of :func:`~misleader.defenses.misleader.defend_misleader`'s arguments (members,
            epochs, preset, batch_size, generator_samples).
    """
    from misleader.defenses.misleader import defend_misleader
    from misleader.defenses.misleader.decoy import save_bank_file
    from misleader.training.checkpoint import read_sidecar
    from misleader.training.resume import claim_run_dir

    if not 1 <= rounds <= MAX_ROUNDS or budget < 1 or sample < 1:
        raise MisleaderError(f"refresh rounds must be in 1..{MAX_ROUNDS} and budget and sample >= 1, got {rounds}, "
                             f"{budget}, {sample}")
    out = Path(out)
    settings = {"defense": "misleader-decoy", "refresh": {"rounds": rounds, "budget": budget, "sample": sample},
                "seed": seed, "victim_sha256": read_sidecar(victim).get("sha256"),
                "member_settings": [dict(s) for s in member_settings], **misleader_kw}
    claim_run_dir(out, settings, force=force, command="misleader defend misleader-decoy --refresh-rounds")
    if (out / "result.json").exists():
        return read_json(out / "result.json")
    vmeta = read_sidecar(victim)
    rounds_dir = out / "rounds"
    rounds_dir.mkdir(parents=True, exist_ok=True)
    banks: list[str] = []
    summary: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for r in range(rounds + 1):
        rdir = rounds_dir / f"r{r}"
        settings_r = []
        for s in member_settings:
            s = dict(s)
            s["decoy"] = {**s["decoy"], **({"extra_banks": list(banks)} if banks else {})}
            settings_r.append(s)
        log.info("decoy refresh: round %d of %d (%d stored banks)", r, rounds, len(banks))
        result = defend_misleader(victim=victim, out=rdir, seed=seed, member_settings=settings_r, data_dir=data_dir,
                                  device=device, decoy_bank_dir=rounds_dir, **misleader_kw)
        row: dict[str, Any] = {"round": r, "folder": f"rounds/r{r}", "test_accuracy": result.get("test_accuracy"),
                               "extra_banks": list(banks)}
        if r < rounds:
            state = rounds_dir / f"r{r}.bank.json"
            if state.exists():
                info = read_json(state)
            else:
                dfme_seed = REFRESH_SEED + r + 100 * seed
                rows, clone, secs = record_dfme(rdir, victim_meta=vmeta, budget=budget, sample=sample, seed=dfme_seed,
                                                data_dir=data_dir, device=device)
                digest = save_bank_file(rows, rounds_dir)  # stored before anything else can fail
                info = {"sha256": digest, "images": int(len(rows)), "dfme_seed": dfme_seed, "dfme_budget": budget,
                        "defender_clone_val_accuracy": val_accuracy(clone, vmeta, data_dir=data_dir), "seconds": secs}
                write_json(state, info)
            log.info("decoy refresh: the defender's DFME (%d queries) against round %d: clone %.1f %% on validation",
                     budget, r, 100 * info["defender_clone_val_accuracy"])
            row.update(defender_dfme=info)
            banks.append(info["sha256"])
        summary.append(row)
    write_json(rounds_dir / "rounds.json", summary)
    _publish(rounds_dir / f"r{rounds}", out)
    result = {**result, "refresh": {"rounds": rounds, "budget": budget, "sample": sample, "summary": summary}}
    write_json(out / "result.json", result)  # last: marks the folder finished
    return result


__all__ = ["MAX_ROUNDS", "REFRESH_SEED", "record_dfme", "train_with_refresh", "val_accuracy"]
