"""Plan and run a grid: one directory per (method, seed), the base model once, resumable.

A grid with capacity matching (``match:``, :mod:`medmoe.experiments.capacity`) has its adapter
sizes resolved on the real models before any run starts (a :class:`GridError` refuses the
grid first). A grid with a ``tune:`` section (:mod:`medmoe.experiments.tuning`) runs in
stages: the base model, then the tuning runs (``<out>/tune/...``, scored on validation) and
the untuned methods' runs, then, once every tuning run has finished, the tuned methods'
reporting runs at the learning rates chosen on validation.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmoe.atomic import atomic_write_text
from medmoe.data.tasks import DOMAIN_TASK_NAMES
from medmoe.experiments.grid import (
    BASE_RUN,
    TUNE_SPLIT,
    EvalSettings,
    Grid,
    GridError,
    Method,
    cli_override,
)
from medmoe.experiments.worker import (
    LAST_CHECKPOINT,
    STOP_GRACE,
    RunSpec,
    die_with_parent,
    execute,
    read_results,
)
from medmoe.run_lock import LOCK_FILE, RunDirectoryBusy, RunDirectoryLock

__all__ = ["GridOutcome", "RunOutcome", "plan_runs", "run_command", "run_grid", "run_spec"]

RUN_LOG = "run.log"
ERROR_FILE = "error.txt"
COMMAND_FILE = "command.sh"
# exit statuses of a run stopped by a signal: medmoe fit's 143 / 130 after writing last.ckpt,
# or the signal itself (a process killed outside a fit)
NOT_STARTED = "not started"  # a spec a slot took back when the grid stopped (not recorded)
INTERRUPTED = {
    128 + signal.SIGTERM: "SIGTERM",
    128 + signal.SIGINT: "SIGINT",
    -signal.SIGTERM: "SIGTERM",
    -signal.SIGINT: "SIGINT",
}


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


def _method_specs(
    grid: Grid,
    method: Method,
    out_dir: Path,
    extra: Sequence[str],
    threads: int | None,
    added: dict[str, Any],
) -> list[RunSpec]:
    """The reporting runs of ``method``, one per seed; ``added``: overrides after the
    method's own (its matched adapter size, its chosen learning rates)."""
    overrides = {**grid.overrides, **method.overrides, **added}
    runs = []
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


@dataclass
class _Plan:
    """A grid's runs by stage: the base model, the tuning runs, the reporting runs that need
    no choice (``fixed``), and the tuned methods whose reporting runs wait for one."""

    grid: Grid
    out_dir: Path
    extra: Sequence[str]
    threads: int | None
    matches: dict[str, Any]  # method -> capacity.Matched
    base: RunSpec
    tuning: list[RunSpec]
    fixed: list[RunSpec]
    waiting: list[Method]  # methods whose family is tuned, in grid order

    def sized(self, method: Method) -> dict[str, Any]:
        matched = self.matches.get(method.name)
        return {} if matched is None else dict(matched.overrides)

    def placeholders(self) -> list[RunSpec]:
        """The waiting methods' runs without a chosen rate (for what is left; never run)."""
        return [
            spec
            for m in self.waiting
            for spec in _method_specs(
                self.grid, m, self.out_dir, self.extra, self.threads, self.sized(m)
            )
        ]

    def families(self) -> dict[str, set[str]]:
        """Tuned family -> the run directories of its tuning runs."""
        left: dict[str, set[str]] = {m.family: set() for m in self.waiting}
        for spec in self.tuning:
            left[spec.method.split("/")[1]].add(str(spec.run_dir))
        return left

    def resolve(
        self,
        write: bool = True,
        log: Callable[[str], None] | None = None,
        families: Sequence[str] | None = None,
    ) -> tuple[list[RunSpec], dict[str, str]]:
        """The waiting methods' runs (of ``families``; default all) at their families' chosen
        rates, and the methods that cannot be planned (method -> why: a tuning run without
        results)."""
        from medmoe.experiments.tuning import TuningIncomplete, choose, write_choices

        tune = self.grid.tune
        choices, why = {}, {}
        waiting = [m for m in self.waiting if families is None or m.family in families]
        for family in dict.fromkeys(m.family for m in waiting):
            try:
                choices[family] = choose(tune, family, self.out_dir)
            except (TuningIncomplete, ValueError) as error:
                why[family] = str(error)
        if write and choices:
            write_choices(self.out_dir, choices)
        for family, choice in choices.items() if log is not None else ():
            mean = choice.scores[choice.point.name]["mean"]
            log(
                f"tuning: {family} -> {choice.point.name} (validation medical avg {mean:.1f} "
                f"over tuning seeds {list(choice.seeds)})"
            )
        for family, reason in why.items() if log is not None else ():
            log(f"tuning: {family}: no choice, {reason}")
        specs, blocked = [], {}
        for m in waiting:
            if m.family in why:
                blocked[m.name] = why[m.family]
                continue
            added = {**self.sized(m), **choices[m.family].overrides}
            specs += _method_specs(self.grid, m, self.out_dir, self.extra, self.threads, added)
        return specs, blocked


def _plan(
    grid: Grid,
    out_dir: str | os.PathLike,
    extra: Sequence[str] = (),
    threads: int | None = None,
    write: bool = False,
    log: Callable[[str], None] | None = None,
) -> _Plan:
    out_dir = Path(out_dir).resolve()
    base_dir = out_dir / BASE_RUN
    base_args = _run_args(
        "validate", grid.base, dict(grid.overrides), extra, grid.seeds[0], base_dir
    )
    base_args.append("--trainer.limit_val_batches=0")
    base = RunSpec(
        method=BASE_RUN,
        seed=None,
        run_dir=base_dir,
        cli_args=base_args,
        eval=grid.eval,
        base=True,
        threads=threads,
        label="Base Model",
    )
    matches: dict[str, Any] = {}
    if any(m.match is not None for m in grid.methods):
        from medmoe.experiments.capacity import resolve_matches  # builds models: torch

        matches = resolve_matches(grid, out_dir, extra, write=write, log=log)
    tuned = set(grid.tune.methods) if grid.tune is not None else set()
    plan = _Plan(grid, out_dir, extra, threads, matches, base, [], [], [])
    for method in grid.methods:
        if method.family in tuned:
            plan.waiting.append(method)
        else:
            plan.fixed += _method_specs(grid, method, out_dir, extra, threads, plan.sized(method))
    if grid.tune is not None:
        plan.tuning = _tuning_specs(grid, plan, {m.family for m in plan.waiting})
    return plan


def _tuning_specs(grid: Grid, plan: _Plan, families: set[str]) -> list[RunSpec]:
    """Every (point, tuning seed) of the tuned families among the selected methods, scored on
    the validation split (``grid.tune.eval``)."""
    from medmoe.experiments.tuning import points, tuning_run_dir

    tune = grid.tune
    assert tune is not None
    specs = []
    for name in tune.methods:
        if name not in families:
            continue
        method = next((m for m in grid.methods if m.name == name), None)
        if method is None:  # a variant selected alone: its family's own config is not known
            variants = [m.name for m in grid.methods if m.family == name]
            raise GridError(
                f"{', '.join(variants)} take(s) the learning rate tuned for {name!r}: select "
                f"{name!r} too (its tuning runs train its own config)"
            )
        for point in points(tune, name):
            overrides = {
                **grid.overrides,
                **method.overrides,
                **plan.sized(method),
                **point.overrides,
            }
            for seed in tune.seeds:
                run_dir = tuning_run_dir(plan.out_dir, name, point, seed)
                configs = (*grid.base, *method.configs)
                args = _run_args("fit", configs, overrides, plan.extra, seed, run_dir)
                specs.append(
                    RunSpec(
                        method=f"tune/{name}/{point.name}",
                        seed=seed,
                        run_dir=run_dir,
                        cli_args=args,
                        eval=_validation(tune.eval),
                        threads=plan.threads,
                        label=f"{method.label} [tuning {point.name}]",
                    )
                )
    return specs


def _validation(settings: EvalSettings) -> EvalSettings:
    if settings.split != TUNE_SPLIT:  # never reached through load_grid; a hand-built Tune
        raise ValueError(f"tuning runs are scored on {TUNE_SPLIT!r}, got {settings.split!r}")
    return settings


def plan_runs(
    grid: Grid,
    out_dir: str | os.PathLike,
    extra: Sequence[str] = (),
    threads: int | None = None,
) -> list[RunSpec]:
    """The base-model run, then the tuning runs (a ``tune:`` section), then every
    (method, seed), as :class:`RunSpec` (nothing is run).

    Arguments of a run, in order: ``--config`` base config(s), the method's fragments, the
    grid's overrides, the method's overrides, its matched adapter size (``match:``) and
    chosen learning rates (``tune:``), ``extra`` (``--set`` of the command line), then
    the run's seed, logger (TensorBoard into the run directory) and no progress bar.
    The base model is the base config under ``medmoe validate`` with no validation batch,
    scored with its adapter switched off. A tuned method's reporting runs are listed only
    once its tuning runs all have results (the choice needs them).
    """
    plan = _plan(grid, out_dir, extra, threads)
    tuned: list[RunSpec] = []
    if plan.waiting:
        tuned, _ = plan.resolve(write=False)
    return [plan.base, *plan.tuning, *plan.fixed, *tuned]


def run_command(spec: RunSpec) -> str:
    """The equivalent ``medmoe`` command line (training only; scoring is the runner's)."""
    return shlex.join(["medmoe", *spec.cli_args])


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "done", "skipped" (results existed), "failed", "interrupted" (by a signal)
    seconds: float = 0.0
    results: dict[str, Any] | None = None
    error: str | None = None
    interrupted_by: str | None = None  # "SIGTERM" / "SIGINT" of an interrupted run


@dataclass
class GridOutcome:
    """What :func:`run_grid` did. ``interrupted_by``: ``"SIGTERM"`` / ``"SIGINT"`` when a signal
    to the runner stopped the grid (every worker stopped, the rest left for the next run)."""

    out_dir: Path
    runs: list[RunOutcome] = field(default_factory=list)
    interrupted_by: str | None = None
    left: list[RunSpec] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def interrupted(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "interrupted"]

    @property
    def exit_code(self) -> int:
        """128 + the signal when one stopped the grid; 1 with a failed or interrupted run."""
        if self.interrupted_by is not None:
            return 128 + int(signal.Signals[self.interrupted_by])
        return 1 if self.failed or self.interrupted else 0


class _Interrupted(Exception):
    """A run stopped by a signal (its fit wrote last.ckpt and exited 143 / 130)."""

    def __init__(self, by: str, detail: str = "") -> None:
        super().__init__(f"stopped by {by}{detail}")
        self.by = by


def _subprocess(
    spec: RunSpec,
    lock: RunDirectoryLock | None = None,
    started: Callable[[int], None] | None = None,
) -> None:
    """``spec`` in a fresh interpreter; it holds the run directory's lock with this process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    command = [sys.executable, "-m", "medmoe.experiments", "--worker", str(spec.spec_path)]
    log = Path(spec.run_dir) / RUN_LOG
    held = () if lock is None or lock.fd is None else (lock.fd,)
    with open(log, "w") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, pass_fds=held
        )
        if lock is not None:
            lock.set_holder(process.pid)
        if started is not None:
            started(process.pid)
        try:
            code = process.wait()
        finally:
            if lock is not None:
                lock.set_holder(os.getpid())
    if code in INTERRUPTED:
        raise _Interrupted(INTERRUPTED[code])
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
        except Exception:
            traceback.print_exc()  # into run.log, as a fresh process would
            raise
        except KeyboardInterrupt:
            print("medmoe.experiments: KeyboardInterrupt stopped the run", file=sys.stderr)
            raise


def _clear_run_directory(run_dir: Path) -> None:
    """Everything of ``run_dir`` but its lock (``--rerun``)."""
    for path in run_dir.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _resumes(run_dir: Path) -> str:
    if (run_dir / LAST_CHECKPOINT).is_file():
        return f"resumes from {LAST_CHECKPOINT}"
    return "starts over: no checkpoint yet"


def run_spec(
    spec: RunSpec,
    in_process: bool = False,
    rerun: bool = False,
    mode: str | None = None,
    started: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Run one spec unless its ``results.json`` exists (then it is skipped); never raises.

    ``mode``: ``"process"`` (a fresh interpreter, output in ``run.log``), ``"in-process"``
    (this process, output on the console) or ``"pooled"`` (this process, output in
    ``run.log``: a worker of :func:`run_grid`'s pool); default from ``in_process``.
    ``started`` is called with the process id of a fresh interpreter once it runs.

    The run directory is locked for the run (:class:`~medmoe.run_lock.RunDirectoryLock`): a
    directory another live process writes is a failed outcome naming that process, and
    nothing in it is touched. A run stopped by a signal (its fit exits 143 / 130 after writing
    ``last.ckpt``, or a Ctrl-C) is ``"interrupted"``, never finished: no ``results.json``.
    """
    mode = mode or ("in-process" if in_process else "process")
    run_dir = Path(spec.run_dir)
    lock = RunDirectoryLock(run_dir)
    try:
        lock.acquire()
    except RunDirectoryBusy as busy:
        return RunOutcome(spec, "failed", error=str(busy))
    except OSError as error:  # a read-only or missing parent, a full disk
        return RunOutcome(spec, "failed", error=f"cannot lock {lock.path}: {error}")
    with lock:
        if lock.took_over is not None:
            print(
                f"medmoe.experiments: {run_dir}: took over the stale lock of process "
                f"{lock.took_over} (gone)",
                file=sys.stderr,
                flush=True,
            )
        if rerun:
            _clear_run_directory(run_dir)
        existing = read_results(run_dir)
        if existing is not None:
            return RunOutcome(spec, "skipped", results=existing)
        began = time.perf_counter()
        try:
            (run_dir / ERROR_FILE).unlink(missing_ok=True)
            spec.write()
            atomic_write_text(run_dir / COMMAND_FILE, f"#!/bin/sh\n{run_command(spec)}\n")
            try:
                if mode == "in-process":
                    execute(spec)
                elif mode == "pooled":
                    _pooled(spec)
                else:
                    _subprocess(spec, lock, started)
            except KeyboardInterrupt:
                raise _Interrupted("SIGINT") from None
            except SystemExit as exit_:  # medmoe fit: 143 / 130 after a signal, else a failure
                code = exit_.code if isinstance(exit_.code, int) else 1
                if code in INTERRUPTED:
                    raise _Interrupted(INTERRUPTED[code]) from None
                raise RuntimeError(f"the run exited with status {code}") from None
            results = read_results(run_dir)
            if results is None:
                raise RuntimeError(f"the run finished without writing {spec.results_path}")
        except _Interrupted as stop:
            seconds = time.perf_counter() - began
            return RunOutcome(
                spec,
                "interrupted",
                seconds,
                error=f"{stop}; {_resumes(run_dir)}",
                interrupted_by=stop.by,
            )
        except Exception as error:  # a failed run is reported; the grid goes on
            message = f"{type(error).__name__}: {error}"
            with contextlib.suppress(OSError):  # the disk may be what failed
                atomic_write_text(run_dir / ERROR_FILE, traceback.format_exc())
            return RunOutcome(spec, "failed", time.perf_counter() - began, error=message)
    return RunOutcome(spec, "done", time.perf_counter() - began, results=results)


def _serve(connection: Any, parent: int) -> None:
    """A long-lived worker process: runs the specs the runner sends, one at a time, until it
    is sent ``None``, its runner goes, or a run of it is interrupted."""
    die_with_parent(parent)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        spec, rerun = message
        outcome = run_spec(spec, rerun=rerun, mode="pooled")
        try:
            connection.send(outcome)
        except OSError:
            return
        if outcome.status == "interrupted":
            return


class _Worker:
    """A worker process of the runner's pool and the pipe to it."""

    def __init__(self, context: Any) -> None:
        self.connection, theirs = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(theirs, os.getpid()), name="medmoe-grid-worker"
        )
        self.process.start()
        theirs.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def run(self, spec: RunSpec, rerun: bool) -> RunOutcome:
        try:
            self.connection.send((spec, rerun))
            return self.connection.recv()
        except (EOFError, OSError):  # the process died: killed, out of memory, a signal
            self.process.join(timeout=10)
            code = self.process.exitcode
            message = (
                f"worker process {self.pid} ended (exit code {code}) during the run; "
                f"see {Path(spec.run_dir) / RUN_LOG}"
            )
            if code in INTERRUPTED:
                by = INTERRUPTED[code]
                error = f"stopped by {by}; {_resumes(Path(spec.run_dir))}"
                return RunOutcome(spec, "interrupted", error=error, interrupted_by=by)
            return RunOutcome(spec, "failed", error=f"RuntimeError: {message}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()
        self.process.join()


class _Pool:
    """``jobs`` slots, each running one spec at a time: in a long-lived worker process, or
    (``fresh``) in a new interpreter per run. Every process dies with the runner, and
    :meth:`stop` signals them all."""

    def __init__(self, jobs: int, rerun: bool, fresh: bool) -> None:
        self.rerun, self.fresh = rerun, fresh
        self.todo: queue.Queue[RunSpec | None] = queue.Queue()
        self.done: queue.Queue[RunOutcome] = queue.Queue()
        self.stopping = threading.Event()
        self.pids: dict[int, int] = {}  # slot -> its live process
        self.context = mp.get_context("spawn")
        self.threads = [
            threading.Thread(target=self._slot, args=(i,), name=f"medmoe-grid-slot-{i}")
            for i in range(jobs)
        ]
        for thread in self.threads:
            thread.start()

    def _started(self, slot: int, pid: int) -> None:
        self.pids[slot] = pid
        if self.stopping.is_set():  # stopped between taking the spec and starting it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _slot(self, slot: int) -> None:
        worker: _Worker | None = None
        try:
            while (spec := self.todo.get()) is not None:
                if self.stopping.is_set():
                    self.done.put(RunOutcome(spec, NOT_STARTED))
                    continue
                try:
                    if self.fresh:
                        outcome = run_spec(
                            spec,
                            rerun=self.rerun,
                            mode="process",
                            started=lambda pid: self._started(slot, pid),
                        )
                        self.pids.pop(slot, None)
                    else:
                        if worker is None:
                            worker = _Worker(self.context)
                            self._started(slot, worker.pid)
                        outcome = worker.run(spec, self.rerun)
                        if outcome.status == "interrupted" or not worker.process.is_alive():
                            worker.close()  # it ends after an interrupted run; a new one next
                            worker = None
                            self.pids.pop(slot, None)  # its process id may be reused
                except Exception as error:  # never leave the runner waiting for this spec
                    outcome = RunOutcome(spec, "failed", error=f"{type(error).__name__}: {error}")
                self.done.put(outcome)
        finally:
            if worker is not None:
                worker.close()
            self.pids.pop(slot, None)

    def submit(self, spec: RunSpec) -> None:
        self.todo.put(spec)

    def withdraw(self) -> list[RunSpec]:
        """The specs not taken by a slot yet, taken back."""
        taken = []
        with contextlib.suppress(queue.Empty):
            while True:
                spec = self.todo.get_nowait()
                if spec is not None:
                    taken.append(spec)
        return taken

    def signal(self, signum: int) -> None:
        for pid in list(self.pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """No new run starts; the running ones get SIGTERM (a fit writes last.ckpt, exits 143)."""
        self.stopping.set()
        self.signal(signal.SIGTERM)

    def close(self, grace: float | None) -> None:
        """End every slot; processes still alive ``grace`` seconds on are killed."""
        for _ in self.threads:
            self.todo.put(None)
        deadline = None if grace is None else time.monotonic() + grace
        for thread in self.threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            self.signal(signal.SIGKILL)
            for thread in self.threads:
                thread.join(10)


@contextlib.contextmanager
def _signals(handler: Callable[[int], None]) -> Iterator[None]:
    """``handler(signum)`` on SIGINT and SIGTERM while the grid runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in names}
    for signum in names:
        signal.signal(signum, lambda signum, frame: handler(signum))
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _describe(outcome: RunOutcome) -> str:
    spec = outcome.spec
    name = spec.method if spec.seed is None else f"{spec.method} seed {spec.seed}"
    if outcome.status == "failed":
        return f"{name}: FAILED after {outcome.seconds:.0f} s ({outcome.error.splitlines()[0]})"
    if outcome.status == "interrupted":
        return f"{name}: interrupted after {outcome.seconds:.0f} s ({outcome.error})"
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
        if result.status not in ("skipped", "interrupted") and not result.spec.base:
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
    stop_grace: float = STOP_GRACE,
) -> GridOutcome:
    """Run every planned spec (the base model first), skipping those with results.

    By default ``jobs`` long-lived worker processes run the specs one after another each
    (the interpreter and its imports start once per worker, not once per run); with
    ``fresh_processes`` every run gets a new interpreter; with ``in_process`` (``jobs`` = 1)
    runs go in this process.

    SIGINT or SIGTERM to this process (the main thread's) stops the grid: no run starts any
    more, each running one gets SIGTERM (its fit writes ``last.ckpt`` and exits 143) and is
    killed if it has not ended ``stop_grace`` seconds later; the outcome's ``interrupted_by``
    names the signal and ``left`` the runs without results, and the next invocation resumes
    them. A second signal kills the workers at once. The worker processes die with this
    process whatever ends it (:func:`~medmoe.experiments.worker.die_with_parent`).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if in_process and jobs > 1:
        raise ValueError("in-process runs go one at a time: use jobs=1 or subprocesses")
    plan = _plan(grid, out_dir, extra, threads, write=True, log=log)  # may refuse the grid
    specs = [plan.base, *plan.tuning, *plan.fixed]
    later = plan.placeholders()  # the tuned methods' runs, planned once the rates are chosen
    outcome = GridOutcome(Path(out_dir).resolve())
    progress = _Progress(len(specs) + len(later), jobs)
    pending = plan.families()  # tuned family -> its tuning runs without an outcome yet

    def record(result: RunOutcome) -> RunOutcome:
        outcome.runs.append(result)
        log(f"{progress.step(result)} {_describe(result)}")
        return result

    def release(ended: RunSpec | None) -> list[RunSpec]:
        """The tuned runs of every family whose tuning runs have all ended (``ended``: the
        run that just did): the rates chosen, the runs planned; those of a method whose tuning
        lacks results are failed outcomes (never started)."""
        for left in pending.values():
            if ended is not None:
                left.discard(str(ended.run_dir))
        ready = [family for family, left in pending.items() if not left]
        if not ready:
            return []
        for family in ready:
            del pending[family]
        tuned, blocked = plan.resolve(log=log, families=ready)
        specs.extend(tuned)
        for spec in later:
            if spec.method in blocked:
                specs.append(spec)
                error = f"RuntimeError: no learning rate chosen ({blocked[spec.method]})"
                record(RunOutcome(spec, "failed", error=error))
        return tuned

    def unplanned() -> list[RunSpec]:
        """The runs of the families still waiting for their choice (for what is left)."""
        waiting = {m.name for m in plan.waiting if m.family in pending}
        return [spec for spec in later if spec.method in waiting]

    caught: list[int] = []
    if in_process:

        def on_signal(signum: int) -> None:
            caught.append(signum)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # outside a fit (a fit's Ctrl-C is its checkpoint's)

        with _signals(on_signal):
            todo, index = list(specs), 0
            while index < len(todo):
                spec = todo[index]
                index += 1
                try:
                    result = record(run_spec(spec, rerun=rerun, mode="in-process"))
                except KeyboardInterrupt:
                    break  # between two runs
                if pending and not caught and result.interrupted_by is None:
                    todo[index:index] = release(spec)  # a family's tuning done: its runs next
                if result.interrupted_by:  # the fit's own handler took the signal: its name
                    caught.insert(0, int(signal.Signals[result.interrupted_by]))
                if caught or (result.status == "failed" and fail_fast):
                    break
        return _finish(outcome, specs + unplanned(), caught, log)

    pool = _Pool(jobs, rerun, fresh_processes)

    def on_signal(signum: int) -> None:
        caught.append(signum)
        if len(caught) == 1:
            pool.stop()
        else:
            pool.signal(signal.SIGKILL)  # a second signal: at once, without a checkpoint

    noticed: float | None = None  # when the main loop saw the first signal
    with _signals(on_signal):
        try:
            pool.submit(specs[0])  # the base model alone first
            outstanding = 1
            while outstanding:
                if caught and noticed is None:
                    noticed = time.monotonic()
                    outstanding -= len(pool.withdraw())
                    log(
                        f"{signal.Signals(caught[0]).name} received: stopping "
                        f"{len(pool.pids)} worker(s) (a running fit writes its checkpoint; "
                        f"killed after {stop_grace:.0f} s)"
                    )
                    continue
                if noticed is not None and time.monotonic() > noticed + stop_grace:
                    break  # still running after the grace: close() kills them
                try:
                    result = pool.done.get(timeout=0.2)
                except queue.Empty:
                    continue
                outstanding -= 1
                if result.status == NOT_STARTED:
                    continue
                if caught and result.status == "failed":
                    result.status = "interrupted"  # ended by the stop, not by its own fault
                    result.interrupted_by = signal.Signals(caught[0]).name
                record(result)
                if result.status == "failed" and fail_fast:
                    outstanding -= len(pool.withdraw())
                    pool.stopping.set()  # the running ones finish; nothing new starts
                elif result.spec.base and not pool.stopping.is_set():
                    for spec in specs[1:]:  # the tuning runs first, then the untuned methods'
                        pool.submit(spec)
                    outstanding += len(specs) - 1
                if pending and not pool.stopping.is_set():
                    tuned = release(result.spec)  # a family whose tuning runs have all ended
                    for spec in tuned:
                        pool.submit(spec)
                    outstanding += len(tuned)
        finally:
            if caught:
                began = noticed if noticed is not None else time.monotonic()
                pool.close(max(0.0, began + stop_grace - time.monotonic()))
            else:
                pool.close(None)
    return _finish(outcome, specs + unplanned(), caught, log)


def _finish(
    outcome: GridOutcome, specs: list[RunSpec], caught: list[int], log: Callable[[str], None]
) -> GridOutcome:
    """With a signal: what is done, what is left (and how it resumes)."""
    if not caught:
        return outcome
    outcome.interrupted_by = signal.Signals(caught[0]).name
    # outcomes of worker processes carry copies of the specs: known by their run directory
    finished = {str(r.spec.run_dir) for r in outcome.runs if r.status in ("done", "skipped")}
    outcome.left = [spec for spec in specs if str(spec.run_dir) not in finished]
    stopped = {str(r.spec.run_dir) for r in outcome.interrupted}
    failed = {str(r.spec.run_dir) for r in outcome.failed}

    def name(spec: RunSpec) -> str:
        return spec.method if spec.seed is None else f"{spec.method} seed {spec.seed}"

    done = [name(spec) for spec in specs if str(spec.run_dir) in finished]
    log(
        f"stopped by {outcome.interrupted_by}: {len(done)} of {len(specs)} runs have results"
        + (f" ({', '.join(done)})" if done else "")
    )
    for spec in outcome.left:
        key = str(spec.run_dir)
        how = "failed" if key in failed else "not started"
        if key in stopped:
            how = f"interrupted, {_resumes(Path(spec.run_dir))}"
        log(f"  left: {name(spec)} ({how})")
    log("run the same command again to resume")
    return outcome
