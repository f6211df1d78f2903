"""Reading and validating a target folder: a victim (``model.json``) or a defense (``manifest.json``).

:func:`read_target` turns any target folder into a :class:`Target`: its public metadata, its models
(checkpoint paths, checked to stay inside the folder) and the pipeline steps that serve it.

* victim folder: one model ``victim`` and the step ``{"kind": "backend", "type": "model", "model": "victim"}``;
* format 1 (``"combine": "mean_softmax"`` over ``members``, written before pipelines): the members become
  models and one ``ensemble`` backend step (weights honoured); it answers bit-identically to before;
* format 2: the ``models`` table and the ``steps`` list as written by
  :func:`misleader.defenses.folder.write_defense_folder`.

Every path stays inside the folder (``..``, absolute paths and symlinks out are refused), except the
explicit victim reference (``"victim": {"path", "sha256"}``; format 1: ``victim`` + ``victim_sha256``),
whose weights must have the recorded sha256. Only regular files are opened (a FIFO would hang).
Every check failure is a one-line :class:`~misleader.errors.MisleaderError` naming the key.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misleader.errors import MisleaderError
from misleader.utils import read_json

MANIFEST = "manifest.json"
SIDECAR = "model.json"
#: the metadata an attack's pool choice may see (nothing else of a manifest)
PUBLIC_KEYS = ("dataset", "input_shape", "num_classes")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ModelRef:
    """One checkpoint a pipeline uses: its sidecar path (checked) and expected weights sha256."""

    name: str
    sidecar: Path
    sha256: str | None
    arch: str | None = None


@dataclass
class Target:
    """A parsed target folder.

    Attributes:
        folder: the folder (resolved).
        kind: ``"victim"`` or ``"defense"``.
        format: 0 (victim folder), 1 or 2.
        meta: the manifest / sidecar dict plus ``kind`` (what :func:`describe_target` returned before).
        num_classes, input_shape: validated.
        models: name -> :class:`ModelRef`.
        steps: the pipeline's step entries.
        seed: seeds the folder's generator.
    """

    folder: Path
    kind: str
    format: int
    meta: dict[str, Any]
    num_classes: int
    input_shape: tuple[int, ...]
    models: dict[str, ModelRef] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0

    def public_meta(self) -> dict[str, Any]:
        """``{dataset, input_shape, num_classes}``: all an attacker's pool choice may see."""
        return {"dataset": self.meta.get("dataset"), "input_shape": list(self.input_shape),
                "num_classes": self.num_classes}


def _bad(where: Path, msg: str) -> MisleaderError:
    return MisleaderError(f"{where}: {msg}: re-create the folder with `misleader train-victim` / `misleader defend`")


def check_regular_file(path: Path, *, what: str = "file") -> Path:
    """Raise unless ``path`` is an existing regular file (checked with ``stat`` before any open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MisleaderError(f"{what} {path} not found: re-create it with the command that wrote it") from None
    except OSError as exc:
        raise MisleaderError(f"{what} {path} cannot be read ({exc.strerror}): check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise MisleaderError(f"{what} {path} is not a regular file: pass the folder written by misleader")
    return path


def read_json_file(path: Path, *, what: str = "file") -> Any:
    """``read_json`` after :func:`check_regular_file`."""
    return read_json(check_regular_file(path, what=what))


def _int(v: Any, where: Path, key: str, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _bad(where, f"{key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def check_shape_classes(meta: dict[str, Any], where: Path) -> tuple[int, tuple[int, ...]]:
    """Validated ``(num_classes, input_shape)`` of a manifest or sidecar dict."""
    for key in ("num_classes", "input_shape"):
        if key not in meta:
            raise _bad(where, f"missing key {key!r}")
    k = _int(meta["num_classes"], where, "num_classes", minimum=2)
    shape = meta["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise _bad(where, f"'input_shape' must be a list [C, H, W], got {shape!r}")
    return k, tuple(_int(s, where, "input_shape", minimum=1) for s in shape)


def inside(folder: Path, rel: Any, where: Path, key: str) -> Path:
    """``folder / rel`` resolved, refusing non-strings, absolute paths and anything leaving ``folder``."""
    if not isinstance(rel, str) or not rel:
        raise _bad(where, f"{key!r} must be a relative path string, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise _bad(where, f"{key!r} = {rel!r} leaves the folder (absolute or '..')")
    full = (folder / p).resolve()
    if full != folder and folder not in full.parents:
        raise _bad(where, f"{key!r} = {rel!r} resolves outside the folder (a symlink?)")
    return full


def _sidecar_of(path: Path) -> Path:
    return path / SIDECAR if path.is_dir() else path


def read_victim_reference(folder: Path, ref: Any, where: Path) -> ModelRef:
    """The explicit victim reference ``{"path", "sha256"}`` (path relative to ``folder`` or absolute)."""
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str):
        raise _bad(where, f"'victim' must be {{'path': str, 'sha256': str}}, got {ref!r}")
    if not _HEX64.match(ref["sha256"]):
        raise _bad(where, "'victim.sha256' is not a sha256 hex digest")
    p = Path(ref["path"])
    full = (p if p.is_absolute() else folder / p).resolve()
    return ModelRef(name="victim", sidecar=_sidecar_of(full), sha256=ref["sha256"])


def _read_victim(folder: Path) -> Target:
    where = folder / SIDECAR
    meta = read_json_file(where, what="checkpoint sidecar")
    if not isinstance(meta, dict):
        raise _bad(where, "not a JSON object")
    k, shape = check_shape_classes(meta, where)
    meta = dict(meta, kind="victim")
    return Target(folder=folder, kind="victim", format=0, meta=meta, num_classes=k, input_shape=shape,
                  models={"victim": ModelRef("victim", where, meta.get("sha256"), meta.get("arch"))},
                  steps=[{"kind": "backend", "type": "model", "model": "victim"}])


def _weights(v: Any, n: int, where: Path) -> list[float] | None:
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) != n
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in v)
            or sum(v) <= 0):
        raise _bad(where, f"'weights' must be null or {n} non-negative numbers, not all zero; got {v!r}")
    return [float(w) for w in v]


def _read_v1(folder: Path, m: dict[str, Any], where: Path, t: Target) -> None:
    combine = m.get("combine", "mean_softmax")
    if combine != "mean_softmax":
        raise _bad(where, f"unknown combine {combine!r} (format 1 knows mean_softmax)")
    members = m.get("members")
    if not isinstance(members, list) or not members:
        raise _bad(where, f"'members' must be a non-empty list, got {members!r}")
    victim = None
    if m.get("victim") is not None and m.get("victim_sha256") is not None:
        victim = read_victim_reference(folder, {"path": m["victim"], "sha256": m["victim_sha256"]}, where)
    names = []
    for i, mem in enumerate(members):
        if not isinstance(mem, dict) or not isinstance(mem.get("checkpoint"), str):
            raise _bad(where, f"members[{i}] must be an object with a 'checkpoint' path")
        name = mem.get("name") if isinstance(mem.get("name"), str) else f"member{i}"
        if name in t.models:
            name = f"{name}#{i}"
        ck = Path(mem["checkpoint"])
        if victim is not None and ck.is_absolute() and ck.resolve() in (victim.sidecar, victim.sidecar.parent):
            ref = ModelRef(name, victim.sidecar, victim.sha256, mem.get("arch"))  # the explicit victim
        else:
            ref = ModelRef(name, _sidecar_of(inside(folder, mem["checkpoint"], where, f"members[{i}].checkpoint")),
                           None, mem.get("arch"))
        t.models[name] = ref
        names.append(name)
    t.steps = [{"kind": "backend", "type": "ensemble", "models": names,
                "weights": _weights(m.get("weights"), len(names), where)}]


def _read_v2(folder: Path, m: dict[str, Any], where: Path, t: Target) -> None:
    from misleader.oracle.steps import STEP_KINDS

    t.seed = _int(m.get("seed"), where, "seed")
    victim = read_victim_reference(folder, m["victim"], where) if m.get("victim") is not None else None
    models = m.get("models", {})
    if not isinstance(models, dict):
        raise _bad(where, f"'models' must be an object name -> {{checkpoint, sha256}}, got {models!r}")
    for name, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _HEX64.match(entry["sha256"]):
            raise _bad(where, f"models[{name!r}] must hold 'checkpoint' and a sha256 hex 'sha256'")
        sidecar = _sidecar_of(inside(folder, entry.get("checkpoint"), where, f"models[{name!r}].checkpoint"))
        t.models[name] = ModelRef(name, sidecar, entry["sha256"], entry.get("arch"))
    if victim is not None:
        t.models.setdefault("victim", victim)
        if t.models["victim"] is not victim:
            raise _bad(where, "a model is named 'victim', which is reserved for the victim reference")
    steps = m.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _bad(where, f"'steps' must be a non-empty list, got {steps!r}")
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or s.get("kind") not in STEP_KINDS or not isinstance(s.get("type"), str):
            raise _bad(where, f"steps[{i}] must be an object with 'kind' in {STEP_KINDS} and a 'type' string")
    t.steps = [dict(s) for s in steps]


def read_target(path: str | Path) -> Target:
    """Parse and validate the target folder ``path`` (victim or defense, format 1 or 2).

    Raises:
        MisleaderError: not a target folder, wrong types, missing keys, paths leaving the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MisleaderError(f"{folder} is not a folder: pass a folder written by `misleader train-victim` or "
                             "`misleader defend`")
    folder = folder.resolve()
    where = folder / MANIFEST
    if not where.exists():
        if (folder / SIDECAR).exists():
            return _read_victim(folder)
        raise MisleaderError(f"{folder} is neither a victim folder (model.json) nor a defense folder (manifest.json): "
                             "pass a folder written by `misleader train-victim` or `misleader defend`")
    m = read_json_file(where, what="manifest")
    if not isinstance(m, dict):
        raise _bad(where, "not a JSON object")
    if m.get("kind", "defense") != "defense":
        raise _bad(where, f"'kind' must be 'defense', got {m.get('kind')!r}")
    fmt = m.get("format", 1)
    if fmt not in (1, 2) or isinstance(fmt, bool):
        raise _bad(where, f"unknown manifest format {fmt!r} (this version reads 1 and 2)")
    if not isinstance(m.get("dataset"), str):
        raise _bad(where, f"'dataset' must be a string, got {m.get('dataset')!r}")
    k, shape = check_shape_classes(m, where)
    t = Target(folder=folder, kind="defense", format=fmt, meta=dict(m, kind="defense"), num_classes=k,
               input_shape=shape)
    (_read_v1 if fmt == 1 else _read_v2)(folder, m, where, t)
    return t


__all__ = ["MANIFEST", "PUBLIC_KEYS", "ModelRef", "Target", "check_regular_file", "check_shape_classes", "inside",
           "read_json_file", "read_target", "read_victim_reference"]
