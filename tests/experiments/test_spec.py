"""Experiment specs: strict validation, expansion into stages, stable ids, the shipped presets."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from misleader.errors import MisleaderError
from misleader.experiments.spec import expand, load_spec, parse_budget, parse_spec

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "experiments").glob("*.yaml"))


def base() -> dict:
    return {
        "name": "t",
        "dataset": "digits",
        "victim": {"arch": "lenet5", "epochs": 2},
        "defenses": ["undefended", {"name": "misleader", "members": ["lenet5", "lenet5_half"], "epochs": 1}],
        "attacks": [
            {"name": "knockoff", "labels": "soft", "pool": "attacker", "budgets": [50, "1k"]},
            {"name": "knockoff", "labels": "hard", "pool": "attacker", "budgets": [50]},
            {"name": "dfme", "budgets": ["10k"], "options": {"preset": "cpu"}},
        ],
        "clone_archs": ["lenet5", "lenet5_half"],
        "seeds": [0, 1],
    }


def test_expansion_counts_and_order() -> None:
    stages = expand(parse_spec(base()))
    kinds = [s.stage for s in stages]
    assert kinds == sorted(kinds, key=["victim", "defense", "attack"].index)  # parents first
    assert kinds.count("victim") == 1 and kinds.count("defense") == 2
    # (2 + 1 + 1 budgets) x 2 clones x 2 seeds x 2 defenses
    assert kinds.count("attack") == 4 * 2 * 2 * 2
    assert len({s.id for s in stages}) == len(stages)
    ids = {s.id: s for s in stages}
    for s in stages:
        assert all(p in ids for p in s.parents)
    undef = [s for s in stages if s.stage == "defense" and s.virtual]
    assert len(undef) == 1 and undef[0].folder == ids[undef[0].parents[0]].folder  # the victim folder itself
    trained = [s for s in stages if s.stage == "defense" and not s.virtual]
    assert trained[0].folder.startswith("defenses/") and trained[0].meta["defense_arch"] == "lenet5+lenet5_half"
    assert {s.meta["budget"] for s in stages if s.stage == "attack"} == {50, 1000, 10_000}


def test_victim_seeds_multiply_victims_and_defenses() -> None:
    spec = base() | {"victim_seeds": [0, 1, 2]}
    stages = expand(parse_spec(spec))
    assert sum(s.stage == "victim" for s in stages) == 3
    assert sum(s.stage == "defense" and not s.virtual for s in stages) == 3
    seeds = {s.config["seed"] for s in stages if s.stage == "defense" and not s.virtual}
    assert seeds == {0, 1, 2}


def _ids(spec: dict) -> list[str]:
    return [s.id for s in expand(parse_spec(spec))]


def _shuffled(obj, rng: random.Random):  # noqa: ANN001, ANN202
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_ids_do_not_depend_on_key_order(seed: int) -> None:
    spec = base()
    assert _ids(_shuffled(copy.deepcopy(spec), random.Random(seed))) == _ids(spec)


def test_ids_ignore_labels_devices_resources_but_not_settings() -> None:
    ref = _ids(base())
    cosmetic = base() | {"device": "cpu", "description": "x", "resources": {"attack": {"num_cpus": 2, "num_gpus": 1}}}
    cosmetic["defenses"][1]["label"] = "renamed"
    cosmetic["attacks"][0]["label"] = "renamed-attack"
    assert _ids(cosmetic) == ref
    # a change of what a stage computes changes its id and every descendant's, and nothing else
    changed = base()
    changed["defenses"][1]["epochs"] = 2
    stages_ref = {s.id: s for s in expand(parse_spec(base()))}
    stages_new = expand(parse_spec(changed))
    for s in stages_new:
        under_misleader = s.meta.get("defense") == "misleader"
        assert (s.id in stages_ref) == (not under_misleader), s.id
    changed = base()
    changed["victim"]["epochs"] = 3
    assert not set(_ids(changed)) & set(ref)  # everything hangs off the victim


def test_readable_id_prefixes() -> None:
    stages = expand(parse_spec(base()))
    v = stages[0]
    assert v.id.startswith("digits-lenet5-s0-") and v.folder == f"victims/{v.id}"
    a = [s for s in stages if s.stage == "attack" and s.config["budget"] == 1000][0]
    assert a.id.startswith("knockoff-soft-") and "-1k-" in a.id and a.folder == f"attacks/{a.id}"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.update(budget=[1]), r"unknown key 'budget' \(did you mean 'budgets'\?\)"),
        (lambda s: s["victim"].update(epoch=3), r"victim: unknown key 'epoch' \(did you mean 'epochs'\?\)"),
        (lambda s: s["defenses"][1].update(member=["lenet5"]), r"defenses\[1\]: unknown key 'member'"),
        (lambda s: s["defenses"][1].update(name="misleeder"), r"unknown defense 'misleeder' \(did you mean 'misleader'"),
        (lambda s: s["defenses"][1].pop("members"), r"defense 'misleader' needs members"),
        (lambda s: s["attacks"][0].update(name="knockof"), r"unknown attack 'knockof' \(did you mean 'knockoff'"),
        (lambda s: s["attacks"][0].update(labels="probs"), r"attacks\[0\].labels: must be one of soft, hard"),
        (lambda s: s["attacks"][0].update(budgets=["lots"]), r"cannot read 'lots' as a query count"),
        (lambda s: s["attacks"][0].update(budgets=[0]), r"budget must be >= 1"),
        (lambda s: s["attacks"][0].update(optionz={}), r"attacks\[0\]: unknown key 'optionz'"),
        (lambda s: s["attacks"][2].update(options={"preset": "cpu", "batchsize": 3}), r"attacks\[2\].options: .*batchsize"),
        (lambda s: s.update(clone_archs=["resnet9000"]), r"clone_archs\[0\]: unknown architecture 'resnet9000'"),
        (lambda s: s.update(dataset="mnits"), r"unknown dataset 'mnits' \(did you mean 'mnist'\?\)"),
        (lambda s: s["victim"].update(epochs="ten"), r"victim.epochs: expected an integer"),
        (lambda s: s.update(seeds=[0, 0]), r"seeds: has repeated values"),
        (lambda s: s.update(resources={"attack": {"gpus": 1}}), r"resources.attack: unknown key 'gpus'"),
        (lambda s: s["attacks"][1].update(labels="soft"), r"attack label 'knockoff' is already used"),
        (lambda s: s.pop("victim"), r"missing required key 'victim'"),
        (lambda s: s["victim"].update(split={"val_fraction": 0.5, "attacker_fraction": 0.45}), r"victim.split"),
        (lambda s: s["victim"].update(lr=-0.1), r"victim.lr: must be >= 0"),
        (lambda s: s["victim"].update(lr=0), r"victim.lr: must be a positive finite number"),
        (lambda s: s["attacks"][0].update(options={"epochs": "abc"}),
         r"attacks\[0\].options.epochs: expected int like the default 20, got 'abc'"),
        (lambda s: s["attacks"][0].update(options={"lr": "fast"}), r"options.lr: expected float"),
        (lambda s: s["attacks"][2].update(options={"preset": "gpu-huge"}), r"unknown dfme preset 'gpu-huge'"),
        (lambda s: s["attacks"][2].update(labels="hard"), r"attacks\[2\].labels: attack 'dfme' cannot work with "
                                                          r"hard labels: use soft"),
        (lambda s: s["attacks"][2].update(pool="attacker"), r"attack 'dfme' uses no pool"),
        (lambda s: s["attacks"][0].update(pool="atacker"), r"unknown pool 'atacker' \(did you mean 'attacker'"),
        (lambda s: s["attacks"][0].update(pool="digits"), r"pool 'digits' is the victim's own dataset"),
        (lambda s: s["defenses"][1].update(preset="mnist-gpu"), r"defenses\[1\]: unknown MISLEADER preset"),
        (lambda s: s.update(dataset="npz:/data/own.npz") or s["attacks"].append({"name": "dfms-hl", "budgets": [100]}),
         r"attacks\[3\].pool: dfms-hl has no default proxy set for a 'npz:/data/own.npz' target: pass `pool:`"),
        (lambda s: s["victim"].update(split={"attacker_fraction": 0}), r"attacks\[0\].pool: the attacker split is empty"),
        (lambda s: s["defenses"][1].update(member_settings=[{"lamda": 1}, {}]),
         r"defenses\[1\]: unknown member setting 'lamda'"),
        (lambda s: s["defenses"][1].update(member_settings=[{"lambda": "big"}, {}]),
         r"member_settings\[0\].lam: expected float"),
        (lambda s: s["defenses"][1].update(member_settings=[{}]), r"member_settings has 1 entries for 2 members"),
        (lambda s: s["defenses"][1].update(epochs="abc"), r"defenses\[1\].epochs: expected int"),
        (lambda s: s["defenses"][1].update(epochs=0), r"defenses\[1\].epochs: must be >= 1"),
        (lambda s: s["defenses"].__setitem__(0, {"name": "undefended", "epochs": 3}), r"defenses\[0\]: unknown key 'epochs'"),
    ],
)
def test_invalid_specs_name_the_problem(mutate, match) -> None:  # noqa: ANN001
    spec = base()
    mutate(spec)
    with pytest.raises(MisleaderError, match=match):
        parse_spec(spec, source="spec.yaml")


def test_identical_entries_are_refused() -> None:
    spec = base()
    spec["attacks"].append(dict(spec["attacks"][0], label="again"))
    with pytest.raises(MisleaderError, match="describe the same run"):
        expand(parse_spec(spec))


def test_top_level_budgets_are_the_default() -> None:
    spec = base()
    del spec["attacks"][2]["budgets"]
    with pytest.raises(MisleaderError, match="no query budget"):
        parse_spec(spec)
    spec["budgets"] = ["2M"]
    p = parse_spec(spec)
    assert p.attacks[2].budgets == (2_000_000,) and p.attacks[0].budgets == (50, 1000)


@given(st.integers(1, 10**12))
def test_parse_budget_roundtrip(n: int) -> None:
    assert parse_budget(n) == n
    assert parse_budget(str(n)) == n
    assert parse_budget(f"{n}k") == n * 1000
    assert parse_budget(f"{n}M") == n * 10**6


def test_parse_budget_fractions() -> None:
    assert parse_budget("1.5M") == 1_500_000
    assert parse_budget("2e6") == 2_000_000
    with pytest.raises(MisleaderError):
        parse_budget("1.5")
    with pytest.raises(MisleaderError):
        parse_budget(True)


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(MisleaderError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(MisleaderError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(MisleaderError, match="expected a mapping"):
        load_spec(bad)


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_validate_and_expand(path: Path) -> None:
    spec = load_spec(path)
    stages = expand(spec)
    assert stages and any(s.stage == "attack" for s in stages)
    assert spec.name == path.stem


def test_every_spec_the_docs_name_exists() -> None:
    """README, Makefile, docstrings and specs only name spec files that ship (and so load above)."""
    import re

    texts = [REPO / "README.md", REPO / "Makefile", *REPO.glob("src/**/*.py"), *PRESETS]
    named = {m for t in texts if t.exists() for m in re.findall(r"experiments/[A-Za-z0-9_.-]+\.yaml", t.read_text())}
    assert "experiments/demo.yaml" in named  # the search itself works
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing


def test_demo_yaml_equals_embedded_demo_spec() -> None:
    from misleader.experiments.demo import DEMO_SPEC

    assert yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text()) == DEMO_SPEC


def test_data_dir_placeholder(tmp_path: Path) -> None:
    from misleader.experiments.runner import expand_dataset

    assert expand_dataset("npz:{data_dir}/sub/x.npz", str(tmp_path)) == f"npz:{tmp_path.resolve()}/sub/x.npz"
    assert expand_dataset("mnist", str(tmp_path)) == "mnist"
    spec = load_spec(REPO / "experiments" / "cifar10-subset-cpu.yaml")
    assert "{data_dir}" in spec.dataset  # ids do not depend on where the data lives


def test_default_labels_follow_what_the_attack_can_use() -> None:
    spec = base()
    spec["attacks"].append({"name": "dfms-hl", "pool": "mnist", "budgets": [100]})  # mnist: not the victim's
    p = parse_spec(spec)
    assert p.attacks[-1].labels == "hard" and p.attacks[-1].label == "dfms-hl-hard"


def test_defenses_are_validated_from_the_registry(monkeypatch) -> None:
    """A defense registered later is accepted with exactly its builder's keyword settings and types."""
    from misleader.defenses.base import DEFENSES, DefenseSpec, register_defense

    def build(*, victim, base, out, data_dir, seed, device, force, beta: float, top_k: int | None = None):  # noqa: ANN001
        raise AssertionError("validation must not build anything")

    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))
    register_defense(DefenseSpec(name="toy-output", help="a test defense", build=build))
    spec = base()
    spec["defenses"].append({"name": "toy-output", "beta": 0.5, "top_k": 3})
    p = parse_spec(spec)
    assert p.defenses[-1].settings == {"beta": 0.5, "top_k": 3}
    for entry, match in [({"name": "toy-output"}, "needs beta"),
                         ({"name": "toy-output", "beta": 0.5, "gamma": 1}, "unknown key 'gamma'"),
                         ({"name": "toy-output", "beta": "x"}, r"beta: expected float, got 'x'"),
                         ({"name": "toy-output", "beta": 1, "top_k": 2.5}, "top_k: expected")]:
        spec = base()
        spec["defenses"].append(entry)
        with pytest.raises(MisleaderError, match=match):
            parse_spec(spec)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00binary", b"name: x\x00\n", b"\xff\xfe\x00d"])
def test_binary_spec_is_one_line_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(MisleaderError, match="binary file") as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_directory_spec_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MisleaderError, match="is a folder"):
        load_spec(tmp_path)


def test_an_attack_can_be_limited_to_some_defenses() -> None:
    """``defenses:`` keeps an attack's runs against the named defenses only, with the ids it has without it."""
    spec = base()
    spec["attacks"][2]["defenses"] = ["misleader"]
    limited = [s for s in expand(parse_spec(spec)) if s.stage == "attack" and s.meta["attack"] == "dfme"]
    full = [s for s in expand(parse_spec(base())) if s.stage == "attack" and s.meta["attack"] == "dfme"]
    assert {s.meta["defense_label"] for s in limited} == {"misleader"} and len(limited) == len(full) // 2
    assert {s.id for s in limited} <= {s.id for s in full}
    spec["attacks"][2]["defenses"] = ["misleadr"]
    with pytest.raises(MisleaderError, match=r"attacks\[2\]\.defenses\[0\].*did you mean 'misleader'"):
        parse_spec(spec)
