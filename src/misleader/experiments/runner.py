"""Run an experiment spec: victims, then defenses, then attacks; resumable, locally or on Ray.

Layout of an output folder::

    OUT/spec.yaml                 the spec as given
    OUT/index.json                every run: stage, id, folder, config, status (pending, finished, failed,
                                  skipped, interrupted), key metrics
    OUT/victims/ID/               a victim folder (model.safetensors, model.json, result.json, history.json)
    OUT/defenses/ID/              a defense folder (manifest.json, members/..., result.json)
    OUT/attacks/ID/               result.json, history.json, ...
    every run folder also holds config.yaml (what it computes) and env.json (versions, device, git sha,
    host, wall time).

A run is executed in a hidden sibling ``.ID.partial`` and renamed to ``ID`` once its API has written
``result.json`` (the APIs write it last), so a folder named by an id is always complete. A rerun of
the same command skips every finished run and resumes the partial ones where the APIs support it
(victim training resumes from ``resume.pt``); nothing finished is ever recomputed or rewritten.

Dependencies: a defense waits for its victim (and for its ``base:`` defense, whose folder is passed to
its builder as ``base=``), an attack for its defense (the ``undefended`` defense is its victim's folder). The local executor runs them in order (``jobs=1``) or in a process pool,
the Ray executor as Ray tasks with the spec's ``resources`` (see :mod:`misleader.experiments.executors`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from misleader.errors import MisleaderError
from misleader.experiments.spec import BUILDER_ARGS, ExperimentSpec, Stage, expand, load_spec, spec_to_yaml
from misleader.utils import atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)

#: metrics shown in progress lines and kept in index.json, per stage
SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "victim": ("test_accuracy", "val_accuracy"),
    "defense": ("test_accuracy", "victim_test_accuracy", "fidelity", "mean_l1_to_victim"),
    "attack": ("clone_accuracy", "clone_accuracy_best", "fidelity", "queries_used"),
}


class StageFailed(Exception):
    """A run raised; ``message`` is one line, the traceback is in the run's ``error.txt``."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _summary(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in SUMMARY_KEYS.get(stage, ()) if k in result}


def _build_defense(name: str, *, base: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the registered builder ``name`` (:data:`misleader.defenses.DEFENSES`) with ``kwargs``; the contract's
    ``base`` (a folder to wrap; ``None``: the victim) and ``force`` are passed only to builders that declare them
    (spec validation refuses a ``base:`` for a builder without one)."""
    import inspect

    from misleader.defenses import DEFENSES  # noqa: F401  (importing the package registers every defense)
    from misleader.defenses.base import defense_spec

    spec = defense_spec(name)
    accepted = inspect.signature(inspect.unwrap(spec.build)).parameters
    extra = {k: v for k, v in (("base", base), ("force", False)) if k in accepted and k in BUILDER_ARGS}
    if base is not None and "base" not in extra:
        raise MisleaderError(f"defense {name!r} cannot wrap another defense (its builder takes no base)")
    return spec(**kwargs, **extra)


def config_yaml(payload: dict[str, Any]) -> str:
    """The text of a run's ``config.yaml``."""
    keys = ("id", "stage", "folder", "parents", "config", "meta", "resources")
    return yaml.safe_dump({k: payload[k] for k in keys if k in payload}, sort_keys=False)


def expand_dataset(name: str, data_dir: str | None) -> str:
    """Replace ``{data_dir}`` in a dataset name (``npz:{data_dir}/x.npz``) by the data folder in use."""
    if "{data_dir}" in name:
        from misleader.data import resolve_data_dir

        name = name.replace("{data_dir}", str(resolve_data_dir(data_dir).resolve()))
    return name


def _call_api(payload: dict[str, Any], out_dir: Path, root: Path, *, data_dir: str | None, device: str) -> dict:
    cfg = payload["config"]
    stage = payload["stage"]
    if stage == "victim":
        from misleader.training.victim import train_victim

        split = None
        if cfg.get("split"):
            from misleader.data import SplitSpec

            split = SplitSpec(**cfg["split"])
        return train_victim(dataset=expand_dataset(cfg["dataset"], data_dir), arch=cfg["arch"], epochs=cfg["epochs"],
                            out=out_dir, data_dir=data_dir, seed=cfg["seed"], device=device, recipe=cfg.get("recipe"),
                            batch_size=cfg.get("batch_size"), lr=cfg.get("lr"), split=split)
    if stage == "defense":
        base = payload["inputs"].get("base")
        return _build_defense(cfg["defense"], victim=str(root / payload["inputs"]["victim"]), out=out_dir,
                              base=None if base is None else str(root / base),
                              data_dir=data_dir, seed=cfg["seed"], device=device, **cfg.get("settings", {}))
    if stage == "attack":
        from misleader.attacks.harness import run_attack

        return run_attack(cfg["attack"], target=str(root / payload["inputs"]["target"]), budget=cfg["budget"],
                          clone_arch=cfg["clone_arch"], out=out_dir, data_dir=data_dir, seed=cfg["seed"], device=device,
                          labels=cfg.get("labels", "soft"), pool=cfg.get("pool"), options=cfg.get("options") or None,
                          eval_every=cfg.get("eval_every"))
    raise ValueError(f"unknown stage {stage!r}")


def execute_stage(payload: dict[str, Any], *, out: str, data_dir: str | None = None, device: str = "auto",
                  threads: int | None = None, executor: str = "local") -> dict[str, Any]:
    """Run one stage into ``out/FOLDER`` (via ``out/.FOLDER.partial``); the unit of work of every executor.

    Args:
        payload: :meth:`Stage.to_dict` plus ``inputs`` (parent folders relative to ``out``).
        out: the experiment's output folder.
        threads: ``torch.set_num_threads`` for this run (``None``: leave as is).
        executor: recorded in ``env.json``.

    Returns:
        ``{"id", "status": "finished" | "cached", "seconds", "summary"}``.

    Raises:
        StageFailed: the API raised (one line; the traceback is in ``.ID.partial/error.txt``).
    """
    root = Path(out)
    final = root / payload["folder"]
    if (final / "result.json").exists():
        return {"id": payload["id"], "status": "cached", "seconds": 0.0,
                "summary": _summary(payload["stage"], read_json(final / "result.json"))}
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from misleader.utils import environment, resolve_device

    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "error.txt").unlink(missing_ok=True)
    atomic_write_text(partial / "config.yaml", config_yaml(payload))
    env = {**environment(), "device": str(resolve_device(device)), "executor": executor,
           "host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(), "started": _now()}
    write_json(partial / "env.json", env)
    t0 = time.perf_counter()
    try:
        result = _call_api(payload, partial, root, data_dir=data_dir, device=device)
    except Exception as exc:  # noqa: BLE001 - reported per run, the grid goes on
        atomic_write_text(partial / "error.txt", traceback.format_exc())
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StageFailed(f"{type(exc).__name__}: {msg}") from None
    seconds = time.perf_counter() - t0
    if not (partial / "result.json").exists():  # the APIs write it; keep the returned dict if one did not
        write_json(partial / "result.json", result)
    write_json(partial / "env.json", {**env, "finished": _now(), "seconds": seconds})
    if final.exists():
        if any(final.iterdir()):
            raise StageFailed(f"{final} exists without result.json (not written by this runner): move it away and rerun")
        final.rmdir()
    os.replace(partial, final)
    return {"id": payload["id"], "status": "finished", "seconds": seconds, "summary": _summary(payload["stage"], result)}


# --------------------------------------------------------------------------- the grid


@dataclass
class RunSummary:
    """What :func:`run_experiment` did."""

    out: Path
    total: int
    finished: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


@dataclass
class Job:
    """A stage to execute: its payload and the ids of the jobs it waits for."""

    stage: Stage
    payload: dict[str, Any]
    deps: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.stage.id


def plan(spec: ExperimentSpec, out: str | Path) -> tuple[list[Stage], dict[str, str]]:
    """All stages and their status in ``out`` (``finished`` iff ``result.json`` exists, else ``pending``)."""
    out = Path(out)
    stages = expand(spec)
    status = {}
    for st in stages:
        status[st.id] = "finished" if (out / st.folder / "result.json").exists() else "pending"
    return stages, status


def _write_index(out: Path, spec: ExperimentSpec, stages: list[Stage], status: dict[str, str],
                 info: dict[str, dict[str, Any]]) -> None:
    runs = []
    for st in stages:
        row = {**st.to_dict(), "status": status[st.id]}
        row.update(info.get(st.id, {}))
        runs.append(row)
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    write_json(out / "index.json", {"spec": spec.name, "dataset": spec.dataset, "updated": _now(),
                                    "counts": counts, "runs": runs})


def _refresh_configs(out: Path, stages: list[Stage], status: dict[str, str]) -> None:
    """Finished runs keep their results; only a changed label (meta) rewrites their config.yaml."""
    for st in stages:
        if st.virtual or status[st.id] != "finished":
            continue
        path = out / st.folder / "config.yaml"
        text = config_yaml(st.to_dict())
        try:
            if path.read_text() == text:
                continue
        except FileNotFoundError:
            pass
        atomic_write_text(path, text)


def run_experiment(
    spec: ExperimentSpec | str | Path,
    *,
    out: str | Path,
    executor: str = "local",
    jobs: int = 1,
    data_dir: str | Path | None = None,
    device: str | None = None,
    ray_address: str | None = None,
    threads: int | None = None,
) -> RunSummary:
    """Run every unfinished stage of ``spec`` into ``out``; finished runs are skipped.

    Args:
        spec: a spec or the path of a YAML file.
        out: output folder (created).
        executor: ``local`` (in this process for ``jobs=1``, else a process pool) or ``ray``.
        jobs: parallel runs for the local executor.
        data_dir: dataset root (default ``$MISLEADER_DATA``, else ``./data``).
        device: overrides the spec's ``device``.
        ray_address: Ray cluster address (default: ``$RAY_ADDRESS`` or an already initialised Ray, else a
            local instance).
        threads: torch threads per run for the local executor (default: unchanged for ``jobs=1``,
            ``cpu_count // jobs`` for a pool); Ray tasks use their ``num_cpus``.

    Returns:
        A :class:`RunSummary` (failed runs are listed; their dependents are skipped).

    Raises:
        MisleaderError: an invalid spec, or another runner holds ``out`` (nothing in ``out`` is touched then).
    """
    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):  # before anything is written: a refused second run leaves the folder untouched
        return _run_locked(spec, out=out, executor=executor, jobs=jobs, data_dir=data_dir, device=device,
                           ray_address=ray_address, threads=threads)


def _run_locked(spec: ExperimentSpec, *, out: Path, executor: str, jobs: int, data_dir: str | Path | None,
                device: str | None, ray_address: str | None, threads: int | None) -> RunSummary:
    """:func:`run_experiment` once ``out``'s lock is held."""
    from misleader.experiments.executors import make_executor

    data_dir = None if data_dir is None else str(Path(data_dir).expanduser().resolve())
    device = device or spec.device
    atomic_write_text(out / "spec.yaml", spec_to_yaml(spec))
    stages, status = plan(spec, out)
    by_id = {st.id: st for st in stages}
    # a virtual stage (undefended) is finished iff its victim is
    for st in stages:
        if st.virtual:
            status[st.id] = status[st.parents[0]]
    _refresh_configs(out, stages, status)
    info: dict[str, dict[str, Any]] = {}
    for st in stages:  # key metrics of runs finished earlier, for the index
        if not st.virtual and status[st.id] == "finished":
            try:
                info[st.id] = {"summary": _summary(st.stage, read_json(out / st.folder / "result.json"))}
            except MisleaderError:  # an unreadable result.json: the report will say so
                pass
    summary = RunSummary(out=out, total=sum(1 for st in stages if not st.virtual))

    def real_deps(st: Stage) -> tuple[str, ...]:
        deps: list[str] = []
        for p in st.parents:
            deps.extend(real_deps(by_id[p]) if by_id[p].virtual else [p])
        return tuple(deps)

    todo: list[Job] = []
    for st in stages:
        if st.virtual or status[st.id] == "finished":
            continue
        inputs = {}
        if st.stage == "defense":
            inputs["victim"] = by_id[st.parents[0]].folder
            if len(st.parents) > 1:  # a composed defense: the folder it wraps (built before it)
                inputs["base"] = by_id[st.parents[1]].folder
        elif st.stage == "attack":
            inputs["target"] = by_id[st.parents[0]].folder
        todo.append(Job(st, {**st.to_dict(), "inputs": inputs}, tuple(d for d in real_deps(st) if status[d] != "finished")))
    n_done = sum(1 for st in stages if not st.virtual and status[st.id] == "finished")
    n_real = sum(1 for st in stages if not st.virtual)
    summary.cached = n_done
    log.info("%s: %d runs (%d victims, %d defenses, %d attacks); %d already finished, %d to run with the %s executor",
             spec.name, n_real, sum(st.stage == "victim" for st in stages),
             sum(st.stage == "defense" and not st.virtual for st in stages), sum(st.stage == "attack" for st in stages),
             n_done, len(todo), executor)
    _write_index(out, spec, stages, status, info)
    if not todo:
        return summary
    t0 = time.perf_counter()
    counter = {"done": n_done}

    def on_start(job: Job) -> None:
        status[job.id] = "running"
        log.info("start %s %s", job.stage.stage, _describe(job.stage))

    def on_done(job: Job, result: dict[str, Any] | None, error: str | None) -> None:
        counter["done"] += 1
        if result is not None:
            status[job.id] = "finished"
            summary.finished += 1
            info[job.id] = {"seconds": round(result.get("seconds", 0.0), 2), "summary": result.get("summary", {})}
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in result.get("summary", {}).items())
            log.info("[%d/%d] done  %s %s in %.1fs: %s", counter["done"], n_real, job.stage.stage,
                     _describe(job.stage), result.get("seconds", 0.0), metrics)
        elif error and error.startswith("skipped"):
            status[job.id] = "skipped"
            summary.skipped.append(job.id)
            info[job.id] = {"error": error}
        else:
            status[job.id] = "failed"
            summary.failed.append((job.id, error or "unknown error"))
            info[job.id] = {"error": error}
            log.error("[%d/%d] FAILED %s %s: %s (traceback: %s)", counter["done"], n_real, job.stage.stage,
                      job.id, error, out / Path(job.stage.folder).parent / f".{Path(job.stage.folder).name}.partial/error.txt")
        _write_index(out, spec, stages, status, info)

    ex = make_executor(executor, jobs=jobs, threads=threads, ray_address=ray_address)
    try:
        ex.run(todo, out=str(out), data_dir=data_dir, device=device, on_start=on_start, on_done=on_done)
    except BaseException:
        for job in todo:
            if status[job.id] in ("running", "pending"):
                status[job.id] = "interrupted" if status[job.id] == "running" else "pending"
        _write_index(out, spec, stages, status, info)
        raise
    for st in stages:  # virtual stages follow their victim
        if st.virtual:
            status[st.id] = status[st.parents[0]]
    _write_index(out, spec, stages, status, info)
    summary.seconds = time.perf_counter() - t0
    return summary


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One runner per output folder: two would write the same partial folders."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".runner.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MisleaderError(f"another `misleader run` is writing into {out}: wait for it to finish, or use "
                                 "another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _describe(st: Stage) -> str:
    m = st.meta
    if st.stage == "victim":
        return f"{m['victim_arch']} on {m['dataset']} (seed {m['victim_seed']})"
    if st.stage == "defense":
        return f"{m['defense_label']} (victim seed {m['victim_seed']})"
    return (f"{m['attack_label']} vs {m['defense_label']}, clone {m['clone_arch']}, budget {m['budget']}, "
            f"seed {m['seed']}")


def clean_partials(out: str | Path) -> list[Path]:
    """Delete the ``.ID.partial`` folders of interrupted runs (they are resumed otherwise)."""
    removed = []
    for sub in ("victims", "defenses", "attacks"):
        for p in sorted((Path(out) / sub).glob(".*.partial")):
            shutil.rmtree(p)
            removed.append(p)
    return removed


__all__ = ["Job", "RunSummary", "StageFailed", "clean_partials", "execute_stage", "expand_dataset", "plan",
           "run_experiment"]
