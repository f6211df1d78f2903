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
``recipe``, ``batch_size``, ``lr``, ``split``), ``victim_seeds``, ``defenses`` (``name``, ``label``, ``base`` and
the defense's settings, e.g. MISLEADER's ``members``, ``epochs``, ``preset``, ``member_settings``,
``batch_size``), ``attacks`` (``name``, ``label``, ``labels`` soft|hard, ``pool``, ``budgets``,
``clone_archs``, ``options``, ``eval_every``, ``seeds``, ``defenses``: only against these defense labels), ``clone_archs``, ``budgets`` (default for
attacks), ``seeds``, ``device``, ``resources`` (per stage: ``num_cpus``, ``num_gpus``; Ray).
Budgets may be written ``5000``, ``"100k"``, ``"2M"``.

The ``undefended`` defense is the victim folder itself (nothing is trained).

Sweeps: a defense setting written ``{sweep: [v1, v2, ...]}`` stands for one defense per value (each value
checked like a plain setting; several swept settings: their cartesian product, keys in sorted order),
labelled ``LABEL(key=value, ...)`` (``LABEL`` defaults to the name) and carrying ``group`` (``LABEL``) and
``sweep`` (the key/value pairs) so that the report draws one curve per group. Each point's stage id is the
id of the same entry written out by hand.

Composition: ``base: LABEL`` names another (expanded) defense of the spec whose folder the builder wraps
(``base=``); its stage depends on that defense's stage, whose id enters its config (a base that is the
``undefended`` victim adds nothing: it is the builder's default). Unknown labels, a sweep's group label and
cycles are refused. Specs without ``sweep``/``base`` keep their stage ids.

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

import collections.abc
import copy
import difflib
import hashlib
import inspect
import json
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

#: stage name -> sub-folder of the output folder
STAGE_DIRS: dict[str, str] = {"victim": "victims", "defense": "defenses", "attack": "attacks"}
STAGES: tuple[str, ...] = ("victim", "defense", "attack")

LABEL_MODES: tuple[str, ...] = ("soft", "hard")
#: what the oracle answers for each label mode (an attack's ``requires`` lists the modes it can use)
LABEL_OUTPUTS: dict[str, str] = {"soft": "probs", "hard": "labels"}
#: the baseline defense: the victim folder itself (nothing is trained, see :func:`expand`)
UNDEFENDED = "undefended"
#: arguments every defense builder receives from the runner (not settings of a spec entry)
BUILDER_ARGS = frozenset({"victim", "base", "out", "data_dir", "seed", "device", "force"})


@dataclass(frozen=True)
class DefenseParams:
    """What a spec entry of a registered defense may set, derived from its builder (never listed here).

    The signature read is the builder's ``check_params`` attribute when it has one (a callable taking
    the builder's settings as keyword arguments and raising :class:`MisleaderError` on a bad value,
    without training anything), else the builder itself (through ``functools.wraps``).

    Attributes:
        keys: settings the builder accepts (``None``: it takes any keyword, e.g. ``post``'s ``op`` and
            ``**op_params``; its ``check_params`` then refuses the wrong ones).
        required: settings without a default.
        hints: type hints of the settings (checked by :func:`check_value`).
        check: the builder's ``check_params`` (``None``: none).
    """

    keys: frozenset[str] | None
    required: frozenset[str]
    hints: dict[str, Any]
    check: Callable[..., None] | None


def _registered_defenses() -> Any:
    from misleader.defenses import DEFENSES  # importing the package registers every defense

    return DEFENSES


def defense_params(name: str) -> DefenseParams:
    """The settings of the registered defense ``name`` (see :class:`DefenseParams`)."""
    from misleader.defenses.base import defense_spec

    _registered_defenses()
    dspec = defense_spec(name)
    check = getattr(dspec.build, "check_params", None)
    fn = inspect.unwrap(check if check is not None else dspec.build)
    params = inspect.signature(fn).parameters.values()
    named = {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.name not in BUILDER_ARGS}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError) as exc:  # an annotation that cannot be resolved: values are not type-checked
        log.debug("type hints of the %s builder are not resolvable (%s)", name, exc)
        hints = {}
    return DefenseParams(
        keys=None if open_ended else frozenset(named),  # ``**params``: its check_params (or the builder) judges
        required=frozenset(n for n, p in named.items() if p.default is p.empty),
        hints={k: v for k, v in hints.items() if k in named},
        check=check,
    )


def _defense_builder(name: str) -> Callable[..., Any]:
    from misleader.defenses.base import defense_spec

    _registered_defenses()
    return defense_spec(name).build


def _known_defenses() -> list[str]:
    return _registered_defenses().names()


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_value(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint of a builder parameter; returns it (a scalar given for a
    sequence becomes a one-item list).

    Handles ``int``, ``float``, ``str``, ``bool``, ``None``, unions, paths, sequences and mappings
    (recursively); any other hint is accepted as is.

    Example:
        >>> check_value(3, int, "epochs")
        3
        >>> check_value("lenet5", list[str], "members")
        ['lenet5']
        >>> check_value("abc", int | None, "epochs")
        Traceback (most recent call last):
        ...
        misleader.errors.MisleaderError: epochs: expected int | None, got 'abc'
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return check_value(value, arm, where)
            except MisleaderError:
                continue
        raise _fail(where, f"expected {_hint_name(hint)}, got {value!r}")
    ok: bool | None = None
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str or hint in (Path, os.PathLike):
        ok = isinstance(value, str)
    elif origin in (list, tuple, Sequence, collections.abc.Sequence) or hint in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            return [check_value(v, item, f"{where}[{j}]") for j, v in enumerate(value)]
        return [check_value(value, item, where)]  # a scalar for a one-item list
    elif origin in (dict, Mapping, collections.abc.Mapping) or hint in (dict, Mapping):
        ok = isinstance(value, Mapping)
    if ok is False:
        raise _fail(where, f"expected {_hint_name(hint)}, got {value!r}")
    return value


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
    """One (expanded) defense entry of a spec.

    Attributes:
        name: the registered defense.
        label: display label (unique in the spec; not part of any stage id).
        settings: the builder's settings (swept keys hold one value each).
        group: the entry's own label when it was expanded from a sweep (the report draws one curve per
            group), else ``None``.
        sweep: ``((key, value), ...)`` of the swept settings, in key order (empty without a sweep).
        base: label of the defense whose folder this one wraps (``base=`` of the builder); ``None``: the victim.
    """

    name: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    sweep: tuple[tuple[str, Any], ...] = ()
    base: str | None = None


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
    #: only against these defenses (labels, or a sweep's group label); ``None``: every defense. Not part of
    #: a run's id (it selects runs, it does not change them)
    defenses: tuple[str, ...] | None = None


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
_ATTACK_KEYS = {"name", "label", "labels", "pool", "budgets", "clone_archs", "options", "eval_every", "seeds",
                "defenses"}
_RESOURCE_KEYS = {"num_cpus", "num_gpus"}


def _fail(where: str, msg: str) -> MisleaderError:
    return MisleaderError(f"{where}: {msg}")



def _registered_name(entry: dict[str, Any], where: str, *, known: list[str], kind: str) -> str:
    """``entry["name"]``, checked against the registry's ``known`` names (one-line error with a hint)."""
    if "name" not in entry:
        raise _fail(where, f"missing required key 'name' (one of {', '.join(known)})")
    name = _str(entry["name"], f"{where}.name")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(f"{where}.name", f"unknown {kind} {name!r}{hint}; choose one of {', '.join(known)}")
    return name

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


def _positive(obj: Any, where: str) -> float:
    value = float(_number(obj, where))
    if not value > 0 or value == float("inf"):
        raise _fail(where, f"must be a positive finite number, got {obj!r}")
    return value


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


def _attack_registry() -> Any:
    import misleader.attacks  # noqa: F401  (importing the package registers every attack)
    from misleader.attacks.base import ATTACKS

    return ATTACKS


def _option_type_ok(value: Any, default: Any) -> bool:
    """Whether an option value has the type of the attack's default for it (``None`` defaults take anything)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def _check_attack_options(name: str, options: dict[str, Any], where: str) -> None:
    """Build the attack once (cheap: settings only) so that a typo or a wrong type fails now, not after
    hours of training: unknown options and presets are the attack's own errors; each value must have the
    type of the attack's default for it."""
    from misleader.attacks.harness import make_attack

    def build(opts: dict[str, Any]) -> Any:
        try:
            return make_attack(name, copy.deepcopy(opts))  # make_attack may normalise the dict in place
        except (MisleaderError, TypeError, ValueError) as exc:
            raise _fail(where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    defaults = build({"preset": options["preset"]} if "preset" in options else {}).config()
    for key, value in options.items():
        if key in defaults and not _option_type_ok(value, defaults[key]):
            raise _fail(f"{where}.{key}", f"expected {type(defaults[key]).__name__} like the default "
                                          f"{defaults[key]!r}, got {value!r}")
    build(options)


def _check_pool(pool: str, *, attack_cls: Any, dataset: str, where: str) -> None:
    """A pool name the harness can load (:func:`misleader.attacks.pools.load_pool`), for an attack that uses one."""
    from misleader.attacks.pools import ALIASES
    from misleader.data import DATASETS

    if not getattr(attack_cls, "needs_pool", False):
        raise _fail(where, f"attack {attack_cls.name!r} uses no pool of images: remove `pool:`")
    if pool == dataset:
        raise _fail(where, f"pool {pool!r} is the victim's own dataset, whose training part holds the defender's "
                           "data: use `pool: attacker` (the disjoint attacker split)")
    known = ["attacker", *ALIASES, *DATASETS.names()]
    if pool not in known and not pool.startswith("npz:"):
        close = difflib.get_close_matches(pool, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(where, f"unknown pool {pool!r}{hint}; choose one of {', '.join(known)} or npz:PATH")


#: keys of a spec's defense entry that are not builder settings
_ENTRY_KEYS = frozenset({"name", "label", "base"})


def _sweep_value(value: Any) -> bool:
    """Whether a setting is written as a sweep, ``{sweep: [v1, v2, ...]}``."""
    return isinstance(value, Mapping) and set(value) == {"sweep"}


def _fmt_sweep_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def sweep_label(label: str, sweep: Sequence[tuple[str, Any]]) -> str:
    """The label of one point of a sweep.

    Example:
        >>> sweep_label("randp", [("epsilon", 0.1)])
        'randp(epsilon=0.1)'
        >>> sweep_label("rs", [("beta", 0.7), ("gamma", 0.4)])
        'rs(beta=0.7, gamma=0.4)'
    """
    return f"{label}({', '.join(f'{k}={_fmt_sweep_value(v)}' for k, v in sweep)})"


def _expand_sweeps(d: dict[str, Any], where: str) -> list[tuple[dict[str, Any], tuple[tuple[str, Any], ...]]]:
    """The entries a defense entry stands for: one per point of the cartesian product of its swept settings
    (key order, then the values' order as written), each with its ``((key, value), ...)``; ``[(d, ())]``
    without a sweep."""
    import itertools

    keys = sorted(k for k, v in d.items() if k not in _ENTRY_KEYS and _sweep_value(v))
    if not keys:
        return [(d, ())]
    values = []
    for k in keys:
        vals = d[k]["sweep"]
        if not isinstance(vals, (list, tuple)) or not vals:
            raise _fail(f"{where}.{k}.sweep", f"expected a non-empty list of values, got {vals!r}")
        if any(_sweep_value(v) for v in vals):
            raise _fail(f"{where}.{k}.sweep", "a sweep value cannot itself be a sweep")
        if len({canonical_json(v) for v in vals}) != len(vals):
            raise _fail(f"{where}.{k}.sweep", f"has repeated values {list(vals)}")
        values.append(list(vals))
    return [({**d, **dict(zip(keys, point))}, tuple(zip(keys, point))) for point in itertools.product(*values)]


def _check_bases(defenses: list[DefenseSpec], *, where: dict[str, str]) -> None:
    """Every ``base:`` names another defense of the spec, and following bases never loops back."""
    by_label = {d.label: d for d in defenses}
    groups = {d.group for d in defenses if d.group is not None and d.group not in by_label}
    for d in defenses:
        if d.base is None:
            continue
        w = f"{where[d.label]}.base"
        if d.base in groups:
            members = ", ".join(x.label for x in defenses if x.group == d.base)
            raise _fail(w, f"{d.base!r} is a sweep; name one of its defenses ({members})")
        if d.base not in by_label:
            close = difflib.get_close_matches(d.base, list(by_label), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(w, f"unknown defense label {d.base!r}{hint}; choose one of {', '.join(by_label)}")
        chain, cur = [d.label], d
        while cur.base is not None:
            cur = by_label[cur.base]
            if cur.label in chain:
                loop = " -> ".join([*chain[chain.index(cur.label):], cur.label])
                raise _fail(w, f"the bases form a cycle ({loop}): one defense must wrap the victim")
            chain.append(cur.label)


def base_order(defenses: Sequence[DefenseSpec]) -> list[DefenseSpec]:
    """``defenses`` with every base before the defenses that wrap it (otherwise in the spec's order)."""
    by_label = {d.label: d for d in defenses}
    done: dict[str, DefenseSpec] = {}

    def visit(d: DefenseSpec) -> None:
        if d.label in done:
            return
        if d.base is not None:
            visit(by_label[d.base])
        done[d.label] = d

    for d in defenses:
        visit(d)
    return list(done.values())


def _defense_settings(dname: str, d: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings of a spec's defense entry, checked against the registered builder (keys, types, its
    ``check_params``)."""
    params = defense_params(dname)
    if params.keys is not None:
        _check_keys(d, params.keys | _ENTRY_KEYS, where)
    missing = sorted(params.required - set(d))
    if missing:
        raise _fail(where, f"defense {dname!r} needs {', '.join(missing)}")
    settings = {}
    for k in sorted(set(d) - _ENTRY_KEYS):
        if d[k] is None:
            continue
        settings[k] = check_value(d[k], params.hints[k], f"{where}.{k}") if k in params.hints else d[k]
    for k in ("epochs", "batch_size"):  # counts: positive whatever the builder's annotation says
        if isinstance(settings.get(k), int):
            _int(settings[k], f"{where}.{k}", minimum=1)
    if "members" in settings:
        settings["members"] = [_arch(a, f"{where}.members[{j}]")
                               for j, a in enumerate(_list(settings["members"], f"{where}.members"))]
    if params.check is not None:
        try:
            params.check(**settings)
        except MisleaderError as exc:
            raise _fail(where, str(exc)) from None
    return settings


# --------------------------------------------------------------------------- parsing


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec file.

    Raises:
        MisleaderError: missing file, invalid YAML, or an invalid spec (the message names the key).
    """
    path = Path(path)
    hint = "pass a YAML file such as experiments/demo.yaml"
    if path.is_dir():
        raise MisleaderError(f"spec {path} is a folder: {hint}")
    if path.exists() and not path.is_file():
        raise MisleaderError(f"spec {path} is not a regular file (a FIFO or device?): {hint}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MisleaderError(f"spec {path} not found: {hint}") from None
    except OSError as exc:
        raise MisleaderError(f"cannot read spec {path} ({exc.strerror or exc}): {hint}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MisleaderError(f"spec {path} is not a UTF-8 text file (a binary file?): {hint}") from None
    if "\x00" in text:
        raise MisleaderError(f"spec {path} contains NUL bytes (a binary file?): {hint}")
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise MisleaderError(f"{path} is not valid YAML: {first}") from None
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
        lr=None if v.get("lr") is None else _positive(v["lr"], f"{w}.lr"),
        split=split,
    )

    # defenses
    defenses: list[DefenseSpec] = []
    placed: list[tuple[str, str]] = []  # (where its entry is, expanded label): error messages
    for i, d in enumerate(_list(top["defenses"], f"{source}: defenses", allow_scalar=False)):
        w = f"{source}: defenses[{i}]"
        d = {"name": d} if isinstance(d, str) else _mapping(d, w)
        dname = _registered_name(d, w, known=_known_defenses(), kind="defense")
        if dname == UNDEFENDED:
            _check_keys(d, {"name", "label"}, w)
        label = _str(d.get("label", dname), f"{w}.label")
        base = None if d.get("base") is None else _str(d["base"], f"{w}.base")
        if base is not None and "base" not in inspect.signature(inspect.unwrap(_defense_builder(dname))).parameters:
            raise _fail(f"{w}.base", f"defense {dname!r} cannot wrap another defense: remove `base:`")
        points = _expand_sweeps(d, w)
        for point, sweep in points:
            settings = {} if dname == UNDEFENDED else _defense_settings(dname, point, w)
            plabel = sweep_label(label, sweep) if sweep else label
            defenses.append(DefenseSpec(name=dname, label=plabel, settings=settings, base=base,
                                        group=label if sweep else None, sweep=sweep))
            placed.append((w, plabel))
    _unique_labels(placed, "defense")
    _check_bases(defenses, where=dict((lab, w) for w, lab in placed))

    clone_archs = tuple(_arch(a, f"{source}: clone_archs[{j}]")
                        for j, a in enumerate(_list(top.get("clone_archs", [victim.arch]), f"{source}: clone_archs")))
    budgets = tuple(parse_budget(b, f"{source}: budgets[{j}]")
                    for j, b in enumerate(_list(top["budgets"], f"{source}: budgets"))) if "budgets" in top else ()

    # attacks
    attacks: list[AttackSpec] = []
    attack_registry = _attack_registry()
    known = attack_registry.names()
    for i, a in enumerate(_list(top["attacks"], f"{source}: attacks", allow_scalar=False)):
        w = f"{source}: attacks[{i}]"
        a = {"name": a} if isinstance(a, str) else _mapping(a, w)
        _check_keys(a, _ATTACK_KEYS, w)
        aname = _registered_name(a, w, known=known, kind="attack")
        attack_cls = attack_registry.get(aname)
        usable = [m for m in LABEL_MODES if LABEL_OUTPUTS[m] in attack_cls.requires]
        labels = a.get("labels", "soft" if "soft" in usable else usable[0])
        if labels not in LABEL_MODES:
            raise _fail(f"{w}.labels", f"must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
        if labels not in usable:
            raise _fail(f"{w}.labels", f"attack {aname!r} cannot work with {labels} labels: use "
                                       f"{' or '.join(usable)}")
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
        if pool is not None:
            _check_pool(pool, attack_cls=attack_cls, dataset=dataset, where=f"{w}.pool")
        if getattr(attack_cls, "needs_pool", False):
            try:  # the pool the harness will use (its choice sees the dataset name only)
                used = pool if pool is not None else attack_cls.choose_pool({"dataset": dataset})
            except MisleaderError as exc:
                raise _fail(f"{w}.pool", str(exc).replace("--pool", "`pool:`")) from None
            if used == "attacker" and split is not None and split.get("attacker_fraction") == 0:
                raise _fail(f"{w}.pool", "the attacker split is empty (victim.split.attacker_fraction: 0): name "
                                         "another pool")
        eval_every = None if a.get("eval_every") is None else parse_budget(a["eval_every"], f"{w}.eval_every")
        a_seeds = None
        if "seeds" in a:
            a_seeds = tuple(_int(s, f"{w}.seeds[{j}]", minimum=0) for j, s in enumerate(_list(a["seeds"], f"{w}.seeds")))
            if len(set(a_seeds)) != len(a_seeds):
                raise _fail(f"{w}.seeds", f"has repeated values {list(a_seeds)}")
        a_defenses = None
        if "defenses" in a:
            names = {d.label for d in defenses} | {d.group for d in defenses if d.group is not None}
            a_defenses = tuple(_str(x, f"{w}.defenses[{j}]") for j, x in enumerate(_list(a["defenses"], f"{w}.defenses")))
            for j, lab in enumerate(a_defenses):
                if lab not in names:
                    near = difflib.get_close_matches(lab, sorted(names), n=1)
                    raise _fail(f"{w}.defenses[{j}]", f"no defense labelled {lab!r}"
                                + (f"; did you mean {near[0]!r}?" if near else f"; the labels are {', '.join(sorted(names))}"))
        default_label = aname if labels == "soft" else f"{aname}-hard"
        attacks.append(AttackSpec(name=aname, label=_str(a.get("label", default_label), f"{w}.label"), labels=labels,
                                  pool=pool, budgets=a_budgets, clone_archs=a_clones, options=options,
                                  eval_every=eval_every, seeds=a_seeds, defenses=a_defenses))
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
    index = {d.label: i for i, d in enumerate(spec.defenses)}
    for vseed, vst in victims.items():
        by_label: dict[str, Stage] = {}
        for d in base_order(spec.defenses):  # a base before the defenses that wrap it
            i = index[d.label]
            bst = None if d.base is None else by_label[d.base]
            if bst is not None and bst.virtual:  # wrapping the undefended victim is wrapping the victim
                bst = None
            cfg = _drop_none({"defense": d.name, "settings": d.settings, "seed": vseed, "victim": vst.id,
                              "base": None if bst is None else bst.id})
            if d.name == UNDEFENDED:
                cfg = {"defense": "undefended", "victim": vst.id}
            did = stage_id(f"{d.name}-s{vseed}", cfg)
            arch = "+".join(d.settings.get("members", [])) or (bst.meta["defense_arch"] if bst else spec.victim.arch)
            meta = {**vst.meta, "defense": d.name, "defense_label": d.label, "defense_id": did, "defense_arch": arch}
            if d.group is not None:
                meta.update(defense_group=d.group, defense_sweep={k: v for k, v in d.sweep})
            if d.base is not None:
                meta["defense_base"] = d.base
            virtual = d.name == UNDEFENDED
            folder = vst.folder if virtual else f"defenses/{did}"
            parents = (vst.id,) if bst is None else (vst.id, bst.id)
            st = Stage("defense", did, cfg, meta, parents, folder, virtual=virtual,
                       resources=spec.resources_for("defense"))
            add(st, f"defenses[{i}] {d.label} (victim seed {vseed})")
            by_label[d.label] = st
            defense_stages.append((d, st))

    for d, dst in defense_stages:
        for i, a in enumerate(spec.attacks):
            if a.defenses is not None and d.label not in a.defenses and d.group not in a.defenses:
                continue
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
    "AttackSpec", "BUILDER_ARGS", "DefenseParams", "DefenseSpec", "ExperimentSpec", "LABEL_OUTPUTS", "Resources",
    "STAGES", "STAGE_DIRS", "Stage", "VictimSpec", "canonical_json", "config_hash", "expand", "load_spec",
    "UNDEFENDED", "base_order", "check_value", "defense_params", "parse_budget", "parse_spec", "spec_to_yaml",
    "stage_id", "sweep_label",
]
