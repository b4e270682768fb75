"""Adapters: pure torch + transformers, no Lightning."""

from medmoe.adapters.allocation import (
    assign_ranks,
    bottom_heavy_counts,
    counts_from_ranges,
    expert_counts,
    uniform_counts,
)
from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.inject import (
    apply_moe_lora,
    decoder_layers,
    enable_gradient_checkpointing,
    moe_lora_layers,
)
from medmoe.adapters.moe_lora import MoELoRALinear
from medmoe.adapters.state import (
    ParameterCounts,
    adapter_state_dict,
    adapters_disabled,
    load_adapter,
    parameter_counts,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "MoELoRAConfig",
    "MoELoRALinear",
    "ParameterCounts",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_moe_lora",
    "assign_ranks",
    "bottom_heavy_counts",
    "counts_from_ranges",
    "decoder_layers",
    "enable_gradient_checkpointing",
    "expert_counts",
    "load_adapter",
    "moe_lora_layers",
    "parameter_counts",
    "read_adapter_config",
    "save_adapter",
    "uniform_counts",
]
