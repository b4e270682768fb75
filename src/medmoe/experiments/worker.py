"""One run of a grid: ``medmoe.cli.main`` (fit, or validate for the base model), then scoring.

A run is described by a :class:`RunSpec` (written as ``spec.json`` in its directory) and
executed by :func:`execute`, either in the runner's process or in a fresh interpreter
(``python -m medmoe.experiments --worker <run dir>/spec.json``). Scoring reuses the evaluation
callbacks' scorer (:class:`medmoe.callbacks.scoring.TaskScorer`) on the trainer the CLI built,
so a run's numbers are exactly what ``ForgettingMonitor``, ``DomainEval`` and ``PaperTables``
would report for the same split and subset.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medmoe.atomic import atomic_write_text
from medmoe.experiments.grid import EvalSettings

__all__ = [
    "RESULTS_FILE",
    "SPEC_FILE",
    "RunSpec",
    "die_with_parent",
    "execute",
    "read_results",
    "score_trained",
    "write_json",
]

RESULTS_FILE = "results.json"
SPEC_FILE = "spec.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
STOP_GRACE = 45.0  # seconds a stopped run gets to write its checkpoint before it is killed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class RunSpec:
    """Everything a worker needs: the CLI arguments, how to score, where to write.

    Attributes:
        method: the grid method's name (``"base"`` for the base model).
        seed: the run's seed (``seed_everything`` and the data stream), or ``None``.
        run_dir: the run's own directory (logs, checkpoints, adapter, results).
        cli_args: arguments of ``medmoe.cli.main``, the subcommand first.
        eval: how the trained model is scored.
        base: score the base model (the adapter switched off) instead of the trained one.
        threads: ``torch.set_num_threads`` for the run (``None``: torch's default).
        label: the method's row label.
    """

    method: str
    seed: int | None
    run_dir: Path
    cli_args: list[str]
    eval: EvalSettings = field(default_factory=EvalSettings)
    base: bool = False
    threads: int | None = None
    label: str = ""

    @property
    def results_path(self) -> Path:
        return Path(self.run_dir) / RESULTS_FILE

    @property
    def spec_path(self) -> Path:
        return Path(self.run_dir) / SPEC_FILE

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["run_dir"] = str(self.run_dir)
        values["eval"] = self.eval.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        values = dict(values)
        values["run_dir"] = Path(values["run_dir"])
        values["eval"] = EvalSettings(**values.get("eval", {}))
        return cls(**values)

    def write(self) -> Path:
        return write_json(self.spec_path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))


def write_json(path: Path, values: dict[str, Any]) -> Path:
    """Write JSON whole or not at all (:func:`medmoe.atomic.atomic_write_text`)."""
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(path, text)


def read_json_cache(path: Path) -> dict[str, Any]:
    """The JSON object a grid keeps to avoid recomputing (``capacity.json``, ``tuning.json``);
    empty when the file is missing, unreadable or not an object: it is then computed again."""
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def read_results(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``results.json``, or ``None`` when it has none (not run, or failed)."""
    path = Path(run_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def score_trained(trainer: Any, module: Any, settings: EvalSettings, base: bool = False) -> dict:
    """``{task: {metric: value}}`` and ``{task: headline}`` of the CLI's trained module.

    Uses the callbacks' :class:`~medmoe.callbacks.scoring.TaskScorer` on the trainer's
    datamodule (the same fixed subsets, precision context and per-task adapter routing).
    With ``base``, the adapter is switched off; a method that cannot switch it off (full
    fine-tuning) is scored as it is, which is the base model when it has not trained.
    """
    from medmoe.callbacks.scoring import TaskScorer

    scorer = TaskScorer(
        split=settings.split,
        limit=settings.limit,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        shots=settings.shots,
    )
    tasks = scorer.present(trainer, list(settings.tasks), "medmoe.experiments")
    metrics: dict[str, dict[str, float]] = {}
    for task in tasks:
        try:
            metrics[task] = scorer.score(trainer, module, task, base=base)
        except NotImplementedError:
            if not base or trainer.global_step > 0:
                raise
            metrics[task] = scorer.score(trainer, module, task)
    scores = {task: float(scorer.primary(task, values)) for task, values in metrics.items()}
    return {"metrics": metrics, "scores": scores}


def die_with_parent(parent: int, grace: float = STOP_GRACE) -> None:
    """End this process when the process ``parent`` ends, however it ends (kill -9 included).

    On Linux the kernel sends this process SIGTERM when its parent dies (``prctl`` with
    ``PR_SET_PDEATHSIG``): a fit under way writes its ``last.ckpt`` and exits 143, any other
    phase ends at once. A watchdog thread also sees the parent process id change (the process
    re-parented) and sends that SIGTERM itself where ``prctl`` is missing or came too late,
    then kills the process ``grace`` seconds later whatever it is doing. A worker of the
    experiment runner calls this first, so none outlives the runner.
    """
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    armed = armed and os.getppid() == parent  # a parent gone before the prctl sent nothing
    watchdog = threading.Thread(
        target=_watch_parent, args=(parent, armed, grace), name="medmoe-parent-watch", daemon=True
    )
    watchdog.start()


def _watch_parent(parent: int, armed: bool, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    if not armed:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.kill(os.getpid(), signal.SIGKILL)


def _clear_earlier_attempt(run_dir: Path) -> None:
    """Remove what a fit stopped before its first checkpoint left (config, logs, a partial
    checkpoint folder): the run starts over, and the run-directory guard of ``medmoe fit``
    would refuse those files. The runner's own files (spec, log, lock) stay."""
    from medmoe.cli import _is_run_output

    for path in run_dir.iterdir():
        if _is_run_output(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def execute(spec: RunSpec) -> dict[str, Any]:
    """Run ``medmoe.cli.main(spec.cli_args)``, score the result, write ``results.json``.

    A fit resumes from ``<run dir>/checkpoints/last.ckpt`` when an earlier attempt left one,
    and starts over, clearing that attempt's files, when it left none.
    A ``--config`` file that does not exist is a FileNotFoundError before anything is loaded.
    """
    args = list(spec.cli_args)
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--config" and not Path(value).is_file():
            raise FileNotFoundError(f"config file {value} of run {spec.run_dir} not found")

    import torch

    from medmoe.adapters import parameter_counts
    from medmoe.callbacks.timing import StepTimer
    from medmoe.cli import run_cli

    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = None
    if args and args[0] == "fit":
        if (run_dir / LAST_CHECKPOINT).is_file():
            resumed_from = str(run_dir / LAST_CHECKPOINT)
            args.append(f"--ckpt_path={resumed_from}")
        else:
            _clear_earlier_attempt(run_dir)
    if args and args[0] == "fit":
        timer = {"class_path": "medmoe.callbacks.timing.StepTimer"}
        args += ["--trainer.callbacks+", json.dumps(timer)]  # train_step_seconds
    began, cpu_began = time.perf_counter(), time.process_time()
    argv = sys.argv
    sys.argv = ["medmoe"]  # the arguments are `args`: LightningCLI must not read the runner's
    try:
        cli = run_cli(args)
    finally:
        sys.argv = argv
    fit_seconds, fit_cpu = time.perf_counter() - began, time.process_time() - cpu_began
    trainer, module = cli.trainer, cli.model
    began, cpu_began = time.perf_counter(), time.process_time()
    scored = score_trained(trainer, module, spec.eval, base=spec.base)
    eval_seconds, eval_cpu = time.perf_counter() - began, time.process_time() - cpu_began
    counts = parameter_counts(module.model)
    timers = [c for c in trainer.callbacks if isinstance(c, StepTimer)]
    results = {
        "method": spec.method,
        "label": spec.label or spec.method,
        "seed": spec.seed,
        "base": spec.base,
        "adapter": module.hparams["adapter"]["class_path"],  # the class the run selected
        "scores": scored["scores"],
        "metrics": scored["metrics"],
        "params": {
            "total": counts.total,
            "trainable": counts.trainable,
            "active": float(counts.active),
        },
        "global_step": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "fit_cpu_seconds": round(fit_cpu, 2),  # CPU time of all threads: wall time when idle
        "eval_cpu_seconds": round(eval_cpu, 2),
        **(timers[0].summary() if timers else {}),  # per-step time inside the loop
        "torch_threads": torch.get_num_threads(),
        "resumed_from": resumed_from,
        "eval": spec.eval.to_dict(),
        "cli_args": args,
        "host": platform.node(),
    }
    write_json(spec.results_path, results)
    return results
