"""Readable short names for routed adapter layers: ``L03.q_proj`` (0-based decoder index +
module). The layers are the model's :class:`~medmoe.adapters.capabilities.RoutedLayer` s."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medmoe.adapters import RoutedLayer, decoder_layers, routed_layers

__all__ = ["AdaptedLayer", "adapted_layers"]


@dataclass(frozen=True)
class AdaptedLayer:
    """One routed layer with its short name and decoder block (``block`` is ``L03``)."""

    name: str
    block: str
    layer: RoutedLayer


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """Every routed (MoE-LoRA) layer of ``model`` in model order, named ``L<decoder index>.<module>``.

    The decoder index is 0-based, as in the model's own parameter names (``model.layers.3``
    is ``L03``). The module is the last path component (``q_proj``), or the path inside the
    decoder block where that is ambiguous. Layers outside the decoder blocks keep their
    qualified name and form a block of their own.
    """
    pairs = routed_layers(model)
    if not pairs:
        return []
    try:
        blocks = decoder_layers(model)
    except ValueError:
        blocks = nn.ModuleList()
    width = max(2, len(str(len(blocks) - 1)))
    where: dict[int, tuple[str, str]] = {}  # id(layer) -> (block, path inside the block)
    for index, block in enumerate(blocks):
        for path, module in block.named_modules():
            if isinstance(module, RoutedLayer):
                where[id(module)] = (f"L{index:0{width}d}", path)
    leaf_counts: dict[tuple[str, str], int] = {}
    for block, path in where.values():
        key = (block, path.rsplit(".", 1)[-1])
        leaf_counts[key] = leaf_counts.get(key, 0) + 1
    named = []
    for qualified, layer in pairs:
        if id(layer) not in where:
            named.append(AdaptedLayer(qualified, qualified, layer))
            continue
        block, path = where[id(layer)]
        leaf = path.rsplit(".", 1)[-1]
        module = leaf if leaf_counts[(block, leaf)] == 1 else path
        named.append(AdaptedLayer(f"{block}.{module}", block, layer))
    return named
