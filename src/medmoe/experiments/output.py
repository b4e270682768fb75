"""Write a grid's report: tables (Markdown, CSV), runs.csv, summary.json, claims.md, plots.

Its own module so that the tables (:mod:`~medmoe.experiments.report`), the verdicts
(:mod:`~medmoe.experiments.claims`) and the plots (:mod:`~medmoe.experiments.plots`), which
all read :mod:`~medmoe.experiments.report`, are imported by one writer without a cycle.
"""

from __future__ import annotations

from pathlib import Path

from medmoe.atomic import atomic_write_text
from medmoe.experiments.claims import claims_markdown, claims_summary
from medmoe.experiments.grid import Grid
from medmoe.experiments.plots import PLOTS
from medmoe.experiments.report import (
    CLAIMS_FILE,
    CSV_FILES,
    MARKDOWN_FILE,
    RUNS_CSV,
    SUMMARY_FILE,
    collect,
    runs_csv,
    settings_note,
    summary_values,
    tables,
    to_csv,
    to_markdown,
)
from medmoe.experiments.worker import write_json

__all__ = ["write_report"]


def write_report(grid: Grid, out_dir: str | Path) -> list[Path]:
    """Write ``tables.md``, the tables' CSVs, ``runs.csv``, ``summary.json``, ``claims.md``
    and the PNG plots into ``out_dir`` from whatever results exist there; returns the files
    written (a plot without data to draw is skipped). Every file is replaced whole
    (:mod:`medmoe.atomic`): a failed write keeps the previous one."""
    data = collect(grid, out_dir)
    out_dir = data.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    built = tables(data)
    written = []
    parts = [f"# {grid.name}\n"]
    if grid.description:
        parts.append(grid.description.strip() + "\n")
    missing = data.missing()
    parts.append(settings_note(grid) + "\n")
    if missing:
        parts.append(f"Runs without results (not run yet or failed): {', '.join(missing)}.\n")
    parts += [to_markdown(t) for t in built]
    markdown = out_dir / MARKDOWN_FILE
    atomic_write_text(markdown, "\n".join(parts))
    written.append(markdown)
    for table in built:
        path = out_dir / (table.file or CSV_FILES[table.number])
        atomic_write_text(path, to_csv(table))
        written.append(path)
    atomic_write_text(out_dir / RUNS_CSV, runs_csv(data))
    written.append(out_dir / RUNS_CSV)
    summary = summary_values(data)
    summary.update(claims_summary(data))  # "claims" and "checks"
    written.append(write_json(out_dir / SUMMARY_FILE, summary))
    claims = out_dir / CLAIMS_FILE
    atomic_write_text(claims, claims_markdown(data))
    written.append(claims)
    for name, plot in PLOTS.items():
        path = plot(data, out_dir / name)
        if path is not None:
            written.append(path)
    return written
