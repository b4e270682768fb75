"""Auxiliary routing objectives of eq 5: load balancing and knowledge preservation.

Both take the router probabilities each MoE-LoRA layer recorded in its last forward
(``layer.last_probs``, [B, T, N_l] with autograd graph) and compute a loss per layer with that
layer's own N_l, averaged over layers, so layers with different expert counts never get mixed
into one tensor. Padding (and, if the caller's mask says so, prompt) tokens are left out.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from medmoe.adapters.layer_capabilities import RoutedLayer

BALANCE_FORMS = ("variance", "normalized", "cv2", "switch")


def recorded_router_probs(layers: Sequence[RoutedLayer]) -> list[Tensor]:
    """The router probabilities of each layer's last forward, checked to carry a gradient.

    A tensor stashed during a reentrant gradient checkpoint was computed under ``no_grad`` and
    would silently give the router no balancing gradient; this raises instead.
    """
    probs = []
    for index, layer in enumerate(layers):
        recorded = layer.last_probs
        if recorded is None:
            raise RuntimeError(
                f"MoE-LoRA layer {index} recorded no routing: run a forward with adapters "
                "enabled and record_routing=True before computing routing losses"
            )
        router_trains = layer.router_trains
        if torch.is_grad_enabled() and router_trains and not recorded.requires_grad:
            raise RuntimeError(
                f"MoE-LoRA layer {index}: router probabilities carry no gradient. The model "
                "probably runs under reentrant gradient checkpointing, which computes the "
                "forward under no_grad; use non-reentrant checkpointing "
                "(medmoe.adapters.enable_gradient_checkpointing or "
                "gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        probs.append(recorded)
    return probs


def _flatten(probs: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """[..., N] probs and [...] mask -> [M, N] probs and [M] float32 token weights."""
    flat = probs.reshape(-1, probs.shape[-1]).float()  # [M, N]
    if token_mask is None:
        weights = flat.new_ones(flat.shape[0])
    else:
        if token_mask.shape != probs.shape[:-1]:
            raise ValueError(
                f"token_mask has shape {tuple(token_mask.shape)}, routing has "
                f"{tuple(probs.shape[:-1])} tokens"
            )
        weights = token_mask.reshape(-1).to(flat.dtype)  # [M]
    return flat, weights


def expert_load(probs: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean gate probability per expert over the unmasked tokens: [..., N] -> [N]."""
    flat, weights = _flatten(probs, token_mask)
    return (flat * weights[:, None]).sum(0) / weights.sum().clamp_min(1.0)


def layer_balance_loss(
    probs: Tensor, token_mask: Tensor | None = None, form: str = "variance"
) -> Tensor:
    """One layer's balancing loss.

    - ``"variance"`` (eq 5, the paper): population variance across experts of the mean gate
      probability ``P_i`` over the batch's tokens.
    - ``"normalized"``: the variance divided by its value for a collapsed router (all gate on
      one expert), ``(N - 1) / N^2``: 0 when balanced and 1 at full collapse for every N, so
      one lambda means the same at N = 2 and N = 8 (the raw variance of a collapsed router is
      0.25 at N = 2 but 0.109 at N = 8). Equals ``cv2 / (N - 1)``; 0 for N = 1.
    - ``"cv2"``: squared coefficient of variation of ``P`` (variance / mean^2 = N^2 variance),
      which does not shrink with N (a collapsed router scores N - 1).
    - ``"switch"``: Switch Transformer's ``N * sum_i f_i P_i`` with ``f_i`` the fraction of
      tokens whose largest gate is expert i; 1 when perfectly balanced.
    """
    load = expert_load(probs, token_mask)  # [N]
    if form == "variance":
        return load.var(unbiased=False)
    if form == "normalized":
        n = load.shape[-1]
        if n < 2:
            return load.sum() * 0.0
        return load.var(unbiased=False) * (n * n / (n - 1))
    if form == "cv2":
        return load.var(unbiased=False) / load.mean().square()
    if form == "switch":
        flat, weights = _flatten(probs, token_mask)
        top1 = F.one_hot(flat.argmax(dim=-1), flat.shape[-1]).float()  # [M, N]
        fraction = (top1 * weights[:, None]).sum(0) / weights.sum().clamp_min(1.0)
        return flat.shape[-1] * (fraction * load).sum()
    raise ValueError(f"unknown balance form {form!r}; accepted: {', '.join(BALANCE_FORMS)}")


def load_balance_loss(
    probs: Sequence[Tensor],
    token_mask: Tensor | None = None,
    form: Literal["variance", "normalized", "cv2", "switch"] = "variance",
) -> Tensor:
    """L_aux of eq 5: :func:`layer_balance_loss` per layer (its own N), averaged over layers."""
    if not probs:
        raise ValueError("load_balance_loss needs the routing of at least one layer")
    return torch.stack([layer_balance_loss(p, token_mask, form) for p in probs]).mean()


def layer_knowledge_preservation_loss(
    probs: Tensor,
    is_general: Tensor,
    num_base_experts: int,
    token_mask: Tensor | None = None,
    delta: float = 0.1,
) -> Tensor:
    """LoRAMoE-style localized balancing for one layer: [B, T, N] probs, [B] general flags.

    ``Q[k, i]`` is sample k's mean gate on expert i (over its unmasked tokens). The coefficient
    ``I[k, i]`` is ``1 + delta`` where expert i's group (base / specialist) matches the sample's
    (general / domain) and ``1 - delta`` otherwise. The loss is ``Var(Z) / Mean(Z)`` over the
    whole matrix ``Z = Q / I``: minimised when, within a sample, matched experts carry
    ``(1 + delta) / (1 - delta)`` times the gate of unmatched ones and experts of one group
    are balanced. (LoRAMoE writes ``Z = I * Q``; with the variance minimised that would push
    matched experts *down*, so the coefficient divides here.)
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    batch, num_experts = probs.shape[0], probs.shape[-1]
    if is_general.shape != (batch,):
        raise ValueError(f"is_general has shape {tuple(is_general.shape)}, expected ({batch},)")
    flat = probs.reshape(batch, -1, num_experts).float()  # [B, T, N]
    if token_mask is None:
        weights = flat.new_ones(flat.shape[:2])
    else:
        weights = token_mask.reshape(batch, -1).to(flat.dtype)  # [B, T]
    importance = (flat * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    is_base_expert = torch.arange(num_experts, device=probs.device) < num_base_experts  # [N]
    matched = is_base_expert[None, :] == is_general.bool()[:, None]  # [B, N]
    coefficient = torch.where(matched, 1.0 + delta, 1.0 - delta).to(flat.dtype)
    scaled = importance / coefficient  # [B, N]
    return scaled.var(unbiased=False) / scaled.mean()


def knowledge_preservation_loss(
    probs: Sequence[Tensor],
    is_general: Tensor,
    num_base_experts: Sequence[int],
    token_mask: Tensor | None = None,
    delta: float = 0.1,
) -> Tensor:
    """Knowledge-preservation loss averaged over the layers that have base experts."""
    losses = [
        layer_knowledge_preservation_loss(p, is_general, n_base, token_mask, delta)
        for p, n_base in zip(probs, num_base_experts, strict=True)
        if n_base > 0
    ]
    if not losses:
        raise ValueError("knowledge_preservation_loss needs layers with num_base_experts > 0")
    return torch.stack(losses).mean()
