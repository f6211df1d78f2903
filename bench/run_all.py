"""Run every benchmark in bench/ (bench_*.py) one after another; results land in bench/results/.

Usage: .venv/bin/python bench/run_all.py [NAME_SUBSTRING ...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    wanted = sys.argv[1:]
    failed = 0
    for script in sorted(here.glob("bench_*.py")):
        if wanted and not any(w in script.name for w in wanted):
            continue
        print(f"== {script.name}", flush=True)
        failed += subprocess.call([sys.executable, str(script)], cwd=here.parent) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
