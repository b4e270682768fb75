"""Med-MoE-LoRA, the method: the :class:`AdapterSpec` that applies, switches off, saves and loads
a :class:`MoELoRAConfig`.

The config (``config.py``) is data; this module imports it, the injection path and the adapter
state in one direction, as peft keeps ``LoraModel`` apart from ``LoraConfig``.

Two ways to select the method in YAML, both with the same ``init_args``::

    class_path: medmoe.adapters.MoELoRAConfig   # the config; MedMoEModule picks its method
    class_path: medmoe.adapters.MoELoRA         # the method itself (subclass it to change it)

The method holds its config (``MoELoRA(config)``, or ``MoELoRA(**fields)``, which builds it);
it does not inherit from it. To change the layer (another gate, say), subclass :class:`MoELoRA`
and set ``layer_cls``; to add hyper-parameters, subclass :class:`MoELoRAConfig` and give the
method subclass that ``config_class`` (a config subclass alone selects :class:`MoELoRA`).

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from medmoe.adapters.capabilities import RoutedAdapter
from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.format import ADAPTER_WEIGHTS, AdapterDescription
from medmoe.adapters.inject import CONFIG_ATTRIBUTE, apply_moe_lora, moe_lora_layers
from medmoe.adapters.moe_lora import MoELoRALinear
from medmoe.adapters.registry import adapter_spec, register_method
from medmoe.adapters.spec import AdapterSpec
from medmoe.adapters.state import (
    TAU_PARAMETRISATION,
    TAU_PARAMETRISATION_KEY,
    adapter_state_dict,
    adapters_disabled,
    load_moe_lora_tensors,
    read_safetensors,
    safetensors_size,
    write_safetensors,
)

__all__ = ["MoELoRA", "adapter_spec"]


@register_method("MoELoRA", config_class=MoELoRAConfig)
class MoELoRA(RoutedAdapter, AdapterSpec):
    """Med-MoE-LoRA (eq 1-5 of the paper): the method that applies a :class:`MoELoRAConfig`.

    ``MoELoRA(config)`` holds ``config``; ``MoELoRA(**fields)`` builds it from the config's
    fields (what YAML's ``init_args`` give). The config's fields read through the method
    (``spec.top_k``). ``layer_cls`` (a class attribute) is the layer every target linear
    becomes: :class:`MoELoRALinear` or a subclass of it; ``config_class`` the config it holds.
    """

    layer_cls: ClassVar[type[MoELoRALinear]] = MoELoRALinear
    config_class: ClassVar[type[MoELoRAConfig]] = MoELoRAConfig

    def __init__(self, config: MoELoRAConfig | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError(f"give {type(self).__name__} a config or its fields, not both")
        if config is None:
            config = self.config_class(**fields)
        elif not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} holds a {self.config_class.__name__}, got "
                f"{type(config).__name__}"
            )
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # the config's fields and methods read through the method (spec.top_k, spec.layer_ranks)
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("_") and hasattr(config, name):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config == self.config

    __hash__ = None  # type: ignore[assignment]  # mutable, as the config dataclass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # ----------------------------------------------------------------- config
    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    to_dict = config_dict  # as MoELoRAConfig.to_dict, for code written when MoELoRA was one

    @classmethod
    def from_config_dict(cls, values: Mapping[str, Any]) -> MoELoRA:
        return cls(config=cls.config_class.from_dict(dict(values)))

    # ----------------------------------------------------------------- AdapterSpec
    def apply(self, model: nn.Module) -> nn.Module:
        apply_moe_lora(model, self.config, layer_cls=self.layer_cls)
        return model

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        with adapters_disabled(model):
            yield model

    def check_saveable(self, model: nn.Module) -> None:
        if getattr(model, CONFIG_ATTRIBUTE, None) is None or not moe_lora_layers(model):
            raise ValueError("the model carries no MoE-LoRA config: call apply_moe_lora first")

    def saved_config_dict(self, model: nn.Module) -> dict[str, Any]:
        """The config the model was adapted with (``model.medmoe_config``)."""
        return getattr(model, CONFIG_ATTRIBUTE).to_dict()

    def description_extras(self, model: nn.Module) -> dict[str, Any]:
        # medmoe_config: a copy of "config" that format-0 readers (medmoe 0.1) still load
        return {
            TAU_PARAMETRISATION_KEY: TAU_PARAMETRISATION,
            "medmoe_config": self.saved_config_dict(model),
        }

    def save_size(self, model: nn.Module, description_bytes: int) -> int:
        return safetensors_size(adapter_state_dict(model)) + description_bytes

    def write_files(self, model: nn.Module, staging: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
        write_safetensors(staging / ADAPTER_WEIGHTS, tensors)

    def read_files(
        self, model: nn.Module, directory: Path, description: AdapterDescription
    ) -> nn.Module:
        """A bare base is first adapted with the file's config and this method's ``layer_cls``;
        an adapted one must match the file's tensors by name and shape."""
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter weights at {weights}")
        saved = read_safetensors(weights)  # before touching the model: a bad file changes nothing
        if not moe_lora_layers(model):
            config = self.config_class.from_dict(description.config)
            apply_moe_lora(model, config, layer_cls=self.layer_cls)
        load_moe_lora_tensors(model, saved, description, weights)
        return model


def _init_signature(config_class: type) -> inspect.Signature:
    """``(self, config=None, *, <the config's fields>)``: what YAML's ``init_args`` may give."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(
            "config",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=config_class | None,
        ),
    ]
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if not f.init:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        parameters.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=hints.get(f.name, inspect.Parameter.empty),
            )
        )
    return inspect.Signature(parameters)


MoELoRA.__init__.__signature__ = _init_signature(MoELoRAConfig)  # type: ignore[attr-defined]


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the model's MoE-LoRA tensors and config into ``directory`` (atomically): the
    Med-MoE-LoRA method's :meth:`~medmoe.adapters.spec.AdapterSpec.save`."""
    config: MoELoRAConfig | None = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("the model carries no MoE-LoRA config: call apply_moe_lora first")
    return MoELoRA(config=config).save(model, directory, metadata)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[MoELoRALinear]:
    """Load a saved Med-MoE-LoRA adapter onto ``model`` (adapting it first if it carries no
    MoE-LoRA layers): the method's :meth:`~medmoe.adapters.spec.AdapterSpec.load`.

    Every tensor must match by name and shape: missing, unexpected or misshapen tensors raise
    ValueError naming the file and the keys.
    """
    MoELoRA().load(model, directory)
    return [layer for _, layer in moe_lora_layers(model)]
