"""The layer capabilities (routed, temperature, expert factors): what an adapter layer may
declare beyond :class:`~medmoe.adapters.layer.AdapterLayer`, and the functions that find them.

A leaf of the adapter contract: the routing objectives (:mod:`medmoe.objectives`) read layers
through it, and :mod:`medmoe.adapters.capabilities` re-exports it with the method capabilities.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import Tensor, nn

from medmoe.adapters.layer import AdapterLayer

__all__ = [
    "ExpertFactorsLayer",
    "RoutedLayer",
    "TemperatureLayer",
    "layers_with",
    "routed_layers",
    "routing_recording_paused",
]

L = TypeVar("L")


# --------------------------------------------------------------------------- layers
class RoutedLayer(AdapterLayer):
    """An adapter layer that routes every token among ``num_experts`` experts.

    The first ``num_base_experts`` experts are the base (anchor) group. With ``record_routing``
    the layer keeps the routing of its last forward: :attr:`last_probs` (router probabilities,
    with autograd graph, for the auxiliary losses), :attr:`last_gates` (the mixture weights
    actually applied, detached, for statistics).
    """

    num_experts: int
    num_base_experts: int
    record_routing: bool

    @property
    @abstractmethod
    def last_probs(self) -> Tensor | None:
        """[..., num_experts] router probabilities of the last forward (with graph), or None."""

    @property
    @abstractmethod
    def last_gates(self) -> Tensor | None:
        """[..., num_experts] gates of the last forward (detached), or None."""

    @property
    @abstractmethod
    def router_trains(self) -> bool:
        """Whether the router's parameters train (its probabilities must carry a gradient)."""

    @abstractmethod
    def clear_routing(self) -> None:
        """Drop the recorded routing."""


class TemperatureLayer(AdapterLayer):
    """An adapter layer whose router has a temperature ``tau`` kept inside ``tau_range``."""

    tau_range: tuple[float, float]

    @property
    @abstractmethod
    def tau(self) -> Tensor:
        """The router temperature (a tensor, per layer or per expert)."""


class ExpertFactorsLayer(AdapterLayer):
    """An adapter layer made of ``num_experts`` LoRA experts ``scale_i * B_i A_i``."""

    num_experts: int
    scales: tuple[float, ...] | list[float]

    @abstractmethod
    def expert(self, i: int) -> tuple[Tensor, Tensor]:
        """Expert ``i``'s factors ``(A_i [r_i, d_in], B_i [d_out, r_i])``."""


def layers_with(model: nn.Module, capability: type[L]) -> list[tuple[str, L]]:
    """``(qualified name, layer)`` for every layer of ``model`` declaring ``capability``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, capability)]


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    """Every :class:`RoutedLayer` of ``model``, in model order."""
    return layers_with(model, RoutedLayer)


@contextmanager
def routing_recording_paused(model: nn.Module) -> Iterator[None]:
    """Forwards inside the block leave the routing the routed layers recorded in place."""
    layers = [layer for _, layer in routed_layers(model)]
    previous = [layer.record_routing for layer in layers]
    for layer in layers:
        layer.record_routing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.record_routing = flag
