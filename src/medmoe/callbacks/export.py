"""AdapterExport: the trained adapter as its own small files beside the run's logs."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from medmoe.strategies import unsharded

__all__ = ["AdapterExport"]


class AdapterExport(Callback):
    """Writes ``adapter.save(model, <dirpath>)`` at the end of training (rank zero).

    Every method writes through :meth:`~medmoe.adapters.spec.AdapterSpec.save`: the description
    (``adapter_config.json``; ``medmoe_adapter.json`` beside another library's files, peft's for
    LoRA and transformers' for full fine-tuning) and the method's tensors, into a staging folder
    that replaces the directory whole: a failed export never replaces a good one.

    Args:
        dirpath: where to write; ``None`` = ``<trainer.log_dir>/adapter``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_to: Path | None = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask, or rank zero waits
        # for the others forever at the end of a DDP fit
        root = trainer.log_dir or trainer.default_root_dir
        with unsharded(pl_module.model):  # FSDP2: every rank gathers, rank zero writes
            if trainer.global_rank != 0:
                return
            target = Path(self.dirpath) if self.dirpath else Path(root) / "adapter"
            self.saved_to = pl_module.adapter.save(pl_module.model, target)
        rank_zero_info(f"adapter saved to {self.saved_to}")
