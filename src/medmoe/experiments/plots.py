"""The report's PNG plots (matplotlib, Agg backend), every error bar a 95% t interval over seeds.

``domain_vs_forgetting.png`` (medical average vs general-task change, intervals on both axes),
``allocation.png`` (Table 3's scores per allocation), ``forgetting_vs_replay.png`` (MMLU and GSM8K
change vs replay ratio, one line per family) and ``interference_gap.png`` (joint vs single-task
medical average per family, plus Ortho-LoRA).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medmoe.atomic import atomic_write_bytes
from medmoe.callbacks.table_format import GENERAL_TASKS, MEDICAL_TASKS
from medmoe.experiments.report import (
    ORTHO,
    Collected,
    forgetting,
    medical_average,
    replay_runs,
    single_task_average,
    single_tasks,
    task_delta,
    task_score,
)
from medmoe.experiments.stats import Stat

__all__ = ["ALLOCATION_PNG", "INTERFERENCE_PNG", "PLOTS", "REPLAY_PNG", "SCATTER_PNG"]

SCATTER_PNG = "domain_vs_forgetting.png"
ALLOCATION_PNG = "allocation.png"
REPLAY_PNG = "forgetting_vs_replay.png"
INTERFERENCE_PNG = "interference_gap.png"
CI_NOTE = "mean, 95% CI over seeds"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errors(stats: list[Stat]) -> list[list[float]]:
    """matplotlib's asymmetric ``yerr``: distances below and above each mean (0 without a CI)."""
    below = [0.0 if s.low is None or s.mean is None else s.mean - s.low for s in stats]
    above = [0.0 if s.high is None or s.mean is None else s.high - s.mean for s in stats]
    return [below, above]


def _stat(data: Collected, name: str, value: Callable[[dict[str, float]], float | None]) -> Stat:
    return Stat.of(list(data.scores(name, value).values()))


def _save(figure: Any, plt: Any, path: Path) -> Path:
    """The PNG rendered in memory, then replaced whole (a failed write keeps the previous)."""
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    plt.close(figure)
    return atomic_write_bytes(path, png.getvalue())


def scatter(data: Collected, path: Path) -> Path | None:
    """Medical average vs mean general-task change, Table 2's methods, CIs on both axes."""
    base = data.base_scores
    points = []
    for m in data.grid.methods:
        if 2 not in m.tables or not data.runs[m.name]:
            continue
        x = _stat(data, m.name, lambda s: forgetting(s, base))
        y = _stat(data, m.name, medical_average)
        if x.mean is not None and y.mean is not None:
            points.append((m.label, x, y))
    if not points:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 5))
    for label, x, y in points:
        axes.errorbar(
            x.mean, y.mean, xerr=_errors([x]), yerr=_errors([y]), fmt="o", capsize=4, label=label
        )
    if base is not None:
        axes.scatter([0.0], [medical_average(base)], marker="*", s=150, c="k")
        axes.annotate(
            "Base Model", (0.0, medical_average(base)), xytext=(5, 5), textcoords="offset points"
        )
    axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("General-task change vs base (mean Δ of MMLU and GSM8K, points)")
    axes.set_ylabel("Medical average (%)")
    axes.set_title(f"Domain performance vs forgetting ({CI_NOTE})")
    axes.legend(fontsize=8, loc="best")
    return _save(figure, plt, path)


def allocation_bars(data: Collected, path: Path) -> Path | None:
    """Table 3's methods: each medical task's score and the average, CI error bars."""
    rows = [m for m in data.grid.methods if 3 in m.tables and data.runs[m.name]]
    if not rows:
        return None
    series = [(title, task_score(task)) for task, title in MEDICAL_TASKS]
    series.append(("Average", medical_average))
    width = 0.8 / len(series)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(rows)), 4.5))
    for i, (title, value) in enumerate(series):
        stats = [_stat(data, m.name, value) for m in rows]
        means = [s.mean if s.mean is not None else 0.0 for s in stats]
        positions = [r + (i - (len(series) - 1) / 2) * width for r in range(len(rows))]
        axes.bar(positions, means, width, yerr=_errors(stats), capsize=3, label=title)
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([m.label for m in rows], fontsize=8)
    axes.set_ylabel("Score (%)")
    axes.set_title(f"Medical scores per expert allocation ({CI_NOTE})")
    axes.legend(fontsize=8)
    return _save(figure, plt, path)


def replay_curves(data: Collected, path: Path) -> Path | None:
    """MMLU and GSM8K change vs replay ratio (one panel each), a line per swept family."""
    base = data.base_scores
    families = [m for m in data.grid.methods if not m.generated and replay_runs(data.grid, m.name)]
    if base is None or not families:
        return None
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(GENERAL_TASKS), figsize=(11, 4.5), squeeze=False)
    drawn = False
    for axes, (task, title) in zip(panels[0], GENERAL_TASKS, strict=True):
        for m in families:
            points = [
                (ratio, _stat(data, name, task_delta(task, base)))
                for ratio, name in replay_runs(data.grid, m.name)
                if ratio is not None
            ]
            points = [(r, s) for r, s in points if s.mean is not None]
            if not points:
                continue
            drawn = True
            stats = [s for _, s in points]
            axes.errorbar(
                [r for r, _ in points],
                [s.mean for s in stats],
                yerr=_errors(stats),
                marker="o",
                capsize=4,
                label=m.label,
            )
        axes.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        axes.set_xlabel("Replay ratio (share of general data per batch)")
        axes.set_ylabel(f"{title} Δ vs base (points)")
        axes.set_title(f"{title}: forgetting vs replay")
    if not drawn:
        plt.close(figure)
        return None
    panels[0][0].legend(fontsize=8, loc="best")
    figure.suptitle(f"Forgetting vs replay ratio ({CI_NOTE})")
    return _save(figure, plt, path)


def interference_bars(data: Collected, path: Path) -> Path | None:
    """Joint vs single-task medical average per family with single-task runs (+ Ortho-LoRA)."""
    grid = data.grid
    families = [m for m in grid.methods if not m.generated and single_tasks(grid, m.name)]
    if not families:
        return None
    bars: list[tuple[str, str, Stat]] = []
    for m in families:
        bars.append((m.label, "joint", _stat(data, m.name, medical_average)))
        single = single_task_average(data, m.name)
        bars.append((m.label, "single-task", Stat.of(list(single.values()))))
    if data.has(ORTHO):
        bars.append((grid.method(ORTHO).label, "joint", _stat(data, ORTHO, medical_average)))
    if all(s.mean is None for _, _, s in bars):
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(7.5, 1.3 * len(bars)), 4.5))
    colours = {"joint": "tab:blue", "single-task": "tab:orange"}
    for i, (_, kind, stat) in enumerate(bars):
        axes.bar(
            i,
            stat.mean if stat.mean is not None else 0.0,
            0.7,
            yerr=_errors([stat]),
            capsize=4,
            color=colours[kind],
            label=kind if kind not in [k for _, k, _ in bars[:i]] else None,
        )
    axes.set_xticks(range(len(bars)))
    axes.set_xticklabels([f"{label}\n{kind}" for label, kind, _ in bars], fontsize=8)
    axes.set_ylabel("Medical average (%)")
    axes.set_title(f"Interference: joint vs single-task training ({CI_NOTE})", fontsize=10)
    axes.legend(fontsize=8)
    return _save(figure, plt, path)


PLOTS: dict[str, Callable[[Collected, Path], Path | None]] = {
    SCATTER_PNG: scatter,
    ALLOCATION_PNG: allocation_bars,
    REPLAY_PNG: replay_curves,
    INTERFERENCE_PNG: interference_bars,
}
