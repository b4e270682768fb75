"""Auxiliary objectives (eq 5) and gradient projection."""

from medmoe.objectives.balance import (
    expert_load,
    knowledge_preservation_loss,
    layer_balance_loss,
    layer_knowledge_preservation_loss,
    load_balance_loss,
    recorded_router_probs,
)

__all__ = [
    "expert_load",
    "knowledge_preservation_loss",
    "layer_balance_loss",
    "layer_knowledge_preservation_loss",
    "load_balance_loss",
    "recorded_router_probs",
]
