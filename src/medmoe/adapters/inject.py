"""Put adapter layers into a Hugging Face causal LM, in place: one injection path for every
method that replaces linear layers (MoE-LoRA, multi-LoRA)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.moe_lora import MoELoRALinear

# Where decoder blocks live: Llama/Qwen2/Mistral causal LMs (model.layers), their bare
# backbones (layers), GPT-2 style (transformer.h) and GPT-NeoX.
_LAYER_PATHS = ("model.layers", "model.model.layers", "layers", "transformer.h", "gpt_neox.layers")
CONFIG_ATTRIBUTE = "medmoe_config"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks, or a ValueError saying where it looked."""
    for path in _LAYER_PATHS:
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(
        f"{type(model).__name__} has no decoder layers: looked for a non-empty nn.ModuleList at "
        f"{', '.join(_LAYER_PATHS)}"
    )


def linear_names(layer: nn.Module) -> list[str]:
    """The names (last path component) of the linear layers inside one decoder layer."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    )


def check_targets(layers: nn.ModuleList, target_modules: Sequence[str]) -> None:
    """ValueError naming the decoder layer's real linear layers if a target is not one of them."""
    available = linear_names(layers[0])
    unknown = [t for t in target_modules if t not in available]
    if unknown:
        raise ValueError(
            f"target module(s) {unknown} not found in {type(layers[0]).__name__}; "
            f"its linear layers are: {', '.join(available)}"
        )


def inject_adapter_layers(
    model: nn.Module,
    target_modules: Sequence[str],
    make_layer: Callable[[nn.Linear, int], nn.Module],
) -> list[nn.Module]:
    """The injection path of every method that replaces linear layers (MoE-LoRA, multi-LoRA;
    LoRA goes through peft, full fine-tuning adds no layer): decoder layers -> target check ->
    replace.

    Every ``nn.Linear`` of decoder layer ``l`` (0-based) whose name is in ``target_modules`` is
    replaced by ``make_layer(linear, l)``; everything else is frozen. Works in place and returns
    the new layers in model order. An unknown target raises (see :func:`check_targets`).
    """
    layers = decoder_layers(model)
    check_targets(layers, target_modules)
    model.requires_grad_(False)
    targets = set(target_modules)
    adapted: list[nn.Module] = []
    for index, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            replacement = make_layer(module, index)
            setattr(parent, child, replacement)
            adapted.append(replacement)
    return adapted


def apply_moe_lora(
    model: nn.Module,
    config: MoELoRAConfig,
    layer_cls: type[MoELoRALinear] = MoELoRALinear,
) -> list[MoELoRALinear]:
    """Adapt ``config.target_modules`` of every decoder layer with that layer's experts.

    Layer ``l`` gets ``N_l`` experts (``config.layer_expert_counts``, eq 2) with ranks from
    ``config.layer_ranks``. Everything but the adapters is frozen. Works in place and returns the
    new layers in model order. The config is kept on the model as ``model.medmoe_config``.
    ``layer_cls`` may be a subclass of :class:`MoELoRALinear` (e.g. with another gate).
    """
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("the model already carries MoE-LoRA layers; apply_moe_lora works once")
    held = getattr(config, "config", None)  # the method (MoELoRA) holding its config
    if not isinstance(config, MoELoRAConfig) and isinstance(held, MoELoRAConfig):
        config = held
    ranks_per_layer = config.layer_ranks(len(decoder_layers(model)))
    adapted = inject_adapter_layers(
        model,
        config.target_modules,
        lambda linear, index: layer_cls(
            linear, ranks_per_layer[index], **config.layer_kwargs(len(ranks_per_layer[index]))
        ),
    )
    setattr(model, CONFIG_ATTRIBUTE, config)
    return adapted


def moe_lora_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    """``(qualified name, layer)`` for every MoE-LoRA layer of the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on the model's gradient checkpointing in its non-reentrant form.

    Non-reentrant checkpointing builds the autograd graph during the forward, so the routing the
    MoE-LoRA layers record keeps its gradient for the auxiliary losses; the reentrant form runs
    the forward under ``no_grad`` and would lose it.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
