"""The optimizer policy: which tensors train, in which AdamW groups, with which optimizer class.

Derived from the adapter contract (:meth:`~medmoe.adapters.spec.AdapterSpec.adapter_tensors`,
:meth:`~medmoe.adapters.spec.AdapterSpec.no_decay_names`), never from parameter names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medmoe.adapters.spec import AdapterSpec


def parameter_groups(
    adapter: AdapterSpec, model: nn.Module, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the adapted ``model``: decayed and exempt.

    Exempt from weight decay: what the adapter declares (routers, temperatures) and every tensor
    of fewer than 2 dimensions (biases, norms). Only the adapter's tensors train; a trainable
    parameter the adapter does not declare is an error (it would train but never be saved).
    Empty groups are left out; parameters keep the model's order.
    """
    declared = {id(t) for t in adapter.adapter_tensors(model).values()}
    exempt_names = adapter.no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) not in declared:
            raise ValueError(
                f"parameter {name} trains but {type(adapter).__name__} does not declare it an "
                "adapter tensor, so no checkpoint would keep it"
            )
        exempt = param.ndim < 2 or name in exempt_names
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def optimizer_class(strategy: Any) -> type[torch.optim.Optimizer]:
    """AdamW; DeepSpeed's CPU AdamW when ZeRO offloads the optimizer (it refuses torch's)."""
    if is_deepspeed(strategy):
        zero = strategy.config.get("zero_optimization", {})
        if zero.get("offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam
    return torch.optim.AdamW


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` (a Lightning strategy, or ``None``) is DeepSpeed's."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)
