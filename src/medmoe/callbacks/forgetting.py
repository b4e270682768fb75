"""ForgettingMonitor: general-knowledge scores of the adapted model against the base model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medmoe.callbacks.scoring import EvalClock, TaskScorer
from medmoe.callbacks.writers import StepCadence, log_to_loggers

__all__ = ["ForgettingMonitor"]


class ForgettingMonitor(Callback):
    """Scores general tasks (MMLU, GSM8K) during fit and logs the drop from the base model.

    - At train start, the base model: the adapted model with its adapter switched off
      (``adapter.disabled``). For methods that cannot switch it off (full fine-tuning), the
      model before its first optimizer step *is* the base, so it is scored as is (a run resumed
      past step 0 restores the base scores from its checkpoint, or reports none).
    - Every ``every_n_steps`` optimizer steps and at train end, the adapted model.

    Logged straight to the Trainer's loggers at the optimizer step (``on_train_start`` and
    ``on_train_end`` do not allow ``LightningModule.log``):

    - ``forgetting/<task>/<metric>``: every metric of the task (``accuracy``;
      ``exact_match_strict`` and ``exact_match_flexible`` for GSM8K);
    - ``forgetting/<task>/base``: the base score of the headline metric (accuracy, GSM8K
      strict match), once;
    - ``forgetting/<task>/delta``: headline score minus base (negative = forgetting);
    - ``eval/forgetting_seconds``: cumulative wall time of these evaluations, and
      ``eval/forgetting_fraction``: its share of the wall time since fit start.

    The model's train/eval mode is restored after every evaluation.

    Args:
        tasks: tasks to score; those the datamodule lacks are skipped with a warning.
        every_n_steps: evaluation interval in optimizer steps; ``None`` or 0 scores at train
            start and end only.
        limit: size of each task's fixed evaluation subset (``None``: all).
        split: the split the subset is drawn from.
        batch_size: evaluation batch size.
        max_new_tokens: generation budget (GSM8K); ``None`` = the task's (GSM8K 256, as the
            harness; Clinical-Sum 128; toy style 64).
        shots: few-shot demonstrations per example; ``None`` = the task's ``num_fewshot``
            (harness style: MMLU 5 from ``dev``, GSM8K 5 from ``train``; toy style 0), chosen by
            the task's sampler as the harness does.
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("mmlu", "gsm8k"),
        every_n_steps: int | None = 200,
        limit: int | None = 64,
        split: str = "validation",
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        shots: int | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.scorer = TaskScorer(split, limit, batch_size, max_new_tokens, shots)
        self._cadence = StepCadence(every_n_steps, "ForgettingMonitor") if every_n_steps else None
        self.clock = EvalClock()
        self.base: dict[str, float] = {}
        self.latest: dict[str, dict[str, float]] = {}
        self._active: list[str] = []
        self._last_step = -1

    # ----------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=self.tasks, split=self.scorer.split)

    def state_dict(self) -> dict[str, Any]:
        return {"base": dict(self.base)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base = dict(state_dict.get("base", {}))

    # ----------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.clock.start()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self.scorer.present(trainer, self.tasks, "ForgettingMonitor")
        metrics: dict[str, float] = {}
        with self.clock.measure():
            for task in self._active:
                if task in self.base:  # restored from a checkpoint, logged by the first run
                    continue
                scores = self._base_scores(trainer, pl_module, task)
                if scores is not None:
                    self.base[task] = self.scorer.primary(task, scores)
                    metrics[f"forgetting/{task}/base"] = self.base[task]
        log_to_loggers(trainer, {**metrics, **self._clock_metrics()}, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Tensor],
        batch_idx: int,
    ) -> None:
        if self._cadence is not None and self._cadence.due(trainer):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    # ----------------------------------------------------------------- scoring
    def _base_scores(
        self, trainer: Trainer, pl_module: LightningModule, task: str
    ) -> dict[str, float] | None:
        try:
            return self.scorer.score(trainer, pl_module, task, base=True)
        except NotImplementedError:
            if trainer.global_step == 0:  # no step taken yet: the model is the base
                return self.scorer.score(trainer, pl_module, task)
            rank_zero_warn(
                f"ForgettingMonitor: {type(pl_module.adapter).__name__} cannot switch its "
                f"adapter off and training starts at step {trainer.global_step}; no base score "
                f"for {task!r}, so no delta"
            )
            return None

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics: dict[str, float] = {}
        with self.clock.measure():
            for task in self._active:
                scores = self.scorer.score(trainer, pl_module, task)
                self.latest[task] = scores
                for name, value in scores.items():
                    metrics[f"forgetting/{task}/{name}"] = value
                if task in self.base:
                    delta = self.scorer.primary(task, scores) - self.base[task]
                    metrics[f"forgetting/{task}/delta"] = delta
        self._last_step = trainer.global_step
        log_to_loggers(trainer, {**metrics, **self._clock_metrics()}, trainer.global_step)

    def _clock_metrics(self) -> dict[str, float]:
        return {
            "eval/forgetting_seconds": self.clock.seconds,
            "eval/forgetting_fraction": self.clock.fraction(),
        }
