"""ResumableCheckpoint: one rolling, atomically written ``last.ckpt`` that survives preemption.

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``save_last=True``,
``save_top_k=0`` and ``every_n_train_steps=N`` already rolls one ``last.ckpt``. This subclass
adds what a week-long run on a preemptible cluster needs:

- the final step is always in ``last.ckpt`` (``ModelCheckpoint`` refreshes it only every N
  steps, so a ``max_steps`` that is no multiple of N left the end of the run out);
- on SIGTERM (Lightning's own signal connector stops the loop at the next step boundary with
  :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`) ``last.ckpt`` is written
  before the process exits; the ``medmoe`` CLI then exits with status 143 so a scheduler
  requeues the job;
- on resume, the learning rate of the first step is the rebuilt schedule's at the restored
  step (:func:`medmoe.resume.continue_schedule`): a changed ``max_steps`` continues on the new
  cosine curve instead of running a step at the old run's final lr;
- SIGINT (Ctrl-C) is handled the same way (exit status 130); a second Ctrl-C interrupts at
  once, without a checkpoint, as Lightning does;
- on several processes every rank stops at the same step: Lightning's own SIGTERM handler runs
  a broadcast *inside the signal handler*, wherever each rank happens to be, which deadlocked
  an FSDP2 run against its all-gathers. This callback's handler only forwards the signal to
  the launcher's other ranks and notes it; the ranks agree at the end of each training batch
  (a max-reduction of one flag) and only then tell Lightning's loop to stop;
- any other exception (a NaN loss, an out-of-memory error) writes nothing: the state may be
  half-updated, and the last periodic ``last.ckpt`` is the good one to keep;
- every write goes to a temporary file beside the target, is flushed to disk and renamed over
  it (:class:`AtomicCheckpointIO`): Lightning's default writes a temporary file in the system
  temporary directory and *moves* it, which copies in place when that directory is another
  file system (a killed copy leaves a truncated ``last.ckpt``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medmoe.atomic import atomic_write_stream
from medmoe.resume import continue_schedule

__all__ = ["AtomicCheckpointIO", "ResumableCheckpoint", "atomic_torch_save"]

EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into a temporary file beside ``path``, fsync, then rename over ``path``.

    The rename is atomic on POSIX file systems: ``path`` is always either the previous whole
    file or the new whole file, whatever happens during the write (a kill -9 included). A
    failed write (a full disk) raises :class:`medmoe.atomic.AtomicWriteError`, one line
    naming ``path`` and the bytes the checkpoint needs (:func:`medmoe.atomic.atomic_write_stream`).
    """
    atomic_write_stream(path, lambda file: torch.save(obj, file))


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local writes are :func:`atomic_torch_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


class ResumableCheckpoint(ModelCheckpoint):
    """A rolling ``last.ckpt`` written every ``every_n_train_steps``, at the end, and on a signal.

    Takes every :class:`ModelCheckpoint` argument; the defaults differ: ``save_last=True``,
    ``save_top_k=0`` (no other copies: the disk holds one checkpoint), ``every_n_train_steps=100``.
    ``save_top_k=-1`` with ``every_n_train_steps`` also keeps a copy per interval.

    Attributes:
        interrupted_by: ``"SIGTERM"`` / ``"SIGINT"`` once a signal stopped the run, else ``None``.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_train_steps: int | None = 100,
        save_last: bool = True,
        save_top_k: int = 0,
        **kwargs: Any,
    ) -> None:
        if not save_last:
            raise ValueError("ResumableCheckpoint: save_last must be true (it writes last.ckpt)")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"ResumableCheckpoint: every_n_train_steps must be >= 1 or null, got "
                f"{every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )
        self.interrupted_by: str | None = None
        self._sigint_previous: Any = None
        self._sigterm_previous: Any = None
        self._sigint_seen = False
        self._sigterm_seen = False
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # --- signals ------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is not None:
            continue_schedule(trainer)  # the lr of the current step, also after a new max_steps
        self.interrupted_by = None
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            self._sigint_seen = self._sigterm_seen = False
            self._sigint_previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._sigterm_previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Forward to the other ranks (rank zero launched them) and note it; no collective."""
        trainer = self._trainer
        if not self._sigterm_seen and trainer is not None:
            rank_zero_info("SIGTERM received: stopping at the end of this training batch")
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self._sigterm_seen = True
        if trainer is not None and trainer.world_size == 1:
            trainer._signal_connector.received_sigterm = True  # Lightning's loop stops there

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if trainer.world_size > 1:  # every rank, same batch: the ranks agree to stop together
            flag = torch.tensor(float(self._sigterm_seen), device=pl_module.device)
            if bool(trainer.strategy.reduce(flag, reduce_op="max") > 0):
                self._sigterm_seen = True
                trainer._signal_connector.received_sigterm = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """First Ctrl-C: stop at the next step boundary through Lightning's SIGTERM path."""
        if self._sigint_seen:
            raise KeyboardInterrupt
        self._sigint_seen = True
        self.interrupted_by = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            if self._sigint_previous is not None:
                signal.signal(signal.SIGINT, self._sigint_previous)
            if self._sigterm_previous is not None:
                signal.signal(signal.SIGTERM, self._sigterm_previous)
        self._sigint_previous = self._sigterm_previous = None

    # --- saving -------------------------------------------------------------------------------

    def _save_last_now(self, trainer: Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_signals()
        if trainer.state.fn == TrainerFn.FITTING and not trainer.fast_dev_run:
            self._save_last_now(trainer)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore_signals()
        if not isinstance(exception, SIGTERMException):
            return  # a fault mid-step: keep the last periodic checkpoint, write nothing
        self.interrupted_by = self.interrupted_by or "SIGTERM"
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._save_last_now(trainer)
        rank_zero_info(
            f"{self.interrupted_by} received: stopped at global step {trainer.global_step}, "
            f"checkpoint {self.last_model_path}"
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_signals()
