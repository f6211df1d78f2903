"""Executors: run the jobs of a grid respecting their dependencies.

* :class:`LocalExecutor` -- ``jobs=1``: one after the other in this process (progress bars and logs
  as usual); ``jobs=N``: a pool of N spawned processes, each with ``cpu_count // N`` torch threads
  (or ``threads``), submitting every job whose parents have finished.
* :class:`RayExecutor` -- every job becomes a Ray task with the spec's ``resources``
  (``num_cpus``/``num_gpus``); a child task receives its parents' object refs, so Ray starts it as
  soon as they finish. It connects to ``ray_address`` / ``$RAY_ADDRESS`` / an already initialised
  Ray, else starts a local instance. ``pip install 'misleader[ray]'``; on a cluster every node needs
  misleader installed and the output folder on a shared file system.

Every executor calls :func:`misleader.experiments.runner.execute_stage` for a job and reports
``on_done(job, result, None)`` or ``on_done(job, None, error)``; a job whose parent failed is
reported with an error starting with ``"skipped"`` and never runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

OnStart = Callable[[Any], None]
OnDone = Callable[[Any, "dict[str, Any] | None", "str | None"], None]


class Executor(ABC):
    name = ""

    @abstractmethod
    def run(self, jobs: Sequence[Any], *, out: str, data_dir: str | None, device: str, on_start: OnStart,
            on_done: OnDone) -> None:
        """Run ``jobs`` (topologically sorted :class:`~misleader.experiments.runner.Job` objects)."""


def _skip_message(job: Any, failed: set[str]) -> str | None:
    bad = [d for d in job.deps if d in failed]
    return f"skipped: needs {', '.join(bad)}, which did not finish" if bad else None


class LocalExecutor(Executor):
    """Sequential (``jobs=1``) or a spawned process pool (``jobs>1``)."""

    name = "local"

    def __init__(self, *, jobs: int = 1, threads: int | None = None) -> None:
        if jobs < 1:
            raise MisleaderError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self.threads = threads

    def run(self, jobs, *, out, data_dir, device, on_start, on_done) -> None:  # noqa: ANN001
        if self.jobs == 1:
            self._sequential(jobs, out=out, data_dir=data_dir, device=device, on_start=on_start, on_done=on_done)
        else:
            self._pool(jobs, out=out, data_dir=data_dir, device=device, on_start=on_start, on_done=on_done)

    def _sequential(self, jobs, *, out, data_dir, device, on_start, on_done) -> None:  # noqa: ANN001
        from misleader.experiments.runner import StageFailed, execute_stage

        failed: set[str] = set()
        for job in jobs:
            skip = _skip_message(job, failed)
            if skip:
                failed.add(job.id)
                on_done(job, None, skip)
                continue
            on_start(job)
            try:
                result = execute_stage(job.payload, out=out, data_dir=data_dir, device=device, threads=self.threads,
                                       executor="local")
            except StageFailed as exc:
                failed.add(job.id)
                on_done(job, None, str(exc))
                continue
            on_done(job, result, None)

    def _pool(self, jobs, *, out, data_dir, device, on_start, on_done) -> None:  # noqa: ANN001
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        from misleader.experiments.runner import StageFailed, execute_stage

        threads = self.threads or max(1, (os.cpu_count() or 1) // self.jobs)
        # longest first among the ready jobs: trainings, then attacks by decreasing budget (a rough cost)
        rank = {"victim": 0, "defense": 1, "attack": 2}
        pending = sorted(jobs, key=lambda j: (rank.get(j.stage.stage, 3), -int(j.stage.config.get("budget", 0))))
        done: set[str] = set()
        failed: set[str] = set()
        running: dict[Any, Any] = {}
        level = logging.getLogger().getEffectiveLevel()
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(level, os.getpid())) as pool:
            try:
                while pending or running:
                    still: list[Any] = []
                    for job in pending:
                        skip = _skip_message(job, failed)
                        if skip:
                            failed.add(job.id)
                            on_done(job, None, skip)
                        elif all(d in done for d in job.deps) and len(running) < self.jobs:
                            on_start(job)
                            fut = pool.submit(execute_stage, job.payload, out=out, data_dir=data_dir, device=device,
                                              threads=threads, executor=f"local-pool-{self.jobs}")
                            running[fut] = job
                        else:
                            still.append(job)
                    pending = still
                    if not running:
                        if pending:  # cannot happen for a plan from runner.plan(): every dep is a job
                            raise RuntimeError(f"jobs wait for unknown runs: {[j.id for j in pending]}")
                        continue
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = running.pop(fut)
                        try:
                            result = fut.result()
                        except StageFailed as exc:
                            failed.add(job.id)
                            on_done(job, None, str(exc))
                        except Exception as exc:  # noqa: BLE001 - a crashed worker process
                            failed.add(job.id)
                            on_done(job, None, f"{type(exc).__name__}: {exc}")
                        else:
                            done.add(job.id)
                            on_done(job, result, None)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _init_worker(level: int, parent: int | None = None) -> None:
    from misleader.utils import set_quiet

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_quiet(True)  # several bars from several processes would interleave
    if parent is not None:
        exit_when_orphaned(parent=parent)


def exit_when_orphaned(*, parent: int, interval: float = 1.0) -> threading.Thread:
    """Watch (daemon thread) for the runner's death and end this worker process at once.

    A pool worker whose runner was killed (``kill``, a closed terminal, an OOM kill) would otherwise go on
    with its stage and finish it into the output folder unobserved, racing the next ``misleader run`` that
    resumes the same folder. Its unfinished work stays in a ``.partial`` folder, which the next run redoes.
    """
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                logging.getLogger(__name__).error("the runner (pid %d) is gone: this worker stops", parent)
                os._exit(3)
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread


class RayExecutor(Executor):
    """Ray tasks with per-stage ``num_cpus`` / ``num_gpus``; dependencies are object refs."""

    name = "ray"

    def __init__(self, *, address: str | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MisleaderError("the ray executor needs Ray: pip install 'misleader[ray]'") from None
        self.address = address

    def run(self, jobs, *, out, data_dir, device, on_start, on_done) -> None:  # noqa: ANN001
        import ray

        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, log_to_driver=True)
        out_abs = os.path.abspath(out)
        remote = ray.remote(_ray_stage)
        refs: dict[str, Any] = {}
        by_ref: dict[Any, Any] = {}
        for job in jobs:
            r = job.stage.resources
            threads = max(1, int(r.num_cpus)) if r.num_cpus else None
            parents = [refs[d] for d in job.deps if d in refs]
            ref = remote.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=0,
                                 name=f"{job.stage.stage}:{job.id}").remote(
                job.payload, out_abs, data_dir, device, threads, *parents)
            refs[job.id] = ref
            by_ref[ref] = job
        log.info("submitted %d Ray tasks (resources per stage from the spec)", len(jobs))
        for job in jobs:  # Ray schedules by itself; the first wave can start at once
            if not job.deps:
                on_start(job)
        errors: dict[str, str] = {}
        left = list(by_ref)
        try:
            while left:
                ready, left = ray.wait(left, num_returns=1)
                for ref in ready:
                    job = by_ref[ref]
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - RayTaskError wrapping the stage's (or a parent's) error
                        errors[job.id] = _ray_error_message(exc)
                    else:
                        on_done(job, result, None)
        except BaseException:  # Ctrl-C: stop the tasks still queued or running (a rerun resumes them)
            for ref in left:
                ray.cancel(ref, force=True)
            raise
        # failures last, in dependency order, so that a parent's failure explains its children's
        failed: set[str] = set()
        for job in jobs:
            if job.id not in errors:
                continue
            failed.add(job.id)
            on_done(job, None, _skip_message(job, failed) or errors[job.id])


def _ray_stage(payload, out, data_dir, device, threads, *parents):  # noqa: ANN001, ANN202
    """The Ray task body: parents' results arrive as arguments (only to order the tasks)."""
    import logging as _logging

    from misleader.experiments.runner import execute_stage
    from misleader.utils import set_quiet

    if not _logging.getLogger().handlers:
        _logging.basicConfig(level=_logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_quiet(True)
    return execute_stage(payload, out=out, data_dir=data_dir, device=device, threads=threads, executor="ray")


def _ray_error_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}" if type(cause).__name__ != "StageFailed" else str(cause)
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def make_executor(name: str, *, jobs: int = 1, threads: int | None = None, ray_address: str | None = None) -> Executor:
    """``local`` or ``ray`` (Ray tasks use their ``num_cpus`` as thread count)."""
    if name == "local":
        return LocalExecutor(jobs=jobs, threads=threads)
    if name == "ray":
        return RayExecutor(address=ray_address)
    raise MisleaderError(f"unknown executor {name!r}: use local or ray")


__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor"]
