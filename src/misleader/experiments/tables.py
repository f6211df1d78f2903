"""Tables from saved results only: clone accuracy (Table-1 style) and utility (Table-2 style).

:func:`load_results` reads an experiment folder written by :mod:`misleader.experiments.runner`
(``victims/ID``, ``defenses/ID``, ``attacks/ID``, each with ``config.yaml`` and ``result.json``;
``history.json`` where present). Nothing is recomputed: every number in a table is a saved number
or a mean / standard deviation of saved numbers.

Cells are ``mean ± std`` in percent over the attack runs of the cell (every attack seed, times every
victim seed); std is the sample standard deviation (ddof 1); a single run shows its value alone.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from misleader.errors import MisleaderError
from misleader.utils import read_json

UNDEFENDED = "undefended"


# --------------------------------------------------------------------------- loading


@dataclass
class RunRecord:
    """One finished run as saved: ``config.yaml`` (config + meta), ``result.json`` and ``history.json``."""

    stage: str
    id: str
    folder: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    result: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Results:
    """Every finished run of an experiment folder, and the order of labels in its spec."""

    out: Path
    victims: dict[str, RunRecord]
    defenses: dict[str, RunRecord]
    attacks: list[RunRecord]
    defense_order: list[str]
    attack_order: list[str]
    clone_order: list[str]
    spec_name: str = ""
    unfinished: int = 0

    @property
    def datasets(self) -> list[str]:
        return _unique(r.meta.get("dataset", "?") for r in self.attacks) or _unique(
            r.meta.get("dataset", "?") for r in self.victims.values())


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for x in items:
        if x not in seen:
            seen.append(x)
    return seen


def _read_run(folder: Path, stage: str) -> RunRecord | None:
    if folder.name.startswith(".") or not (folder / "result.json").exists() or not (folder / "config.yaml").exists():
        return None
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise MisleaderError(f"{folder}/config.yaml is not valid YAML ({exc}): rerun `misleader run` to rewrite it") from None
    history: list[dict[str, Any]] = []
    if (folder / "history.json").exists():
        h = read_json(folder / "history.json")
        history = h if isinstance(h, list) else []
    return RunRecord(stage=stage, id=str(cfg.get("id", folder.name)), folder=folder, config=cfg.get("config", {}),
                     meta=cfg.get("meta", {}), result=read_json(folder / "result.json"), history=history)


def load_results(out: str | Path) -> Results:
    """Read every finished run under ``out``.

    Raises:
        MisleaderError: ``out`` holds no runs (not an experiment folder).
    """
    out = Path(out)
    if not out.is_dir():
        raise MisleaderError(f"{out} is not a folder: pass the --out folder of `misleader run` (or `demo`)")
    recs: dict[str, list[RunRecord]] = {}
    for stage, sub in (("victim", "victims"), ("defense", "defenses"), ("attack", "attacks")):
        d = out / sub
        found = [r for f in sorted(d.iterdir()) if f.is_dir() and (r := _read_run(f, stage))] if d.is_dir() else []
        recs[stage] = found
    if not any(recs.values()):
        raise MisleaderError(f"{out} holds no finished runs (victims/, defenses/, attacks/ with result.json): "
                             "run `misleader run SPEC --out DIR` first")
    defense_order: list[str] = []
    attack_order: list[str] = []
    clone_order: list[str] = []
    spec_name = ""
    unfinished = 0
    if (out / "index.json").exists():  # the spec's order of labels (the index is written by the runner)
        idx = read_json(out / "index.json")
        spec_name = idx.get("spec", "")
        for row in idx.get("runs", []):
            m = row.get("meta", {})
            if row.get("stage") == "defense":
                defense_order.append(m.get("defense_label"))
            if row.get("stage") == "attack":
                attack_order.append(m.get("attack_label"))
                clone_order.append(m.get("clone_arch"))
            if row.get("status") != "finished":
                unfinished += 1
    attacks = recs["attack"]
    defense_order = _unique(defense_order + [r.meta.get("defense_label") for r in attacks]
                            + [r.meta.get("defense_label") for r in recs["defense"]])
    if UNDEFENDED in defense_order:
        defense_order.remove(UNDEFENDED)
        defense_order.insert(0, UNDEFENDED)
    return Results(
        out=out,
        victims={r.id: r for r in recs["victim"]},
        defenses={r.id: r for r in recs["defense"]},
        attacks=attacks,
        defense_order=[d for d in defense_order if d is not None],
        attack_order=[a for a in _unique(attack_order + [r.meta.get("attack_label") for r in attacks]) if a is not None],
        clone_order=[c for c in _unique(clone_order + [r.meta.get("clone_arch") for r in attacks]) if c is not None],
        spec_name=spec_name,
        unfinished=unfinished,
    )


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof 1; 0 for one value) of ``n`` values."""

    n: int
    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return cls(0, math.nan, math.nan)
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return cls(len(vals), m, sd)

    def fmt(self, *, percent: bool = True, digits: int = 1, show_n: bool = False) -> str:
        if self.n == 0:
            return "–"
        k = 100.0 if percent else 1.0
        text = f"{self.mean * k:.{digits}f}"
        if self.n > 1:
            text += f" ± {self.std * k:.{digits}f}"
        if show_n:
            text += f" (n={self.n})"
        return text


@dataclass
class Table:
    """A rendered table: header, rows of strings, a caption (Markdown and CSV)."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    key_columns: int = 1  #: leading label columns (left-aligned); the others are numbers

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            return str(s).replace("|", "\\|")

        lines = ["| " + " | ".join(esc(h) for h in self.header) + " |",
                 "|" + "|".join("---" if i < self.key_columns else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        return buf.getvalue()

    def to_text(self) -> str:
        """Plain aligned text (for terminals)."""
        widths = [max(len(str(r[i])) for r in [self.header] + self.rows) for i in range(len(self.header))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(self.header), sep] + [fmt(r) for r in self.rows])


# --------------------------------------------------------------------------- cells


def _budget_str(b: int) -> str:
    for div, suf in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if b >= div and b % div == 0:
            return f"{b // div}{suf}"
    return f"{b:,}"


def attack_cells(res: Results) -> dict[tuple, list[RunRecord]]:
    """Group attack runs by (dataset, defense label, attack label, budget, clone arch)."""
    cells: dict[tuple, list[RunRecord]] = {}
    for r in res.attacks:
        m = r.meta
        key = (m.get("dataset"), m.get("defense_label"), m.get("attack_label"), int(m.get("budget", 0)),
               m.get("clone_arch"))
        cells.setdefault(key, []).append(r)
    return cells


def _row_keys(res: Results, cells: dict[tuple, list[RunRecord]]) -> list[tuple]:
    keys = _unique((k[0], k[1], k[2], k[3]) for k in cells)

    def order(k: tuple) -> tuple:
        ds, d, a, b = k
        di = res.defense_order.index(d) if d in res.defense_order else len(res.defense_order)
        ai = res.attack_order.index(a) if a in res.attack_order else len(res.attack_order)
        return (res.datasets.index(ds) if ds in res.datasets else 0, ai, di, b)

    return sorted(keys, key=order)


def _common_n(stats: Iterable[Stat]) -> int | None:
    ns = {s.n for s in stats if s.n}
    return ns.pop() if len(ns) == 1 else None


def clone_table(res: Results, *, metric: str = "clone_accuracy") -> Table:
    """Table-1 style: rows defense x attack (x budget), columns clone architectures, cells mean ± std (%).

    Args:
        metric: ``clone_accuracy`` (final clone), ``clone_accuracy_best`` (best over evaluations) or
            ``fidelity`` (agreement with the target on the test set).
    """
    cells = attack_cells(res)
    clones = [c for c in res.clone_order if any(k[4] == c for k in cells)]
    multi_ds = len(res.datasets) > 1
    stats = {k: Stat.of([r.result.get(metric) for r in runs]) for k, runs in cells.items()}
    n = _common_n(stats.values())
    header = (["Dataset"] if multi_ds else []) + ["Attack", "Defense", "Budget"] + clones
    rows = []
    for ds, d, a, b in _row_keys(res, cells):
        row = ([ds] if multi_ds else []) + [a, d, _budget_str(b)]
        for c in clones:
            s = stats.get((ds, d, a, b, c))
            row.append(s.fmt(show_n=n is None) if s else "–")
        rows.append(row)
    what = {
        "clone_accuracy": ("Clone accuracy (%), final clone", "final clone"),
        "clone_accuracy_best": ("Clone accuracy (%), best over evaluations (test-set selection, as in papers)",
                                "best over the run's evaluations on the test set: test-set model selection, "
                                "shown only for comparison with papers"),
        "fidelity": ("Fidelity (%): top-1 agreement of the final clone with the attacked model", "final clone"),
    }[metric]
    spread = f"mean ± std over {n} runs" if n and n > 1 else ("one run per cell" if n == 1 else "mean ± std over n runs")
    caption = (f"{what[0]}. Columns: clone (attacker) architecture; {what[1]}; {spread} "
               "(attack seeds × victim seeds; sample std). Lower is better for the defender.")
    t = Table(name={"clone_accuracy": "table1_clone_accuracy", "clone_accuracy_best": "table1_clone_accuracy_best",
                    "fidelity": "table1_fidelity"}[metric], title=what[0], header=header, rows=rows, caption=caption,
              key_columns=len(header) - len(clones))
    return t


def utility_rows(res: Results) -> list[dict[str, Any]]:
    """Per (dataset, defense label): Stats of defended test accuracy, victim test accuracy, fidelity, L1."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    labels: dict[tuple, dict[str, Any]] = {}

    def add(key: tuple, info: dict[str, Any], **vals: Any) -> None:
        g = groups.setdefault(key, {})
        labels.setdefault(key, info)
        for k, v in vals.items():
            if v is not None:
                g.setdefault(k, []).append(float(v))

    for d in res.defenses.values():
        m, r = d.meta, d.result
        victim = res.victims.get(m.get("victim_id"))
        vacc = r.get("victim_test_accuracy", victim.result.get("test_accuracy") if victim else None)
        add((m.get("dataset"), m.get("defense_label")), {"defense": m.get("defense"), "arch": m.get("defense_arch")},
            test_accuracy=r.get("test_accuracy"), victim_test_accuracy=vacc, fidelity=r.get("fidelity"),
            mean_l1_to_victim=r.get("mean_l1_to_victim"))
    # the undefended "defense" is its victim: fidelity 1 and L1 0 by definition
    undefended_victims = {(r.meta.get("dataset"), r.meta.get("victim_id")) for r in res.attacks
                          if r.meta.get("defense") == UNDEFENDED}
    for ds, vid in sorted(undefended_victims):
        v = res.victims.get(vid)
        if v is None:
            continue
        acc = v.result.get("test_accuracy")
        add((ds, UNDEFENDED), {"defense": UNDEFENDED, "arch": v.meta.get("victim_arch")}, test_accuracy=acc,
            victim_test_accuracy=acc, fidelity=1.0, mean_l1_to_victim=0.0)
    rows = []
    for key, g in groups.items():
        rows.append({"dataset": key[0], "defense_label": key[1], **labels[key],
                     **{k: Stat.of(v) for k, v in g.items()}})

    def order(row: dict[str, Any]) -> tuple:
        d = row["defense_label"]
        return (res.datasets.index(row["dataset"]) if row["dataset"] in res.datasets else 0,
                res.defense_order.index(d) if d in res.defense_order else len(res.defense_order))

    return sorted(rows, key=order)


def utility_table(res: Results) -> Table:
    """Table-2 style: defended test accuracy, victim test accuracy, fidelity, mean L1 to the victim."""
    rows_data = utility_rows(res)
    multi_ds = len(res.datasets) > 1
    header = (["Dataset"] if multi_ds else []) + ["Defense", "Architecture", "Defended test acc. (%)",
                                                  "Victim test acc. (%)", "Fidelity to victim (%)",
                                                  "Mean L1 to victim", "n"]
    rows = []
    for r in rows_data:
        none = Stat(0, math.nan, math.nan)
        n = max((s.n for k, s in r.items() if isinstance(s, Stat)), default=0)
        rows.append(([r["dataset"]] if multi_ds else []) + [
            r["defense_label"], str(r.get("arch") or ""), r.get("test_accuracy", none).fmt(),
            r.get("victim_test_accuracy", none).fmt(), r.get("fidelity", none).fmt(),
            r.get("mean_l1_to_victim", none).fmt(percent=False, digits=3),
            str(n)])
    t = Table(name="table2_utility", title="Utility of each defense", header=header, rows=rows, caption=(
        "Test accuracy of the model the API serves, of the undefended victim, top-1 agreement with the victim and "
        "mean L1 distance between the served and the victim's probability vectors on the test set (in [0, 2]); "
        "mean ± std over the n trained defenses (one per victim seed). The undefended row is the victim itself "
        "(fidelity 100, L1 0 by definition)."),
              key_columns=2 + multi_ds)
    return t


def runs_csv(res: Results) -> str:
    """One row per attack run with every saved number (for users' own analysis)."""
    cols = ["dataset", "victim_arch", "victim_seed", "defense_label", "defense", "attack_label", "attack", "labels",
            "pool", "clone_arch", "budget", "seed"]
    rcols = ["clone_accuracy", "clone_accuracy_best", "fidelity", "queries_used", "target_test_accuracy",
             "victim_test_accuracy", "seconds"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run_id"] + cols + rcols)
    for r in res.attacks:
        w.writerow([r.id] + [r.meta.get(c, "") for c in cols] + [r.result.get(c, "") for c in rcols])
    return buf.getvalue()


def cells_csv(res: Results) -> str:
    """Aggregated numbers per cell (fractions, not percent): n, mean and std of each metric."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metrics = ["clone_accuracy", "clone_accuracy_best", "fidelity", "queries_used"]
    w.writerow(["dataset", "defense", "attack", "budget", "clone_arch", "n"]
               + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
    cells = attack_cells(res)
    for key in _row_keys(res, cells):
        for c in res.clone_order:
            runs = cells.get((*key, c))
            if not runs:
                continue
            stats = [Stat.of([r.result.get(m) for r in runs]) for m in metrics]
            w.writerow([*key, c, stats[0].n] + [f"{v:.6g}" for s in stats for v in (s.mean, s.std)])
    return buf.getvalue()


__all__ = ["RunRecord", "Results", "Stat", "Table", "attack_cells", "cells_csv", "clone_table", "load_results",
           "runs_csv", "utility_rows", "utility_table"]
