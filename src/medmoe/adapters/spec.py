"""The adapter protocol the training loop relies on, whatever the method.

Every method (Med-MoE-LoRA, plain LoRA, multi-LoRA, full fine-tuning, ...) is a subclass of
:class:`AdapterSpec`, usually a dataclass of its hyper-parameters, selected in YAML by
``class_path``. The LightningModule calls these methods and the optional capabilities of
:mod:`medmoe.adapters.capabilities` (routed layers, per-task routing), nothing method-specific.

Besides applying, switching off, saving and loading, a spec declares which tensors of the adapted
model are the adapter's (:meth:`AdapterSpec.adapter_tensors`) and which of them are exempt from
weight decay (:meth:`AdapterSpec.no_decay_names`); by default both come from the model's
:class:`~medmoe.adapters.layer.AdapterLayer` layers. Checkpoints keep exactly the adapter
tensors, and the optimizer trains exactly them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from medmoe.adapters.format import ADAPTER_CONFIG, AdapterDescription, describe, read_description
from medmoe.adapters.layer import layer_adapter_tensors, layer_no_decay_names
from medmoe.atomic import atomic_directory, write_file_bytes


class AdapterConfig:
    """Base of the hyper-parameter classes that are data only (``MoELoRAConfig``): the method is
    another class, which :func:`medmoe.adapters.med_moe_lora.adapter_spec` picks for them, as
    ``peft.get_peft_model`` picks the tuner of a ``PeftConfig``. (Being a plain class, it also
    makes jsonargparse select its dataclass subclasses by ``class_path`` in YAML.)"""


class AdapterSpec:
    """What a fine-tuning method must provide to the training loop.

    Saving and loading are written once, here (:meth:`save`, :meth:`load`): the directory gets
    the description ``{method, format_version, config, metadata}``
    (:mod:`medmoe.adapters.format`) plus the files the method writes in :meth:`write_files`,
    all into a staging folder that replaces the directory whole
    (:func:`medmoe.atomic.atomic_directory`); :meth:`load` reads the description of any format,
    checks it names this method and hands it to :meth:`read_files`. A method is registered under
    its name with :func:`medmoe.adapters.registry.register_method`.
    """

    #: the registered name adapter directories record (set by ``register_method``)
    method_name: ClassVar[str | None] = None
    #: the data-only config class the method holds, if any (set by ``register_method``)
    config_class: ClassVar[type | None] = None
    #: the description's file name: ``adapter_config.json``, or ``medmoe_adapter.json`` where
    #: the method's files are another library's (peft, transformers)
    description_file: ClassVar[str] = ADAPTER_CONFIG

    # ----------------------------------------------------------------- config
    def config_dict(self) -> dict[str, Any]:
        """The method's hyper-parameters as JSON values (what the description records)."""
        if dataclasses.is_dataclass(self):
            return dataclasses.asdict(self)
        raise NotImplementedError(f"{type(self).__name__} must define config_dict")

    @classmethod
    def from_config_dict(cls, values: Mapping[str, Any]) -> AdapterSpec:
        """The method with the hyper-parameters :meth:`config_dict` gave; unknown keys raise."""
        if not dataclasses.is_dataclass(cls):
            raise NotImplementedError(f"{cls.__name__} must define from_config_dict")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)

    def init_args(self) -> dict[str, Any]:
        """The YAML ``init_args`` that rebuild this method from its ``class_path``."""
        return self.config_dict()

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

    # ----------------------------------------------------------------- save / load
    def save(
        self,
        model: nn.Module,
        directory: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the description and the trained tensors (adapter only where the method has one)
        into ``directory``, whole: a kill or a full disk part-way keeps the previous one, and a
        full disk raises :class:`~medmoe.atomic.AtomicWriteError` naming the bytes needed."""
        if self.method_name is None:
            raise TypeError(
                f"{type(self).__name__} is no registered method: decorate it with "
                "medmoe.adapters.registry.register_method(name)"
            )
        self.check_saveable(model)
        cls = type(self)
        description = describe(
            self.method_name,
            f"{cls.__module__}.{cls.__qualname__}",
            self.saved_config_dict(model),
            dict(metadata or {}),
            self.description_extras(model),
        )
        blob = json.dumps(description, indent=2, sort_keys=True).encode()
        directory = Path(directory)
        size = lambda: self.save_size(model, len(blob))  # noqa: E731
        with atomic_directory(directory, size=size) as staging:
            self.write_files(model, staging)
            write_file_bytes(staging / self.description_file, blob)
        return directory

    def load(self, model: nn.Module, directory: str | os.PathLike) -> nn.Module:
        """Load what :meth:`save` wrote (or a format-0 directory of this method) onto ``model``
        (a bare base, or one adapted by :meth:`apply`) and return the adapted model."""
        description = read_description(directory)
        if description.method != self.method_name:
            raise ValueError(
                f"{directory} holds a {description.method} adapter, not a {self.method_name} "
                "one: load it with medmoe.adapters.load_adapted(model, directory), which picks "
                "the method the directory records"
            )
        return self.read_files(model, Path(directory), description)

    # what a method defines for save / load
    def check_saveable(self, model: nn.Module) -> None:
        """Raise before anything is written if ``model`` cannot be saved by this method."""

    def saved_config_dict(self, model: nn.Module) -> dict[str, Any]:
        """The config the description records for ``model`` (default: :meth:`config_dict`)."""
        return self.config_dict()

    def description_extras(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific top-level keys of the description (e.g. MoE-LoRA's tau form)."""
        return {}

    def save_size(self, model: nn.Module, description_bytes: int) -> int:
        """Bytes the directory needs (the full-disk message), given the description's size.
        Default: the adapter tensors' bytes, what a library's writer (peft, transformers)
        mostly writes; a method writing its own files gives their exact size."""
        return sum(t.nbytes for t in self.adapter_tensors(model).values())

    def write_files(self, model: nn.Module, staging: Path) -> None:
        """Write the method's tensor files into the (empty) staging folder."""
        raise NotImplementedError(f"{type(self).__name__} cannot save")

    def read_files(
        self, model: nn.Module, directory: Path, description: AdapterDescription
    ) -> nn.Module:
        """Load the tensor files of ``directory`` (described by ``description``) onto ``model``,
        reading and checking every file before the model is touched."""
        raise NotImplementedError(f"{type(self).__name__} cannot load")

    def auxiliary_losses(
        self, model: nn.Module, token_mask: Tensor | None, **weights: Any
    ) -> dict[str, Tensor]:
        """The method's auxiliary loss terms of the forward just run, named, plus their weighted
        sum ``routing_loss``; ``{}`` when it has none (the default). The one hook the training
        module calls for any method; ``weights``: ``lambda_balance``, ``lambda_kp``,
        ``balance_form``, ``kp_delta``, ``is_general`` (see
        :func:`medmoe.adapters.capabilities.routing_losses`, what routed methods return)."""
        return {}

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter's tensors in the adapted ``model``, keyed by their ``state_dict`` names:
        what trains and what a checkpoint keeps. Default: the declared tensors of every
        :class:`~medmoe.adapters.layer.AdapterLayer`."""
        return layer_adapter_tensors(model)

    def no_decay_names(self, model: nn.Module) -> set[str]:
        """Keys of :meth:`adapter_tensors` that AdamW must not decay (routers, temperatures)."""
        return layer_no_decay_names(model)
