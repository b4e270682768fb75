"""DomainEval: the medical tasks' scores (PubMedQA, MedQA accuracy; Clinical-Sum ROUGE-L)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from medmoe.callbacks.scoring import EvalClock, TaskScorer
from medmoe.callbacks.writers import StepCadence, log_to_loggers
from medmoe.data.tasks import DOMAIN_TASK_NAMES

__all__ = ["DomainEval"]


class DomainEval(Callback):
    """Scores the domain tasks on their fixed evaluation subsets.

    With ``every_n_steps=None`` it runs at the end of every validation (not the sanity check)
    and logs through ``LightningModule.log``, so ``ModelCheckpoint`` can monitor e.g.
    ``domain/average``. With ``every_n_steps=N`` it runs every N optimizer steps instead and
    writes straight to the Trainer's loggers.

    Tags: ``domain/<task>/<metric>`` (``accuracy`` for PubMedQA/MedQA, ``rouge_l`` for
    Clinical-Sum), ``domain/average`` (mean headline score over the scored tasks, the paper's
    "Medical Avg."), ``eval/domain_seconds`` (cumulative wall time of these evaluations) and
    ``eval/domain_fraction`` (its share of the wall time since fit start).

    Args:
        tasks: tasks to score; those the datamodule lacks are skipped with a warning.
        limit: size of each task's fixed evaluation subset (``None``: all).
        split: the split the subset is drawn from.
        batch_size: evaluation batch size.
        max_new_tokens: generation budget (Clinical-Sum); ``None`` = the task's (GSM8K 256, as the
            harness; Clinical-Sum 128; toy style 64).
        shots: few-shot demonstrations per example; ``None`` = the task's ``num_fewshot``
            (harness style: MMLU 5 from ``dev``, GSM8K 5 from ``train``; toy style 0), chosen by
            the task's sampler as the harness does.
        every_n_steps: ``None`` to score at each validation end, else a step interval.
    """

    def __init__(
        self,
        tasks: Sequence[str] = DOMAIN_TASK_NAMES,
        limit: int | None = 64,
        split: str = "validation",
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        shots: int | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.scorer = TaskScorer(split, limit, batch_size, max_new_tokens, shots)
        self._cadence = StepCadence(every_n_steps, "DomainEval") if every_n_steps else None
        self.clock = EvalClock()
        self.latest: dict[str, dict[str, float]] = {}
        self._active: list[str] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.clock.start()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._cadence is not None or trainer.sanity_checking:
            return
        for name, value in self.evaluate(trainer, pl_module).items():
            # every rank scored the same examples: syncing averages equal values
            pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Tensor],
        batch_idx: int,
    ) -> None:
        if self._cadence is not None and self._cadence.due(trainer):
            log_to_loggers(trainer, self.evaluate(trainer, pl_module), trainer.global_step)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Score every present task now; returns the tagged metrics."""
        if self._active is None:
            self._active = self.scorer.present(trainer, self.tasks, "DomainEval")
        metrics: dict[str, float] = {}
        headline = []
        with self.clock.measure():
            for task in self._active:
                scores = self.scorer.score(trainer, pl_module, task)
                self.latest[task] = scores
                headline.append(self.scorer.primary(task, scores))
                for name, value in scores.items():
                    metrics[f"domain/{task}/{name}"] = value
        if headline:
            metrics["domain/average"] = sum(headline) / len(headline)
        metrics["eval/domain_seconds"] = self.clock.seconds
        metrics["eval/domain_fraction"] = self.clock.fraction()
        return metrics
