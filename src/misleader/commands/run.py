"""misleader run: run an experiment grid (victims x defenses x attacks x clones x budgets x seeds)."""

from __future__ import annotations

import argparse
import json

from misleader.commands.common import positive_int


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "run", help="run an experiment spec (resumable; local or Ray)",
        description="Expand SPEC.yaml into runs with stable ids and run every unfinished one into OUT "
                    "(victims, then defenses, then attacks). Rerunning the same command skips finished runs "
                    "and resumes interrupted ones. See experiments/*.yaml for presets.")
    p.add_argument("spec", help="experiment spec (YAML), e.g. experiments/mnist-cpu.yaml")
    p.add_argument("--out", required=True, help="output folder (victims/, defenses/, attacks/, index.json)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (default) or ray (pip install 'misleader[ray]')")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="local executor: runs in parallel (processes), default 1")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local Ray)")
    p.add_argument("--data-dir", default=None,
                   help="dataset root in torchvision layout (default: $MISLEADER_DATA, else ./data)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the spec's, else auto)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    p.add_argument("--report", action="store_true", help="build the report (misleader report OUT) afterwards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misleader.experiments.runner import plan, run_experiment
    from misleader.experiments.spec import load_spec

    spec = load_spec(args.spec)
    if args.dry_run:
        stages, status = plan(spec, args.out)
        for st in stages:
            state = "virtual " if st.virtual else f"{status[st.id]:8s}"
            what = ""
            if st.stage == "defense":  # the label, and what a composed defense wraps (built before it)
                base = st.meta.get("defense_base")
                what = f"  {st.meta.get('defense_label')}" + (f" (wraps {base})" if base else "")
            print(f"{state} {st.stage:8s} {st.folder}{what}")
        real = [st for st in stages if not st.virtual]
        print(f"{len(real)} runs, {sum(status[st.id] == 'finished' for st in real)} finished")
        return 0
    summary = run_experiment(spec, out=args.out, executor=args.executor, jobs=args.jobs, data_dir=args.data_dir,
                             device=args.device, ray_address=args.ray_address)
    print(json.dumps({"out": str(summary.out), "runs": summary.total, "ran": summary.finished,
                      "already_finished": summary.cached, "failed": [f"{i}: {e}" for i, e in summary.failed],
                      "skipped": len(summary.skipped), "seconds": round(summary.seconds, 1)}, indent=2))
    if args.report:
        from misleader.experiments.report import build_report

        rep = build_report(args.out)
        print(f"report: {rep.markdown_path}")
    return 0 if summary.ok else 1
