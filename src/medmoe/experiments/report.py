"""The paper's Tables 1-4, Table 5 (interference: joint vs single-task training) and Table 6
(forgetting vs replay ratio), built from the ``results.json`` files a grid's runs wrote: table
models whose cells carry mean, 95% t interval and n, rendered as Markdown and CSV text, and
runs.csv and summary values. Writing the files (with ``claims.md`` and the plots) is
:mod:`medmoe.experiments.output`'s job.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
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
from medmoe.experiments.grid import BASE_RUN, REPLAY_KEY, Grid, Method
from medmoe.experiments.stats import (
    BOOTSTRAP_RESAMPLES,
    Stat,
    bootstrap,
    paired_difference,
    paired_ratio,
)
from medmoe.experiments.worker import read_results

__all__ = ["Collected", "Stat", "Table", "collect", "settings_note", "tables"]

MARKDOWN_FILE = "tables.md"
CSV_FILES = {
    1: "table1_medical.csv",
    2: "table2_general.csv",
    3: "table3_allocation.csv",
    4: "table4_params.csv",
    5: "table5_interference.csv",
    6: "table6_forgetting_replay.csv",
}
ORTHO_CSV = "table5b_ortho_lora.csv"
CAPACITY_CSV = "capacity_matching.csv"
TUNING_CSV = "lr_selection.csv"
CLAIMS_FILE = "claims.md"
ORTHO = "ortho_lora"  # Ortho-LoRA's method name: its gap recovery against LoRA's family
RUNS_CSV = "runs.csv"
SUMMARY_FILE = "summary.json"


Cell = Stat | str | float | int | None
PerSeed = dict[int, float | None]
NOT_RUN = "not run"


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    note: str = ""
    file: str = ""  # the CSV's name; default: CSV_FILES[number]
    digits: tuple[int, ...] = ()  # decimals per column (default 1)


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

    @property
    def base_scores(self) -> dict[str, float] | None:
        return None if self.base is None else self.base["scores"]

    def has(self, name: str) -> bool:
        """Whether the grid defines method ``name`` (found runs or not)."""
        return name in self.runs

    def per_seed(self, name: str, value: Callable[[dict[str, Any]], float | None]) -> PerSeed:
        """``value(results)`` of each finished seed of method ``name`` (empty if undefined)."""
        return {r["seed"]: value(r) for r in self.runs.get(name, [])}

    def scores(self, name: str, value: Callable[[dict[str, float]], float | None]) -> PerSeed:
        """``value(scores)`` of each finished seed of method ``name``."""
        return self.per_seed(name, lambda r: value(r["scores"]))


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


def medical_average(scores: dict[str, float]) -> float | None:
    """Mean over the domain tasks the run has scores for, in % (the paper's Average)."""
    values = [_pct(scores, t) for t, _ in MEDICAL_TASKS if t in scores]
    return statistics.fmean(values) if values else None


def _delta(scores: dict[str, float], base: dict[str, float] | None, task: str) -> float | None:
    if base is None or task not in scores or task not in base:
        return None
    return 100.0 * (scores[task] - base[task])


def forgetting(scores: dict[str, float], base: dict[str, float] | None) -> float | None:
    """Mean change on the general tasks against the base model (negative = forgetting)."""
    deltas = [_delta(scores, base, t) for t, _ in GENERAL_TASKS]
    deltas = [d for d in deltas if d is not None]
    return statistics.fmean(deltas) if deltas else None


def task_score(task: str) -> Callable[[dict[str, float]], float | None]:
    """The per-run score of ``task`` in % (``None`` if the run has none)."""
    return lambda scores: _pct(scores, task)


def task_delta(
    task: str, base: dict[str, float] | None
) -> Callable[[dict[str, float]], float | None]:
    """The per-run change of ``task`` against the base model, in points."""
    return lambda scores: _delta(scores, base, task)


def step_seconds(results: dict[str, Any]) -> float | None:
    """CPU seconds per optimizer step of one fit (``fit_cpu_seconds / global_step``)."""
    cpu, steps = results.get("fit_cpu_seconds"), results.get("global_step")
    return None if cpu is None or not steps else float(cpu) / float(steps)


def single_tasks(grid: Grid, family: str) -> dict[str, str]:
    """Domain task -> the name of ``family``'s single-task run on it (empty: none)."""
    return {m.single_task: m.name for m in grid.family(family) if m.single_task is not None}


def replay_runs(grid: Grid, family: str) -> list[tuple[float | None, str]]:
    """(replay ratio, method name) of ``family``'s sweep runs and its own row, by ratio; empty
    when the family has no sweep. The own row's ratio is its override's or else the grid's
    (``None`` if unknown)."""
    sweep = [(m.replay_ratio, m.name) for m in grid.family(family) if m.replay_ratio is not None]
    if not sweep:
        return []
    own = grid.method(family).overrides.get(REPLAY_KEY, grid.replay_ratio)
    rows = [*sweep, (None if own is None else float(own), family)]
    return sorted(rows, key=lambda row: -1.0 if row[0] is None else row[0])


def single_task_average(data: Collected, family: str) -> PerSeed:
    """Per seed: the mean over domain tasks of each task's score from its single-task run
    (a seed lacking any task's run is dropped)."""
    runs = single_tasks(data.grid, family)
    if not runs:
        return {}
    per_task = {t: data.scores(name, task_score(t)) for t, name in runs.items()}
    seeds = set.intersection(
        *(set(k for k, v in p.items() if v is not None) for p in per_task.values())
    )
    return {s: statistics.fmean(per_task[t][s] for t in runs) for s in sorted(seeds)}


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
        f"Mean ± half-width of the 95% CI (t, n-1 df) over seeds {list(grid.seeds)} (Seeds: "
        "the runs found; one run: the mean alone); split "
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
        average = Stat.of([medical_average(base_scores)])
        rows.append(("Base Model (Zero-shot)", *base_cells, average, 1))
    for m in methods(1):
        runs = data.runs[m.name]
        cells = [_stat(runs, lambda s, t=t: _pct(s, t)) for t, _ in MEDICAL_TASKS]
        rows.append((m.label, *cells, _stat(runs, medical_average), len(runs)))
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
                _stat(runs, medical_average),
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
                _stat(runs, medical_average),
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
    paper = [t for t in (table1, table2, table3, table4) if t.rows]  # a grid's own tables only
    fairness = [t for t in (capacity_table(data), tuning_table(data)) if t is not None]
    return [*paper, *interference_tables(data), replay_table(data), *fairness]


def capacity_table(data: Collected) -> Table | None:
    """The "Capacity matching" table of a grid with ``match:`` methods (``None``: it has
    none), from ``<out>/capacity.json`` (:mod:`medmoe.experiments.capacity`)."""
    from medmoe.experiments.capacity import read_matches

    matched = [m for m in data.grid.methods if m.match is not None]
    if not matched:
        return None
    found = read_matches(data.out_dir)
    rows: list[tuple[Cell, ...]] = []
    for m in matched:
        match = m.match
        target = match.target_method.label if match.target_method else match.target
        entry = (found.get(m.name) or {}).get("matched")
        if not isinstance(entry, dict):
            rows.append((m.label, target, match.count, "not resolved yet", None, None, None))
            continue
        knobs = ", ".join(f"{k} = {v}" for k, v in entry["knobs"].items())
        fields = ", ".join(
            f"{k} = {v}" for k, v in entry["changes"].items() if entry["knobs"].get(k) != v
        )
        chosen = f"{knobs} ({fields})" if fields else knobs
        count, target_count = float(entry["count"]), float(entry["target_count"])
        rows.append(
            (m.label, target, match.count, chosen, count, target_count, count / target_count)
        )
    header = ("Method", "Matched to", "Count", "Chosen value", "Its count", "Target's count")
    header += ("Ratio",)
    note = (
        "Counted on the real model of each run (the method's merged config, adapter applied, "
        "medmoe.adapters.parameter_counts) before any run started; the closest count within "
        f"the tolerance ({matched[0].match.tolerance:.0%} unless a method sets its own) wins, "
        "ties to the smaller value."
    )
    return Table(
        0, "Capacity matching", header, tuple(rows), note, CAPACITY_CSV, (1, 1, 1, 1, 0, 0, 3)
    )


def tuning_table(data: Collected) -> Table | None:
    """The "Learning rate selection" table of a grid with a ``tune:`` section (``None``: it
    has none): every point's validation medical average over the tuning seeds and the choice,
    from ``<out>/tuning.json`` (:mod:`medmoe.experiments.tuning`)."""
    from medmoe.experiments.tuning import read_choices

    tune = data.grid.tune
    if tune is None:
        return None
    found = read_choices(data.out_dir)
    labels = {m.name: m.label for m in data.grid.methods}
    rows: list[tuple[Cell, ...]] = []
    for name in tune.methods:
        if name not in labels:  # a tuned method this report leaves out
            continue
        label = labels[name]
        choice = found.get(name)
        if not isinstance(choice, dict):
            rows.append((label, "not chosen yet", MISSING, MISSING, None, 0, ""))
            continue
        for point, scores in choice["scores"].items():
            values = [scores["per_seed"][str(s)] for s in choice["seeds"]]
            rows.append(
                (
                    label,
                    point,
                    MISSING if scores["learning_rate"] is None else f"{scores['learning_rate']:g}",
                    MISSING
                    if scores["router_learning_rate"] is None
                    else f"{scores['router_learning_rate']:g}",
                    Stat.of(values),
                    len(values),
                    "chosen" if point == choice["chosen_name"] else "",
                )
            )
    header = ("Method", "Point", "Learning rate", "Router rate", "Validation medical avg.")
    header += ("Tuning seeds", "Choice")
    note = (
        f"Tuning seeds {list(tune.seeds)}, scored on the validation split only (limit "
        f"{tune.eval.limit}); the choice is the best mean over the tuning seeds (ties: the "
        "smaller learning rate, then the smaller router rate). The reporting seeds train at "
        "the chosen point; the test split scores only them. -: the method's configured value."
    )
    return Table(0, "Learning rate selection", header, tuple(rows), note, TUNING_CSV)


def interference_tables(data: Collected) -> list[Table]:
    """Table 5 (joint vs single-task medical scores per family, paired gap) and, with an
    ``ortho_lora`` method and LoRA single-task runs, Table 5b (Ortho-LoRA's gap recovery)."""
    grid = data.grid
    families = [m for m in grid.methods if not m.generated and single_tasks(grid, m.name)]
    rows: list[tuple[Cell, ...]] = []
    for m in families:
        runs = single_tasks(grid, m.name)
        joint = data.scores(m.name, medical_average)
        single = single_task_average(data, m.name)
        cells: list[Cell] = [m.label, Stat.of(list(joint.values())), Stat.of(list(single.values()))]
        cells.append(paired_difference(joint, single))
        for task, _ in MEDICAL_TASKS:
            if task not in runs:
                cells += [NOT_RUN, NOT_RUN]
                continue
            alone = data.scores(runs[task], task_score(task))
            cells.append(Stat.of(list(alone.values())))
            cells.append(paired_difference(data.scores(m.name, task_score(task)), alone))
        cells.append(len(single))
        rows.append(tuple(cells))
    header = ("Method", "Joint Avg.", "Single-task Avg.", "Gap (joint - single)")
    for _, title in MEDICAL_TASKS:
        header += (f"{title} single", f"{title} gap")
    header += ("Seeds",)
    note = (
        "Joint: the method's own row (all domain tasks together); single-task: per seed, the "
        "mean over domain tasks of each task's score from a run trained on that task alone "
        "with the same per-task budget. Gaps: paired differences over the seeds both have "
        "(mean ± 95% CI half-width, t); negative = interference. Seeds: seeds with every "
        "single-task run."
    )
    if not rows:
        note = "No method of this grid has single-task runs (a `single_task:` section)."

    table5 = Table(
        5, "Table 5: Interference (joint vs single-task training)", header, tuple(rows), note
    )
    tables_ = [table5]
    ortho = ortho_recovery(data)
    if ortho is not None:
        rows = [
            (
                grid.method(ORTHO).label,
                ortho["joint"],
                ortho["vs_lora"],
                ortho["recovery"],
                ortho["step_ratio"],
                ortho["joint"].n,
            )
        ]
        header = (
            "Method",
            "Joint Avg.",
            "Δ vs LoRA joint",
            "Gap recovery",
            "Step-time ratio vs LoRA",
            "Seeds",
        )
        note = (
            "Gap recovery = (Ortho-LoRA joint − LoRA joint) / (LoRA single-task − LoRA joint) on "
            "the medical average, point estimate from the means; interval: 95% percentile "
            f"bootstrap over seeds ({BOOTSTRAP_RESAMPLES} paired resamples, fixed RNG seed). "
            "1 = the whole gap recovered; with few seeds a percentile bootstrap is narrower "
            "than the true 95% interval. Step-time ratio: (fit_cpu_seconds / global_step) of "
            "Ortho-LoRA over LoRA's, per seed, mean and t interval of the ratios."
        )
        tables_.append(
            Table(
                5,
                "Table 5b: Ortho-LoRA's recovery of the interference gap",
                header,
                tuple(rows),
                note,
                ORTHO_CSV,
                digits=(1, 1, 1, 2, 3, 1),
            )
        )
    return tables_


def ortho_recovery(data: Collected, family: str = "lora") -> dict[str, Stat] | None:
    """Ortho-LoRA against ``family``'s joint and single-task runs (``None``: the grid has no
    ``ortho_lora`` or no single-task runs of ``family``): ``joint``, ``vs_lora`` (paired
    difference), ``gap`` (LoRA single − joint, paired), ``recovery`` (bootstrap interval),
    ``step_ratio`` (paired ratio of step times)."""
    if not data.has(ORTHO) or not data.has(family) or not single_tasks(data.grid, family):
        return None
    ortho = data.scores(ORTHO, medical_average)
    joint = data.scores(family, medical_average)
    single = single_task_average(data, family)
    seeds = sorted(
        s
        for s in set(ortho) & set(joint) & set(single)
        if None not in (ortho[s], joint[s], single[s])
    )

    def recovery(rows) -> float | None:
        o, j, a = (statistics.fmean(r[i] for r in rows) for i in range(3))
        return None if a == j else (o - j) / (a - j)

    return {
        "joint": Stat.of(list(ortho.values())),
        "vs_lora": paired_difference(ortho, joint),
        "gap": paired_difference(single, joint),
        "recovery": bootstrap([(ortho[s], joint[s], single[s]) for s in seeds], recovery),
        "step_ratio": paired_ratio(
            data.per_seed(ORTHO, step_seconds), data.per_seed(family, step_seconds)
        ),
    }


def replay_table(data: Collected) -> Table:
    """Table 6: MMLU and GSM8K change against the base model and the medical average, per
    family with a replay sweep, at each replay ratio (the sweep's and the grid's own)."""
    grid = data.grid
    base = data.base_scores
    rows: list[tuple[Cell, ...]] = []
    for m in grid.methods:
        if m.generated:
            continue
        for ratio, name in replay_runs(grid, m.name):
            cells: list[Cell] = [m.label, MISSING if ratio is None else f"{ratio:g}"]
            for task, _ in GENERAL_TASKS:
                cells.append(
                    Stat.of(list(data.scores(name, task_delta(task, base)).values()), signed=True)
                )
            cells.append(Stat.of(list(data.scores(name, medical_average).values())))
            cells.append(len(data.runs[name]))
            rows.append(tuple(cells))
    header = ("Method", "Replay ratio", *(f"{title} Δ" for _, title in GENERAL_TASKS))
    header += ("Medical Avg.", "Seeds")
    note = (
        "Δ: change against the base model in points (the base is scored once; the interval is "
        "over the trained runs' seeds). The grid's own ratio is the method's own row."
    )
    if not rows:
        note = "No method of this grid has a replay sweep (a `replay_sweep:` section)."
    return Table(6, "Table 6: Forgetting vs replay ratio", header, tuple(rows), note)


def _format(cell: Cell, digits: int = 1) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, Stat):
        return cell.text(digits)
    if isinstance(cell, float):
        return f"{cell:.{digits}f}"
    return str(cell)


def to_markdown(table: Table) -> str:
    digits = list(table.digits) + [1] * (len(table.header) - len(table.digits))
    rows = [[_format(c, d) for c, d in zip(row, digits, strict=True)] for row in table.rows]
    return markdown_table(table.title, table.header, rows, table.note)


def to_csv(table: Table) -> str:
    """One column per value; a statistics column ``<name>`` becomes ``<name>`` (the mean),
    ``<name> ci_low``, ``<name> ci_high`` (the 95% interval), ``<name> std`` and ``<name> n``."""
    stats = [any(isinstance(row[i], Stat) for row in table.rows) for i in range(len(table.header))]
    header: list[str] = []
    for name, is_stat in zip(table.header, stats, strict=True):
        header += [name, *(f"{name} {k}" for k in STAT_COLUMNS)] if is_stat else [name]
    lines = []
    for row in table.rows:
        line: list[str] = []
        for cell, is_stat in zip(row, stats, strict=True):
            if is_stat:
                stat = cell if isinstance(cell, Stat) else Stat(None, None, 0)
                line += [MISSING if stat.mean is None else f"{stat.mean:.4g}"]
                line += [_number(v) for v in (stat.low, stat.high, stat.std)]
                line.append(str(stat.n))
            elif isinstance(cell, float):
                line.append(f"{cell:.6g}")
            else:
                line.append(MISSING if cell is None else str(cell))
        lines.append(line)
    return csv_table(header, lines)


STAT_COLUMNS = ("ci_low", "ci_high", "std", "n")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


# ----------------------------------------------------------------- files
def runs_csv(data: Collected) -> str:
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
        average = medical_average(scores)
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


def summary_values(data: Collected) -> dict[str, Any]:
    base_scores = data.base["scores"] if data.base else None
    methods = {}
    for m in data.grid.methods:
        runs = data.runs[m.name]
        values = {
            t: _stat(runs, lambda s, t=t: _pct(s, t)) for t, _ in (*MEDICAL_TASKS, *GENERAL_TASKS)
        }
        values["medical_avg"] = _stat(runs, medical_average)
        values["forgetting"] = _stat(runs, lambda s: forgetting(s, base_scores))
        methods[m.name] = {
            "label": m.label,
            "seeds": [r["seed"] for r in runs],
            **{k: _stat_dict(v) for k, v in values.items()},
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


def _stat_dict(stat: Stat) -> dict[str, Any]:
    return {
        "mean": stat.mean,
        "std": stat.std,
        "ci_low": stat.low,
        "ci_high": stat.high,
        "n": stat.n,
    }


def _mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(values) if values else None
