"""Experiment specs: a YAML grid of victims x defenses x attacks x clones x budgets x seeds.

A spec (``experiments/*.yaml``) is validated strictly: an unknown key, a wrong type or an unknown
name is a :class:`~misleader.errors.MisleaderError` naming the key path and the allowed values.
:func:`expand` turns it into :class:`Stage` objects in three levels, each with a stable id:

``victim(dataset, arch, recipe, epochs, seed)`` -> ``defense(victim, name, settings, seed)`` ->
``attack(defense, attack, settings, clone_arch, budget, labels, pool, seed)``

An id is a readable prefix plus the first 10 hex digits of the sha256 of the canonical JSON of the
stage's config (keys sorted, ``None`` values dropped, the parent's id included), so the same
config always maps to the same folder (``out/victims/ID``, ``out/defenses/ID``, ``out/attacks/ID``)
and every attack run that needs a victim or a defense shares the one trained copy. Display labels,
devices, data folders and resources are *not* part of an id: renaming a defense does not retrain it.

Seeds: each seed in ``victim_seeds`` (default ``[0]``) gets its own victim and its own defenses
(trained with that seed); each seed in ``seeds`` (or in an attack's own ``seeds``, for an expensive
attack) is one attack run per (victim seed, defense, attack, clone, budget). Tables report mean ±
std over all attack runs of a cell, i.e. over ``len(victim_seeds) * len(seeds)`` runs. The paper's
std is over attack runs against one trained defense, which is the default (``victim_seeds: [0]``).

Top-level keys: ``name``, ``description``, ``dataset`` (a registered name or ``npz:PATH``;
``{data_dir}`` in it is replaced by the data folder in use), ``victim`` (``arch``, ``epochs``,
``recipe``, ``batch_size``, ``lr``, ``split``), ``victim_seeds``, ``defenses`` (``name``, ``label`` and
the defense's settings, e.g. MISLEADER's ``members``, ``epochs``, ``preset``, ``member_settings``,
``batch_size``), ``attacks`` (``name``, ``label``, ``labels`` soft|hard, ``pool``, ``budgets``,
``clone_archs``, ``options``, ``eval_every``, ``seeds``), ``clone_archs``, ``budgets`` (default for
attacks), ``seeds``, ``device``, ``resources`` (per stage: ``num_cpus``, ``num_gpus``; Ray).
Budgets may be written ``5000``, ``"100k"``, ``"2M"``.

The ``undefended`` defense is the victim folder itself (nothing is trained).

Example (the keys; see ``experiments/demo.yaml`` for a complete file)::

    name: demo
    dataset: digits
    victim: {arch: lenet5, epochs: 30}
    defenses:
      - name: undefended
      - {name: misleader, members: [lenet5, lenet5_half, lenet5_fifth], epochs: 20}
    attacks:
      - {name: knockoff, labels: hard, pool: attacker, budgets: [2000]}
      - {name: dfme, budgets: [100k], options: {preset: cpu}}
    clone_archs: [lenet5]
    seeds: [0, 1]
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from misleader.errors import MisleaderError

#: stage name -> sub-folder of the output folder
STAGE_DIRS: dict[str, str] = {"victim": "victims", "defense": "defenses", "attack": "attacks"}
STAGES: tuple[str, ...] = ("victim", "defense", "attack")

#: attacks the harness (misleader.attacks.harness.run_attack) knows by name
KNOWN_ATTACKS: tuple[str, ...] = ("knockoff", "dfme", "dfms-hl")
LABEL_MODES: tuple[str, ...] = ("soft", "hard")


@dataclass(frozen=True)
class DefenseKind:
    """How the runner trains a defense of this kind.

    Attributes:
        name: the spec's ``name``.
        api: ``"module:function"`` called as ``fn(victim=DIR, out=DIR, data_dir=..., seed=..., device=...,
            **settings)``; ``None`` for ``undefended`` (the victim folder is the target).
        keys: the settings a spec entry may give (passed to ``api`` as keyword arguments).
        required: settings that must be given.
    """

    name: str
    api: str | None
    keys: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()


DEFENSE_KINDS: dict[str, DefenseKind] = {}


def register_defense_kind(kind: DefenseKind) -> DefenseKind:
    """Make a defense usable in specs (later defenses register themselves here)."""
    if kind.name in DEFENSE_KINDS:
        raise ValueError(f"defense kind {kind.name!r} is already registered")
    DEFENSE_KINDS[kind.name] = kind
    return kind


register_defense_kind(DefenseKind("undefended", None))
register_defense_kind(DefenseKind(
    "misleader", "misleader.defenses.misleader:defend_misleader",
    keys=frozenset({"members", "epochs", "preset", "member_settings", "batch_size"}),
    required=frozenset({"members", "epochs"}),
))


def _register_retrained_kinds() -> None:
    """MeCo, ACT and DNF: their settings are the parameters of their builders' ``check_params``."""
    import importlib
    import inspect

    for name in ("meco", "act", "dnf"):
        build = getattr(importlib.import_module(f"misleader.defenses.{name}"), f"defend_{name}")
        register_defense_kind(DefenseKind(name, f"misleader.defenses.{name}:defend_{name}",
                                          keys=frozenset(inspect.signature(build.check_params).parameters)))


_register_retrained_kinds()


# --------------------------------------------------------------------------- spec objects


@dataclass(frozen=True)
class Resources:
    """Per-run resources for the Ray executor (and threads for the local process pool)."""

    num_cpus: float = 1
    num_gpus: float = 0

    def to_dict(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


@dataclass(frozen=True)
class VictimSpec:
    arch: str
    epochs: int
    recipe: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    split: dict[str, Any] | None = None


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackSpec:
    name: str
    label: str
    labels: str = "soft"
    pool: str | None = None
    budgets: tuple[int, ...] = ()
    clone_archs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    eval_every: int | None = None
    seeds: tuple[int, ...] | None = None  #: overrides the spec's ``seeds`` for this attack


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated spec. Build it with :func:`load_spec` or :func:`parse_spec`."""

    name: str
    dataset: str
    victim: VictimSpec
    defenses: tuple[DefenseSpec, ...]
    attacks: tuple[AttackSpec, ...]
    clone_archs: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    victim_seeds: tuple[int, ...] = (0,)
    budgets: tuple[int, ...] = ()
    description: str = ""
    device: str = "auto"
    resources: dict[str, Resources] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())


@dataclass(frozen=True)
class Stage:
    """One run of the grid.

    Attributes:
        stage: ``victim``, ``defense`` or ``attack``.
        id: stable id (readable prefix + config hash).
        config: what the run computes (hashed into ``id``; written to ``config.yaml``).
        meta: labels for reports (dataset, defense label, attack label, clone arch, budget, seeds ...).
        parents: ids of the stages it needs (victim for a defense, defense for an attack).
        folder: path relative to the output folder (``victims/ID`` ...; an ``undefended`` defense
            points at its victim's folder).
        virtual: nothing to run (the ``undefended`` defense).
        resources: for the Ray executor.
    """

    stage: str
    id: str
    config: dict[str, Any]
    meta: dict[str, Any]
    parents: tuple[str, ...]
    folder: str
    virtual: bool = False
    resources: Resources = Resources()

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "id": self.id, "folder": self.folder, "parents": list(self.parents),
                "virtual": self.virtual, "config": self.config, "meta": self.meta,
                "resources": self.resources.to_dict()}


# --------------------------------------------------------------------------- validation helpers

_TOP_KEYS = {"name", "description", "dataset", "victim", "victim_seeds", "defenses", "attacks", "clone_archs",
             "budgets", "seeds", "device", "resources"}
_VICTIM_KEYS = {"arch", "epochs", "recipe", "batch_size", "lr", "split"}
_SPLIT_KEYS = {"seed", "val_fraction", "attacker_fraction"}
_ATTACK_KEYS = {"name", "label", "labels", "pool", "budgets", "clone_archs", "options", "eval_every", "seeds"}
_RESOURCE_KEYS = {"num_cpus", "num_gpus"}


def _fail(where: str, msg: str) -> MisleaderError:
    return MisleaderError(f"{where}: {msg}")


def _check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = sorted(allowed)
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(where, f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}")


def _mapping(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise _fail(where, f"expected a mapping (key: value), got {type(obj).__name__}")
    return dict(obj)


def _str(obj: Any, where: str) -> str:
    if not isinstance(obj, str) or not obj:
        raise _fail(where, f"expected a non-empty string, got {obj!r}")
    return obj


def _int(obj: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise _fail(where, f"expected an integer, got {obj!r}")
    if minimum is not None and obj < minimum:
        raise _fail(where, f"must be >= {minimum}, got {obj}")
    return obj


def _number(obj: Any, where: str, *, minimum: float = 0.0) -> float:
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        raise _fail(where, f"expected a number, got {obj!r}")
    if obj < minimum:
        raise _fail(where, f"must be >= {minimum}, got {obj}")
    return obj


def _list(obj: Any, where: str, *, allow_scalar: bool = True) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise _fail(where, "must not be empty")
        return list(obj)
    if allow_scalar and obj is not None:
        return [obj]
    raise _fail(where, f"expected a list, got {obj!r}")


_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9}


def parse_budget(obj: Any, where: str = "budget") -> int:
    """A query budget: an integer, or a string like ``"100k"``, ``"2M"``, ``"1.5M"``, ``"2e6"``."""
    if isinstance(obj, bool):
        raise _fail(where, f"expected a query count, got {obj!r}")
    if isinstance(obj, int):
        value = obj
    elif isinstance(obj, float) and obj.is_integer():
        value = int(obj)
    elif isinstance(obj, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)\s*", obj.lower())
        if not m:
            raise _fail(where, f"cannot read {obj!r} as a query count: write e.g. 5000, '100k' or '2M'")
        from decimal import Decimal

        num = Decimal(m.group(1)) * _SUFFIX.get(m.group(2), 1)  # exact, unlike float
        if num != num.to_integral_value():
            raise _fail(where, f"{obj!r} is not a whole number of queries")
        value = int(num)
    else:
        raise _fail(where, f"expected a query count like 5000 or '2M', got {obj!r}")
    if value < 1:
        raise _fail(where, f"a budget must be >= 1 query, got {value}")
    return value


def _arch(obj: Any, where: str) -> str:
    name = _str(obj, where)
    from misleader.models import MODELS

    if name not in MODELS:
        try:
            MODELS.get(name)
        except MisleaderError as exc:
            raise _fail(where, str(exc)) from None
    return name


def _unique_labels(items: Iterable[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for where, label in items:
        if label in seen:
            raise _fail(where, f"{what} label {label!r} is already used by {seen[label]}: give a distinct `label:`")
        seen[label] = where


def _known_attacks() -> list[str]:
    names = set(KNOWN_ATTACKS)
    try:  # attacks registered later (plugins) are accepted too
        from misleader.attacks import ATTACKS

        names.update(n.replace("_", "-") for n in ATTACKS.names())
    except Exception:  # noqa: BLE001 - the attacks package may be mid-development
        pass
    return sorted(names)


def _check_attack_options(name: str, options: dict[str, Any], where: str) -> None:
    """Build the attack once (cheap: settings only) so that a typo fails now, not after hours of training."""
    try:
        from misleader.attacks.harness import make_attack
    except ImportError:  # the harness is not installed: the runner will report it
        return
    try:
        make_attack(name, options)
    except MisleaderError as exc:
        if "unknown attack" in str(exc):  # registered under another name or not yet available
            return
        raise _fail(where, str(exc)) from None


# --------------------------------------------------------------------------- parsing


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec file.

    Raises:
        MisleaderError: missing file, invalid YAML, or an invalid spec (the message names the key).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MisleaderError(f"spec {path} not found: pass a YAML file such as experiments/demo.yaml") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MisleaderError(f"{path} is not valid YAML: {exc}") from None
    return parse_spec(obj, source=str(path))


def parse_spec(obj: Any, *, source: str = "spec") -> ExperimentSpec:
    """Validate a spec given as a mapping (the parsed YAML).

    Args:
        obj: the mapping.
        source: how to name it in error messages (the file name).
    """
    top = _mapping(obj, source)
    _check_keys(top, _TOP_KEYS, source)
    for key in ("dataset", "victim", "defenses", "attacks"):
        if key not in top:
            raise _fail(source, f"missing required key {key!r}")
    name = _str(top.get("name", Path(source).stem), f"{source}: name")
    dataset = _str(top["dataset"], f"{source}: dataset")
    if not dataset.startswith("npz:"):
        from misleader.data import DATASETS

        if dataset not in DATASETS:
            try:
                DATASETS.get(dataset)
            except MisleaderError as exc:
                raise _fail(f"{source}: dataset", f"{exc} (or npz:PATH)") from None

    # victim
    w = f"{source}: victim"
    v = _mapping(top["victim"], w)
    _check_keys(v, _VICTIM_KEYS, w)
    for key in ("arch", "epochs"):
        if key not in v:
            raise _fail(w, f"missing required key {key!r}")
    split = None
    if v.get("split") is not None:
        split = _mapping(v["split"], f"{w}.split")
        _check_keys(split, _SPLIT_KEYS, f"{w}.split")
        from misleader.data import SplitSpec

        try:
            SplitSpec(**split)
        except (TypeError, ValueError) as exc:
            raise _fail(f"{w}.split", str(exc)) from None
    recipe = v.get("recipe")
    if recipe is not None:
        from misleader.training.train import RECIPES

        if recipe not in RECIPES:
            raise _fail(f"{w}.recipe", f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    victim = VictimSpec(
        arch=_arch(v["arch"], f"{w}.arch"),
        epochs=_int(v["epochs"], f"{w}.epochs", minimum=1),
        recipe=recipe,
        batch_size=None if v.get("batch_size") is None else _int(v["batch_size"], f"{w}.batch_size", minimum=1),
        lr=None if v.get("lr") is None else float(_number(v["lr"], f"{w}.lr")),
        split=split,
    )

    # defenses
    defenses: list[DefenseSpec] = []
    for i, d in enumerate(_list(top["defenses"], f"{source}: defenses", allow_scalar=False)):
        w = f"{source}: defenses[{i}]"
        d = {"name": d} if isinstance(d, str) else _mapping(d, w)
        if "name" not in d:
            raise _fail(w, f"missing required key 'name' (one of {', '.join(sorted(DEFENSE_KINDS))})")
        dname = _str(d["name"], f"{w}.name")
        if dname not in DEFENSE_KINDS:
            close = difflib.get_close_matches(dname, list(DEFENSE_KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(f"{w}.name", f"unknown defense {dname!r}{hint}; choose one of {', '.join(sorted(DEFENSE_KINDS))}")
        kind = DEFENSE_KINDS[dname]
        _check_keys(d, kind.keys | {"name", "label"}, w)
        missing = sorted(kind.required - set(d))
        if missing:
            raise _fail(w, f"defense {dname!r} needs {', '.join(missing)}")
        settings = {k: d[k] for k in sorted(kind.keys) if d.get(k) is not None}
        if "members" in settings:
            settings["members"] = [_arch(a, f"{w}.members[{j}]")
                                   for j, a in enumerate(_list(settings["members"], f"{w}.members"))]
        if "epochs" in settings:
            _int(settings["epochs"], f"{w}.epochs", minimum=1)
        if "batch_size" in settings:
            _int(settings["batch_size"], f"{w}.batch_size", minimum=1)
        if "member_settings" in settings:
            ms = _list(settings["member_settings"], f"{w}.member_settings", allow_scalar=False)
            settings["member_settings"] = [_mapping(m or {}, f"{w}.member_settings[{j}]") for j, m in enumerate(ms)]
            if len(ms) != len(settings.get("members", ms)):
                raise _fail(f"{w}.member_settings", f"give one mapping per member ({len(settings['members'])}), "
                                                    f"got {len(ms)}")
        label = _str(d.get("label", dname), f"{w}.label")
        defenses.append(DefenseSpec(name=dname, label=label, settings=settings))
    _unique_labels(((f"{source}: defenses[{i}]", d.label) for i, d in enumerate(defenses)), "defense")

    clone_archs = tuple(_arch(a, f"{source}: clone_archs[{j}]")
                        for j, a in enumerate(_list(top.get("clone_archs", [victim.arch]), f"{source}: clone_archs")))
    budgets = tuple(parse_budget(b, f"{source}: budgets[{j}]")
                    for j, b in enumerate(_list(top["budgets"], f"{source}: budgets"))) if "budgets" in top else ()

    # attacks
    attacks: list[AttackSpec] = []
    known = _known_attacks()
    for i, a in enumerate(_list(top["attacks"], f"{source}: attacks", allow_scalar=False)):
        w = f"{source}: attacks[{i}]"
        a = {"name": a} if isinstance(a, str) else _mapping(a, w)
        _check_keys(a, _ATTACK_KEYS, w)
        if "name" not in a:
            raise _fail(w, f"missing required key 'name' (one of {', '.join(known)})")
        aname = _str(a["name"], f"{w}.name")
        if aname not in known:
            close = difflib.get_close_matches(aname, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(f"{w}.name", f"unknown attack {aname!r}{hint}; choose one of {', '.join(known)}")
        labels = a.get("labels", "soft")
        if labels not in LABEL_MODES:
            raise _fail(f"{w}.labels", f"must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
        if "budgets" in a:
            a_budgets = tuple(parse_budget(b, f"{w}.budgets[{j}]") for j, b in enumerate(_list(a["budgets"], f"{w}.budgets")))
        elif budgets:
            a_budgets = budgets
        else:
            raise _fail(w, "no query budget: give `budgets:` here or at the top level")
        a_clones = (tuple(_arch(c, f"{w}.clone_archs[{j}]") for j, c in enumerate(_list(a["clone_archs"], f"{w}.clone_archs")))
                    if "clone_archs" in a else clone_archs)
        options = _mapping(a.get("options") or {}, f"{w}.options")
        _check_attack_options(aname, options, f"{w}.options")
        pool = None if a.get("pool") is None else _str(a["pool"], f"{w}.pool")
        eval_every = None if a.get("eval_every") is None else parse_budget(a["eval_every"], f"{w}.eval_every")
        a_seeds = None
        if "seeds" in a:
            a_seeds = tuple(_int(s, f"{w}.seeds[{j}]", minimum=0) for j, s in enumerate(_list(a["seeds"], f"{w}.seeds")))
            if len(set(a_seeds)) != len(a_seeds):
                raise _fail(f"{w}.seeds", f"has repeated values {list(a_seeds)}")
        default_label = aname if labels == "soft" else f"{aname}-hard"
        attacks.append(AttackSpec(name=aname, label=_str(a.get("label", default_label), f"{w}.label"), labels=labels,
                                  pool=pool, budgets=a_budgets, clone_archs=a_clones, options=options,
                                  eval_every=eval_every, seeds=a_seeds))
    _unique_labels(((f"{source}: attacks[{i}]", a.label) for i, a in enumerate(attacks)), "attack")

    seeds = tuple(_int(s, f"{source}: seeds[{j}]", minimum=0) for j, s in enumerate(_list(top.get("seeds", [0]), f"{source}: seeds")))
    victim_seeds = tuple(_int(s, f"{source}: victim_seeds[{j}]", minimum=0)
                         for j, s in enumerate(_list(top.get("victim_seeds", [0]), f"{source}: victim_seeds")))
    for what, vals in (("seeds", seeds), ("victim_seeds", victim_seeds)):
        if len(set(vals)) != len(vals):
            raise _fail(f"{source}: {what}", f"has repeated values {list(vals)}")

    resources: dict[str, Resources] = {}
    if top.get("resources") is not None:
        r = _mapping(top["resources"], f"{source}: resources")
        _check_keys(r, STAGES, f"{source}: resources")
        for stage, val in r.items():
            wr = f"{source}: resources.{stage}"
            val = _mapping(val, wr)
            _check_keys(val, _RESOURCE_KEYS, wr)
            resources[stage] = Resources(num_cpus=_number(val.get("num_cpus", 1), f"{wr}.num_cpus"),
                                         num_gpus=_number(val.get("num_gpus", 0), f"{wr}.num_gpus"))
    device = _str(top.get("device", "auto"), f"{source}: device")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise _fail(f"{source}: device", f"use auto, cpu or cuda, got {device!r}")
    return ExperimentSpec(
        name=name, description=str(top.get("description") or ""), dataset=dataset, victim=victim,
        defenses=tuple(defenses), attacks=tuple(attacks), clone_archs=clone_archs, seeds=seeds,
        victim_seeds=victim_seeds, budgets=budgets, device=device, resources=resources, raw=dict(top),
    )


# --------------------------------------------------------------------------- expansion


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON of ``obj`` with ``None`` values dropped (what ids hash)."""
    return json.dumps(_drop_none(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(config: Mapping[str, Any], *, length: int = 10) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:length]


def _slug(text: str) -> str:
    if text.startswith("npz:"):
        text = "npz-" + Path(text[4:]).stem
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-").lower() or "x"


def _budget_str(b: int) -> str:
    for div, suf in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if b >= div and b % div == 0:
            return f"{b // div}{suf}"
    return str(b)


def stage_id(prefix: str, config: Mapping[str, Any]) -> str:
    return f"{_slug(prefix)}-{config_hash(config)}"


def expand(spec: ExperimentSpec) -> list[Stage]:
    """Every run of the grid, parents before children (victims, then defenses, then attacks).

    Raises:
        MisleaderError: two entries of the spec describe the same runs (identical configs).
    """
    stages: list[Stage] = []
    seen: dict[str, str] = {}

    def add(st: Stage, where: str) -> None:
        if st.id in seen:
            raise MisleaderError(f"{where} and {seen[st.id]} describe the same run ({st.stage} {st.id}): remove one")
        seen[st.id] = where
        stages.append(st)

    victims: dict[int, Stage] = {}
    for vseed in spec.victim_seeds:
        vs = spec.victim
        cfg = {"dataset": spec.dataset, "arch": vs.arch, "epochs": vs.epochs, "recipe": vs.recipe,
               "batch_size": vs.batch_size, "lr": vs.lr, "split": vs.split, "seed": vseed}
        cfg = _drop_none(cfg)
        vid = stage_id(f"{spec.dataset}-{vs.arch}-s{vseed}", cfg)
        meta = {"spec": spec.name, "dataset": spec.dataset, "victim_arch": vs.arch, "victim_id": vid,
                "victim_seed": vseed}
        victims[vseed] = Stage("victim", vid, cfg, meta, (), f"victims/{vid}", resources=spec.resources_for("victim"))
        add(victims[vseed], f"victim (seed {vseed})")

    defense_stages: list[tuple[DefenseSpec, Stage]] = []
    for vseed, vst in victims.items():
        for i, d in enumerate(spec.defenses):
            cfg = _drop_none({"defense": d.name, "settings": d.settings, "seed": vseed, "victim": vst.id})
            if d.name == "undefended":
                cfg = {"defense": "undefended", "victim": vst.id}
            did = stage_id(f"{d.name}-s{vseed}", cfg)
            arch = "+".join(d.settings.get("members", [])) or spec.victim.arch
            meta = {**vst.meta, "defense": d.name, "defense_label": d.label, "defense_id": did, "defense_arch": arch}
            virtual = DEFENSE_KINDS[d.name].api is None
            folder = vst.folder if virtual else f"defenses/{did}"
            st = Stage("defense", did, cfg, meta, (vst.id,), folder, virtual=virtual,
                       resources=spec.resources_for("defense"))
            add(st, f"defenses[{i}] (victim seed {vseed})")
            defense_stages.append((d, st))

    for _, dst in defense_stages:
        for i, a in enumerate(spec.attacks):
            for clone in a.clone_archs:
                for budget in a.budgets:
                    for seed in a.seeds if a.seeds is not None else spec.seeds:
                        cfg = _drop_none({"attack": a.name, "labels": a.labels, "pool": a.pool, "options": a.options,
                                          "clone_arch": clone, "budget": budget, "eval_every": a.eval_every,
                                          "seed": seed, "target": dst.id})
                        prefix = f"{a.name}-{a.labels}-{clone}-{_budget_str(budget)}-s{seed}"
                        aid = stage_id(prefix, cfg)
                        meta = {**dst.meta, "attack": a.name, "attack_label": a.label, "labels": a.labels,
                                "pool": a.pool, "clone_arch": clone, "budget": budget, "seed": seed, "attack_id": aid}
                        st = Stage("attack", aid, cfg, meta, (dst.id,), f"attacks/{aid}",
                                   resources=spec.resources_for("attack"))
                        add(st, f"attacks[{i}] ({dst.meta['defense_label']}, {clone}, budget {budget}, seed {seed})")
    return stages


def spec_to_yaml(spec: ExperimentSpec) -> str:
    """The spec as given (validated), for ``out/spec.yaml``."""
    return yaml.safe_dump(spec.raw, sort_keys=False)


__all__ = [
    "AttackSpec", "DEFENSE_KINDS", "DefenseKind", "DefenseSpec", "ExperimentSpec", "KNOWN_ATTACKS", "Resources",
    "STAGES", "STAGE_DIRS", "Stage", "VictimSpec", "canonical_json", "config_hash", "expand", "load_spec",
    "parse_budget", "parse_spec", "register_defense_kind", "spec_to_yaml", "stage_id",
]
