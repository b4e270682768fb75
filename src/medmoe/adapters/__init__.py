"""Adapters: pure torch + transformers, no Lightning."""

from medmoe.adapters.allocation import (
    assign_ranks,
    bottom_heavy_counts,
    counts_from_ranges,
    expert_counts,
    uniform_counts,
)
from medmoe.adapters.capabilities import (
    ExpertFactorsLayer,
    RoutedAdapter,
    RoutedLayer,
    TaskRoutedAdapter,
    TemperatureLayer,
    layers_with,
    routed_layers,
    routing_losses,
    routing_recording_paused,
    task_routing,
)
from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.format import FORMAT_VERSION, AdapterDescription, read_description
from medmoe.adapters.inject import (
    apply_moe_lora,
    decoder_layers,
    enable_gradient_checkpointing,
    inject_adapter_layers,
    moe_lora_layers,
)
from medmoe.adapters.layer import AdapterLayer, adapter_layers
from medmoe.adapters.med_moe_lora import MoELoRA, load_adapter, save_adapter
from medmoe.adapters.moe_lora import MoELoRALinear
from medmoe.adapters.registry import (
    adapter_spec,
    load_adapted,
    method_class,
    register_method,
    registered_methods,
    saved_method,
)
from medmoe.adapters.spec import AdapterSpec
from medmoe.adapters.state import (
    ParameterCounts,
    adapter_state_dict,
    adapters_disabled,
    parameter_counts,
    read_adapter_config,
)

__all__ = [
    "FORMAT_VERSION",
    "AdapterDescription",
    "AdapterLayer",
    "AdapterSpec",
    "MoELoRA",
    "MoELoRAConfig",
    "MoELoRALinear",
    "ExpertFactorsLayer",
    "ParameterCounts",
    "RoutedAdapter",
    "RoutedLayer",
    "TaskRoutedAdapter",
    "TemperatureLayer",
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
    "layers_with",
    "load_adapted",
    "load_adapter",
    "method_class",
    "moe_lora_layers",
    "parameter_counts",
    "read_adapter_config",
    "read_description",
    "register_method",
    "registered_methods",
    "routed_layers",
    "routing_losses",
    "routing_recording_paused",
    "save_adapter",
    "saved_method",
    "task_routing",
    "uniform_counts",
]
