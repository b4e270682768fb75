"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medmoe.adapters.moe_lora import MoELoRALinear


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable router weights and temperatures (``log_tau``) of every MoE-LoRA layer."""
    params = []
    for layer in model.modules():
        if isinstance(layer, MoELoRALinear):
            for param in (layer.router.weight, layer.log_tau):
                if isinstance(param, nn.Parameter) and param.requires_grad:
                    params.append(param)
    return params


def parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, router_learning_rate: float
) -> list[dict[str, Any]]:
    """AdamW groups: ``decay`` (matrices), ``no_decay`` (biases, norms, other vectors) and
    ``routing`` (routers and temperatures, at ``router_learning_rate``, never decayed).

    A temperature that shared the adapters' learning rate (5e-5 in the paper's setup) could
    move ``log tau`` by at most ~lr per Adam step, i.e. < 0.08 over 3000 cosine steps: it could
    not learn. Empty groups are left out.
    """
    routing = {id(p) for p in routing_parameters(model)}
    decay, no_decay, routed = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in routing:
            routed.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": learning_rate},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": learning_rate},
        {"name": "routing", "params": routed, "weight_decay": 0.0, "lr": router_learning_rate},
    ]
    return [g for g in groups if g["params"]]


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
