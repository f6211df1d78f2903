"""Reports from saved results: hand-written fake results with known numbers -> tables, CSVs, figures."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from misleader.errors import MisleaderError
from misleader.experiments.report import build_report
from misleader.experiments.runner import config_yaml
from misleader.experiments.spec import expand, parse_spec
from misleader.experiments.tables import Stat, clone_table, load_results, utility_table

SPEC = {
    "name": "fake",
    "dataset": "digits",
    "victim": {"arch": "lenet5", "epochs": 1},
    "defenses": ["undefended", {"name": "misleader", "members": ["lenet5", "lenet5_half"], "epochs": 1}],
    "attacks": [
        {"name": "knockoff", "label": "knockoff-hard", "labels": "hard", "pool": "attacker", "budgets": [100, 200]},
        {"name": "dfme", "budgets": ["10k"], "eval_every": "5k"},
    ],
    "clone_archs": ["lenet5", "lenet5_half"],
    "seeds": [0, 1, 2],
}

VICTIM_ACC = 0.95
DEFENSE = {"test_accuracy": 0.93, "victim_test_accuracy": VICTIM_ACC, "fidelity": 0.96, "mean_l1_to_victim": 0.4}


def clone_acc(meta: dict) -> float:
    """A known, distinct number per attack run."""
    base = {"undefended": 0.80, "misleader": 0.50}[meta["defense"]]
    base += {"knockoff-hard": 0.1, "dfme": 0.0}[meta["attack_label"]]
    base -= 0.05 * (meta["clone_arch"] == "lenet5_half") + 0.1 * (meta["budget"] == 100)
    return round(base + 0.01 * meta["seed"], 6)


def write_fake(out: Path, spec: dict = SPEC, *, skip: set[str] = frozenset()) -> list:
    stages = expand(parse_spec(spec))
    (out / "index.json").parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for s in stages:
        done = s.id not in skip
        runs.append({**s.to_dict(), "status": "finished" if done else "pending"})
        if s.virtual or not done:
            continue
        folder = out / s.folder
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(config_yaml(s.to_dict()))
        (folder / "env.json").write_text(json.dumps({"misleader": "0.1.0", "torch": "2.x", "device": "cpu",
                                                     "executor": "local", "git_sha": "abc"}))
        if s.stage == "victim":
            res = {"test_accuracy": VICTIM_ACC}
        elif s.stage == "defense":
            res = dict(DEFENSE)
        else:
            acc = clone_acc(s.meta)
            res = {"clone_accuracy": acc, "clone_accuracy_best": acc + 0.02, "fidelity": acc + 0.01,
                   "queries_used": s.meta["budget"], "budget": s.meta["budget"]}
            hist = [{"queries": q, "clone_accuracy": acc * q / s.meta["budget"], "fidelity": acc}
                    for q in (s.meta["budget"] // 2, s.meta["budget"])]
            (folder / "history.json").write_text(json.dumps(hist))
        (folder / "result.json").write_text(json.dumps(res))
    (out / "index.json").write_text(json.dumps({"spec": spec["name"], "runs": runs}))
    return stages


def fmt(values: list[float]) -> str:
    m, sd = statistics.mean(values) * 100, statistics.stdev(values) * 100
    return f"{m:.1f} ± {sd:.1f}"


def test_clone_table_cells(tmp_path: Path) -> None:
    write_fake(tmp_path)
    t = clone_table(load_results(tmp_path))
    assert t.header == ["Attack", "Defense", "Budget", "lenet5", "lenet5_half"]
    rows = {(r[0], r[1], r[2]): r[3:] for r in t.rows}
    assert list(rows) == [("knockoff-hard", "undefended", "100"), ("knockoff-hard", "undefended", "200"),
                          ("knockoff-hard", "misleader", "100"), ("knockoff-hard", "misleader", "200"),
                          ("dfme", "undefended", "10k"), ("dfme", "misleader", "10k")]
    # misleader, knockoff-hard, budget 200, lenet5: 0.5 + 0.1 + 0.01 * seed
    assert rows[("knockoff-hard", "misleader", "200")][0] == fmt([0.60, 0.61, 0.62]) == "61.0 ± 1.0"
    assert rows[("dfme", "undefended", "10k")][1] == fmt([0.75, 0.76, 0.77])
    assert "mean ± std over 3 runs" in t.caption and "final clone" in t.caption
    best = clone_table(load_results(tmp_path), metric="clone_accuracy_best")
    assert "test-set selection" in best.title
    assert {(r[0], r[1], r[2]): r[3:] for r in best.rows}[("knockoff-hard", "misleader", "200")][0] == "63.0 ± 1.0"


def test_utility_table(tmp_path: Path) -> None:
    write_fake(tmp_path)
    t = utility_table(load_results(tmp_path))
    rows = {r[0]: r for r in t.rows}
    assert list(rows) == ["undefended", "misleader"]
    assert rows["undefended"][2:6] == ["95.0", "95.0", "100.0", "0.000"]
    assert rows["misleader"][1] == "lenet5+lenet5_half"
    assert rows["misleader"][2:6] == ["93.0", "95.0", "96.0", "0.400"]


def test_report_files(tmp_path: Path) -> None:
    write_fake(tmp_path)
    (tmp_path / "attacks" / ".half-done.partial").mkdir()  # an interrupted run is ignored
    rep = build_report(tmp_path)
    d = tmp_path / "report"
    for name in ("report.md", "table1_clone_accuracy.csv", "table1_clone_accuracy_best.csv", "table1_fidelity.csv",
                 "table2_utility.csv", "cells.csv", "runs.csv"):
        assert (d / name).is_file(), name
    for name in ("fig_budget", "fig_arch_heatmap", "fig_pareto"):
        png = d / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"![{name}]({name}.png)" in rep.markdown
    md = (d / "report.md").read_text()
    assert "| knockoff-hard | misleader | 200 | 61.0 ± 1.0 |" in md
    assert "best over evaluations (test-set selection" in md
    # the markdown table and the CSV agree
    rows = list(csv.reader(io.StringIO((d / "table1_clone_accuracy.csv").read_text())))
    assert rows[0] == ["Attack", "Defense", "Budget", "lenet5", "lenet5_half"] and len(rows) == 7
    runs = list(csv.DictReader(io.StringIO((d / "runs.csv").read_text())))
    assert len(runs) == 2 * (2 + 1) * 2 * 3
    cells = list(csv.DictReader(io.StringIO((d / "cells.csv").read_text())))
    c = [r for r in cells if r["defense"] == "misleader" and r["attack"] == "knockoff-hard" and r["budget"] == "200"
         and r["clone_arch"] == "lenet5"][0]
    assert c["n"] == "3" and math.isclose(float(c["clone_accuracy_mean"]), 0.61, rel_tol=1e-5)
    # observations are computed, and the hard-label bound is stated
    # misleader: (61 + 56) / 2 = 58.5 over the two clone architectures; undefended (91 + 86) / 2 = 88.5
    assert any("knockoff-hard (200 queries) against misleader: clones reach 58.5% (mean over 2 clone architectures) "
               "vs. 88.5% (mean over 2 clone architectures) undefended (-30.0 points)" in o for o in rep.observations)
    assert any(o.startswith("Limit (DESIGN.md rule 6): misleader agrees") for o in rep.observations)


def test_report_reads_only_finished_runs(tmp_path: Path) -> None:
    stages = expand(parse_spec(SPEC))
    missing = {s.id for s in stages if s.stage == "attack" and s.meta["seed"] == 2 and s.meta["attack"] == "dfme"}
    write_fake(tmp_path, skip=missing)
    rep = build_report(tmp_path, figures=False)
    rows = {(r[0], r[1], r[2]): r[3:] for r in rep.tables["table1_clone_accuracy"].rows}
    assert rows[("dfme", "undefended", "10k")][0] == fmt([0.80, 0.81]) + " (n=2)"  # n differs: shown per cell
    assert rows[("knockoff-hard", "undefended", "200")][0] == fmt([0.90, 0.91, 0.92]) + " (n=3)"
    assert "4 runs of the spec are not finished" in rep.markdown
    assert not rep.figures


def test_single_run_cells_have_no_std(tmp_path: Path) -> None:
    spec = dict(SPEC, seeds=[0])
    write_fake(tmp_path, spec)
    t = clone_table(load_results(tmp_path))
    assert t.rows[0][3] == "80.0" and "one run per cell" in t.caption  # undefended, knockoff-hard, 100, lenet5


def test_figures_return_figures(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from misleader.experiments import plots

    write_fake(tmp_path)
    res = load_results(tmp_path)
    for fn in (plots.plot_budget_curves, plots.plot_arch_heatmap, plots.plot_pareto):
        fig = fn(res)
        assert isinstance(fig, Figure) and fig.axes
    colours = plots.defense_colours(["undefended", "misleader", "other", "misleader-big"])
    assert colours["undefended"] == plots.FIXED_COLOURS["undefended"]
    assert colours["misleader"] == plots.FIXED_COLOURS["misleader"]
    assert len(set(colours.values())) == 4


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MisleaderError, match="holds no finished runs"):
        build_report(tmp_path)
    with pytest.raises(MisleaderError, match="is not a folder"):
        build_report(tmp_path / "nope")


def test_report_cli(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from misleader.cli import main

    write_fake(tmp_path)
    assert main(["report", str(tmp_path), "--no-figures", "--print"]) == 0
    out = capsys.readouterr().out
    assert "Clone accuracy (%), final clone" in out and "61.0 ± 1.0" in out and "report.md" in out


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=20))
def test_stat_matches_statistics(values: list[float]) -> None:
    s = Stat.of(values)
    assert s.n == len(values)
    assert math.isclose(s.mean, statistics.fmean(values), abs_tol=1e-12)
    want = statistics.stdev(values) if len(values) > 1 else 0.0
    assert math.isclose(s.std, want, abs_tol=1e-9)


def test_config_yaml_is_what_the_report_reads(tmp_path: Path) -> None:
    stages = write_fake(tmp_path)
    a = [s for s in stages if s.stage == "attack"][0]
    cfg = yaml.safe_load((tmp_path / a.folder / "config.yaml").read_text())
    assert cfg["meta"]["defense_label"] == a.meta["defense_label"] and cfg["config"] == a.config
