"""Per-step time measured inside the training loop, with the steps another process slowed apart.

A fit's wall time mixes the training steps with loading, validation and checkpoints, and on a
shared machine with the time other processes took the cores. :class:`StepTimer` times every
optimizer step (its micro-batches, from batch start to batch end) in wall and CPU time; a step
whose wall time exceeds its CPU time by more than :data:`CONTENTION_LIMIT` waited for a core
(with one torch thread an uncontended step's wall and CPU times agree to a few percent), and
the step time it reports is the median over the other steps. The experiment runner adds it to
every fit and writes :meth:`StepTimer.summary` into ``results.json``.
"""

from __future__ import annotations

import statistics
from time import perf_counter, process_time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["CONTENTION_LIMIT", "MIN_UNCONTENDED_STEPS", "StepTimer"]

CONTENTION_LIMIT = 1.10  # wall / CPU above this: the step waited for a core
MIN_UNCONTENDED_STEPS = 10  # fewer uncontended steps than this: no step time is reported


class StepTimer(Callback):
    """Wall and CPU seconds of each optimizer step (see the module notes)."""

    def __init__(self) -> None:
        self.steps: dict[int, list[float]] = {}  # global step -> [wall, cpu]
        self._began: tuple[int, float, float] | None = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._began = trainer.global_step, perf_counter(), process_time()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._began is None:
            return
        step, wall_began, cpu_began = self._began
        wall, cpu = perf_counter() - wall_began, process_time() - cpu_began
        self._began = None
        totals = self.steps.setdefault(step, [0.0, 0.0])  # the step the micro-batch belongs to
        totals[0] += wall
        totals[1] += cpu

    def uncontended(self) -> list[float]:
        """Wall seconds of the steps that did not wait for a core."""
        return [wall for wall, cpu in self.steps.values() if wall <= CONTENTION_LIMIT * cpu]

    def summary(self) -> dict[str, Any]:
        """``train_step_seconds`` (median wall seconds of the uncontended steps; ``None`` with
        fewer than :data:`MIN_UNCONTENDED_STEPS` of them), and the step counts behind it."""
        clean = self.uncontended()
        return {
            "train_step_seconds": (
                round(statistics.median(clean), 6) if len(clean) >= MIN_UNCONTENDED_STEPS else None
            ),
            "train_steps_timed": len(self.steps),
            "train_steps_uncontended": len(clean),
        }
