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
    inject_adapter_layers,
    moe_lora_layers,
)
from medmoe.adapters.layer import AdapterLayer, adapter_layers
from medmoe.adapters.med_moe_lora import MoELoRA, adapter_spec
from medmoe.adapters.moe_lora import MoELoRALinear
from medmoe.adapters.spec import AdapterSpec
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
    "AdapterLayer",
    "AdapterSpec",
    "MoELoRA",
    "MoELoRAConfig",
    "MoELoRALinear",
    "ParameterCounts",
    "adapter_layers",
    "adapter_spec",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_moe_lora",
    "assign_ranks",
    "bottom_heavy_counts",
    "counts_from_ranges",
    "decoder_layers",
    "enable_gradient_checkpointing",
    "expert_counts",
    "inject_adapter_layers",
    "load_adapter",
    "moe_lora_layers",
    "parameter_counts",
    "read_adapter_config",
    "save_adapter",
    "uniform_counts",
]
