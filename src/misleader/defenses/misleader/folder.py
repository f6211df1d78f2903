"""MISLEADER ensemble folders: members trained (or resumed) one by one, then assembled and evaluated.

Paper: MISLEADER, arXiv 2506.02362, https://arxiv.org/abs/2506.02362 (see :mod:`misleader.defenses.misleader`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from misleader.defenses.misleader.config import AUTO_PRESET, PAPER_URL, MemberConfig, get_preset, member_config
from misleader.defenses.misleader.diagnostics import evaluate_defense
from misleader.defenses.misleader.trainer import train_member
from misleader.errors import MisleaderError
from misleader.fingerprint import FINGERPRINT_FILE, settings_fingerprint
from misleader.models import MODELS, Classifier, create_model
from misleader.training.checkpoint import load_model, read_sidecar, save_model
from misleader.training.resume import RESUME_FILE, claim_run_dir, flat_settings
from misleader.utils import derive_seed, environment, make_generator, read_json, resolve_device, write_json

log = logging.getLogger(__name__)



def member_names(archs: Sequence[str]) -> list[str]:
    """Folder names of the members: the architecture, ``arch-2``, ``arch-3`` ... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for a in archs:
        seen[a] = seen.get(a, 0) + 1
        names.append(a if seen[a] == 1 else f"{a}-{seen[a]}")
    return names


def member_seed(seed: int, name: str) -> int:
    """A member's seed from the run seed and its name (the same in joint and separate runs)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _fingerprint(cfg: MemberConfig, *, seed: int, victim_sha: str | None) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "seed": int(seed), "victim_sha256": victim_sha}


def _finished(member_dir: Path) -> bool:
    return all((member_dir / f).exists() for f in ("result.json", "model.json", "model.safetensors"))


def _check_fingerprint(member_dir: Path, want: dict[str, Any]) -> None:
    got = read_json(member_dir / "result.json").get("fingerprint")
    if got != json.loads(json.dumps(want)):
        diff = []
        if got is None:
            diff.append("no recorded settings")
        else:
            for k in ("seed", "victim_sha256"):
                if got.get(k) != want[k]:
                    diff.append(f"{k} {got.get(k)!r} != {want[k]!r}")
            gc, wc = got.get("config", {}), json.loads(json.dumps(want["config"]))
            diff += [f"{k} {gc.get(k)!r} != {wc[k]!r}" for k in wc if gc.get(k) != wc[k]]
        raise MisleaderError(f"{member_dir} holds a member trained with other settings ({'; '.join(diff)}): "
                             "delete that folder to retrain it, or pass the settings it was trained with")


def _train_one(*, name: str, cfg: MemberConfig, seed: int, member_dir: Path, teacher: Classifier,
               victim_meta: dict[str, Any], victim_sha: str | None, data, splits, device: torch.device,
               decoy_bank_dir: Path | None = None) -> dict:
    """Train (or resume) one member into ``member_dir``; returns its result dict."""
    want = _fingerprint(cfg, seed=seed, victim_sha=victim_sha)
    if _finished(member_dir):
        _check_fingerprint(member_dir, want)
        log.info("member %s already finished in %s", name, member_dir)
        return read_json(member_dir / "result.json")
    MODELS.get(cfg.arch)
    MODELS.get(cfg.clone_arch or cfg.arch)
    member_dir.mkdir(parents=True, exist_ok=True)
    gen = make_generator(member_seed(seed, name))
    shape = victim_meta["input_shape"]
    k = int(victim_meta["num_classes"])
    mean, std = victim_meta.get("mean"), victim_meta.get("std")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(gen))
        d = create_model(cfg.arch, in_channels=int(shape[0]), num_classes=k, mean=mean, std=std)
        s = (create_model(cfg.clone_arch or cfg.arch, in_channels=int(shape[0]), num_classes=k, mean=mean, std=std)
             if cfg.lam > 0 else None)
    res = train_member(
        config=cfg, teacher=teacher, defense=d, clone=s, x_train=data.x_train[splits.train],
        y_train=data.y_train[splits.train], x_val=data.x_train[splits.val], y_val=data.y_train[splits.val],
        device=device, generator=gen, resume_path=member_dir / RESUME_FILE, settings={"seed": int(seed), "victim_sha256": victim_sha},
        desc=f"misleader {name}", decoy_bank_dir=decoy_bank_dir,
    )
    d.load_state_dict(res.defense_state)
    meta = {"dataset": victim_meta["dataset"], "num_classes": k, "input_shape": list(shape),
            "class_names": victim_meta.get("class_names"), "split": victim_meta.get("split", {}),
            "seed": seed, "role": "misleader member", "member": name, "config": cfg.to_dict(),
            "metrics": {"val_accuracy": res.best_val_accuracy}}
    save_model(d, member_dir, meta=meta, name="model")
    if s is not None and res.clone_state is not None:
        s.load_state_dict(res.clone_state)
        save_model(s, member_dir, meta={**meta, "role": "misleader inner clone"}, name="clone")
    write_json(member_dir / "history.json", res.history)
    result = {"name": name, "arch": cfg.arch, "lambda": cfg.lam, "temperature": cfg.temperature, "alpha": cfg.alpha,
              "val_accuracy": res.best_val_accuracy, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
              "seconds": res.seconds, "device": str(device), "fingerprint": want}
    write_json(member_dir / "result.json", result)  # written last: marks the member finished
    (member_dir / RESUME_FILE).unlink(missing_ok=True)
    return result


def _publish(member_dir: Path, target: Path, want: dict[str, Any]) -> None:
    """Copy a finished member folder to ``target`` (atomically: temp folder, then rename)."""
    if _finished(target):
        _check_fingerprint(target, want)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{time.time_ns()}"
    shutil.copytree(member_dir, tmp, ignore=shutil.ignore_patterns(RESUME_FILE, ".*"))
    if target.exists():
        shutil.rmtree(target)  # an unfinished folder (interrupted copy or training): replaced
    tmp.rename(target)


def _adopt_published_members(out: Path, settings: dict[str, Any]) -> None:
    """Let an ensemble folder that holds only ``members/`` published by ``--member-of`` be claimed.

    Each published member is checked against its own recorded settings before it is reused
    (:func:`_check_fingerprint`), so the folder is claimed for ``settings`` as if it were new.
    """
    if not out.is_dir() or (out / FINGERPRINT_FILE).exists() or not (out / "members").is_dir():
        return
    if {p.name for p in out.iterdir()} == {"members"}:
        write_json(out / FINGERPRINT_FILE, {"fingerprint": settings_fingerprint(settings), "settings": settings})


def _assemble(out: Path, plan: dict[str, Any], *, victim_dir: Path, teacher: Classifier, victim_meta: dict,
              data, device: torch.device, t_start: float) -> dict[str, Any]:
    names = plan["names"]
    member_results = [read_json(out / "members" / n / "result.json") for n in names]
    models = [load_model(out / "members" / n, device=device)[0] for n in names]
    ev = evaluate_defense(victim=teacher, members=models, data=data, device=device, seed=plan["seed"],
                          generator_samples=int(plan.get("generator_samples", 256)))
    members_out = []
    for i, (n, r) in enumerate(zip(names, member_results)):
        members_out.append({
            "name": n, "arch": r["arch"], "checkpoint": f"members/{n}/model.json", "lambda": r["lambda"],
            "temperature": r["temperature"], "alpha": r["alpha"], "val_accuracy": r["val_accuracy"],
            "test_accuracy": ev["member_test_accuracy"][i], "fidelity": ev["member_fidelity"][i],
            "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "seconds": r["seconds"],
        })
    # manifest format 2: the members as models inside the folder, one soft-voting ensemble backend step
    models = {m["name"]: {"checkpoint": m["checkpoint"], "arch": m["arch"],
                          "sha256": str(read_json(out / m["checkpoint"])["sha256"])} for m in members_out}
    manifest = {
        "format": 2, "kind": "defense", "defense": "misleader", "paper": PAPER_URL, "dataset": victim_meta["dataset"],
        "num_classes": int(victim_meta["num_classes"]), "input_shape": list(victim_meta["input_shape"]),
        "class_names": victim_meta.get("class_names"), "split": victim_meta.get("split", {}),
        "seed": plan["seed"],
        "victim": {"path": os.path.relpath(victim_dir.resolve(), out.resolve()), "sha256": victim_meta.get("sha256")},
        "models": models,
        "steps": [{"kind": "backend", "type": "ensemble", "models": list(names), "weights": None}],
        "params": {"epochs": plan["epochs"], "preset": plan.get("preset"),
                   "members": [{k: m[k] for k in ("name", "arch", "lambda", "temperature", "alpha")}
                               for m in members_out]},
        "base": None, "versions": environment(),
    }
    write_json(out / "history.json", {n: read_json(out / "members" / n / "history.json") for n in names})
    write_json(out / "manifest.json", manifest)
    result = {
        "test_accuracy": ev["test_accuracy"], "victim_test_accuracy": ev["victim_test_accuracy"],
        "fidelity": ev["fidelity"], "mean_l1_to_victim": ev["mean_l1_to_victim"],
        "members": members_out, "member_test_accuracy": {m["name"]: m["test_accuracy"] for m in members_out},
        "diagnostics": ev["diagnostics"], "defense": "misleader", "dataset": victim_meta["dataset"],
        "victim": str(victim_dir), "epochs": plan["epochs"], "seed": plan["seed"], "preset": plan.get("preset"),
        "train_seconds": sum(m["seconds"] for m in members_out), "seconds": time.perf_counter() - t_start,
        "device": str(device), "environment": environment(),
    }
    write_json(out / "result.json", result)  # written last
    log.info("MISLEADER ensemble %s: test accuracy %.4f (victim %.4f), fidelity %.4f, mean L1 %.4f", out,
             result["test_accuracy"], result["victim_test_accuracy"], result["fidelity"], result["mean_l1_to_victim"])
    return result


def defend_misleader(
    *,
    victim: str | Path,
    members: Sequence[str],
    epochs: int,
    out: str | Path,
    data_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    preset: str | None = None,
    member_settings: Sequence[dict] | None = None,
    batch_size: int | None = None,
    member_of: str | Path | None = None,
    generator_samples: int = 256,
    force: bool = False,
    base: str | Path | None = None,
    decoy_bank_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a MISLEADER ensemble against the victim folder ``victim`` and write it to ``out``.

    Args:
        victim: a victim folder (``misleader train-victim``); its sidecar names the dataset and split.
        members: member architectures, e.g. ``["lenet5", "lenet5_half", "lenet5_fifth"]``.
        epochs: epochs per member.
        out: the defense folder; with ``member_of``, the folder of the single member trained here.
        data_dir: dataset root (default ``$MISLEADER_DATA``, else ``./data``).
        seed: run seed (each member's seed derives from it and the member's name).
        device: ``auto``, ``cpu`` or ``cuda``.
        preset: a name in :data:`PRESETS` (default: the one matching the victim's dataset, for its
            training settings; ``members`` and ``epochs`` are always the ones given).
        member_settings: one dict per member overriding ``lambda`` / ``temperature`` / ``alpha`` or
            any :class:`MemberConfig` field (``None`` values are ignored).
        batch_size: overrides the preset's batch size.
        member_of: train only the one member in ``members`` into ``out`` (its own folder), then copy it
            into the ensemble folder ``member_of`` (``member_of/members/NAME``); when that folder's
            ``plan.json`` lists members that are now all finished, the ensemble is assembled there.
            Members trained on other machines can be copied into ``DIR/members/`` by hand and
            assembled by running the command without ``member_of`` and ``out=DIR``.
        generator_samples: untrained-generator images in the misleading diagnostics of ``result.json``.
        force: start over in ``out`` (delete what it holds), whatever settings it was written with.
        base: must be ``None`` or the victim folder itself: MISLEADER distils the victim, it cannot
            wrap another defense. To compose, write this folder first and pass it as ``--base`` to
            the next (output) defense.
        decoy_bank_dir: where the decoy variant's stored banks are (members whose decoy settings list
            ``extra_banks``); not part of the settings (the banks are named by their sha256 there).

    Returns:
        The ``result.json`` dict (``test_accuracy``, ``victim_test_accuracy``, ``fidelity``,
        ``mean_l1_to_victim``, ``members`` ...); with ``member_of`` before assembly, the member's
        own result.

    Resumable: ``out`` records a fingerprint of the settings (``fingerprint.json``); a re-run with
    the same settings skips finished members, resumes an interrupted member from its last epoch,
    and writes ``result.json`` only when every member is done. A re-run with other settings (members,
    epochs, seed, member settings, preset, victim) is refused with a one-line error unless ``force``.

    Raises:
        MisleaderError: bad arguments, ``base`` other than the victim, ``out`` written with other
            settings, or an unreadable resume file.
    """
    t_start = time.perf_counter()
    victim_dir, out = Path(victim), Path(out)
    archs = [a.strip() for a in members if a and a.strip()]
    if not archs:
        raise MisleaderError("no members given: pass architectures such as --members lenet5,lenet5_half,lenet5_fifth")
    for a in archs:
        MODELS.get(a)
    if epochs < 1:
        raise MisleaderError(f"epochs must be >= 1, got {epochs}")
    if member_settings is not None and len(member_settings) != len(archs):
        raise MisleaderError(f"member_settings has {len(member_settings)} entries for {len(archs)} members: "
                             "give one per member")
    if base is not None and Path(base).resolve() != victim_dir.resolve():
        raise MisleaderError(f"--base {base}: misleader distils the victim itself; compose by passing this folder "
                             "as --base to the next defense")
    if member_of is not None and len(archs) != 1:
        raise MisleaderError(f"member_of trains one member per call, got {len(archs)} ({','.join(archs)}): "
                             "run one invocation per member")
    from misleader.training.victim import load_target_data

    teacher, vmeta = load_model(victim_dir, device="cpu")
    vmeta.setdefault("sha256", read_sidecar(victim_dir).get("sha256"))
    preset_name = preset if preset is not None else AUTO_PRESET.get(vmeta["dataset"])
    pre = get_preset(preset_name) if preset_name is not None else None
    if pre is not None and preset is not None and vmeta["dataset"] not in pre.datasets:
        log.warning("preset %s is meant for %s, the victim is on %s", preset_name, ",".join(pre.datasets),
                    vmeta["dataset"])
    configs = []
    for i, a in enumerate(archs):
        ov = dict(member_settings[i]) if member_settings is not None else {}
        if batch_size is not None:
            ov["batch_size"] = batch_size
        configs.append(member_config(a, epochs=epochs, preset=pre, overrides=ov))
    dev = resolve_device(device)
    names = member_names(archs)
    sha = vmeta.get("sha256")
    fingerprints = [_fingerprint(c, seed=seed, victim_sha=sha) for c in configs]
    if member_of is not None:
        claim_run_dir(out, {"defense": "misleader", "member": names[0], **fingerprints[0]}, force=force,
                      command="misleader defend misleader --member-of")
    else:
        plan = {"names": names, "archs": archs, "epochs": epochs, "seed": seed, "preset": preset_name,
                "victim": str(victim_dir), "victim_sha256": sha, "configs": [c.to_dict() for c in configs],
                "generator_samples": generator_samples}
        settings = {"defense": "misleader", **{k: v for k, v in plan.items() if k not in ("victim", "configs")},
                    "members": {n: c.to_dict() for n, c in zip(names, configs)}}
        _adopt_published_members(out, flat_settings(settings))
        claim_run_dir(out, settings, force=force, command="misleader defend misleader")
    data, splits = load_target_data(vmeta, data_dir=data_dir)

    if member_of is not None:
        ens = Path(member_of)
        name = names[0]
        result = _train_one(name=name, cfg=configs[0], seed=seed, member_dir=out, teacher=teacher,
                            victim_meta=vmeta, victim_sha=sha, data=data, splits=splits, device=dev,
                            decoy_bank_dir=None if decoy_bank_dir is None else Path(decoy_bank_dir))
        _publish(out, ens / "members" / name, fingerprints[0])
        plan_path = ens / "plan.json"
        if plan_path.exists():
            plan = read_json(plan_path)
            if all(_finished(ens / "members" / n) for n in plan["names"]) and not (ens / "result.json").exists():
                return _assemble(ens, plan, victim_dir=victim_dir, teacher=teacher, victim_meta=vmeta, data=data,
                                 device=dev, t_start=t_start)
        return result

    write_json(out / "plan.json", plan)
    for name, cfg in zip(names, configs):
        _train_one(name=name, cfg=cfg, seed=seed, member_dir=out / "members" / name, teacher=teacher,
                   victim_meta=vmeta, victim_sha=sha, data=data, splits=splits, device=dev,
                   decoy_bank_dir=None if decoy_bank_dir is None else Path(decoy_bank_dir))
    return _assemble(out, plan, victim_dir=victim_dir, teacher=teacher, victim_meta=vmeta, data=data, device=dev,
                     t_start=t_start)

