"""Parameter sweeps and composed defenses in specs: expansion, labels, validation, stage ids, dependency
order, the report's one curve per sweep, and a tiny end-to-end run on digits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from misleader.errors import MisleaderError
from misleader.experiments.spec import expand, load_spec, parse_spec, sweep_label

REPO = Path(__file__).resolve().parents[2]


def spec(*defenses, attacks=None) -> dict:  # noqa: ANN001
    return {"name": "sw", "dataset": "digits", "victim": {"arch": "lenet5_fifth", "epochs": 1},
            "defenses": list(defenses),
            "attacks": attacks or [{"name": "knockoff", "labels": "soft", "pool": "attacker", "budgets": [40],
                                    "options": {"epochs": 1}}],
            "clone_archs": ["lenet5_fifth"], "seeds": [0]}


def test_sweep_expands_one_defense_per_value() -> None:
    s = parse_spec(spec("undefended", {"name": "randp", "epsilon": {"sweep": [0.1, 0.5, 1.0]}}))
    rp = s.defenses[1:]
    assert [d.label for d in rp] == ["randp(epsilon=0.1)", "randp(epsilon=0.5)", "randp(epsilon=1.0)"]
    assert [d.settings["epsilon"] for d in rp] == [0.1, 0.5, 1.0]
    assert {d.group for d in rp} == {"randp"} and s.defenses[0].group is None
    assert [d.sweep for d in rp] == [(("epsilon", 0.1),), (("epsilon", 0.5),), (("epsilon", 1.0),)]


def test_several_swept_keys_are_a_cartesian_product_under_the_given_label() -> None:
    s = parse_spec(spec({"name": "post", "label": "rs", "op": "reverse-sigmoid", "beta": {"sweep": [0.5, 0.7]},
                         "gamma": {"sweep": [0.2, 0.4]}}))
    assert [d.label for d in s.defenses] == ["rs(beta=0.5, gamma=0.2)", "rs(beta=0.5, gamma=0.4)",
                                             "rs(beta=0.7, gamma=0.2)", "rs(beta=0.7, gamma=0.4)"]
    assert all(d.group == "rs" and d.settings["op"] == "reverse-sigmoid" for d in s.defenses)
    assert sweep_label("x", [("k", [1, 2])]) == "x(k=[1,2])"


def test_a_sweep_gives_the_same_stage_ids_as_the_entries_written_out() -> None:
    swept = expand(parse_spec(spec({"name": "randp", "epsilon": {"sweep": [0.1, 0.5]}})))
    written = expand(parse_spec(spec({"name": "randp", "epsilon": 0.1, "label": "a"},
                                     {"name": "randp", "epsilon": 0.5, "label": "b"})))
    assert [st.id for st in swept] == [st.id for st in written]


def test_stage_ids_of_a_spec_without_sweeps_are_unchanged() -> None:
    """demo.yaml's ids as computed before sweeps and bases existed (a label is never part of an id)."""
    ids = [st.id for st in expand(load_spec(REPO / "experiments" / "demo.yaml"))][:4]
    assert ids == ["digits-lenet5-s0-c0053a0a18", "undefended-s0-716a3ff789", "misleader-s0-4b30266fbe",
                   "knockoff-soft-lenet5-80-s0-66d616e1f7"]


@pytest.mark.parametrize("entry, match", [
    ({"name": "randp", "epsilon": {"sweep": [0.1, "big"]}}, r"epsilon: expected float"),
    ({"name": "randp", "epsilon": {"sweep": []}}, r"epsilon\.sweep: expected a non-empty list"),
    ({"name": "randp", "epsilon": {"sweep": 0.1}}, r"epsilon\.sweep: expected a non-empty list"),
    ({"name": "randp", "epsilon": {"sweep": [0.1, 0.1]}}, r"repeated values"),
    ({"name": "randp", "epsilon": {"sweep": [{"sweep": [1]}]}}, r"cannot itself be a sweep"),
    ({"name": "randp", "epsilon": 0.1, "base": "nope"}, r"defenses\[1\]\.base: unknown defense label 'nope'"),
    ({"name": "post", "op": "reverse-sigmoid", "beta": {"sweep": [0.5, "x"]}}, r"defenses\[1\]"),
    ({"name": "post", "op": "round", "beta": 0.5}, r"do not apply"),
    ({"name": "undefended", "label": "u2", "base": "undefended"}, r"unknown key 'base'"),
])
def test_sweep_and_base_validation_errors(entry: dict, match: str) -> None:
    with pytest.raises(MisleaderError, match=match) as err:
        parse_spec(spec("undefended", entry))
    assert "\n" not in str(err.value)


def test_base_cycles_and_sweep_groups_are_refused() -> None:
    with pytest.raises(MisleaderError, match=r"cycle \(a -> b -> a\)"):
        parse_spec(spec({"name": "randp", "label": "a", "base": "b"}, {"name": "randp", "label": "b", "base": "a"}))
    with pytest.raises(MisleaderError, match="cycle"):
        parse_spec(spec({"name": "randp", "label": "a", "base": "a"}))
    with pytest.raises(MisleaderError, match=r"'rp' is a sweep; name one of its defenses \(rp\(epsilon=0.1\)"):
        parse_spec(spec({"name": "randp", "label": "rp", "epsilon": {"sweep": [0.1, 0.5]}},
                        {"name": "post", "label": "x", "op": "round", "base": "rp"}))
    with pytest.raises(MisleaderError, match="is already used"):
        parse_spec(spec({"name": "randp", "epsilon": {"sweep": [0.1, 0.5]}},
                        {"name": "randp", "label": "randp(epsilon=0.1)", "epsilon": 0.2}))


def test_a_base_is_built_before_the_defenses_that_wrap_it() -> None:
    s = parse_spec(spec({"name": "post", "label": "top", "op": "round", "base": "mid"},
                        {"name": "randp", "label": "mid", "epsilon": 0.2, "base": "low"},
                        {"name": "post", "label": "low", "op": "reverse-sigmoid"}, "undefended",
                        {"name": "post", "label": "rs-u", "op": "reverse-sigmoid", "beta": 0.5, "base": "undefended"}))
    stages = expand(s)
    defs = [st for st in stages if st.stage == "defense"]
    assert [st.meta["defense_label"] for st in defs] == ["low", "mid", "top", "undefended", "rs-u"]
    by = {st.meta["defense_label"]: st for st in defs}
    vid = stages[0].id
    assert by["mid"].parents == (vid, by["low"].id) and by["mid"].config["base"] == by["low"].id
    assert by["top"].parents == (vid, by["mid"].id) and by["top"].meta["defense_base"] == "mid"
    # wrapping the undefended victim is wrapping the victim: the same run as no base
    assert by["rs-u"].parents == (vid,) and "base" not in by["rs-u"].config
    plain = expand(parse_spec(spec({"name": "post", "label": "x", "op": "reverse-sigmoid", "beta": 0.5})))
    assert by["rs-u"].id == plain[1].id
    pos = {st.id: i for i, st in enumerate(stages)}
    assert all(pos[p] < pos[st.id] for st in stages for p in st.parents)


def test_pareto_draws_one_line_per_sweep_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import test_report  # tests/experiments is on sys.path (pytest's default prepend import mode)

    from misleader.experiments import plots
    from misleader.experiments.tables import load_results

    sp = spec("undefended", {"name": "randp", "epsilon": {"sweep": [1.0, 0.1, 0.5]}},
              {"name": "post", "label": "rs", "op": "reverse-sigmoid", "beta": {"sweep": [0.5, 0.7]}},
              {"name": "post", "label": "u+round", "op": "round", "base": "rs(beta=0.5)"})
    sp["seeds"] = [0, 1]

    def acc(meta: dict) -> float:  # clone accuracy falls with epsilon: the curve's order is checkable
        eps = meta.get("defense_sweep", {}).get("epsilon", 0.0)
        return round(0.8 - 0.2 * eps + 0.01 * meta["seed"], 6)

    monkeypatch.setattr(test_report, "clone_acc", acc)
    test_report.write_fake(tmp_path, sp)
    res = load_results(tmp_path)
    fig = plots.plot_pareto(res, path=tmp_path / "p.png")
    lines = {ln.get_gid(): ln for ln in fig.axes[0].lines if (ln.get_gid() or "").startswith("sweep:")}
    assert sorted(lines) == ["sweep:randp:knockoff", "sweep:rs:knockoff"]
    x = list(lines["sweep:randp:knockoff"].get_xdata())  # ordered by epsilon 0.1, 0.5, 1.0
    assert x == pytest.approx([100 * (0.8 - 0.2 * e + 0.005) for e in (0.1, 0.5, 1.0)])
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"0.1", "0.5", "1.0", "0.7", "randp", "rs", "u+round", "undefended"} <= texts
    assert (tmp_path / "p.png").stat().st_size > 0
    labels = [p["defense"] for p in plots.pareto_points(res)]
    assert "u+round" in labels and len(labels) == 7
    import matplotlib.pyplot as plt

    plt.close(fig)


E2E = spec("undefended",
           {"name": "post", "label": "rs", "op": "reverse-sigmoid", "beta": {"sweep": [0.5, 1.0]}, "base": "undefended"},
           {"name": "post", "label": "rs+round", "op": "round", "decimals": 1, "base": "rs(beta=0.5)"},
           attacks=[{"name": "knockoff", "labels": "soft", "pool": "attacker", "budgets": [40],
                     "options": {"epochs": 1}}])


def test_end_to_end_sweep_and_composition_on_digits(tmp_path: Path) -> None:
    from misleader import load_oracle
    from misleader.experiments.report import build_report
    from misleader.experiments.runner import run_experiment

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_experiment(parse_spec(copy.deepcopy(E2E)), out=tmp_path)
    finally:
        torch.set_num_threads(old)
    assert summary.ok and summary.finished == 1 + 3 + 4, summary
    index = json.loads((tmp_path / "index.json").read_text())
    defs = {r["meta"]["defense_label"]: r for r in index["runs"] if r["stage"] == "defense"}
    composed = tmp_path / defs["rs+round"]["folder"]
    manifest = json.loads((composed / "manifest.json").read_text())
    assert [s["type"] for s in manifest["steps"] if s["kind"] == "output"] == ["reverse_sigmoid", "round"]
    assert manifest["steps"][-2]["beta"] == 0.5
    oracle = load_oracle(composed)
    p = oracle.query(torch.rand(3, *manifest["input_shape"]))
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)
    rep = build_report(tmp_path)
    md = Path(rep.markdown_path).read_text()
    assert "rs(beta=0.5)" in md and "rs(beta=1.0)" in md and "rs+round" in md
