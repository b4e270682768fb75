"""The routing terms of eq 5 for one forward: which tokens they average over, and their weighted sum.

:func:`routing_losses` reads the router probabilities the MoE-LoRA layers recorded in the forward
just run (:func:`~medmoe.objectives.balance.recorded_router_probs`) and returns the load-balancing
and knowledge-preservation losses with ``lambda_balance * L_balance + lambda_kp * L_kp``. Any
training loop can add that sum to its task loss; :class:`medmoe.AdaptedModel` does (the
LightningModule computes the same terms in ``MedMoEModule.compute_losses``).

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medmoe.adapters.layer_capabilities import RoutedLayer
from medmoe.objectives.balance import (
    knowledge_preservation_loss,
    load_balance_loss,
    recorded_router_probs,
)

ROUTING_TOKENS = ("all", "target")


def routing_token_mask(
    routing_tokens: str, attention_mask: Tensor | None, target_mask: Tensor | None = None
) -> Tensor | None:
    """The [B, T] tokens the routing losses average over (``None``: every token).

    ``"all"``: the non-padding tokens (``attention_mask``; ``None`` when there is none, e.g.
    packed rows without padding). ``"target"``: the positions ``t`` whose next token ``t + 1`` is
    a target; ``target_mask`` is that [B, T-1] flag (labels[:, 1:] carry a label).
    """
    if routing_tokens == "all":
        return None if attention_mask is None else attention_mask.bool()
    if routing_tokens == "target":
        if target_mask is None:
            raise ValueError("routing_tokens='target' needs the target mask (labels), got none")
        return F.pad(target_mask.bool(), (0, 1), value=False)  # [B, T-1] -> [B, T]
    raise ValueError(
        f"unknown routing_tokens {routing_tokens!r}; accepted: {', '.join(ROUTING_TOKENS)}"
    )


def routing_losses(
    layers: Sequence[RoutedLayer],
    token_mask: Tensor | None,
    *,
    lambda_balance: float,
    lambda_kp: float,
    balance_form: str = "variance",
    kp_delta: float = 0.1,
    is_general: Tensor | None = None,
) -> dict[str, Tensor]:
    """The routing terms of the layers' last forward and their weighted sum.

    Returns ``balance_loss`` (when ``lambda_balance > 0``), ``kp_loss`` (when ``lambda_kp > 0``,
    ``is_general`` is given and some layer has base experts) and ``routing_loss``, the sum of the
    weighted terms (float32; 0 when no term applies). ``is_general``: [B] flags (general replay
    vs domain sample) of the knowledge-preservation loss.
    """
    if not layers or (lambda_balance <= 0 and lambda_kp <= 0):
        raise ValueError("routing_losses needs MoE-LoRA layers and a positive weight")
    probs = recorded_router_probs(layers)
    losses: dict[str, Tensor] = {}
    routing = probs[0].new_zeros((), dtype=torch.float32)
    if lambda_balance > 0:
        losses["balance_loss"] = load_balance_loss(probs, token_mask, balance_form)
        routing = routing + lambda_balance * losses["balance_loss"]
    base_experts = [layer.num_base_experts for layer in layers]
    if lambda_kp > 0 and is_general is not None and any(n > 0 for n in base_experts):
        losses["kp_loss"] = knowledge_preservation_loss(
            probs, is_general, base_experts, token_mask, kp_delta
        )
        routing = routing + lambda_kp * losses["kp_loss"]
    losses["routing_loss"] = routing
    return losses
