"""Optional capabilities an adapter declares, so that callers ask instead of guessing.

Methods (:class:`~medmoe.adapters.spec.AdapterSpec` subclasses) may declare

- :class:`TaskRoutedAdapter`: one adapter per task (multi-LoRA): ``num_tasks`` and
  ``task_context(model, task)``; :func:`task_routing` returns it or ``None``;
- :class:`RoutedAdapter`: layers that route tokens among experts (MoE-LoRA): the
  auxiliary (routing) losses through :meth:`~medmoe.adapters.spec.AdapterSpec.auxiliary_losses`,
  the one hook the training module calls for any method.

Layers (:class:`~medmoe.adapters.layer.AdapterLayer` subclasses) may declare

- :class:`RoutedLayer`: experts, a router, and the routing of their last forward (gates,
  probabilities, the base-expert group), which routing statistics and losses read;
- :class:`TemperatureLayer`: a router temperature ``tau`` and its range;
- :class:`ExpertFactorsLayer`: per-expert LoRA factors and scales.

Callers outside ``medmoe.adapters`` use these (and :func:`routed_layers`,
:func:`layers_with`, :func:`routing_recording_paused`), never a concrete layer class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from medmoe.adapters.layer_capabilities import (
    ExpertFactorsLayer,
    RoutedLayer,
    TemperatureLayer,
    layers_with,
    routed_layers,
    routing_recording_paused,
)
from medmoe.objectives.routing import routing_losses as layer_routing_losses

__all__ = [
    "ExpertFactorsLayer",
    "RoutedAdapter",
    "RoutedLayer",
    "TaskRoutedAdapter",
    "TemperatureLayer",
    "layers_with",
    "routed_layers",
    "routing_losses",
    "routing_recording_paused",
    "task_routing",
]


def routing_losses(
    model: nn.Module,
    token_mask: Tensor | None,
    *,
    lambda_balance: float,
    lambda_kp: float,
    balance_form: str = "variance",
    kp_delta: float = 0.1,
    is_general: Tensor | None = None,
) -> dict[str, Tensor]:
    """The routing terms of eq 5 over every routed layer of ``model``'s last forward
    (:func:`medmoe.objectives.routing.routing_losses`): ``balance_loss``, ``kp_loss`` where they
    apply and ``routing_loss``, their weighted sum; ``{}`` without routed layers or weights."""
    layers = [layer for _, layer in routed_layers(model)]
    if not layers or (lambda_balance <= 0 and lambda_kp <= 0):
        return {}
    return layer_routing_losses(
        layers,
        token_mask,
        lambda_balance=lambda_balance,
        lambda_kp=lambda_kp,
        balance_form=balance_form,
        kp_delta=kp_delta,
        is_general=is_general,
    )


# --------------------------------------------------------------------------- methods
class TaskRoutedAdapter(ABC):
    """A method with one adapter per task (ids ``0..num_tasks-1``), chosen per sample by the
    batch's ``task_key`` entry (:meth:`~medmoe.adapters.spec.AdapterSpec.prepare_batch`)."""

    num_tasks: int
    task_key: str

    @abstractmethod
    def task_context(
        self, model: nn.Module, task: Tensor | int | str
    ) -> AbstractContextManager[nn.Module]:
        """Route every forward inside the block by ``task`` (an id, a name, or [B] ids)."""


class RoutedAdapter:
    """A method whose layers are :class:`RoutedLayer` s: its auxiliary losses are the routing
    terms of eq 5 (:func:`routing_losses`)."""

    def auxiliary_losses(
        self, model: nn.Module, token_mask: Tensor | None, **weights: Any
    ) -> dict[str, Tensor]:
        return routing_losses(model, token_mask, **weights)


def task_routing(adapter: object) -> TaskRoutedAdapter | None:
    """``adapter`` if it routes by task (:class:`TaskRoutedAdapter`), else ``None``."""
    return adapter if isinstance(adapter, TaskRoutedAdapter) else None
