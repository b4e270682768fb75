"""The paper's two result tables as data, Markdown and CSV (scores in %, "n/a" when missing).

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medmoe.data.tasks import DOMAIN_TASK_NAMES, GENERAL_TASK_NAMES

__all__ = [
    "GENERAL_TASKS",
    "Delta",
    "MEDICAL_TASKS",
    "Table",
    "csv_table",
    "general_table",
    "markdown_table",
    "medical_table",
    "to_csv",
    "to_markdown",
]

TITLES = {
    "pubmedqa": "PubMedQA",
    "medqa": "MedQA",
    "clinical_sum": "Clinical-Sum",
    "mmlu": "MMLU",
    "gsm8k": "GSM8K",
}
# (task, column title) of each table, the tasks by their group (Task.group)
MEDICAL_TASKS: tuple[tuple[str, str], ...] = tuple((t, TITLES[t]) for t in DOMAIN_TASK_NAMES)
GENERAL_TASKS: tuple[tuple[str, str], ...] = tuple((t, TITLES[t]) for t in GENERAL_TASK_NAMES)
MISSING = "n/a"
NOT_APPLICABLE = "-"


@dataclass(frozen=True)
class Delta:
    """A score difference (printed signed)."""

    value: float


Cell = float | Delta | str | None  # a score in [0, 1], a difference, a literal, None (missing)
Scores = Mapping[str, float | None]


@dataclass(frozen=True)
class Table:
    """A header and rows of a method name followed by cells."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Cell, ...]], ...]


def medical_table(rows: Sequence[tuple[str, Scores | None]]) -> Table:
    """Table 1: PubMedQA, MedQA, Clinical-Sum and their Average, per method.

    The Average is over the tasks the row has scores for (the paper's over all three).
    A row whose scores are ``None`` (e.g. no base model) is all "n/a".
    """
    body = []
    for label, scores in rows:
        cells: list[Cell] = [(scores or {}).get(task) for task, _ in MEDICAL_TASKS]
        known = [c for c in cells if isinstance(c, (int, float))]
        cells.append(sum(known) / len(known) if known else None)
        body.append((label, tuple(cells)))
    header = ("Method", *(title for _, title in MEDICAL_TASKS), "Average")
    return Table("Medical benchmarks (Accuracy %, ROUGE-L x100)", header, tuple(body))


def general_table(base: Scores | None, rows: Sequence[tuple[str, Scores | None]]) -> Table:
    """Table 2: MMLU, delta, GSM8K, delta; the base model first, deltas against it."""
    body = [("Base Model", _general_cells(base, None))]
    body += [
        (label, _general_cells(scores, base if base is not None else {})) for label, scores in rows
    ]
    header = ("Method", "MMLU", "Δ", "GSM8K", "Δ")
    return Table("Catastrophic forgetting on general benchmarks (%)", header, tuple(body))


def _general_cells(scores: Scores | None, base: Scores | None) -> tuple[Cell, ...]:
    cells: list[Cell] = []
    for task, _ in GENERAL_TASKS:
        score = (scores or {}).get(task)
        cells.append(score)
        if base is None:
            cells.append(NOT_APPLICABLE)
        else:
            reference = base.get(task)
            both = score is not None and reference is not None
            cells.append(Delta(score - reference) if both else None)
    return tuple(cells)


def _format(cell: Cell, digits: int) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, Delta):
        return f"{100 * cell.value:+.{digits}f}"
    if isinstance(cell, str):
        return cell
    return f"{100 * cell:.{digits}f}"


def _rows(table: Table, digits: int) -> list[list[str]]:
    return [[label, *(_format(c, digits) for c in cells)] for label, cells in table.rows]


def markdown_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], note: str | None = None
) -> str:
    """The one Markdown table writer: bold title, header, right-aligned value columns, an
    optional note below. ``rows`` are already formatted cells."""
    lines = [
        f"**{title}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def csv_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The one CSV table writer: the header row, then the already formatted rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(table: Table, digits: int = 1) -> str:
    """A Markdown table with its title in bold above it."""
    return markdown_table(table.title, table.header, _rows(table, digits))


def to_csv(table: Table, digits: int = 2) -> str:
    """CSV with the header row; missing values are "n/a" (pandas reads them as NaN)."""
    return csv_table(table.header, _rows(table, digits))
