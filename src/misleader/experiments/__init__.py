"""Experiments: YAML specs (a grid of runs), a resumable runner (local or Ray), tables, figures, reports."""

from misleader.experiments.spec import ExperimentSpec, Stage, expand, load_spec, parse_spec

__all__ = ["ExperimentSpec", "Stage", "build_report", "expand", "load_spec", "parse_spec", "run_experiment"]


def __getattr__(name: str):  # lazy: the runner and the report pull in torch / matplotlib
    if name == "run_experiment":
        from misleader.experiments.runner import run_experiment

        return run_experiment
    if name == "build_report":
        from misleader.experiments.report import build_report

        return build_report
    raise AttributeError(name)
