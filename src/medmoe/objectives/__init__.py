"""Auxiliary objectives (eq 5) and gradient projection.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from medmoe.objectives.balance import (
    expert_load,
    knowledge_preservation_loss,
    layer_balance_loss,
    layer_knowledge_preservation_loss,
    load_balance_loss,
    recorded_router_probs,
)
from medmoe.objectives.routing import routing_losses, routing_token_mask

__all__ = [
    "expert_load",
    "knowledge_preservation_loss",
    "layer_balance_loss",
    "layer_knowledge_preservation_loss",
    "load_balance_loss",
    "recorded_router_probs",
    "routing_losses",
    "routing_token_mask",
]
