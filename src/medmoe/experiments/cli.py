"""Command line of the experiment runner (``python -m medmoe.experiments --help``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from medmoe.experiments.grid import Grid, GridError, load_grid
from medmoe.experiments.runner import plan_runs, run_command, run_grid
from medmoe.experiments.worker import RunSpec, die_with_parent, execute

__all__ = ["main"]

DEFAULT_GRID = "configs/experiments/toy_full.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medmoe.experiments",
        description=(
            "Run a grid of methods x seeds through `medmoe fit`, score every run on the test "
            "split's fixed subsets, and write the paper's Tables 1-4 and Tables 5-6 (Markdown, "
            "CSV; 95% CIs over seeds), claims.md (a verdict per claim) and plots."
        ),
    )
    parser.add_argument(
        "grid", nargs="?", default=DEFAULT_GRID, help=f"grid YAML (default: {DEFAULT_GRID})"
    )
    parser.add_argument(
        "--out",
        help="output folder (default: runs/experiments/<grid name>, '-quick' appended by --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the grid's quick: variant (few steps, 1 seed, 2 methods, small eval subsets)",
    )
    parser.add_argument("--methods", help="comma-separated method names to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: the grid's)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `medmoe fit` override for every run, e.g. "
        "model.init_args.model_name_or_path=/path/to/base (repeatable)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each its own process (default 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: cores / jobs; 0 = torch's default)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run in this process instead of one fresh process per run (faster start, less "
        "isolation; jobs must be 1)",
    )
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="one new interpreter per run (full isolation, ~12 s of imports each); default: "
        "each of the --jobs worker processes runs its runs one after another",
    )
    parser.add_argument(
        "--rerun", action="store_true", help="delete the selected runs' folders and run them again"
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the planned runs' commands; run nothing"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the tables from existing results"
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _overrides(sets: Sequence[str]) -> list[str]:
    args = []
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise GridError(f"--set expects KEY=VALUE, got {item!r}")
        args.append(f"--{key}={value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 every run has results, 1 a run failed
    or was interrupted, 2 a bad grid or option, 130 / 143 SIGINT / SIGTERM stopped the grid
    (every worker stopped, running fits saved their last.ckpt; run again to resume)."""
    args = _parser().parse_args(argv)
    if args.worker:  # a run of `--fresh-processes`: it ends with the runner that started it
        die_with_parent(os.getppid())
        execute(RunSpec.read(args.worker))
        return 0
    try:
        whole = load_grid(args.grid)
        if args.quick:
            whole = whole.quick()
        seeds = _split(args.seeds)
        grid = whole.select(
            _split(args.methods), None if seeds is None else [int(s) for s in seeds]
        )
        extra = _overrides(args.sets)
        if args.jobs < 1 or (args.threads is not None and args.threads < 0):
            raise GridError(
                f"--jobs must be >= 1 and --threads >= 0, got {args.jobs}, {args.threads}"
            )
        if args.in_process and args.jobs > 1:
            raise GridError("--in-process runs one at a time: drop --jobs or the --in-process flag")
    except (FileNotFoundError, GridError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args, whole, grid, extra)
    except GridError as error:  # found while planning: capacity matching, tuning choices
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, whole: Grid, grid: Grid, extra: list[str]) -> int:
    """Plan (``--dry-run``: print) or run the selected ``grid``, then write the report over
    ``whole`` (the grid file's methods) at the seeds run; returns main's exit status."""
    out_dir = Path(args.out or Path("runs") / "experiments" / whole.name)
    if args.threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    else:
        threads = args.threads or None
    if args.dry_run:
        for spec in plan_runs(grid, out_dir, extra, threads):
            seed = "" if spec.seed is None else f" seed {spec.seed}"
            print(f"# {spec.method}{seed} -> {spec.run_dir}\n{run_command(spec)}")
        return 0
    status = 0
    if not args.report_only:
        began = time.perf_counter()
        print(
            f"grid {grid.name}: {len(grid.methods)} method(s) x {len(grid.seeds)} seed(s) + the "
            f"base model -> {out_dir}",
            flush=True,
        )
        outcome = run_grid(
            grid,
            out_dir,
            extra=extra,
            jobs=args.jobs,
            threads=threads,
            in_process=args.in_process,
            fresh_processes=args.fresh_processes,
            rerun=args.rerun,
            fail_fast=args.fail_fast,
            log=lambda line: print(line, flush=True),
        )
        if outcome.interrupted_by is not None:  # what is done and left is printed: no report
            return outcome.exit_code
        print(f"grid finished in {time.perf_counter() - began:.0f} s", flush=True)
        status = outcome.exit_code
        for failed in outcome.failed + outcome.interrupted:
            print(f"{failed.status}: {failed.spec.run_dir} ({failed.error.splitlines()[0]})")
    from medmoe.experiments.output import write_report  # matplotlib, medmoe.callbacks

    # the report covers every method of the grid (runs left out by --methods read "n/a") over
    # the seeds run: --seeds 100,101 reports those seeds, not the grid file's
    for path in write_report(whole.select(seeds=grid.seeds), out_dir):
        print(f"wrote {path}")
    for name in ("tables.md", "claims.md"):
        markdown = Path(out_dir) / name
        if markdown.is_file():
            print("\n" + markdown.read_text())
    return status
