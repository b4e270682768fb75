"""The paper's Tables 1-4 (Markdown and CSV, mean ± std over seeds) and two plots, from the
``results.json`` files a grid's runs wrote.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmoe.callbacks.table_format import (
    GENERAL_TASKS,
    MEDICAL_TASKS,
    MISSING,
    csv_table,
    markdown_table,
)
from medmoe.experiments.grid import BASE_RUN, Grid, Method
from medmoe.experiments.worker import read_results, write_json

__all__ = ["Collected", "Stat", "Table", "collect", "settings_note", "tables", "write_report"]

MARKDOWN_FILE = "tables.md"
CSV_FILES = {
    1: "table1_medical.csv",
    2: "table2_general.csv",
    3: "table3_allocation.csv",
    4: "table4_params.csv",
}
RUNS_CSV = "runs.csv"
SUMMARY_FILE = "summary.json"
SCATTER_PNG = "domain_vs_forgetting.png"
ALLOCATION_PNG = "allocation.png"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``None`` with one value) of ``n`` values."""

    mean: float | None
    std: float | None
    n: int
    signed: bool = False

    @classmethod
    def of(cls, values: Sequence[float | None], signed: bool = False) -> Stat:
        kept = [float(v) for v in values if v is not None and not math.isnan(v)]
        if not kept:
            return cls(None, None, 0, signed)
        std = statistics.stdev(kept) if len(kept) > 1 else None
        return cls(statistics.fmean(kept), std, len(kept), signed)

    def text(self, digits: int = 1) -> str:
        if self.mean is None:
            return MISSING
        sign = "+" if self.signed else ""
        mean = f"{self.mean:{sign}.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{digits}f}"


Cell = Stat | str | float | int | None


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    note: str = ""


@dataclass
class Collected:
    """The results found on disk: the base model's and each method's, per seed."""

    grid: Grid
    out_dir: Path
    base: dict[str, Any] | None
    runs: dict[str, list[dict[str, Any]]]  # method name -> results of its finished seeds

    def missing(self) -> list[str]:
        """Runs of the grid without results (``method seed k``, ``base``)."""
        absent = [] if self.base is not None else [BASE_RUN]
        for method in self.grid.methods:
            done = {r["seed"] for r in self.runs[method.name]}
            absent += [f"{method.name} seed {s}" for s in self.grid.seeds if s not in done]
        return absent


def collect(grid: Grid, out_dir: str | Path) -> Collected:
    out_dir = Path(out_dir).resolve()
    runs = {}
    for method in grid.methods:
        found = [read_results(out_dir / method.name / f"seed_{s}") for s in grid.seeds]
        runs[method.name] = [r for r in found if r is not None]
    return Collected(grid, out_dir, read_results(out_dir / BASE_RUN), runs)


# ----------------------------------------------------------------- per-run numbers (in %)
def _pct(scores: dict[str, float], task: str) -> float | None:
    value = scores.get(task)
    return None if value is None else 100.0 * value


def _medical_average(scores: dict[str, float]) -> float | None:
    values = [_pct(scores, t) for t, _ in MEDICAL_TASKS if t in scores]
    return statistics.fmean(values) if values else None


def _delta(scores: dict[str, float], base: dict[str, float] | None, task: str) -> float | None:
    if base is None or task not in scores or task not in base:
        return None
    return 100.0 * (scores[task] - base[task])


def _forgetting(scores: dict[str, float], base: dict[str, float] | None) -> float | None:
    """Mean change on the general tasks against the base model (negative = forgetting)."""
    deltas = [_delta(scores, base, t) for t, _ in GENERAL_TASKS]
    deltas = [d for d in deltas if d is not None]
    return statistics.fmean(deltas) if deltas else None


def _stat(runs: list[dict[str, Any]], value, signed: bool = False) -> Stat:
    return Stat.of([value(r["scores"]) for r in runs], signed)


def _params(runs: list[dict[str, Any]], key: str) -> Stat:
    return Stat.of([r["params"][key] for r in runs])


# ----------------------------------------------------------------- tables
def settings_note(grid: Grid) -> str:
    """What every number of the tables is: seeds, split, subset size, shots, metrics."""
    settings = grid.eval
    subset = "all" if settings.limit is None else f"a fixed subset of {settings.limit}"
    return (
        f"Mean ± std over seeds {list(grid.seeds)} (Seeds: the runs found); split "
        f"{settings.split!r}, {subset} examples per task, {settings.shots}-shot. Accuracy % "
        "(GSM8K: strict exact match), ROUGE-L x100; Δ: change against the base model, in points."
    )


def tables(data: Collected) -> list[Table]:
    grid = data.grid
    base_scores = data.base["scores"] if data.base else None

    def methods(number: int) -> list[Method]:
        return [m for m in grid.methods if number in m.tables]

    # Table 1: medical
    rows: list[tuple[Cell, ...]] = []
    if base_scores is not None:
        base_cells = [Stat.of([_pct(base_scores, t)]) for t, _ in MEDICAL_TASKS]
        average = Stat.of([_medical_average(base_scores)])
        rows.append(("Base Model (Zero-shot)", *base_cells, average, 1))
    for m in methods(1):
        runs = data.runs[m.name]
        cells = [_stat(runs, lambda s, t=t: _pct(s, t)) for t, _ in MEDICAL_TASKS]
        rows.append((m.label, *cells, _stat(runs, _medical_average), len(runs)))
    header = ("Method", *(title for _, title in MEDICAL_TASKS), "Average", "Seeds")
    table1 = Table(1, "Table 1: Medical benchmarks", header, tuple(rows))

    # Table 2: general, deltas against the base model
    rows = []
    if base_scores is not None:
        mmlu, gsm8k = (Stat.of([_pct(base_scores, t)]) for t in ("mmlu", "gsm8k"))
        rows.append(("Base Model", mmlu, "-", gsm8k, "-", 1))
    for m in methods(2):
        runs = data.runs[m.name]
        cells: list[Cell] = []
        for task, _ in GENERAL_TASKS:
            cells.append(_stat(runs, lambda s, t=task: _pct(s, t)))
            cells.append(_stat(runs, lambda s, t=task: _delta(s, base_scores, t), signed=True))
        rows.append((m.label, *cells, len(runs)))
    header = ("Method", "MMLU", "Δ", "GSM8K", "Δ", "Seeds")
    table2 = Table(2, "Table 2: Forgetting on general benchmarks", header, tuple(rows))

    # Table 3: allocation ablation
    rows = []
    for m in methods(3):
        allocation = m.allocation or {}
        runs = data.runs[m.name]
        rows.append(
            (
                m.label,
                allocation.get("lower", MISSING),
                allocation.get("higher", MISSING),
                _stat(runs, _medical_average),
                len(runs),
            )
        )
    header = ("Allocation Strategy", grid.table3["lower"], grid.table3["higher"])
    header += ("Medical Avg.", "Seeds")
    table3 = Table(3, "Table 3: Layer-wise expert allocation", header, tuple(rows))

    # Table 4: parameters
    rows = []
    found = [r for m in methods(4) for r in data.runs[m.name]]
    largest = max((r["params"]["trainable"] for r in found), default=0)
    scale, unit = (1e6, "M") if largest >= 1e6 else (1e3, "K")
    for m in methods(4):
        runs = data.runs[m.name]
        trainable, active = _params(runs, "trainable"), _params(runs, "active")
        rows.append(
            (
                m.label,
                Stat.of([None if trainable.mean is None else trainable.mean / scale]),
                Stat.of([None if active.mean is None else active.mean / scale]),
                _stat(runs, _medical_average),
                len(runs),
            )
        )
    header = ("Method", f"Trainable Params ({unit})", f"Active Params ({unit})")
    header += ("Medical Avg.", "Seeds")
    params_note = (
        "Trainable: parameters that train; active: the adapter parameters one token uses "
        "(medmoe.adapters.parameter_counts); equal over seeds."
    )
    table4 = Table(4, "Table 4: Parameter efficiency", header, tuple(rows), params_note)
    return [table1, table2, table3, table4]


def _format(cell: Cell, digits: int = 1) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, Stat):
        return cell.text(digits)
    if isinstance(cell, float):
        return f"{cell:.{digits}f}"
    return str(cell)


def to_markdown(table: Table) -> str:
    rows = [[_format(c) for c in row] for row in table.rows]
    return markdown_table(table.title, table.header, rows, table.note)


def to_csv(table: Table) -> str:
    """One column per value; a mean ± std column becomes ``<name>`` and ``<name> std``."""
    stats = [any(isinstance(row[i], Stat) for row in table.rows) for i in range(len(table.header))]
    header: list[str] = []
    for name, is_stat in zip(table.header, stats, strict=True):
        header += [name, f"{name} std"] if is_stat else [name]
    lines = []
    for row in table.rows:
        line: list[str] = []
        for cell, is_stat in zip(row, stats, strict=True):
            if is_stat:
                stat = cell if isinstance(cell, Stat) else Stat(None, None, 0)
                line += [MISSING if stat.mean is None else f"{stat.mean:.2f}"]
                line += ["" if stat.std is None else f"{stat.std:.2f}"]
            elif isinstance(cell, float):
                line.append(f"{cell:.6g}")
            else:
                line.append(MISSING if cell is None else str(cell))
        lines.append(line)
    return csv_table(header, lines)


# ----------------------------------------------------------------- plots
def _scatter(data: Collected, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_scores = data.base["scores"] if data.base else None
    points = []
    for m in data.grid.methods:
        if 2 not in m.tables or not data.runs[m.name]:
            continue
        runs = data.runs[m.name]
        x = _stat(runs, lambda s: _forgetting(s, base_scores))
        y = _stat(runs, _medical_average)
        if x.mean is not None and y.mean is not None:
            points.append((m.label, x, y))
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(7, 5))
    for label, x, y in points:
        axes.errorbar(
            x.mean, y.mean, xerr=x.std or 0.0, yerr=y.std or 0.0, fmt="o", capsize=4, label=label
        )
    if base_scores is not None:
        axes.scatter([0.0], [_medical_average(base_scores)], marker="*", s=150, c="k")
        axes.annotate(
            "Base Model",
            (0.0, _medical_average(base_scores)),
            xytext=(5, 5),
            textcoords="offset points",
        )
    axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("General-task change vs base (mean Δ of MMLU and GSM8K, points)")
    axes.set_ylabel("Medical average (%)")
    axes.set_title("Domain performance vs forgetting (mean ± std over seeds)")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _allocation_bars(data: Collected, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in data.grid.methods if 3 in m.tables and data.runs[m.name]]
    if not rows:
        return None
    series = [(title, lambda s, t=task: _pct(s, t)) for task, title in MEDICAL_TASKS]
    series.append(("Average", _medical_average))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(rows)), 4.5))
    for i, (title, value) in enumerate(series):
        stats = [_stat(data.runs[m.name], value) for m in rows]
        means = [s.mean if s.mean is not None else 0.0 for s in stats]
        errors = [s.std or 0.0 for s in stats]
        positions = [r + (i - (len(series) - 1) / 2) * width for r in range(len(rows))]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=title)
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([m.label for m in rows], fontsize=8)
    axes.set_ylabel("Score (%)")
    axes.set_title("Medical scores per expert allocation (mean ± std over seeds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------- files
def _runs_csv(data: Collected) -> str:
    tasks = [t for t, _ in (*MEDICAL_TASKS, *GENERAL_TASKS)]
    header = ["method", "label", "seed", *tasks, "medical_avg", "trainable", "active"]
    header += ["global_step", "fit_seconds", "eval_seconds", "fit_cpu_seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    everything = ([data.base] if data.base else []) + [
        r for m in data.grid.methods for r in data.runs[m.name]
    ]
    for r in everything:
        scores = r["scores"]
        average = _medical_average(scores)
        writer.writerow(
            [r["method"], r.get("label", ""), "" if r["seed"] is None else r["seed"]]
            + [MISSING if t not in scores else f"{100 * scores[t]:.2f}" for t in tasks]
            + [MISSING if average is None else f"{average:.2f}"]
            + (
                ["", ""]
                if r.get("base")
                else [r["params"]["trainable"], f"{r['params']['active']:.0f}"]
            )
            + [r.get(k, "") for k in ("global_step", "fit_seconds", "eval_seconds")]
            + [r.get("fit_cpu_seconds", "")]
        )
    return buffer.getvalue()


def _summary(data: Collected) -> dict[str, Any]:
    base_scores = data.base["scores"] if data.base else None
    methods = {}
    for m in data.grid.methods:
        runs = data.runs[m.name]
        values = {
            t: _stat(runs, lambda s, t=t: _pct(s, t)) for t, _ in (*MEDICAL_TASKS, *GENERAL_TASKS)
        }
        values["medical_avg"] = _stat(runs, _medical_average)
        values["forgetting"] = _stat(runs, lambda s: _forgetting(s, base_scores))
        methods[m.name] = {
            "label": m.label,
            "seeds": [r["seed"] for r in runs],
            **{k: {"mean": v.mean, "std": v.std, "n": v.n} for k, v in values.items()},
            "trainable": _params(runs, "trainable").mean,
            "active": _params(runs, "active").mean,
            "fit_seconds": _mean_of(runs, "fit_seconds"),
            "fit_cpu_seconds": _mean_of(runs, "fit_cpu_seconds"),
        }
    return {
        "grid": str(data.grid.path),
        "name": data.grid.name,
        "seeds": list(data.grid.seeds),
        "eval": data.grid.eval.to_dict(),
        "base": base_scores,
        "methods": methods,
        "missing": data.missing(),
    }


def _mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def write_report(grid: Grid, out_dir: str | Path) -> list[Path]:
    """Write ``tables.md``, the four CSVs, ``runs.csv``, ``summary.json`` and the two PNGs
    into ``out_dir`` from whatever results exist there; returns the files written."""
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
    markdown.write_text("\n".join(parts))
    written.append(markdown)
    for table in built:
        path = out_dir / CSV_FILES[table.number]
        path.write_text(to_csv(table))
        written.append(path)
    (out_dir / RUNS_CSV).write_text(_runs_csv(data))
    written.append(out_dir / RUNS_CSV)
    written.append(write_json(out_dir / SUMMARY_FILE, _summary(data)))
    for plot, name in ((_scatter, SCATTER_PNG), (_allocation_bars, ALLOCATION_PNG)):
        path = plot(data, out_dir / name)
        if path is not None:
            written.append(path)
    return written
