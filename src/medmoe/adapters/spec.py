"""The adapter protocol the training loop relies on, whatever the method.

Every method (Med-MoE-LoRA, plain LoRA, multi-LoRA, full fine-tuning, ...) is a subclass of
:class:`AdapterSpec`, usually a dataclass of its hyper-parameters, selected in YAML by
``class_path``. The LightningModule only calls these methods.

Besides applying, switching off, saving and loading, a spec declares which tensors of the adapted
model are the adapter's (:meth:`AdapterSpec.adapter_tensors`) and which of them are exempt from
weight decay (:meth:`AdapterSpec.no_decay_names`); by default both come from the model's
:class:`~medmoe.adapters.layer.AdapterLayer` layers. Checkpoints keep exactly the adapter
tensors, and the optimizer trains exactly them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn

from medmoe.adapters.layer import layer_adapter_tensors, layer_no_decay_names


class AdapterConfig:
    """Base of the hyper-parameter classes that are data only (``MoELoRAConfig``): the method is
    another class, which :func:`medmoe.adapters.med_moe_lora.adapter_spec` picks for them, as
    ``peft.get_peft_model`` picks the tuner of a ``PeftConfig``. (Being a plain class, it also
    makes jsonargparse select its dataclass subclasses by ``class_path`` in YAML.)"""


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

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter's tensors in the adapted ``model``, keyed by their ``state_dict`` names:
        what trains and what a checkpoint keeps. Default: the declared tensors of every
        :class:`~medmoe.adapters.layer.AdapterLayer`."""
        return layer_adapter_tensors(model)

    def no_decay_names(self, model: nn.Module) -> set[str]:
        """Keys of :meth:`adapter_tensors` that AdamW must not decay (routers, temperatures)."""
        return layer_no_decay_names(model)
