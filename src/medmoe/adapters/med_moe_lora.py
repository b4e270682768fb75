"""Med-MoE-LoRA, the method: the :class:`AdapterSpec` that applies, switches off, saves and loads
a :class:`MoELoRAConfig`.

The config (``config.py``) is data; this module imports it, the injection path and the adapter
state in one direction, as peft keeps ``LoraModel`` apart from ``LoraConfig``.

Two ways to select the method in YAML, both with the same ``init_args``::

    class_path: medmoe.adapters.MoELoRAConfig   # the config; MedMoEModule picks its method
    class_path: medmoe.adapters.MoELoRA         # the method itself (subclass it to change it)

To change the layer (another gate, say), subclass :class:`MoELoRA` and set ``layer_cls``.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.inject import apply_moe_lora, moe_lora_layers
from medmoe.adapters.moe_lora import MoELoRALinear
from medmoe.adapters.spec import AdapterConfig, AdapterSpec
from medmoe.adapters.state import (
    adapters_disabled,
    load_adapter,
    read_adapter_config,
    save_adapter,
)


@dataclass
class MoELoRA(MoELoRAConfig, AdapterSpec):
    """Med-MoE-LoRA (eq 1-5 of the paper): a :class:`MoELoRAConfig` that also applies itself.

    The fields are :class:`MoELoRAConfig`'s. ``layer_cls`` (a class attribute, not a field) is
    the layer every target linear becomes: :class:`MoELoRALinear` or a subclass of it.
    """

    layer_cls: ClassVar[type[MoELoRALinear]] = MoELoRALinear

    def apply(self, model: nn.Module) -> nn.Module:
        apply_moe_lora(model, self, layer_cls=self.layer_cls)
        return model

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        with adapters_disabled(model):
            yield model

    def save(self, model: nn.Module, directory: str | os.PathLike) -> Path:
        return save_adapter(model, directory)

    def load(self, model: nn.Module, directory: str | os.PathLike) -> nn.Module:
        """Load a saved adapter; a bare base is first adapted with the file's config and this
        method's ``layer_cls``."""
        if not moe_lora_layers(model):
            apply_moe_lora(model, read_adapter_config(directory), layer_cls=self.layer_cls)
        load_adapter(model, directory)
        return model


def adapter_spec(adapter: AdapterSpec | AdapterConfig) -> AdapterSpec:
    """The method of ``adapter``: an :class:`AdapterSpec` as it is, a plain
    :class:`MoELoRAConfig` as the :class:`MoELoRA` with the same fields."""
    if isinstance(adapter, AdapterSpec):
        return adapter
    if type(adapter) is MoELoRAConfig:
        fields = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)}
        return MoELoRA(**fields)
    if isinstance(adapter, MoELoRAConfig):
        raise TypeError(
            f"{type(adapter).__name__} subclasses MoELoRAConfig, which is data only; to change "
            "how Med-MoE-LoRA applies, subclass medmoe.adapters.MoELoRA (the method) instead"
        )
    raise TypeError(
        f"adapter must be an AdapterSpec (e.g. medmoe.adapters.MoELoRA, "
        f"medmoe.adapters.baselines.LoRA) or a MoELoRAConfig, got {type(adapter).__name__}"
    )
