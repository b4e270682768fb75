"""Plan and run a grid: one directory per (method, seed), the base model once, resumable."""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmoe.data.tasks import DOMAIN_TASK_NAMES
from medmoe.experiments.grid import BASE_RUN, Grid, cli_override
from medmoe.experiments.worker import RunSpec, execute, read_results

__all__ = ["GridOutcome", "RunOutcome", "plan_runs", "run_command", "run_grid", "run_spec"]

RUN_LOG = "run.log"
ERROR_FILE = "error.txt"
COMMAND_FILE = "command.sh"


def _logger(run_dir: Path) -> str:
    """The run's TensorBoard logger writing straight into ``run_dir`` (no name/version)."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    return f"--trainer.logger={json.dumps(logger)}"


def _run_args(
    subcommand: str,
    configs: Sequence[Path],
    overrides: dict[str, Any],
    extra: Sequence[str],
    seed: int,
    run_dir: Path,
) -> list[str]:
    args = [subcommand]
    for config in configs:
        args += ["--config", str(config)]
    args += [cli_override(key, value) for key, value in overrides.items()]
    args += list(extra)
    args += [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        _logger(run_dir),
        "--trainer.enable_progress_bar=false",
    ]
    return args


def plan_runs(
    grid: Grid,
    out_dir: str | os.PathLike,
    extra: Sequence[str] = (),
    threads: int | None = None,
) -> list[RunSpec]:
    """The base-model run, then every (method, seed), as :class:`RunSpec` (nothing is run).

    Arguments of a run, in order: ``--config`` base config(s), the method's fragments, the
    grid's overrides, the method's overrides, ``extra`` (``--set`` of the command line), then
    the run's seed, logger (TensorBoard into the run directory) and no progress bar.
    The base model is the base config under ``medmoe validate`` with no validation batch,
    scored with its adapter switched off.
    """
    out_dir = Path(out_dir).resolve()
    base_dir = out_dir / BASE_RUN
    base_args = _run_args(
        "validate", grid.base, dict(grid.overrides), extra, grid.seeds[0], base_dir
    )
    base_args.append("--trainer.limit_val_batches=0")
    runs = [
        RunSpec(
            method=BASE_RUN,
            seed=None,
            run_dir=base_dir,
            cli_args=base_args,
            eval=grid.eval,
            base=True,
            threads=threads,
            label="Base Model",
        )
    ]
    for method in grid.methods:
        overrides = {**grid.overrides, **method.overrides}
        for seed in grid.seeds:
            run_dir = out_dir / method.name / f"seed_{seed}"
            args = _run_args("fit", (*grid.base, *method.configs), overrides, extra, seed, run_dir)
            runs.append(
                RunSpec(
                    method=method.name,
                    seed=seed,
                    run_dir=run_dir,
                    cli_args=args,
                    eval=grid.eval,
                    threads=threads,
                    label=method.label,
                )
            )
    return runs


def run_command(spec: RunSpec) -> str:
    """The equivalent ``medmoe`` command line (training only; scoring is the runner's)."""
    return shlex.join(["medmoe", *spec.cli_args])


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "done", "skipped" (results existed), "failed"
    seconds: float = 0.0
    results: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class GridOutcome:
    out_dir: Path
    runs: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]


def _subprocess(spec: RunSpec) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    command = [sys.executable, "-m", "medmoe.experiments", "--worker", str(spec.spec_path)]
    log = Path(spec.run_dir) / RUN_LOG
    with open(log, "w") as stream:
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"worker exited with code {code}; see {log}\n{tail}")


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so logging handlers
    and C code too) to ``log`` for the duration of a pooled run."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _pooled(spec: RunSpec) -> None:
    with _output_to(Path(spec.run_dir) / RUN_LOG):
        try:
            execute(spec)
        except BaseException:
            traceback.print_exc()  # into run.log, as a fresh process would
            raise


def _pool_worker(spec: RunSpec, rerun: bool) -> RunOutcome:
    """One run inside a long-lived worker process of the pool."""
    return run_spec(spec, rerun=rerun, mode="pooled")


def run_spec(
    spec: RunSpec, in_process: bool = False, rerun: bool = False, mode: str | None = None
) -> RunOutcome:
    """Run one spec unless its ``results.json`` exists (then it is skipped); never raises.

    ``mode``: ``"process"`` (a fresh interpreter, output in ``run.log``), ``"in-process"``
    (this process, output on the console) or ``"pooled"`` (this process, output in
    ``run.log``: a worker of :func:`run_grid`'s pool); default from ``in_process``.
    """
    mode = mode or ("in-process" if in_process else "process")
    run_dir = Path(spec.run_dir)
    if rerun and run_dir.exists():
        shutil.rmtree(run_dir)
    existing = read_results(run_dir)
    if existing is not None:
        return RunOutcome(spec, "skipped", results=existing)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    spec.write()
    (run_dir / COMMAND_FILE).write_text(f"#!/bin/sh\n{run_command(spec)}\n")
    began = time.perf_counter()
    try:
        if mode == "in-process":
            execute(spec)
        elif mode == "pooled":
            _pooled(spec)
        else:
            _subprocess(spec)
        results = read_results(run_dir)
        if results is None:
            raise RuntimeError(f"the run finished without writing {spec.results_path}")
    except Exception as error:  # a failed run is reported; the grid goes on
        message = f"{type(error).__name__}: {error}"
        (run_dir / ERROR_FILE).write_text(traceback.format_exc())
        return RunOutcome(spec, "failed", time.perf_counter() - began, error=message)
    return RunOutcome(spec, "done", time.perf_counter() - began, results=results)


def _describe(outcome: RunOutcome) -> str:
    spec = outcome.spec
    name = spec.method if spec.seed is None else f"{spec.method} seed {spec.seed}"
    if outcome.status == "failed":
        return f"{name}: FAILED after {outcome.seconds:.0f} s ({outcome.error.splitlines()[0]})"
    scores = (outcome.results or {}).get("scores", {})
    medical = [scores[t] for t in DOMAIN_TASK_NAMES if t in scores]
    average = f", medical avg {100 * sum(medical) / len(medical):.1f}" if medical else ""
    if outcome.status == "skipped":
        return f"{name}: results exist, skipped{average}"
    results = outcome.results or {}
    return (
        f"{name}: done in {outcome.seconds:.0f} s (fit {results.get('fit_seconds', 0):.0f} s, "
        f"eval {results.get('eval_seconds', 0):.0f} s){average}"
    )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class _Progress:
    """``[done/total, elapsed, ~remaining]``: remaining = the mean wall time of the trained
    runs that actually ran (not skipped ones, not the base model's scoring) x the runs left /
    the runs going at once."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs, self.done = total, jobs, 0
        self.began = time.perf_counter()
        self.run_seconds: list[float] = []

    def step(self, result: RunOutcome) -> str:
        self.done += 1
        if result.status != "skipped" and not result.spec.base:
            self.run_seconds.append(result.seconds)
        elapsed = time.perf_counter() - self.began
        left = self.total - self.done
        if not left:
            eta = "done"
        elif self.run_seconds:
            mean = sum(self.run_seconds) / len(self.run_seconds)
            eta = f"~{_clock(mean * left / min(self.jobs, left))} left"
        else:
            eta = "remaining unknown"
        return f"[{self.done}/{self.total}, {_clock(elapsed)} elapsed, {eta}]"


def run_grid(
    grid: Grid,
    out_dir: str | os.PathLike,
    *,
    extra: Sequence[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    in_process: bool = False,
    fresh_processes: bool = False,
    rerun: bool = False,
    fail_fast: bool = False,
    log: Callable[[str], None] = print,
) -> GridOutcome:
    """Run every planned spec (the base model first), skipping those with results.

    By default ``jobs`` long-lived worker processes run the specs one after another each
    (the interpreter and its imports start once per worker, not once per run); with
    ``fresh_processes`` every run gets a new interpreter; with ``in_process`` (``jobs`` = 1)
    runs go in this process.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if in_process and jobs > 1:
        raise ValueError("in-process runs go one at a time: use jobs=1 or subprocesses")
    specs = plan_runs(grid, out_dir, extra, threads)
    outcome = GridOutcome(Path(out_dir).resolve())
    progress = _Progress(len(specs), jobs)

    def record(result: RunOutcome) -> RunOutcome:
        outcome.runs.append(result)
        log(f"{progress.step(result)} {_describe(result)}")
        return result

    if in_process:
        for spec in specs:
            result = record(run_spec(spec, rerun=rerun, mode="in-process"))
            if result.status == "failed" and fail_fast:
                break
        return outcome
    if fresh_processes:
        pool: Executor = ThreadPoolExecutor(max_workers=jobs)
        submit = functools.partial(run_spec, rerun=rerun, mode="process")
    else:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        submit = functools.partial(_pool_worker, rerun=rerun)
    with pool:
        first = record(_result(pool.submit(submit, specs[0]), specs[0]))
        if first.status == "failed" and fail_fast:
            return outcome
        futures = {pool.submit(submit, spec): spec for spec in specs[1:]}
        for future in as_completed(futures):
            result = record(_result(future, futures[future]))
            if result.status == "failed" and fail_fast:
                for pending in futures:
                    pending.cancel()
                break
    return outcome


def _result(future: Future, spec: RunSpec) -> RunOutcome:
    """The future's outcome; a worker process that died is a failed run, not a crash."""
    try:
        return future.result()
    except Exception as error:  # BrokenProcessPool: the worker died (killed, out of memory)
        return RunOutcome(spec, "failed", error=f"{type(error).__name__}: {error}")
