"""The baselines Med-MoE-LoRA is measured against, each an :class:`AdapterSpec` for YAML.

``class_path`` values: ``medmoe.adapters.baselines.FullFineTune``, ``...baselines.LoRA``,
``...baselines.MultiLoRA``; vanilla MoE-LoRA is a :class:`~medmoe.adapters.MoELoRAConfig` (see
:func:`vanilla_moe_lora`), and Ortho-LoRA is a training option
(``MedMoEModule(gradient_projection="ortho")``) over any LoRA-style adapter, see
:mod:`medmoe.objectives.projection`.
"""

from __future__ import annotations

from typing import Any

from medmoe.adapters.full import FullFineTune
from medmoe.adapters.lora import LoRA
from medmoe.adapters.med_moe_lora import MoELoRA
from medmoe.adapters.multi_lora import MultiLoRA, MultiLoRALinear

__all__ = ["FullFineTune", "LoRA", "MultiLoRA", "MultiLoRALinear", "vanilla_moe_lora"]


def vanilla_moe_lora(
    num_experts: int = 8, top_k: int = 2, rank: int = 16, **overrides: Any
) -> MoELoRA:
    """Vanilla MoE-LoRA: ``num_experts`` equal-rank experts in every layer, top-k routing, no
    base-expert group (so no knowledge-preservation split). ``overrides`` go to the config.

    In YAML the same config reads::

        class_path: medmoe.adapters.MoELoRAConfig
        init_args: {allocation: uniform, num_experts: 8, rank_pattern: equal,
                    expert_rank: 16, allowed_ranks: [16], top_k: 2, num_base_experts: 0}
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in 1..num_experts={num_experts}, got {top_k}")
    values: dict[str, Any] = dict(
        allocation="uniform",
        num_experts=num_experts,
        rank_pattern="equal",
        expert_rank=rank,
        allowed_ranks=[rank],
        top_k=top_k,
        num_base_experts=0,
        layer_ranges=None,
    )
    values.update(overrides)
    return MoELoRA(**values)
