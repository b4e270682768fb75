"""Routing statistics over masked tokens: pure torch, no Lightning.

Every function takes gates ``g`` of shape [B, T, N] (one layer's routing weights, rows summing
to 1) and a token mask [B, T] (True on the tokens that count) and returns detached float32
tensors, so a caller can stack many results and move them to the host in one transfer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from medmoe.data.collate import IGNORE_INDEX

TokenSelection = Literal["all", "target"]

__all__ = [
    "coefficient_of_variation",
    "expert_utilisation",
    "group_base_share",
    "router_entropy",
    "routing_mask",
    "task_gate_sums",
]


def routing_mask(batch: dict[str, Tensor], tokens: TokenSelection = "all") -> Tensor:
    """[B, T] bool: the non-padding tokens (``"all"``) or the target-predicting ones.

    A label at position t+1 makes position t a target-predicting token (the same convention as
    the model's routing losses); padding is always excluded.
    """
    attention = batch["attention_mask"].bool()
    if tokens == "all":
        return attention
    if tokens != "target":
        raise ValueError(f"tokens must be 'all' or 'target', got {tokens!r}")
    targets = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T-1]
    return F.pad(targets, (0, 1), value=False) & attention


def _weights(gates: Tensor, mask: Tensor) -> Tensor:
    """The mask as float32 weights [B, T], checked against the gates' leading shape."""
    if gates.shape[:-1] != mask.shape:
        raise ValueError(
            f"gates {tuple(gates.shape)} do not match the token mask {tuple(mask.shape)}"
        )
    return mask.to(device=gates.device, dtype=torch.float32)


def router_entropy(gates: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked tokens of ``-sum_i g_i log g_i`` (0 log 0 = 0); lies in [0, ln N]."""
    g = gates.detach().float()
    w = _weights(g, mask)
    per_token = -torch.special.xlogy(g, g).sum(-1)  # [B, T]
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def expert_utilisation(gates: Tensor, mask: Tensor) -> Tensor:
    """[N]: the mean gate of every expert over masked tokens (sums to 1 when a token counts)."""
    g = gates.detach().float()
    w = _weights(g, mask)
    return (g * w.unsqueeze(-1)).sum((0, 1)) / w.sum().clamp_min(1.0)


def coefficient_of_variation(utilisation: Tensor) -> Tensor:
    """Load-balance CV: population std / mean of an [N] utilisation (0 = perfectly balanced)."""
    u = utilisation.float()
    return u.std(unbiased=False) / u.mean().clamp_min(1e-12)


def group_base_share(
    gates: Tensor, mask: Tensor, is_general: Tensor, num_base_experts: int
) -> tuple[Tensor, Tensor]:
    """Mean gate mass on the first ``num_base_experts`` experts for general, domain samples.

    Returns two scalars, ``(general, domain)``; a group with no masked token gives NaN.
    """
    g = gates.detach().float()
    w = _weights(g, mask)
    base_mass = g[..., :num_base_experts].sum(-1)  # [B, T]
    general = is_general.to(device=w.device, dtype=torch.bool).unsqueeze(-1)  # [B, 1]
    shares = []
    for group in (general, ~general):
        gw = w * group
        count = gw.sum()
        shares.append(
            torch.where(count > 0, (base_mass * gw).sum() / count.clamp_min(1.0), torch.nan)
        )
    return shares[0], shares[1]


def task_gate_sums(
    gates: Tensor, mask: Tensor, task_id: Tensor, num_tasks: int
) -> tuple[Tensor, Tensor]:
    """Per-task sums of gates over masked tokens [num_tasks, N] and token counts [num_tasks].

    Divide the first by the second for the mean gate per task (task x expert affinity); sums
    let a caller accumulate over batches before dividing.
    """
    g = gates.detach().float()
    w = _weights(g, mask)
    per_sample = (g * w.unsqueeze(-1)).sum(1)  # [B, N]
    ids = task_id.to(device=g.device, dtype=torch.long).clamp(0, num_tasks - 1)
    sums = per_sample.new_zeros(num_tasks, g.shape[-1]).index_add_(0, ids, per_sample)
    counts = w.new_zeros(num_tasks).index_add_(0, ids, w.sum(1))
    return sums, counts
