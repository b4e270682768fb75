"""The experiment runner: a grid of methods x seeds, scored, summarised as the paper's tables.

    python -m medmoe.experiments configs/experiments/toy_full.yaml            # the full grid
    python -m medmoe.experiments configs/experiments/toy_full.yaml --quick    # a smoke run

Every run trains through ``medmoe.cli.main`` (``medmoe fit``) in its own directory
(``<out>/<method>/seed_<k>``), in a worker process the runner owns, and is scored on the
test split's fixed subsets with the evaluation callbacks' scorer; the base model is scored
once (``<out>/base``). A run whose ``results.json`` exists is skipped, so an interrupted grid
resumes where it stopped (a fit interrupted mid-way resumes from its ``last.ckpt``). The
report (``tables.md``, ``table{1..6}_*.csv``, ``runs.csv``, ``summary.json``, ``claims.md``,
the PNG plots; 95% t intervals over seeds, paired differences) is rebuilt from the results on
disk at the end of every invocation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medmoe.experiments.cli import main
    from medmoe.experiments.grid import EvalSettings, Grid, GridError, Method, load_grid
    from medmoe.experiments.output import write_report
    from medmoe.experiments.report import collect, tables
    from medmoe.experiments.runner import GridOutcome, RunOutcome, plan_runs, run_grid, run_spec
    from medmoe.experiments.worker import RunSpec, execute, score_trained

# Imported on first use, so `python -m medmoe.experiments --help` / `--dry-run` start fast and
# a worker process pays for torch and Lightning only when it runs.
_EXPORTS = {
    "main": "cli",
    "EvalSettings": "grid",
    "Grid": "grid",
    "GridError": "grid",
    "Method": "grid",
    "load_grid": "grid",
    "collect": "report",
    "tables": "report",
    "write_report": "output",
    "GridOutcome": "runner",
    "RunOutcome": "runner",
    "plan_runs": "runner",
    "run_grid": "runner",
    "run_spec": "runner",
    "RunSpec": "worker",
    "execute": "worker",
    "score_trained": "worker",
}

__all__ = [
    "EvalSettings",
    "Grid",
    "GridError",
    "GridOutcome",
    "Method",
    "RunOutcome",
    "RunSpec",
    "collect",
    "execute",
    "load_grid",
    "main",
    "plan_runs",
    "run_grid",
    "run_spec",
    "score_trained",
    "tables",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medmoe.experiments' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medmoe.experiments.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
