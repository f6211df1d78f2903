"""Figures from saved results (matplotlib, Agg backend): every function returns a ``Figure``.

* :func:`plot_budget_curves` -- clone accuracy against queries, one panel per attack, one colour per
  defense (the paper's Figure 3). Curves are the runs' saved histories (mean over seeds, band = ±
  std); with several budgets the final clones are drawn as markers at their budgets.
* :func:`plot_arch_heatmap` -- clone accuracy for attacker (clone) architecture x defense
  architecture, one panel per attack (the paper's Figure 2).
* :func:`plot_pareto` -- utility (the served model's test accuracy) against clone accuracy, one point
  per defense and attack (a spec's sweep: one curve over the swept value): the defender wants the upper left.

Colours are fixed per defense (undefended grey, MISLEADER red, others from a fixed list in the
spec's order), so the same defense looks the same in every figure and every report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from misleader.experiments.tables import UNDEFENDED, Results, Stat, _unique, attack_cells, utility_rows

FIXED_COLOURS = {UNDEFENDED: "#4d4d4d", "misleader": "#d62728"}
PALETTE = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 130) -> None:
    """Write ``fig`` atomically: rendered in memory, then a temp file in the same folder and ``os.replace``.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``), so a reader never sees a half-written figure.
    """
    import io

    from misleader.utils import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def defense_colours(labels: list[str]) -> dict[str, str]:
    """Fixed colour per defense label: known names first, the rest from :data:`PALETTE` in order."""
    out: dict[str, str] = {}
    free = iter(PALETTE)
    for lab in labels:
        base = lab.split("-")[0].split(" ")[0].lower()
        if lab in FIXED_COLOURS and FIXED_COLOURS[lab] not in out.values():
            out[lab] = FIXED_COLOURS[lab]
        elif base in FIXED_COLOURS and FIXED_COLOURS[base] not in out.values():
            out[lab] = FIXED_COLOURS[base]
        else:
            out[lab] = next(free, "#000000")
    return out


def _grid(n: int, *, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _fmt_queries(x: float, _pos: Any = None) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.0f}{suf}" if v == int(v) else f"{v:.1f}{suf}"
    return f"{x:.0f}"


def _largest_budget_runs(runs: list) -> list:  # noqa: ANN001
    b = max(int(r.meta.get("budget", 0)) for r in runs)
    return [r for r in runs if int(r.meta.get("budget", 0)) == b]


def plot_budget_curves(res: Results, *, path: str | Path | None = None):
    """Clone accuracy (%) against queries used, per attack (panels) and defense (colours)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    cells = attack_cells(res)
    attacks = [a for a in res.attack_order if any(k[2] == a for k in cells)]
    colours = defense_colours(res.defense_order)
    clones = [c for c in res.clone_order if any(k[4] == c for k in cells)]
    nrows, ncols = _grid(max(1, len(attacks)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks):
        for d in res.defense_order:
            for ci, clone in enumerate(clones):
                runs = [r for k, rs in cells.items() if k[1] == d and k[2] == attack and k[4] == clone for r in rs]
                if not runs:
                    continue
                style = LINESTYLES[ci % len(LINESTYLES)]
                label = d if len(clones) == 1 else f"{d} / {clone}"
                top = _largest_budget_runs(runs)
                hists = [[(float(h["queries"]), float(h["clone_accuracy"])) for h in r.history
                          if "queries" in h and "clone_accuracy" in h] for r in top]
                hists = [sorted(h) for h in hists if len({q for q, _ in h}) >= 2]  # a curve needs 2 query counts
                drew = False
                if hists:
                    grid = np.unique(np.concatenate([[q for q, _ in h] for h in hists]))
                    ys = np.stack([np.interp(grid, [q for q, _ in h], [a for _, a in h]) for h in hists]) * 100
                    mean = ys.mean(0)
                    ax.plot(grid, mean, style, color=colours[d], lw=1.8, label=label)
                    if len(hists) > 1:
                        sd = ys.std(0, ddof=1)
                        ax.fill_between(grid, mean - sd, mean + sd, color=colours[d], alpha=0.15, lw=0)
                    drew = True
                budgets = sorted({int(r.meta["budget"]) for r in runs})
                finals = [Stat.of([r.result.get("clone_accuracy") for r in runs if int(r.meta["budget"]) == b])
                          for b in budgets]
                qs = [float(np.mean([r.result.get("queries_used", b) for r in runs if int(r.meta["budget"]) == b]))
                      for b in budgets]
                shift = 1 + 0.015 * (res.defense_order.index(d) - (len(res.defense_order) - 1) / 2)
                ax.errorbar([q * shift for q in qs], [s.mean * 100 for s in finals], yerr=[s.std * 100 for s in finals],
                            fmt="o" if drew else "o" + style, color=colours[d], ms=5, capsize=3,
                            label=None if drew else label)
        ax.set_title(attack)
        ax.set_xlabel("queries to the API")
        ax.set_ylabel("clone test accuracy (%)")
        ax.xaxis.set_major_formatter(FuncFormatter(_fmt_queries))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    fig.suptitle(f"{res.spec_name or 'experiment'}: clone accuracy vs. query budget (final clone = dot; "
                 "curve = evaluations during the run)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_arch_heatmap(res: Results, *, path: str | Path | None = None):
    """Mean clone accuracy (%) per clone architecture (rows) and defense architecture (columns)."""
    plt = _plt()
    cells = attack_cells(res)
    attacks = [a for a in res.attack_order if any(k[2] == a for k in cells)]
    clones = [c for c in res.clone_order if any(k[4] == c for k in cells)]
    defenses = [d for d in res.defense_order if any(k[1] == d for k in cells)]
    arch_of = {}
    for r in res.attacks:
        arch_of.setdefault(r.meta.get("defense_label"), r.meta.get("defense_arch", ""))
    nrows, ncols = _grid(max(1, len(attacks)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 + 2.0 * max(2, len(defenses)) * ncols,
                                                     1.9 + 0.8 * max(2, len(clones)) * nrows), squeeze=False,
                             layout="constrained")
    im = None
    for ax, attack in zip(axes.flat, attacks):
        mat = np.full((len(clones), len(defenses)), np.nan)
        for i, c in enumerate(clones):
            for j, d in enumerate(defenses):
                runs = [r for k, rs in cells.items() if k[1] == d and k[2] == attack and k[4] == c for r in rs]
                if runs:
                    mat[i, j] = Stat.of([r.result.get("clone_accuracy") for r in _largest_budget_runs(runs)]).mean * 100
        im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i in range(len(clones)):
            for j in range(len(defenses)):
                if not np.isnan(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="white" if mat[i, j] < 60 else "black")
        ax.set_xticks(range(len(defenses)))
        ax.set_xticklabels([f"{d}\n({_short_arch(arch_of.get(d, ''))})" for d in defenses], fontsize=8)
        ax.set_yticks(range(len(clones)))
        ax.set_yticklabels(clones, fontsize=8)
        ax.set_xlabel("defense (architecture served)", fontsize=9)
        if ax in axes[:, 0]:
            ax.set_ylabel("attacker's clone architecture", fontsize=9)
        ax.set_title(f"{attack} (largest budget)", fontsize=10)
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="clone test accuracy (%)")
    fig.suptitle("Clone test accuracy (%): attacker's clone architecture x defense", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig


def _short_arch(arch: str) -> str:
    """An ensemble's member list, one member per line when long (tick labels)."""
    arch = str(arch)
    return arch.replace("+", "+\n") if len(arch) > 16 else arch


def _sweep_key(values: dict[str, Any]) -> tuple:
    """Sort key of a sweep point: its values in key order (numbers by value, anything else by its text)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for _, v in sorted(values.items()))


def _sweep_text(values: dict[str, Any]) -> str:
    """A marker's label: the value alone for a one-key sweep, else ``k=v, ...``."""
    items = sorted(values.items())
    return f"{items[0][1]}" if len(items) == 1 else ", ".join(f"{k}={v}" for k, v in items)


def pareto_points(res: Results) -> list[dict[str, Any]]:
    """The points of :func:`plot_pareto`: one per defense label and attack with a utility and an attack result.

    Each point: ``attack``, ``defense`` (label), ``group`` (the sweep it belongs to, else ``None``), ``sweep``
    (``{key: value}``, empty without a sweep), ``base`` (label it wraps, else ``None``), ``x``/``xerr`` (clone
    accuracy mean/std over the largest budget's runs) and ``y``/``yerr`` (the served model's test accuracy), in
    percent.
    """
    cells = attack_cells(res)
    attacks = [a for a in res.attack_order if any(k[2] == a for k in cells)]
    utility = {(r["dataset"], r["defense_label"]): r for r in utility_rows(res)}
    points = []
    for attack in attacks:
        for d in res.defense_order:
            runs = [r for k, rs in cells.items() if k[1] == d and k[2] == attack for r in rs]
            if not runs:
                continue
            m = runs[0].meta
            u = utility.get((m.get("dataset"), d))
            if u is None or "test_accuracy" not in u:
                continue
            s = Stat.of([r.result.get("clone_accuracy") for r in _largest_budget_runs(runs)])
            ua = u["test_accuracy"]
            points.append({"attack": attack, "defense": d, "group": m.get("defense_group"),
                           "sweep": dict(m.get("defense_sweep") or {}), "base": m.get("defense_base"),
                           "x": s.mean * 100, "xerr": s.std * 100, "y": ua.mean * 100, "yerr": ua.std * 100})
    return points


def plot_pareto(res: Results, *, path: str | Path | None = None):
    """Defended test accuracy (%) against clone accuracy (%): each defense x attack a point; the defenses of one
    sweep (``{sweep: [...]}`` in the spec) are one curve per attack, ordered by the swept value, each marker
    labelled with its value (the line's ``gid`` is ``sweep:GROUP:ATTACK``). A composed defense (``base:``) is
    an entry of its own."""
    plt = _plt()
    points = pareto_points(res)
    attacks = _unique(p["attack"] for p in points)
    keys = _unique(p["group"] or p["defense"] for p in points)  # one colour per sweep or defense
    colours = defense_colours(keys)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs: list[float] = []
    anchor: dict[str, tuple[float, float]] = {}
    for ai, attack in enumerate(attacks):
        marker = MARKERS[ai % len(MARKERS)]
        for key in keys:
            pts = [p for p in points if p["attack"] == attack and (p["group"] or p["defense"]) == key]
            if not pts:
                continue
            grouped = pts[0]["group"] is not None
            if grouped:
                pts.sort(key=lambda p: _sweep_key(p["sweep"]))
                ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "-", color=colours[key], lw=1.4, alpha=0.8,
                        gid=f"sweep:{key}:{attack}")
            for p in pts:
                ax.errorbar(p["x"], p["y"], xerr=p["xerr"], yerr=p["yerr"], fmt=marker, color=colours[key], ms=8,
                            capsize=3, mec="black", mew=0.5)
                if grouped:
                    ax.annotate(_sweep_text(p["sweep"]), (p["x"], p["y"]), textcoords="offset points",
                                xytext=(6, -10), fontsize=7, color=colours[key])
                xs += [p["x"] - p["xerr"], p["x"] + p["xerr"]]
                x0, _ = anchor.get(key, (math.inf, 0.0))
                if p["x"] < x0:
                    anchor[key] = (p["x"], p["y"])
    for key, (x, y) in anchor.items():  # one name per defense or sweep, left of its leftmost point
        ax.annotate(key, (x, y), textcoords="offset points", xytext=(-8, 8), ha="right", fontsize=9,
                    color=colours[key])
    # legends: colour = defense (a line: a sweep), marker = attack
    from matplotlib.lines import Line2D

    swept = {p["group"] for p in points if p["group"] is not None}
    h1 = [Line2D([], [], color=colours[k], marker="o", ls="-" if k in swept else "",
                 label=f"{k} (sweep)" if k in swept else k) for k in keys]
    h2 = [Line2D([], [], color="black", marker=MARKERS[i % len(MARKERS)], ls="", mfc="white", label=a)
          for i, a in enumerate(attacks)]
    leg = ax.legend(handles=h1, title="defense", fontsize=8, title_fontsize=8, loc="lower left")
    ax.add_artist(leg)
    ax.legend(handles=h2, title="attack", fontsize=8, title_fontsize=8, loc="lower right")
    ax.set_xlabel("clone test accuracy (%)  (lower: harder to steal)")
    ax.set_ylabel("served model's test accuracy (%)  (higher: more useful)")
    ax.set_title("Utility vs. extraction (largest budget; upper left is better for the defender)", fontsize=10)
    ax.grid(alpha=0.3)
    lo_y, hi_y = ax.get_ylim()
    ax.set_ylim(max(0, lo_y - 5), min(100.5, hi_y + 3))
    if xs:  # zoom on the points (the axis says where): differences of a few points stay visible
        lo, hi = min(xs), max(xs)
        pad = max(3.0, 0.15 * (hi - lo))
        ax.set_xlim(max(0.0, lo - 3 * pad), min(100.5, hi + pad))
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = ["defense_colours", "pareto_points", "plot_arch_heatmap", "plot_budget_curves", "plot_pareto"]
