"""The attack contract: an attack sees only an :class:`~misleader.oracle.Oracle`, never the victim.

``Attack.run(oracle, budget=..., clone=..., generator=...) -> AttackResult``. The attack must
never make the oracle answer more than ``budget`` rows, and its own accounting must equal the
oracle's count (tests check both). Evaluation of the clone on the test set is the *harness's* job:
an attack may call the optional ``evaluate(clone, *, queries=n, **fields)`` callback it is given (to
record a history row against the query count); the callback returns nothing: the measurement goes to
the harness's history only, so no attack can select or tune on the test set.

**Attacker data (pools).** An attack that queries natural images (Knockoff Nets) or needs a proxy
set (DFMS-HL) sets the class attribute ``needs_pool = True``. The harness then builds the pool with
:func:`misleader.attacks.pools.load_pool` (spec from ``--pool``, else :meth:`Attack.choose_pool`,
which returns ``default_pool``, ``"attacker"`` = the target's in-distribution attacker split, unless
a subclass overrides it) and calls ``attack.prepare(pool_x=..., pool_y=...)`` *before* ``run``:
``pool_x`` is uint8 (N, C, H, W) already converted to the oracle's ``input_shape``, ``pool_y`` the
pool's *own* int64 labels (N,) or ``None`` (never the victim's answers). Inside ``run`` an attack
reads them with :meth:`Attack.pool_data`. Pools are not hyper-parameters: they are stored in
private attributes and stay out of :meth:`Attack.config`.

**Presets and the target's public description.** Attacks with named settings keep them in a
``presets`` dict of frozen config dataclasses; ``preset="auto"`` (the default) picks the one that suits
the target's scale in :meth:`Attack.choose_preset`. Before ``run`` the harness calls
:meth:`Attack.adapt_to_target` with the target's *public* description only (:data:`PUBLIC_META_KEYS`:
dataset name, input shape, class count; never the defense's manifest), which resolves ``"auto"`` and
lets an attack use public knowledge about the dataset (e.g. DFME's image range). Option values
(``-o key=value``, YAML ``options``) are type-checked against the config's fields
(:func:`check_options`): a wrong type or an unknown name is a one-line :class:`MisleaderError`.
"""

from __future__ import annotations

import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.oracle import Oracle
from misleader.registry import Registry

#: ``evaluate(clone, *, queries=int, **fields) -> None`` supplied by the harness: it measures the clone
#: on the test split and records a history row (``queries``, the attack's ``fields``, test accuracy,
#: fidelity) that only the harness sees. It returns nothing, so an attack cannot steer by it.
Evaluator = Callable[..., None]

#: what an attack may learn about its target before attacking (public knowledge of the API)
PUBLIC_META_KEYS: tuple[str, ...] = ("dataset", "input_shape", "num_classes")


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Only the public keys (:data:`PUBLIC_META_KEYS`) of a target's description."""
    return {k: meta[k] for k in PUBLIC_META_KEYS if k in meta}


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
        clone: the trained clone (in [0, 1] input space, returns logits).
        queries_used: rows the oracle answered during the attack (``oracle.queries_used`` delta).
        history: rows ``{"queries": int, "clone_accuracy": float, "fidelity": float, ...}``.
        seconds: wall time of the attack.
        extra: attack-specific numbers (e.g. DFME's iteration count).
    """

    clone: nn.Module
    queries_used: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """Base class. Subclasses store hyper-parameters (paper defaults) in ``__init__`` (keyword-only).

    Class attributes:
        name: registry name.
        requires: the oracle output modes the attack can work with.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset({"probs", "labels"})
    #: True: the harness loads a pool of attacker images and calls :meth:`prepare` before :meth:`run`.
    needs_pool: ClassVar[bool] = False
    #: pool spec used when the caller names none (see :func:`misleader.attacks.pools.load_pool`).
    default_pool: ClassVar[str] = "attacker"
    #: named settings (frozen config dataclasses); empty for attacks without presets
    presets: ClassVar[dict[str, Any]] = {}
    #: ``(small, large)``: the presets :meth:`choose_preset` picks by target scale (``None``: the first preset)
    scale_presets: ClassVar[tuple[str, str] | None] = None
    #: option -> item cast for tuple options given as lists (YAML)
    option_casts: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    @classmethod
    def choose_preset(cls, target_meta: dict[str, Any]) -> str:
        """The preset ``preset="auto"`` resolves to for a target (``target_meta``: public keys only,
        empty when unknown): with :attr:`scale_presets` = ``(small, large)``, ``small`` for a 1-channel
        target of at most 32x32 pixels (the MNIST family) and ``large`` otherwise (also when unknown);
        without it, the first preset.

        Example:
            >>> class A(Attack):
            ...     presets, scale_presets = {"paper": None, "small": None}, ("small", "paper")
            ...     def run(self, *a, **k): ...
            >>> A.choose_preset({"input_shape": [1, 28, 28]}), A.choose_preset({"input_shape": [3, 32, 32]})
            ('small', 'paper')
        """
        if cls.scale_presets is None:
            return next(iter(cls.presets))
        shape = target_meta.get("input_shape")
        small = shape is not None and len(shape) == 3 and int(shape[0]) == 1 and max(int(s) for s in shape[1:]) <= 32
        return cls.scale_presets[0] if small else cls.scale_presets[1]

    def _configure(self, preset: str, overrides: dict[str, Any]) -> Any:
        """Apply ``presets[preset]`` (``"auto"``: :meth:`choose_preset` of the target known so far) with
        type-checked ``overrides``; remembers both so :meth:`adapt_to_target` can re-resolve ``"auto"``."""
        self._preset_arg, self._overrides = preset, dict(overrides)
        name = self.choose_preset(getattr(self, "_target", {})) if preset == "auto" else preset
        return apply_preset(self, presets=self.presets, preset=name, overrides=dict(overrides),
                            casts=self.option_casts)

    def adapt_to_target(self, meta: dict[str, Any]) -> None:
        """Learn the target's public description before :meth:`run` (the harness calls this).

        Only :data:`PUBLIC_META_KEYS` are kept. With ``preset="auto"`` the preset is chosen again for
        this target (:meth:`choose_preset`), the user's options still applied on top.

        Args:
            meta: the target's description; keys other than dataset, input_shape, num_classes are ignored.
        """
        self._target = public_meta(meta)
        if getattr(self, "_preset_arg", None) == "auto":
            self._cfg = self._configure("auto", self._overrides)

    @classmethod
    def choose_pool(cls, target_meta: dict[str, Any]) -> str:
        """The pool spec to use against a target when the caller names none (default: ``default_pool``).

        Override to pick a proxy from another distribution, e.g. ``"fashion-mnist"`` for an MNIST target.
        """
        return cls.default_pool

    def prepare(self, *, pool_x: torch.Tensor, pool_y: torch.Tensor | None = None) -> None:
        """Hand the attacker's own data to the attack (called by the harness before :meth:`run`).

        Args:
            pool_x: uint8 (N, C, H, W) images in the oracle's ``input_shape``.
            pool_y: int64 (N,) the pool's own labels (e.g. adaptive Knockoff's arms), or ``None``.
        """
        if pool_x.dtype != torch.uint8 or pool_x.dim() != 4 or len(pool_x) == 0:
            raise ValueError(f"pool_x must be a non-empty uint8 (N, C, H, W) tensor, got {pool_x.dtype} "
                             f"{tuple(pool_x.shape)}")
        if pool_y is not None and (pool_y.shape != (len(pool_x),) or pool_y.is_floating_point()):
            raise ValueError(f"pool_y must be integer labels of shape ({len(pool_x)},), got {pool_y.dtype} "
                             f"{tuple(pool_y.shape)}")
        self._pool_x = pool_x
        self._pool_y = pool_y

    def pool_data(self, *, input_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(pool_x, pool_y)`` given to :meth:`prepare`; with ``input_shape`` (the oracle's), the images'
        shape is checked against it.

        Raises:
            MisleaderError: no pool was given, or its images do not match ``input_shape``.
        """
        x = getattr(self, "_pool_x", None)
        if x is None:
            raise MisleaderError(f"attack {self.name!r} needs a pool of attacker images: call "
                                 "attack.prepare(pool_x=..., pool_y=...) before run() (run_attack does this)")
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise MisleaderError(f"pool images {tuple(x.shape[1:])} do not match the oracle's input "
                                 f"{tuple(input_shape)}: convert them with misleader.attacks.pools.convert_images")
        return x, getattr(self, "_pool_y", None)

    @abstractmethod
    def run(
        self,
        oracle: Oracle,
        *,
        budget: int,
        clone: nn.Module,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        evaluate: Evaluator | None = None,
        eval_every: int | None = None,
    ) -> AttackResult:
        """Extract ``oracle`` into ``clone`` with at most ``budget`` queries."""

    def check_oracle(self, oracle: Oracle, budget: int) -> None:
        if oracle.output not in self.requires:
            raise ValueError(f"{self.name} needs an oracle with output in {sorted(self.requires)}, got {oracle.output!r}")
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if oracle.remaining is not None and oracle.remaining < budget:
            raise ValueError(f"budget {budget} exceeds what the oracle has left ({oracle.remaining})")

    def config(self) -> dict[str, Any]:
        """Hyper-parameters (for run folders)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


ATTACKS: Registry[Attack] = Registry("attack")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "a list of " + {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(
            args[0], str(args[0]))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``); raises TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, bool):
        raise TypeError
    if hint is int:
        if isinstance(value, int) or isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    return value


def check_options(attack: str, config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Type-check ``overrides`` against the fields of the config dataclass ``config_cls``.

    Returns the values converted to the fields' types (a YAML int for a float field becomes a float, a
    list for a tuple field a tuple, a single number for a tuple field a 1-tuple).

    Raises:
        MisleaderError: an unknown option name, or a value of the wrong type (one line, naming the option,
            the expected type and the value given).
    """
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MisleaderError(f"unknown {attack} option(s) {', '.join(unknown)}; it accepts: {', '.join(sorted(known))}")
    out = {}
    for key, value in overrides.items():
        try:
            out[key] = _coerce(value, hints[key])
        except TypeError:
            raise MisleaderError(f"{attack} option {key} must be {_describe(hints[key])}, got {value!r}") from None
    return out


def check_range(attack: str, cfg: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                fractions: tuple[str, ...] = ()) -> None:
    """Range checks for a config's numeric fields (``fractions``: in [0, 1)); one-line MisleaderError."""
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise MisleaderError(f"{attack} option {name} must be > 0, got {getattr(cfg, name)!r}")
    for name in non_negative:
        if not getattr(cfg, name) >= 0:
            raise MisleaderError(f"{attack} option {name} must be >= 0, got {getattr(cfg, name)!r}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) < 1:
            raise MisleaderError(f"{attack} option {name} must be in [0, 1), got {getattr(cfg, name)!r}")


def apply_preset(attack: Attack, *, presets: dict[str, Any], preset: str, overrides: dict[str, Any],
                 casts: dict[str, Callable[[Any], Any]] | None = None) -> Any:
    """Resolve ``presets[preset]`` (a frozen config dataclass) with ``overrides`` onto ``attack``.

    Unknown presets or option names, and option values of the wrong type (:func:`check_options`), raise
    :class:`~misleader.errors.MisleaderError`; each field named in ``casts`` that is overridden (and not
    None) becomes a tuple of ``casts[field]`` applied to its items. The config's fields become attributes
    of ``attack`` (so :meth:`Attack.config` lists them), ``attack.preset`` the preset name and
    ``attack._cfg`` the config. Returns the config.
    """
    if preset not in presets:
        raise MisleaderError(f"unknown {attack.name} preset {preset!r}; choose one of: auto, {', '.join(presets)}")
    overrides = check_options(attack.name, type(presets[preset]), overrides)
    for key, cast in (casts or {}).items():
        if overrides.get(key) is not None:
            overrides[key] = tuple(cast(v) for v in overrides[key])
    cfg = replace(presets[preset], **overrides)
    attack.preset = preset
    for k, v in asdict(cfg).items():
        setattr(attack, k, v)
    attack._cfg = cfg
    return cfg


def register_attack(name: str):
    """Class decorator: register an :class:`Attack` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        ATTACKS.register(name)(cls)
        return cls

    return deco
