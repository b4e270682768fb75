"""LoadAdapterWeights: start a new run from a checkpoint's (or adapter's) weights only."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from medmoe.adapters.state import copy_matching_tensors

__all__ = ["LoadAdapterWeights"]


class LoadAdapterWeights(Callback):
    """Copies trained adapter tensors into the freshly built adapter before training starts.

    The optimizer, the schedule and the step counters start new (unlike ``--ckpt_path``,
    which resumes them), so any learning rate, ``max_steps`` or loss weight may be given. The
    adapter must be the same (names and shapes are checked; nothing is copied on a mismatch).

    Args:
        path: a ``.ckpt`` written by ``medmoe fit`` (its adapter tensors) or an adapter
            directory written by :class:`~medmoe.callbacks.AdapterExport`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None:
            raise ValueError(
                f"LoadAdapterWeights({self.path}) starts a new run but --ckpt_path "
                f"{trainer.ckpt_path} resumes one: use one of them"
            )
        if self.path.is_dir():
            pl_module.adapter.load(pl_module.model, self.path)
        else:
            from medmoe.errors import read_checkpoint

            state = read_checkpoint(self.path)["state_dict"]
            current = {
                k: v
                for k, v in pl_module.state_dict().items()
                if k in pl_module.trainable_state_keys()
            }
            copy_matching_tensors(current, dict(state), self.path)
        rank_zero_info(f"adapter weights loaded from {self.path} (new optimizer and schedule)")
