"""``misleader report DIR``: tables (Markdown + CSV) and figures (PNG) from saved results only.

Writes into ``DIR/report/`` (or ``report_dir``):

==============================  ==========================================================
``report.md``                   everything below, with captions and computed observations
``table1_clone_accuracy.csv``   Table-1 style: final clone accuracy, mean ± std (%)
``table1_clone_accuracy_best.csv``  best over evaluations (test-set selection, labelled)
``table1_fidelity.csv``         top-1 agreement of the final clone with the attacked model
``table2_utility.csv``          Table-2 style: defended / victim test accuracy, fidelity, L1
``cells.csv`` / ``runs.csv``    numbers per cell (n, mean, std) / per attack run
``fig_budget.png``              clone accuracy vs. queries (the paper's Figure 3)
``fig_arch_heatmap.png``        clone architecture x defense architecture (Figure 2)
``fig_pareto.png``              utility vs. clone accuracy
==============================  ==========================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misleader.experiments.tables import (
    UNDEFENDED,
    Results,
    Stat,
    Table,
    attack_cells,
    cells_csv,
    clone_table,
    load_results,
    runs_csv,
    utility_rows,
    utility_table,
)
from misleader.utils import atomic_write_text, read_json

log = logging.getLogger(__name__)

#: the order of the tables in report.md and on the terminal
ORDER = ("table1_clone_accuracy", "table2_utility", "table1_fidelity", "table1_clone_accuracy_best")


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    directory: Path
    markdown_path: Path
    markdown: str
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    observations: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """The tables as plain text (what the demo prints), in the order of ``report.md``."""
        parts = []
        for name in ORDER:
            if name in self.tables:
                t = self.tables[name]
                parts += [t.title, t.to_text(), ""]
        if self.observations:
            parts += ["Observations"] + [f"- {o}" for o in self.observations]
        return "\n".join(parts)


def _largest(runs: list) -> list:  # noqa: ANN001
    b = max(int(r.meta["budget"]) for r in runs)
    return [r for r in runs if int(r.meta["budget"]) == b]


def _cell_summary(runs: list) -> tuple[float, str]:  # noqa: ANN001
    """Mean clone accuracy of the largest-budget runs: per clone architecture, then averaged over them."""
    top = _largest(runs)
    archs = sorted({r.meta.get("clone_arch") for r in top})
    if len(archs) == 1:
        s = Stat.of([r.result["clone_accuracy"] for r in top])
        return s.mean, f"{s.fmt()}%"
    means = [Stat.of([r.result["clone_accuracy"] for r in top if r.meta.get("clone_arch") == a]).mean for a in archs]
    m = sum(means) / len(means)
    return m, f"{m * 100:.1f}% (mean over {len(archs)} clone architectures)"


def observations(res: Results) -> list[str]:
    """Sentences computed from the saved numbers: each defense's effect per attack, and the hard-label bound."""
    out: list[str] = []
    cells = attack_cells(res)
    util = {(r["dataset"], r["defense_label"]): r for r in utility_rows(res)}
    for ds in res.datasets:
        for attack in res.attack_order:
            base_runs = [r for k, rs in cells.items() if k[0] == ds and k[1] == UNDEFENDED and k[2] == attack for r in rs]
            base = _cell_summary(base_runs) if base_runs else None
            for d in res.defense_order:
                if d == UNDEFENDED:
                    continue
                runs = [r for k, rs in cells.items() if k[0] == ds and k[1] == d and k[2] == attack for r in rs]
                if not runs:
                    continue
                top = _largest(runs)
                mean, text_acc = _cell_summary(runs)
                budget = int(top[0].meta["budget"])
                text = f"{attack} ({budget:,} queries) against {d}: clones reach {text_acc}"
                if base is not None and int(_largest(base_runs)[0].meta["budget"]) == budget:
                    text += f" vs. {base[1]} undefended ({(mean - base[0]) * 100:+.1f} points)"
                u = util.get((ds, d))
                if u and "test_accuracy" in u:
                    text += f"; the served model keeps {u['test_accuracy'].fmt()}% test accuracy"
                    if "victim_test_accuracy" in u:
                        text += f" (victim {u['victim_test_accuracy'].fmt()}%)"
                out.append(text + ".")
                labels = {r.meta.get("labels") for r in top}
                pools = {r.meta.get("pool") for r in top}
                if labels == {"hard"} and pools <= {"attacker", None} and u and "fidelity" in u:
                    out.append(
                        f"Limit (DESIGN.md rule 6): {d} agrees with the victim's top-1 on {u['fidelity'].fmt()}% of "
                        f"test inputs, so a hard-label attacker with in-distribution data ({attack}) receives "
                        "essentially the victim's labels: no top-1-preserving defense can stop this attacker, and "
                        "the line above measures that bound.")
    return out


def _settings_table(res: Results) -> Table:
    rows: dict[str, list[str]] = {}
    for r in res.attacks:
        m, c = r.meta, r.config
        label = m.get("attack_label")
        row = rows.setdefault(label, [label, str(c.get("attack")), str(c.get("labels", "soft")),
                                      str(c.get("pool") or "–"), set(), set(), str(c.get("options") or {})])
        row[4].add(int(c.get("budget", 0)))
        row[5].add(int(m.get("seed", 0)))
    out = []
    for label in res.attack_order:
        if label in rows:
            row = rows[label]
            out.append(row[:4] + [", ".join(f"{b:,}" for b in sorted(row[4])), str(len(row[5])), row[6]])
    return Table(name="attack_settings", title="Attack settings", header=[
        "Attack", "Method", "Labels", "Pool", "Budgets", "Seeds", "Options"], rows=out, key_columns=7)


def _env_line(res: Results) -> str:
    for rec in list(res.attacks) + list(res.victims.values()):
        p = rec.folder / "env.json"
        if p.exists():
            e: dict[str, Any] = read_json(p)
            return (f"misleader {e.get('misleader')}, torch {e.get('torch')}, python {e.get('python')}, device "
                    f"{e.get('device')}{' (' + e['cuda'] + ')' if e.get('cuda') else ''}, executor {e.get('executor')}, "
                    f"git {str(e.get('git_sha') or 'unknown')[:12]}")
    return "unknown (no env.json found)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def build_report(out: str | Path, *, report_dir: str | Path | None = None, figures: bool = True) -> Report:
    """Build the report of the experiment folder ``out`` from its saved results.

    Args:
        out: the ``--out`` folder of ``misleader run`` / ``misleader demo``.
        report_dir: where to write (default ``out/report``).
        figures: also draw the PNG figures.

    Raises:
        MisleaderError: ``out`` holds no finished runs.
    """
    res = load_results(out)
    rdir = Path(report_dir) if report_dir is not None else Path(out) / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, Table] = {}
    if res.attacks:
        for metric in ("clone_accuracy", "clone_accuracy_best", "fidelity"):
            t = clone_table(res, metric=metric)
            tables[t.name] = t
    t = utility_table(res)
    tables[t.name] = t
    for t in tables.values():
        atomic_write_text(rdir / f"{t.name}.csv", t.to_csv())
    if res.attacks:
        atomic_write_text(rdir / "cells.csv", cells_csv(res))
        atomic_write_text(rdir / "runs.csv", runs_csv(res))

    figs: dict[str, Path] = {}
    if figures and res.attacks:
        from misleader.experiments import plots

        plt = plots._plt()
        for name, fn in (("fig_budget", plots.plot_budget_curves), ("fig_arch_heatmap", plots.plot_arch_heatmap),
                         ("fig_pareto", plots.plot_pareto)):
            path = rdir / f"{name}.png"
            fig = fn(res, path=path)
            plt.close(fig)
            figs[name] = path

    obs = observations(res) if res.attacks else []
    victims = list(res.victims.values())
    vacc = Stat.of([v.result.get("test_accuracy") for v in victims])
    arch = ", ".join(sorted({str(v.meta.get("victim_arch")) for v in victims})) or "?"
    lines = [f"# Model-extraction report: {res.spec_name or Path(out).name}", ""]
    lines.append(f"Dataset: **{', '.join(res.datasets)}**. Victim: **{arch}**, test accuracy {vacc.fmt()}% "
                 f"({_plural(vacc.n, 'victim')}). Runs read from `{Path(out)}`: {_plural(len(victims), 'victim')}, "
                 f"{_plural(len(res.defenses), 'trained defense')}, {_plural(len(res.attacks), 'attack run')}"
                 + (f"; **{res.unfinished} runs of the spec are not finished** and are missing here" if res.unfinished
                    else "") + ".")
    lines += ["", "Every number below is read from the runs' saved `result.json` files (nothing is recomputed). "
              "Clone accuracy is the **final** clone's test accuracy; the 'best over evaluations' table selects on "
              "the test set, as the papers do, and is shown only for comparison. Model selection of victims and "
              "defenses used a validation split; the attacker's pool is disjoint from the defender's data.", ""]
    for name in ORDER:
        if name in tables:
            t = tables[name]
            lines += [f"## {t.title}", "", t.to_markdown(), "", f"_{t.caption}_ (CSV: `{t.name}.csv`)", ""]
    if obs:
        lines += ["## Observations (computed from the tables)", ""] + [f"- {o}" for o in obs] + [""]
    if figs:
        lines += ["## Figures", ""]
        captions = {
            "fig_budget": "Clone accuracy against the number of queries, per attack; colour = defense. Dots: final "
                          "clones at each budget (± std); lines: evaluations during the longest runs (mean ± std).",
            "fig_arch_heatmap": "Clone accuracy (%) for each attacker (clone) architecture and defense, at the largest "
                                "budget.",
            "fig_pareto": "Served model's test accuracy against clone accuracy: each defense a point (colour), per "
                          "attack (marker); a parameter sweep is one curve ordered by the swept value (markers "
                          "labelled with it); the defender wants the upper left.",
        }
        for name, path in figs.items():
            lines += [f"![{name}]({path.name})", "", f"_{captions[name]}_", ""]
    if res.attacks:
        st = _settings_table(res)
        lines += ["## Attack settings", "", st.to_markdown(), ""]
    lines += ["## Environment", "", _env_line(res), ""]
    md = "\n".join(lines)
    md_path = rdir / "report.md"
    atomic_write_text(md_path, md)
    log.info("report written to %s (%d tables, %d figures)", md_path, len(tables), len(figs))
    return Report(directory=rdir, markdown_path=md_path, markdown=md, tables=tables, figures=figs, observations=obs)


__all__ = ["Report", "build_report", "observations"]
