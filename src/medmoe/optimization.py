"""The optimizer policy: which tensors train, in which AdamW groups, with which optimizer class,
and the warm-up + cosine learning-rate schedule.

Derived from the adapter contract (:meth:`~medmoe.adapters.spec.AdapterSpec.adapter_tensors`,
:meth:`~medmoe.adapters.spec.AdapterSpec.no_decay_names`), never from parameter names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medmoe.adapters.spec import AdapterSpec


def parameter_groups(
    adapter: AdapterSpec,
    model: nn.Module,
    weight_decay: float,
    *,
    learning_rate: float | None = None,
    router_learning_rate: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups of the adapted ``model``: ``decay`` (matrices), ``no_decay`` (biases, norms,
    other vectors) and ``routing`` (what the adapter declares exempt from weight decay: the
    routers and temperatures, at ``router_learning_rate``, never decayed).

    A temperature that shared the adapters' learning rate (5e-5 in the paper's setup) could
    move ``log tau`` by at most ~lr per Adam step, i.e. < 0.08 over 3000 cosine steps: it could
    not learn. Only the adapter's tensors train; a trainable parameter the adapter does not
    declare is an error (it would train but never be saved). Empty groups are left out;
    parameters keep the model's order. A learning rate left ``None`` is the optimizer's
    ``lr`` (``router_learning_rate`` then follows ``learning_rate``).
    """
    declared = {id(t) for t in adapter.adapter_tensors(model).values()}
    routing_names = adapter.no_decay_names(model)
    decay, no_decay, routed = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) not in declared:
            raise ValueError(
                f"parameter {name} trains but {type(adapter).__name__} does not declare it an "
                "adapter tensor, so no checkpoint would keep it"
            )
        if name in routing_names:
            routed.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    router_learning_rate = learning_rate if router_learning_rate is None else router_learning_rate
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": learning_rate},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": learning_rate},
        {"name": "routing", "params": routed, "weight_decay": 0.0, "lr": router_learning_rate},
    ]
    for group in groups:
        if group["lr"] is None:
            del group["lr"]
    return [group for group in groups if group["params"]]


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


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based: the step about to run).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, so the
    first step already trains (transformers' schedule gives it lr 0), then a cosine decay from
    1 towards 0 over the remaining steps (the paper: 3% warm-up, cosine decay).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine_factor` applied to every parameter group's own peak lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)
    )
