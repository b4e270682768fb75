"""PaperTables: the paper's Table 1 (medical) and Table 2 (forgetting) at ``medmoe test``."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from medmoe.callbacks.scoring import PRIMARY_METRIC, TaskScorer, task_metric
from medmoe.callbacks.table_format import (
    GENERAL_TASKS,
    MEDICAL_TASKS,
    Table,
    general_table,
    medical_table,
    to_csv,
    to_markdown,
)

__all__ = ["PaperTables"]

MARKDOWN_FILE = "paper_tables.md"
MEDICAL_CSV = "table1_medical.csv"
GENERAL_CSV = "table2_general.csv"


class PaperTables(Callback):
    """At the end of ``trainer.test`` (``medmoe test``), scores every paper task and writes the
    two tables, printed and saved as Markdown and CSV.

    - Table 1, medical: PubMedQA, MedQA (accuracy), Clinical-Sum (ROUGE-L) and their Average,
      for the base model (adapter off) and the trained method.
    - Table 2, general: MMLU and GSM8K (strict exact match) with their deltas against the base
      model scored with its adapter off.

    Scores are in %, through the same scorer as ForgettingMonitor and DomainEval, on fixed
    subsets of the ``split`` split. Tasks the datamodule lacks read "n/a", and so does the base
    model of a method that cannot switch its adapter off (full fine-tuning: its base is only
    known before training, see ForgettingMonitor).

    Files (in ``output_dir``, default ``trainer.log_dir``): ``paper_tables.md``,
    ``table1_medical.csv``, ``table2_general.csv``. The tables are also kept as
    :attr:`tables` and the raw headline scores as :attr:`scores` / :attr:`base_scores`.

    Args:
        output_dir: where the files go (``None``: the trainer's log directory).
        method: the method's row label (``None``: the adapter's class name).
        limit: size of each task's fixed subset (``None``: the whole split).
        split: the split scored.
        batch_size: evaluation batch size.
        max_new_tokens: generation budget (GSM8K, Clinical-Sum); ``None`` = the task's (GSM8K 256, as the
            harness; Clinical-Sum 128; toy style 64).
        shots: few-shot demonstrations per example; ``None`` = the task's ``num_fewshot``
            (harness style: MMLU 5 from ``dev``, GSM8K 5 from ``train``; toy style 0), chosen by
            the task's sampler as the harness does.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        method: str | None = None,
        limit: int | None = None,
        split: str = "test",
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        shots: int | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.method = method
        self.scorer = TaskScorer(split, limit, batch_size, max_new_tokens, shots)
        self.scores: dict[str, float] = {}
        self.base_scores: dict[str, float] | None = None
        self.worst_scores: dict[str, float] = {}
        self.tables: tuple[Table, Table] | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = [task for task, _ in (*MEDICAL_TASKS, *GENERAL_TASKS)]
        tasks = self.scorer.present(trainer, names, "PaperTables", warn=False)
        full = {t: self.scorer.score(trainer, pl_module, t) for t in tasks}
        self.scores = {t: self.scorer.primary(t, scores) for t, scores in full.items()}
        # tasks scored under each domain adapter (multi-LoRA's general benchmarks)
        self.worst_scores = {
            t: scores[f"{PRIMARY_METRIC[task_metric(t)]}_worst"]
            for t, scores in full.items()
            if f"{PRIMARY_METRIC[task_metric(t)]}_worst" in scores
        }
        try:
            self.base_scores = {
                t: self.scorer.primary(t, self.scorer.score(trainer, pl_module, t, base=True))
                for t in tasks
            }
        except NotImplementedError:
            rank_zero_warn(
                f"PaperTables: {type(pl_module.adapter).__name__} cannot switch its adapter "
                "off; the base model's row and the deltas read n/a"
            )
            self.base_scores = None
        label = self.method or _method_label(pl_module)
        self.tables = (
            medical_table([("Base Model", self.base_scores), (label, self.scores)]),
            general_table(self.base_scores, [(label, self.scores)]),
        )
        # trainer.log_dir is a broadcast: every rank asks, then rank zero writes
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write(directory)

    def _write(self, directory: Path) -> None:
        medical, general = self.tables
        directory.mkdir(parents=True, exist_ok=True)
        subset = "all" if self.scorer.limit is None else f"a fixed subset of {self.scorer.limit}"
        note = (
            f"Split {self.scorer.split!r}, {subset} examples per task, "
            f"{_shots(self.scorer.shots)}. GSM8K: strict exact match. n/a: not scored.\n"
        )
        if self.worst_scores:
            worst = ", ".join(f"{t} {100 * v:.1f}" for t, v in self.worst_scores.items())
            note += (
                "One adapter per domain task: each general benchmark is answered under every "
                f"domain adapter; the table shows their mean, the worst adapter gives: {worst}.\n"
            )
        markdown = "\n".join([to_markdown(medical), to_markdown(general), note])
        (directory / MARKDOWN_FILE).write_text(markdown)
        (directory / MEDICAL_CSV).write_text(to_csv(medical))
        (directory / GENERAL_CSV).write_text(to_csv(general))
        print(f"\n{markdown}\nSaved to {directory}", flush=True)


def _shots(shots: int | None) -> str:
    return "each task's default few-shot" if shots is None else f"{shots}-shot"


def _method_label(pl_module: LightningModule) -> str:
    name = type(getattr(pl_module, "adapter", pl_module)).__name__
    return name.removesuffix("Config") or name
