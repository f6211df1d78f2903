"""What the gateway asks of a client beyond its key: proof-of-work bits and the detector policy.

``--pow-bits N`` gives :class:`FixedBits`; ``--pow DIR`` reads ``DIR/pow.json``
(``{"bits": N}``, optionally ``"ttl"``; calibrated meters will add their own keys and a
:class:`PowPolicy` of their own).

``--detector S --policy P`` gives a :class:`DetectorPolicy`: every row of every request is scored by
the same detector (a SAME folder, :mod:`misleader.detect.same`; any :class:`RowScorer`), a row is
*flagged* when its score is above the detector's calibrated threshold, and the policy decides what
the flagged rows get:

* ``log``: the normal answer (scores only recorded);
* ``gate``: the answer of another folder ``--gate-folder X`` (e.g. MISLEADER's ensemble or a
  labels-only defense built on the same victim), computed on the flagged rows only;
* ``refuse``: no answer. The request is still answered (200) for its other rows: a flagged row is
  refused *per row* (JSON: ``null`` in ``outputs`` and its index in ``refused``; ``.npy``: a row of NaN
  for probabilities, ``-1`` for labels; header ``X-Refused-Rows``). A request-level 403 would refuse
  almost every benign batch (at a 5% false-positive rate per row, 96% of 64-row batches hold a
  flagged row). Refused rows are **released, not counted**: a key's ``used`` is the rows it was
  answered, so "answered == used == logged rows" stays exact; the query log row records how many
  rows were flagged.

A client is never told which or how many of its rows were flagged under ``log`` and ``gate`` (a gate
that announced itself would stop misleading); only ``refuse`` shows, by refusing.

Per-key statistics (rows scored, score sum, rows flagged: :class:`misleader.detect.same.ClientStats`)
live in the store, updated in the same transaction that counts the rows, so they are exact across
threads, replicas and restarts. A key is a *flagged client* (``/metrics``, status page) once it has
at least ``flag_min_rows`` scored rows and more than ``flag_fraction`` of them flagged (a server
knob, not from the paper, which gives no per-client decision; its default 0.5 is ten times the
detector's default 5% false-positive rate).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from misleader.errors import MisleaderError


class PowPolicy(Protocol):
    """Bits a client must pay for a batch."""

    ttl: float

    def bits(self, *, key_id: str, x: torch.Tensor) -> int: ...

    def describe(self) -> str:
        """One line for the status page."""


@dataclass(frozen=True)
class FixedBits:
    """The same difficulty for every batch."""

    n: int
    ttl: float = 300.0

    def bits(self, *, key_id: str, x: torch.Tensor) -> int:
        return self.n

    def describe(self) -> str:
        return f"{self.n} bits per batch"


def load_pow_policy(path: str | Path) -> PowPolicy:
    """The policy of a PoW config folder (``pow.json``)."""
    from misleader.oracle.manifest import read_json_file
    from misleader.pow.puzzle import check_bits

    cfg = read_json_file(Path(path) / "pow.json", what="PoW config")
    try:
        return FixedBits(check_bits(cfg["bits"]), float(cfg.get("ttl", 300.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise MisleaderError(f"{path}/pow.json: {exc}: write {{\"bits\": N}} with N in [0, 40]") from None


POLICIES = ("log", "gate", "refuse")


class RowScorer(Protocol):
    """A detector: ``score(x) -> (N,)`` (higher: more suspicious) and its calibrated ``threshold``."""

    threshold: float | None

    def score(self, x: torch.Tensor) -> torch.Tensor: ...


class DetectorPolicy:
    """One detector, its threshold and the policy applied to flagged rows.

    Args:
        scorer: the detector (e.g. a :class:`misleader.detect.same.SameDetector`).
        policy: ``log``, ``gate`` or ``refuse`` (see the module docstring).
        gate: the served model answering flagged rows (``gate`` only).
        threshold: overrides the scorer's calibrated threshold.
        flag_fraction: a key is flagged when more than this fraction of its scored rows were flagged ...
        flag_min_rows: ... once it has at least this many scored rows.
        name: shown on the status page (e.g. the detector folder's name).
    """

    def __init__(self, *, scorer: RowScorer, policy: str = "log", gate: Any = None, threshold: float | None = None,
                 flag_fraction: float = 0.5, flag_min_rows: int = 100, name: str = "detector") -> None:
        if policy not in POLICIES:
            raise MisleaderError(f"unknown detector policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if (policy == "gate") != (gate is not None):
            raise MisleaderError("the gate policy needs a gate folder (--gate-folder X), and only it takes one")
        thr = scorer.threshold if threshold is None else threshold
        if thr is None:
            raise MisleaderError("the detector has no calibrated threshold: calibrate it (detect same train does)")
        if not 0.0 <= flag_fraction <= 1.0:
            raise MisleaderError(f"--flag-fraction must be in [0, 1], got {flag_fraction}")
        self.scorer, self.policy, self.gate = scorer, policy, gate
        self.threshold = float(thr)
        self.flag_fraction, self.flag_min_rows = float(flag_fraction), int(flag_min_rows)
        self.name = name
        self._lock = threading.Lock()

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (N,) float32, flagged (N,) bool)`` of a batch (N, *input_shape). Blocking."""
        with self._lock:
            s = self.scorer.score(x).detach().float().flatten().cpu()
        if s.shape[0] != x.shape[0]:
            raise RuntimeError(f"the detector gave {s.shape[0]} scores for {x.shape[0]} rows")
        return s, s > self.threshold

    def client_flagged(self, stats: Any) -> bool:
        """Whether a key with these :class:`~misleader.detect.same.ClientStats` is a flagged client."""
        return stats.queries >= self.flag_min_rows and stats.flagged_fraction > self.flag_fraction

    def describe(self) -> str:
        """One line for the status page."""
        then = {"log": "logged only", "gate": f"answered by {getattr(self.gate, 'folder', self.gate)!s}",
                "refuse": "refused (released, not counted)"}[self.policy]
        return (f"{self.name}: policy {self.policy}, threshold {self.threshold:.5g}, flagged rows {then}; "
                f"a key is flagged above {self.flag_fraction:.0%} flagged rows (after {self.flag_min_rows})")


def load_detector_policy(detector: str | Path, *, served_folder: str | Path, policy: str = "log",
                         gate_folder: str | Path | None = None, output: str = "probs", device: str = "cpu",
                         flag_fraction: float = 0.5, flag_min_rows: int = 100) -> DetectorPolicy:
    """A :class:`DetectorPolicy` from a SAME detector folder, checked against the served folder's victim.

    The detector scores with its own victim reference (the victim behind ``served_folder``; its sha256
    must match); the gate folder must take the same inputs and classes and be built on the same victim.
    """
    from misleader.detect.same import load_detector, read_detector_meta
    from misleader.oracle.manifest import read_target

    served = read_target(served_folder)
    vref = served.models.get("victim")
    meta = read_detector_meta(detector)
    if vref is not None and (meta.get("victim") or {}).get("sha256") != vref.sha256:
        raise MisleaderError(f"--detector {detector} was trained for another victim than the one {served_folder} "
                             "serves: train one for it with `misleader detect same train`")
    if list(meta.get("input_shape") or []) != list(served.input_shape):
        raise MisleaderError(f"--detector {detector} takes inputs {meta.get('input_shape')}, the served folder "
                             f"{list(served.input_shape)}")
    gate = None
    if gate_folder is not None:
        from misleader.serving.model import ServedModel

        gt = read_target(gate_folder)
        if tuple(gt.input_shape) != tuple(served.input_shape) or int(gt.num_classes) != int(served.num_classes):
            raise MisleaderError(f"--gate-folder {gate_folder} takes {list(gt.input_shape)} with {gt.num_classes} "
                                 f"classes; the served folder {list(served.input_shape)} with {served.num_classes}")
        gv = gt.models.get("victim")
        if vref is not None and gv is not None and gv.sha256 != vref.sha256:
            raise MisleaderError(f"--gate-folder {gate_folder} was built on another victim than {served_folder}")
        gate = ServedModel(gate_folder, output=output, device=device)  # type: ignore[arg-type]
    scorer = load_detector(detector, device=device)
    return DetectorPolicy(scorer=scorer, policy=policy, gate=gate, flag_fraction=flag_fraction,
                          flag_min_rows=flag_min_rows, name=Path(detector).name)


__all__ = ["DetectorPolicy", "FixedBits", "POLICIES", "PowPolicy", "RowScorer", "load_detector_policy",
           "load_pow_policy"]
