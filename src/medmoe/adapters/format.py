"""The one adapter directory format: a description ``{method, format_version, config}`` plus the
method's tensor files, and the reader of every format medmoe has written.

Format 1 (this medmoe writes it). Every method's directory holds one description, a JSON
object::

    {"format": "medmoe-adapter", "format_version": 1,
     "method": "MoELoRA",                                  # the registered method name
     "class_path": "medmoe.adapters.med_moe_lora.MoELoRA", # the class that saved it
     "config": {...},                                      # the method's hyper-parameters
     "metadata": {...}}                                    # free-form (ZeRO source, step, ...)

plus the method's own keys (MoE-LoRA: ``tau_parametrisation``, and ``medmoe_config``, a copy of
``config`` that keeps the file readable by format-0 readers). Where the tensors are medmoe's own
(MoE-LoRA, multi-LoRA: ``adapter_model.safetensors``) the description is ``adapter_config.json``;
where they are another library's files, the description is ``medmoe_adapter.json`` beside them,
so that library still loads the directory alone: peft LoRA (peft's ``adapter_config.json`` +
``adapter_model.safetensors``: ``peft.PeftModel.from_pretrained`` reads it) and full fine-tuning
(``save_pretrained``'s ``config.json`` + ``*.safetensors``: ``from_pretrained`` reads it).

Format 0 (medmoe before the one format), still read, never written:

- MoE-LoRA: ``adapter_config.json`` = ``{"medmoe_config": {...}, "metadata": ..., ...}``;
- multi-LoRA: ``adapter_config.json`` = ``{"method": "MultiLoRA", "config": {...}}``;
- peft LoRA: peft's ``adapter_config.json`` alone (``"peft_type": "LORA"``);
- full fine-tuning: ``config.json`` + ``*.safetensors``, no description.

:func:`read_description` turns any of them into one :class:`AdapterDescription`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmoe.errors import read_json_file

FORMAT = "medmoe-adapter"
FORMAT_VERSION = 1
# the file names (peft's, so peft LoRA matches them)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# the description beside another library's files (peft LoRA, full fine-tuning)
DESCRIPTION_BESIDE = "medmoe_adapter.json"
DESCRIPTION_FILES = (DESCRIPTION_BESIDE, ADAPTER_CONFIG)  # the order they are looked for


@dataclass(frozen=True)
class AdapterDescription:
    """What an adapter directory says about itself, whatever its format.

    Attributes:
        method: the registered method name (``"MoELoRA"``, ``"LoRA"``, ``"MultiLoRA"``,
            ``"FullFineTune"``).
        config: the method's hyper-parameters (:meth:`AdapterSpec.config_dict`).
        format_version: 1, or 0 for a directory written before the one format.
        class_path: the class that saved it (a subclass of the method's, e.g. with another
            layer), when the file names one.
        metadata: the free-form ``metadata`` object.
        raw: the description file's JSON object as read (empty without one).
        path: the description file (``None`` for a format-0 full fine-tuning).
    """

    method: str
    config: dict[str, Any]
    format_version: int
    class_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def describe(
    method: str,
    class_path: str,
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A format-1 description (the JSON object written into the directory)."""
    return {
        **(extra or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "class_path": class_path,
        "config": config,
        "metadata": metadata or {},
    }


def _object(path: Path) -> dict[str, Any]:
    description = read_json_file(path, "adapter config")
    if not isinstance(description, dict):
        raise ValueError(f"adapter config {path} holds no JSON object")
    return description


def _version_1(description: dict[str, Any], path: Path) -> AdapterDescription:
    version = description.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} is adapter format {version}, written by a newer medmoe; this medmoe reads "
            f"formats 0-{FORMAT_VERSION}: upgrade medmoe to load it"
        )
    method, config = description.get("method"), description.get("config")
    if not isinstance(method, str) or not isinstance(config, dict):
        raise ValueError(f"{path} names no method and config (keys: {sorted(description)})")
    metadata = description.get("metadata") or {}
    return AdapterDescription(
        method=method,
        config=dict(config),
        format_version=version,
        class_path=description.get("class_path"),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
        raw=description,
        path=path,
    )


def peft_lora_fields(description: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~medmoe.adapters.lora.LoRA` fields of a peft ``LoraConfig`` JSON object."""
    return {
        "r": int(description["r"]),
        "lora_alpha": float(description["lora_alpha"]),
        "dropout": float(description.get("lora_dropout") or 0.0),
        "target_modules": sorted(description["target_modules"]),
        "bias": description.get("bias", "none"),
    }


def _version_0(description: dict[str, Any], path: Path) -> AdapterDescription:
    """A format-0 ``adapter_config.json``, by the keys each method wrote."""
    if "medmoe_config" in description:
        config = description["medmoe_config"]
        if not isinstance(config, dict):
            raise ValueError(f"{path}: 'medmoe_config' holds no JSON object")
        metadata = description.get("metadata") or {}
        return AdapterDescription(
            "MoELoRA", dict(config), 0, None, dict(metadata), description, path
        )
    if description.get("method") == "MultiLoRA" and isinstance(description.get("config"), dict):
        return AdapterDescription(
            "MultiLoRA", dict(description["config"]), 0, None, {}, description, path
        )
    peft_type = description.get("peft_type")
    if peft_type == "LORA":
        try:
            fields = peft_lora_fields(description)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: a peft LoRA config without a usable {err}") from None
        return AdapterDescription("LoRA", fields, 0, None, {}, description, path)
    if peft_type is not None:
        raise ValueError(
            f"{path} is a peft {peft_type} adapter; medmoe's methods read peft LoRA only: load "
            "it with peft.PeftModel.from_pretrained"
        )
    raise ValueError(
        f"{path} describes no adapter medmoe knows: expected a medmoe description "
        "('format_version', 'method', 'config'), or a format-0 file (Med-MoE-LoRA "
        "'medmoe_config', multi-LoRA 'method', peft LoRA 'peft_type': LORA)"
    )


def read_description(directory: str | os.PathLike) -> AdapterDescription:
    """The description of an adapter directory of any format (see the module notes).

    Raises FileNotFoundError when ``directory`` holds no adapter, ValueError naming the file for a
    damaged, unknown or too new description.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    beside = directory / DESCRIPTION_BESIDE
    if beside.is_file():
        return _version_1(_object(beside), beside)
    path = directory / ADAPTER_CONFIG
    if path.is_file():
        description = _object(path)
        if "format_version" in description:
            return _version_1(description, path)
        return _version_0(description, path)
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return AdapterDescription("FullFineTune", {}, 0)
    raise FileNotFoundError(
        f"{directory} holds no adapter: expected {ADAPTER_CONFIG} beside {ADAPTER_WEIGHTS}, "
        f"{DESCRIPTION_BESIDE} beside a library's files, or a full model's config.json and "
        "safetensors weights"
    )
