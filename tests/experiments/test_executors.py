"""The local pool's workers stop when their runner dies (no orphan finishing stages into the folder)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _run(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_worker_whose_runner_is_gone_exits_at_once():
    # the "runner" pid given is not this process's parent: the watchdog must end the process with status 3
    t0 = time.monotonic()
    r = _run("import os, time\n"
             "from misleader.experiments.executors import exit_when_orphaned\n"
             "exit_when_orphaned(parent=os.getppid() + 1_000_000, interval=0.05)\n"
             "time.sleep(20)\n"
             "raise SystemExit(0)\n")
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - t0 < 15


def test_a_worker_with_its_runner_alive_keeps_working():
    r = _run("import os, time\n"
             "from misleader.experiments.executors import exit_when_orphaned\n"
             "exit_when_orphaned(parent=os.getppid(), interval=0.02)\n"
             "time.sleep(0.3)\n"
             "print('finished')\n")
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr
