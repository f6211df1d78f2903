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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from misleader.errors import MisleaderError
from misleader.oracle import Oracle
from misleader.registry import Registry

#: ``evaluate(clone, *, queries=int, **fields) -> None`` supplied by the harness: it measures the clone
#: on the test split and records a history row (``queries``, the attack's ``fields``, test accuracy,
#: fidelity) that only the harness sees. It returns nothing, so an attack cannot steer by it.
Evaluator = Callable[..., None]


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

    def pool_data(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(pool_x, pool_y)`` given to :meth:`prepare`.

        Raises:
            MisleaderError: no pool was given.
        """
        x = getattr(self, "_pool_x", None)
        if x is None:
            raise MisleaderError(f"attack {self.name!r} needs a pool of attacker images: call "
                                 "attack.prepare(pool_x=..., pool_y=...) before run() (run_attack does this)")
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


def apply_preset(attack: Attack, *, presets: dict[str, Any], preset: str, overrides: dict[str, Any],
                 casts: dict[str, Callable[[Any], Any]] | None = None) -> Any:
    """Resolve ``presets[preset]`` (a frozen config dataclass) with ``overrides`` onto ``attack``.

    Unknown presets or option names raise :class:`~misleader.errors.MisleaderError`; each field named in
    ``casts`` that is overridden (and not None) becomes a tuple of ``casts[field]`` applied to its items
    (YAML gives lists). The config's fields become attributes of ``attack`` (so :meth:`Attack.config`
    lists them), ``attack.preset`` the preset name and ``attack._cfg`` the config. Returns the config.
    """
    if preset not in presets:
        raise MisleaderError(f"unknown {attack.name} preset {preset!r}; choose one of: {', '.join(presets)}")
    known = {f.name for f in fields(presets[preset])}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MisleaderError(
            f"unknown {attack.name} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
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
