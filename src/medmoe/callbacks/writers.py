"""Where the callbacks' outputs go: Lightning's loggers, TensorBoard images, a step cadence."""

from __future__ import annotations

from collections.abc import Mapping
from weakref import WeakKeyDictionary

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["StepCadence", "add_image", "last_logged", "log_to_loggers", "tensorboard_experiment"]

# the latest value of every scalar sent through log_to_loggers, per trainer (rank zero)
_LAST_LOGGED: WeakKeyDictionary[Trainer, dict[str, float]] = WeakKeyDictionary()


def tensorboard_experiment(trainer: Trainer):
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def add_image(trainer: Trainer, tag: str, image: np.ndarray, step: int) -> bool:
    """Write an [H, W, 3] uint8 image to TensorBoard (rank zero); False without TensorBoard."""
    if trainer.global_rank != 0:
        return False
    experiment = tensorboard_experiment(trainer)
    if experiment is None:
        return False
    experiment.add_image(tag, image, step, dataformats="HWC")
    return True


def log_to_loggers(trainer: Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger of the Trainer at ``step`` (rank zero only).

    The callbacks log on their own step cadence this way rather than through
    ``LightningModule.log``, whose step values reach the loggers only on the Trainer's
    ``log_every_n_steps`` steps and are then re-sent, stale, on each later such step until
    logged again; ``on_train_start`` and ``on_train_end`` do not allow it at all.
    """
    if not metrics or trainer.global_rank != 0:
        return
    values = {k: float(v) for k, v in metrics.items()}
    _LAST_LOGGED.setdefault(trainer, {}).update(values)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def last_logged(trainer: Trainer) -> dict[str, float]:
    """The latest value of every scalar the callbacks sent through :func:`log_to_loggers`."""
    return dict(_LAST_LOGGED.get(trainer, {}))


class StepCadence:
    """Says once per optimizer step whether a hook at ``on_train_batch_end`` is due.

    Due when ``global_step`` (optimizer steps done, this batch's included) is a positive
    multiple of ``every``; the micro-batches of one accumulated step count once.
    """

    def __init__(self, every: int, owner: str) -> None:
        if every < 1:
            raise ValueError(f"{owner}: the step interval must be >= 1, got {every}")
        self.every = every
        self._last_step = -1

    def due(self, trainer: Trainer) -> bool:
        step = trainer.global_step
        if step <= 0 or step == self._last_step or step % self.every:
            return False
        self._last_step = step
        return True
