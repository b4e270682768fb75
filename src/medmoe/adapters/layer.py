"""The adapter-layer contract, written once: what every medmoe adapter layer declares.

In the spirit of torchtune's ``AdapterModule.adapter_params()`` and peft's
``adapter_layer_names``, an :class:`AdapterLayer` wraps a frozen ``nn.Linear`` (``self.base``)
and declares

- ``adapter_tensor_names``: the tensors (parameters, or persistent buffers such as a fixed
  ``log_tau``) that are the adapter's, by name relative to the layer. They are what adapter
  files, checkpoints and the ZeRO converter keep, and the only tensors that train;
- ``no_decay_tensor_names``: the subset exempt from weight decay (routers, temperatures);
- ``adapter_enabled``: the on/off switch; ``False`` makes the forward return ``base(x)`` exactly;
- :meth:`active_parameter_count`: the adapter parameters one token uses (Table 4 of the paper).

The checkpoint filter, the optimizer's parameter groups, the adapter state dicts, the switch
:func:`~medmoe.adapters.state.adapters_disabled`, the parameter counts and the ZeRO converter
all read these declarations (through the functions below), not parameter names (the one
name-based step left is :mod:`medmoe.zero_to_adapter` reshaping an old file's 0-dim ``log_tau``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn


class AdapterLayer(nn.Module, ABC):
    """Base class of every adapter layer: a frozen ``base`` linear plus declared adapter tensors."""

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ()
    no_decay_tensor_names: ClassVar[tuple[str, ...]] = ()
    adapter_enabled: bool
    base: nn.Linear

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors by name relative to the layer, in declaration order."""
        return {name: _tensor(self, name) for name in self.adapter_tensor_names}

    @abstractmethod
    def active_parameter_count(self) -> float:
        """Adapter parameters one token uses (Table 4 of the paper)."""


def _tensor(module: nn.Module, name: str) -> Tensor:
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    tensor = getattr(owner, attribute)
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{type(module).__name__} declares adapter tensor {name!r}, not a tensor")
    return tensor


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(qualified name, layer)`` for every adapter layer of ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def layer_adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter layer's declared tensors, keyed by qualified name (``<layer>.<tensor>``)."""
    return {
        f"{name}.{key}": tensor
        for name, layer in adapter_layers(model)
        for key, tensor in layer.adapter_tensors().items()
    }


def layer_no_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of the adapter tensors the layers exempt from weight decay."""
    return {
        f"{name}.{key}"
        for name, layer in adapter_layers(model)
        for key in layer.no_decay_tensor_names
    }
