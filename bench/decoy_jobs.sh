#!/usr/bin/env bash
# Attack jobs for docs/results/decoy (issue 11). Usage: bench/decoy_jobs.sh JOBFILE WORKERS
# Each line of JOBFILE: OUTNAME TARGET ATTACK BUDGET SEED [extra misleader-attack flags...]
# A job waits until its target folder is finished (result.json for a defense, model.json for a victim).
set -u
export OMP_NUM_THREADS=1 MISLEADER_DATA=${MISLEADER_DATA:-/work/shared/data} PYTHONPATH=src
PY=${PY:-/work/main/.venv/bin/python}
job() {
  name=$1 target=$2 attack=$3 budget=$4 seed=$5; shift 5
  until [ -f "$target/result.json" ] || { [ -f "$target/model.json" ] && [ ! -f "$target/manifest.json" ]; }; do sleep 20; done
  "$PY" -m misleader attack "$attack" --target "$target" --budget "$budget" --clone-arch lenet5 --seed "$seed" \
    --out "runs/attacks/$name" --device cpu "$@" > "runs/attacks/$name.log" 2>&1 || echo "FAILED $name" >> runs/attacks/FAILED
}
export -f job; export PY
mkdir -p runs/attacks
grep -v '^#' "$1" | grep -v '^\s*$' | xargs -P "${2:-2}" -L 1 bash -c 'job "$@"' _
