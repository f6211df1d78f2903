"""The experiment runner: real tiny runs on digits, resume after a kill, failures, pool and Ray executors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from misleader.experiments.runner import run_experiment
from misleader.experiments.spec import expand, parse_spec

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "dataset": "digits",
    "victim": {"arch": "lenet5_fifth", "epochs": 1},
    "defenses": ["undefended"],
    "attacks": [
        {"name": "knockoff", "labels": "soft", "pool": "attacker", "budgets": [40], "options": {"epochs": 1}},
        {"name": "knockoff", "labels": "hard", "pool": "attacker", "budgets": [40], "options": {"epochs": 1}},
    ],
    "clone_archs": ["lenet5_fifth"],
    "seeds": [0, 1],
}


def _finished_files(out: Path) -> dict[str, float]:
    """mtime of every file inside finished run folders."""
    files = {}
    for sub in ("victims", "defenses", "attacks"):
        for run in (out / sub).glob("[!.]*"):
            for f in run.rglob("*"):
                if f.is_file():
                    files[str(f.relative_to(out))] = f.stat().st_mtime_ns
    return files


def _numbers(obj, prefix=""):  # noqa: ANN001, ANN202
    """Numeric leaves of a result dict, minus timings and environment."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "second" in k or k in ("environment", "wall_seconds"):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("local")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_experiment(parse_spec(TINY), out=out)
    finally:
        torch.set_num_threads(old)
    assert summary.ok and summary.finished == 5, summary
    return out


def test_layout_and_index(local_run: Path) -> None:
    stages = expand(parse_spec(TINY))
    index = json.loads((local_run / "index.json").read_text())
    assert [r["id"] for r in index["runs"]] == [s.id for s in stages]
    assert {r["status"] for r in index["runs"]} == {"finished"}
    for st in stages:
        folder = local_run / st.folder
        assert (folder / "result.json").is_file()
        if st.virtual:
            continue
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert cfg["id"] == st.id and cfg["config"] == st.config
        env = json.loads((folder / "env.json").read_text())
        assert {"torch", "git_sha", "device", "seconds"} <= set(env)
        if st.stage == "attack":
            assert (folder / "history.json").is_file()
            res = json.loads((folder / "result.json").read_text())
            assert res["queries_used"] <= 40 and res["labels"] == st.config["labels"]
    assert not list(local_run.glob("*/.*.partial")), "no partial folder after a complete run"
    assert yaml.safe_load((local_run / "spec.yaml").read_text()) == TINY


def test_rerun_skips_everything(local_run: Path) -> None:
    before = _finished_files(local_run)
    summary = run_experiment(parse_spec(TINY), out=local_run)
    assert summary.finished == 0 and summary.cached == 5 and summary.ok
    assert _finished_files(local_run) == before


def test_growing_the_grid_runs_only_the_new_runs(local_run: Path, tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    import shutil

    out = tmp_path / "grown"
    shutil.copytree(local_run, out)
    before = _finished_files(out)
    grown = json.loads(json.dumps(TINY))
    grown["seeds"] = [0, 1, 2]
    grown["attacks"][0]["label"] = "knockoff-soft"  # a label is cosmetic: no rerun, config.yaml refreshed
    summary = run_experiment(parse_spec(grown), out=out)
    assert summary.finished == 2 and summary.ok  # seed 2 of both attacks
    after = _finished_files(out)
    for f, mtime in before.items():
        if not f.endswith("config.yaml"):
            assert after[f] == mtime, f
    relabelled = [yaml.safe_load(p.read_text()) for p in out.glob("attacks/knockoff-soft-*/config.yaml")]
    assert {c["meta"]["attack_label"] for c in relabelled} == {"knockoff-soft"}


_HANG_SCRIPT = """
import sys, time
from pathlib import Path
import misleader.attacks.harness as harness

real = harness.run_attack
calls = []

def run_attack(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second attack hangs: the test kills us here
        (Path(kwargs["out"]).parent / ".hanging").write_text("x")  # outside the run's folder: not an attack file
        time.sleep(600)
    return real(*args, **kwargs)

harness.run_attack = run_attack
from misleader.cli import main
sys.exit(main(["-q", "run", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_kill_midway_then_resume(tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    spec_path, out = tmp_path / "tiny.yaml", tmp_path / "out"
    spec_path.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _HANG_SCRIPT, str(spec_path), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "attacks" / ".hanging").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first attack never finished"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished_attacks = [p for p in out.glob("attacks/*") if not p.name.startswith(".")]
    assert len(finished_attacks) == 1 and (finished_attacks[0] / "result.json").exists()
    partial = list(out.glob("attacks/.*.partial"))
    assert len(partial) == 1 and not (partial[0] / "result.json").exists()
    assert (partial[0] / "config.yaml").exists() and (partial[0] / "env.json").exists()
    before = _finished_files(out)
    assert len([f for f in before if f.endswith("result.json")]) == 2  # victim + first attack

    summary = run_experiment(parse_spec(TINY), out=out)
    assert summary.ok and summary.cached == 2 and summary.finished == 3
    after = _finished_files(out)
    assert {f: after[f] for f in before} == before, "finished runs were redone or rewritten"
    assert not list(out.glob("attacks/.*.partial"))
    index = json.loads((out / "index.json").read_text())
    assert {r["status"] for r in index["runs"]} == {"finished"}


def test_a_failing_run_is_isolated_and_retried(tmp_path: Path, monkeypatch, one_thread) -> None:  # noqa: ANN001
    import misleader.attacks.harness as harness

    real = harness.run_attack

    def flaky(name, **kw):  # noqa: ANN001, ANN202
        if kw["labels"] == "hard" and kw["seed"] == 1:
            raise RuntimeError("simulated crash")
        return real(name, **kw)

    monkeypatch.setattr(harness, "run_attack", flaky)
    summary = run_experiment(parse_spec(TINY), out=tmp_path)
    assert [e for _, e in summary.failed] == ["RuntimeError: simulated crash"] and summary.finished == 4
    index = {r["id"]: r for r in json.loads((tmp_path / "index.json").read_text())["runs"]}
    failed_id = summary.failed[0][0]
    assert index[failed_id]["status"] == "failed"
    err = list(tmp_path.glob(f"attacks/.{failed_id}.partial/error.txt"))
    assert err and "simulated crash" in err[0].read_text()
    monkeypatch.setattr(harness, "run_attack", real)
    before = _finished_files(tmp_path)
    summary = run_experiment(parse_spec(TINY), out=tmp_path)
    assert summary.ok and summary.finished == 1
    assert {f: m for f, m in _finished_files(tmp_path).items() if f in before} == before


def test_children_of_a_failed_victim_are_skipped(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import misleader.training.victim as victim

    def broken(**kw):  # noqa: ANN003, ANN202
        raise ValueError("no victim today")

    monkeypatch.setattr(victim, "train_victim", broken)
    summary = run_experiment(parse_spec(TINY), out=tmp_path)
    assert len(summary.failed) == 1 and len(summary.skipped) == 4 and not summary.ok
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(r["status"] for r in index["runs"]) == ["failed", "failed", "skipped", "skipped", "skipped",
                                                          "skipped"]  # the undefended stage follows its victim


def test_process_pool_gives_the_same_results(local_run: Path, tmp_path: Path) -> None:
    summary = run_experiment(parse_spec(TINY), out=tmp_path, jobs=2, threads=1)
    assert summary.ok and summary.finished == 5
    _assert_same_results(local_run, tmp_path)


def _assert_same_results(a: Path, b: Path) -> None:
    ra = sorted(p.relative_to(a) for p in a.glob("*/*/result.json"))
    rb = sorted(p.relative_to(b) for p in b.glob("*/*/result.json"))
    assert ra == rb and ra
    for rel in ra:
        na, nb = _numbers(json.loads((a / rel).read_text())), _numbers(json.loads((b / rel).read_text()))
        assert na == nb, rel
        assert (a / rel).with_name("config.yaml").read_text() == (b / rel).with_name("config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ray.init + worker start-up is slow on a loaded 2-core machine
def test_ray_executor_matches_local(local_run: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'misleader[ray]')")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_experiment(parse_spec(TINY), out=tmp_path, executor="ray")
        seconds = time.perf_counter() - t0
        # a run that fails inside a Ray task is reported with its own message; the grid goes on
        bad = json.loads(json.dumps(TINY))
        bad["attacks"].append({"name": "knockoff", "label": "broken", "budgets": [40], "pool": "npz:/no/such.npz"})
        failing = run_experiment(parse_spec(bad), out=tmp_path, executor="ray")
    finally:
        ray.shutdown()
    assert summary.ok and summary.finished == 5
    _assert_same_results(local_run, tmp_path)
    envs = [json.loads(p.read_text()) for p in tmp_path.glob("attacks/*/env.json")]
    assert {e["executor"] for e in envs} == {"ray"}
    assert failing.finished == 0 and failing.cached == 5 and len(failing.failed) == 2  # seeds 0 and 1
    assert all("npz dataset /no/such.npz not found" in e for _, e in failing.failed), failing.failed
    print(f"ray executor: {seconds:.1f}s including ray.init")


def test_misleader_defense_stage(tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    spec = json.loads(json.dumps(TINY))
    spec["defenses"] = [{"name": "misleader", "members": ["lenet5_fifth"], "epochs": 1, "preset": "digits-cpu"}]
    spec["attacks"] = spec["attacks"][:1]
    spec["seeds"] = [0]
    summary = run_experiment(parse_spec(spec), out=tmp_path)
    assert summary.ok and summary.finished == 3
    (defense,) = [p for p in (tmp_path / "defenses").iterdir() if not p.name.startswith(".")]
    assert (defense / "manifest.json").exists() and (defense / "config.yaml").exists()
    res = json.loads(next((tmp_path / "attacks").glob("*/result.json")).read_text())
    assert res["target_kind"] == "defense"


def test_one_runner_per_output_folder(tmp_path: Path) -> None:
    """A refused second run (another spec, same --out) leaves the first run's spec.yaml and index.json as they were."""
    import fcntl

    from misleader.errors import MisleaderError

    (tmp_path / "spec.yaml").write_text("first run's spec\n")
    (tmp_path / "index.json").write_text('{"first": true}\n')
    other = json.loads(json.dumps(TINY)) | {"name": "another"}
    with open(tmp_path / ".runner.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MisleaderError, match="another `misleader run` is writing"):
            run_experiment(parse_spec(other), out=tmp_path)
    assert (tmp_path / "spec.yaml").read_text() == "first run's spec\n"
    assert (tmp_path / "index.json").read_text() == '{"first": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runner.lock", "index.json", "spec.yaml"]


def test_dry_run_refuses_bad_settings_before_anything_trains(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`misleader run --dry-run` (and a real run) fail on settings the builders and attacks would refuse later."""
    from misleader.cli import main

    bad = {
        "preset": lambda s: s["defenses"].append({"name": "misleader", "members": ["lenet5_fifth"], "epochs": 1,
                                                  "preset": "no-such-preset"}),
        "member_settings": lambda s: s["defenses"].append({"name": "misleader", "members": ["lenet5_fifth"],
                                                           "epochs": 1, "member_settings": [{"lamda": 1}]}),
        "pool": lambda s: s["attacks"][0].update(pool="cifar10-subsett"),
        "dfme-hard": lambda s: s["attacks"].append({"name": "dfme", "labels": "hard", "budgets": [100]}),
        "options-type": lambda s: s["attacks"][0]["options"].update(epochs="abc"),
    }
    for what, mutate in bad.items():
        spec = json.loads(json.dumps(TINY))
        mutate(spec)
        path = tmp_path / f"{what}.yaml"
        path.write_text(yaml.safe_dump(spec))
        out = tmp_path / f"out-{what}"
        for argv in (["run", str(path), "--out", str(out), "--dry-run"], ["run", str(path), "--out", str(out)]):
            assert main(["-q", *argv]) == 2, what
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists(), what  # nothing trained, nothing written
