"""The adapter protocol the training loop relies on, whatever the method.

Every method (Med-MoE-LoRA, plain LoRA, multi-LoRA, full fine-tuning, ...) is a subclass of
:class:`AdapterSpec`, usually a dataclass of its hyper-parameters, selected in YAML by
``class_path``. The LightningModule only calls these methods.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn


class AdapterSpec:
    """What a fine-tuning method must provide to the training loop."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Adapt ``model`` (in place or by wrapping it) and return the model to train."""
        raise NotImplementedError

    def prepare_batch(self, model: nn.Module, batch: Mapping[str, Tensor]) -> None:
        """Called before every forward with the batch (e.g. to select per-task adapters)."""

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the base model inside the block (used to measure forgetting)."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch its adapter off")
        yield model  # pragma: no cover

    def save(self, model: nn.Module, directory: str | os.PathLike) -> Path:
        """Write the trained parameters (adapter only where the method has one)."""
        raise NotImplementedError

    def load(self, model: nn.Module, directory: str | os.PathLike) -> nn.Module:
        """Load what :meth:`save` wrote onto ``model`` (adapted by :meth:`apply`)."""
        raise NotImplementedError
