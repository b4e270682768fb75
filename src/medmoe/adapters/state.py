"""Adapter state: adapter-only safetensors files, switching adapters off, parameter counts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterDescription,
    read_description,
)
from medmoe.adapters.inject import moe_lora_layers
from medmoe.adapters.layer import adapter_layers
from medmoe.adapters.moe_lora import (
    raw_log_tau_from_legacy,
    scalar_log_tau_as_vector,
)
from medmoe.atomic import atomic_directory, write_file_bytes

# How ``log_tau`` maps to tau. Files without this key predate the soft bound: their log_tau
# was clamped hard, and loading converts it (raw_log_tau_from_legacy).
TAU_PARAMETRISATION_KEY = "tau_parametrisation"
TAU_PARAMETRISATION = "soft_bound"


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The MoE-LoRA tensors of the model (A, B, router, log tau), keyed by qualified name.

    The tensors are what each layer declares (``MoELoRALinear.adapter_tensor_names``).
    """
    return {
        f"{name}.{key}": tensor
        for name, layer in moe_lora_layers(model)
        for key, tensor in layer.adapter_tensors().items()
    }


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` as one safetensors file (into a staging folder)."""
    write_file_bytes(path, safetensors_bytes(tensors))


def safetensors_size(tensors: dict[str, Tensor]) -> int:
    """The bytes :func:`write_safetensors` writes for ``tensors``."""
    return len(safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def write_adapter_files(
    directory: str | os.PathLike, tensors: dict[str, Tensor], description: dict[str, Any]
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``directory``, whole.

    Both files go into a staging folder beside ``directory`` that replaces it in one step at
    the end (:func:`medmoe.atomic.atomic_directory`): a kill or a full disk part-way never
    replaces a good adapter with a partial one; a full disk raises
    :class:`~medmoe.atomic.AtomicWriteError` naming ``directory`` and the bytes needed.
    (The methods save through :meth:`~medmoe.adapters.spec.AdapterSpec.save`, which writes
    the same way.)
    """
    weights = safetensors_bytes(tensors)
    config = json.dumps(description, indent=2, sort_keys=True).encode()
    directory = Path(directory)
    with atomic_directory(directory, size=len(weights) + len(config)) as staging:
        write_file_bytes(staging / ADAPTER_WEIGHTS, weights)
        write_file_bytes(staging / ADAPTER_CONFIG, config)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> MoELoRAConfig:
    """The :class:`MoELoRAConfig` of a Med-MoE-LoRA adapter directory (any format)."""
    description = read_description(directory)
    if description.method != "MoELoRA":
        raise ValueError(
            f"{description.path or directory} holds a {description.method} adapter, not a "
            "Med-MoE-LoRA one (medmoe.adapters.saved_method reads any method's)"
        )
    return MoELoRAConfig.from_dict(description.config)


def load_moe_lora_tensors(
    model: nn.Module,
    saved: dict[str, Tensor],
    description: AdapterDescription,
    source: str | os.PathLike,
) -> None:
    """Copy a Med-MoE-LoRA file's tensors into the model's MoE-LoRA layers, converting the
    ``log_tau`` of files written before the soft tau bound."""
    parametrisation = description.raw.get(TAU_PARAMETRISATION_KEY, "legacy_clamp")
    if parametrisation not in ("legacy_clamp", TAU_PARAMETRISATION):
        raise ValueError(
            f"{description.path}: {TAU_PARAMETRISATION_KEY}={parametrisation!r} is not one this "
            f"medmoe reads (accepted: {TAU_PARAMETRISATION!r}, or the key absent for files "
            "written before the soft tau bound)"
        )
    saved = {
        key: scalar_log_tau_as_vector(value) if key.endswith(".log_tau") else value
        for key, value in saved.items()
    }
    if parametrisation == "legacy_clamp":
        saved = convert_legacy_log_tau(saved, model)
    copy_matching_tensors(adapter_state_dict(model), saved, source)


def convert_legacy_log_tau(
    tensors: dict[str, Tensor], model: nn.Module, prefix: str = ""
) -> dict[str, Tensor]:
    """``tensors`` with every ``<layer>.log_tau`` of a hard-clamp-era file converted to the soft
    bound's raw parameter (same tau); ``prefix`` is prepended to the model's layer names."""
    converted = dict(tensors)
    for name, layer in moe_lora_layers(model):
        key = f"{prefix}{name}.log_tau"
        if key in converted:
            converted[key] = raw_log_tau_from_legacy(converted[key], layer.tau_range)
    return converted


def copy_matching_tensors(
    current: dict[str, Tensor], saved: dict[str, Tensor], source: str | os.PathLike
) -> None:
    """Copy ``saved`` into the model's ``current`` tensors; names and shapes must match exactly.

    Missing, unexpected or misshapen tensors raise ValueError naming ``source`` and the keys.
    """
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, target in current.items():  # every shape first: a mismatch copies nothing
        if target.shape != saved[key].shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(saved[key].shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in current.items():
            target.copy_(saved[key])


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file; ValueError naming ``path`` if it is truncated or foreign."""
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises SafetensorError / OSError
        raise ValueError(
            f"adapter weights {path} cannot be read: the file is truncated or not safetensors "
            f"({' '.join(str(err).split())[:120]})"
        ) from None
    # safetensors keeps no checksum: a damaged tensor shows, if at all, as non-finite values
    damaged = [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if damaged:
        raise ValueError(
            f"adapter weights {path} are damaged: {damaged[:3]} hold non-finite values "
            "(NaN or inf); the file was corrupted or written by a diverged run"
        )
    return tensors


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter layer (:class:`~medmoe.adapters.layer.AdapterLayer`:
    MoE-LoRA, multi-LoRA) returns ``W0 x`` alone inside the block."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts (Table 4): ``active`` is what one token uses, never derived from ``trainable``."""

    total: int
    trainable: int
    active: float


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total, trainable and active-per-token trainable parameters.

    Adapter layers (:class:`~medmoe.adapters.layer.AdapterLayer`) report their own active
    share; every other trainable parameter is active for every token.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    routed = [layer for _, layer in adapter_layers(model)]
    routed_params = {id(p) for m in routed for p in m.parameters() if p.requires_grad}
    plain = sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in routed_params
    )
    return ParameterCounts(
        total=total,
        trainable=trainable,
        active=plain + sum(m.active_parameter_count() for m in routed),
    )
