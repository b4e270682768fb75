"""A DeepSpeed ZeRO-2 or FSDP2 (sharded) checkpoint written by Lightning -> a medmoe adapter.

One converter for both engines: a directory holding ``.metadata`` and ``meta.pt`` is a
Lightning distributed checkpoint (``medmoe.strategies.FSDP2Strategy``), read with
``torch.distributed.checkpoint`` on CPU; any other is DeepSpeed's, described below.

::

    python -m medmoe.zero_to_adapter CKPT_DIR OUT_DIR [--config CONFIG] [--tag TAG]
                                     [--master-weights]

Under ``DeepSpeedStrategy`` a Lightning checkpoint (``last.ckpt``, ``epoch=0-step=500.ckpt``)
is a *directory* that DeepSpeed's ``engine.save_checkpoint(path, tag="checkpoint")`` writes::

    last.ckpt/
      latest                                              the tag: "checkpoint"
      zero_to_fp32.py, zero_to_torch.py                   DeepSpeed's recovery scripts
      checkpoint/
        mp_rank_00_model_states.pt                        module states + Lightning's state
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO optimizer partitions

``mp_rank_00_model_states.pt`` is a ``torch.save``\\ d dict (``DeepSpeedEngine._save_checkpoint``):
``module`` (the LightningModule's state dict; with ``exclude_frozen_parameters=True`` only the
trainable parameters and the persistent buffers), ``param_shapes`` (the optimizer's parameter
names), ``buffer_names``, ``ds_config``, ``ds_version``, ... and Lightning's own entries
(``epoch``, ``global_step``, ``hyper_parameters``, ``loops``, ...). Under ZeRO-1/2 the module
states are full tensors (only optimizer state and gradients are partitioned), in the training
dtype (bf16 under ``bf16-mixed``: DeepSpeed casts the module's parameters).

This tool reads those module states, keeps the MoE-LoRA tensors (``lora_A``, ``lora_B``,
``router.weight``, ``log_tau`` of every adapted layer), strips the ``model.`` prefix of
``MedMoEModule.model``, checks every tensor against the adapter configuration, and writes
``adapter_model.safetensors`` + ``adapter_config.json`` through
:func:`medmoe.adapters.save_adapter` (same key names, same atomic write), so that
``load_adapter(base, OUT_DIR)`` on a freshly loaded base gives the trained model's logits.

``--master-weights`` takes the fp32 master copy from the ZeRO optimizer partitions instead
(through DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``; needs ``deepspeed``).

The adapter configuration comes from ``--config`` (a medmoe/LightningCLI YAML such as the
``config.yaml`` the CLI saves in the run's log directory, an ``adapter_config.json`` or the
directory holding one) or, by default, from the checkpoint's own ``hyper_parameters``.

ZeRO-3 checkpoints partition every parameter across ranks (``zero_pp_rank_*_model_states.pt``
hold placeholders); they are refused with an error: medmoe supports ZeRO-2.

Like DeepSpeed and Lightning, this loads the checkpoint with ``torch.load(weights_only=False)``
(it holds pickled Python objects): convert only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.inject import CONFIG_ATTRIBUTE
from medmoe.adapters.moe_lora import MoELoRALinear, scalar_log_tau_as_vector
from medmoe.adapters.state import ADAPTER_CONFIG, adapter_state_dict, save_adapter

MODEL_STATES = "mp_rank_00_model_states.pt"
MODULE_PREFIX = "model."  # MedMoEModule.model holds the Hugging Face model
LEGACY_PREFIX = "_forward_module."  # Lightning < 2.1 wrapped the module
# the tensors each MoE-LoRA layer declares its own (the adapter-layer contract)
ADAPTER_SUFFIXES = tuple(f".{name}" for name in MoELoRALinear.adapter_tensor_names)
_DECODER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")

__all__ = [
    "ZeroCheckpointError",
    "adapter_from_zero_checkpoint",
    "checkpoint_tag_dir",
    "main",
    "read_model_states",
    "resolve_adapter_config",
]


class ZeroCheckpointError(ValueError):
    """The directory is not a DeepSpeed checkpoint this tool can convert."""


# --------------------------------------------------------------------------- reading
def checkpoint_tag_dir(checkpoint_dir: str | Path, tag: str | None = None) -> Path:
    """The folder holding ``*_model_states.pt``: ``CKPT_DIR/<tag>`` (tag from ``latest``).

    ``checkpoint_dir`` may also be that folder itself.
    """
    root = Path(checkpoint_dir)
    if not root.exists():
        raise FileNotFoundError(f"no checkpoint at {root}")
    if root.is_file():
        raise ZeroCheckpointError(
            f"{root} is a file; a DeepSpeed checkpoint is a directory (Lightning's "
            "DeepSpeedStrategy saves e.g. last.ckpt/ with a 'latest' file and a tag folder). A "
            "regular Lightning .ckpt file already holds a 'state_dict'."
        )
    if tag is not None:
        folder = root / tag
    elif (root / "latest").is_file():
        folder = root / (root / "latest").read_text().strip()
    elif any(root.glob("*_model_states.pt")):
        folder = root
    else:
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise ZeroCheckpointError(
            f"{root} is no DeepSpeed checkpoint: it has no 'latest' file and no "
            f"*_model_states.pt (it holds {listing})"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint tag folder {folder} does not exist")
    return folder


def _zero3_error(folder: Path, detail: str) -> ZeroCheckpointError:
    return ZeroCheckpointError(
        f"{folder} is a ZeRO-3 checkpoint ({detail}): its parameters are partitioned across "
        "ranks, and adapter weights read from it come out empty in several frameworks. medmoe "
        "supports DeepSpeed ZeRO-2 (stage: 2, the default of configs/med.yaml); train with "
        "stage 2, or consolidate the shards yourself with DeepSpeed's zero_to_fp32.py "
        "(untested with medmoe)"
    )


def _zero_stage(states: Mapping[str, Any]) -> int | None:
    config = states.get("ds_config") or {}
    zero = config.get("zero_optimization") if isinstance(config, Mapping) else None
    if isinstance(zero, Mapping) and "stage" in zero:
        return int(zero["stage"])
    return None


SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
SHARDED_LIGHTNING_STATE = "meta.pt"  # Lightning's non-tensor part of it


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Lightning distributed (sharded) checkpoint, e.g. of FSDP2."""
    path = Path(path)
    return (path / SHARDED_METADATA).is_file() and (path / SHARDED_LIGHTNING_STATE).is_file()


def read_sharded_states(folder: str | Path) -> dict[str, Any]:
    """A sharded checkpoint (FSDP2 through ``medmoe.strategies.FSDP2Strategy``) in the shape of
    :func:`read_model_states`: ``module`` (its ``state_dict`` tensors, whole) and Lightning's
    entries (``hyper_parameters``, ``global_step``, ...). Read on CPU, no process group."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    module = {
        key[len(prefix) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not module:
        raise ZeroCheckpointError(f"sharded checkpoint {folder} holds no state_dict tensors")
    load({"state_dict": module}, checkpoint_id=str(folder), no_dist=True)
    states = torch.load(folder / SHARDED_LIGHTNING_STATE, map_location="cpu", weights_only=False)
    return {**states, "module": module}


def read_model_states(folder: str | Path) -> dict[str, Any]:
    """Load ``mp_rank_00_model_states.pt`` of a ZeRO-0/1/2 checkpoint tag folder (on CPU)."""
    folder = Path(folder)
    partitioned = sorted(folder.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    path = folder / MODEL_STATES
    if not path.is_file():
        if partitioned:
            raise _zero3_error(folder, f"{partitioned[0].name} instead of {MODEL_STATES}")
        found = ", ".join(sorted(p.name for p in folder.glob("*_model_states.pt"))) or "none"
        raise ZeroCheckpointError(f"no {MODEL_STATES} in {folder} (model states found: {found})")
    if any(folder.glob("mp_rank_0[1-9]_model_states.pt")):
        raise ZeroCheckpointError(
            f"{folder} holds several model-parallel ranks (mp_rank_01...); medmoe trains with data "
            "parallelism only and cannot merge tensor-parallel shards"
        )
    states = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(states, Mapping) or "module" not in states:
        raise ZeroCheckpointError(f"{path} is no DeepSpeed model-states file (no 'module' entry)")
    stage = _zero_stage(states)
    if stage == 3 or partitioned:
        raise _zero3_error(folder, f"ds_config zero_optimization.stage = {stage}")
    if states["module"] is None:
        raise ZeroCheckpointError(f"{path} holds no module state dict")
    return dict(states)


def _strip(key: str) -> str | None:
    """``model.model.layers.0...`` (LightningModule) -> ``model.layers.0...`` (HF model)."""
    if key.startswith(LEGACY_PREFIX):
        key = key[len(LEGACY_PREFIX) :]
    return key[len(MODULE_PREFIX) :] if key.startswith(MODULE_PREFIX) else None


# --------------------------------------------------------------------------- configuration
def _description_to_config(description: Any, where: str) -> MoELoRAConfig:
    """``{"class_path": ..., "init_args": {...}}``, a bare field mapping, or a config object."""
    if isinstance(description, MoELoRAConfig):
        return description
    if not isinstance(description, Mapping):
        raise ValueError(f"{where}: the adapter is {description!r}, not a MoELoRAConfig mapping")
    if "class_path" in description:
        class_path = str(description["class_path"])
        module_name, _, class_name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{where}: cannot import adapter class {class_path!r}") from error
        if not (isinstance(cls, type) and issubclass(cls, MoELoRAConfig)):
            raise ValueError(
                f"{where}: the adapter is {class_path}; zero_to_adapter converts Med-MoE-LoRA "
                "adapters (medmoe.adapters.MoELoRAConfig) only"
            )
        values = dict(description.get("init_args") or {})
        known = cls.__dataclass_fields__
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown {class_name} field(s) {unknown}")
        return cls(**values)
    return MoELoRAConfig.from_dict(dict(description))


def _config_from_yaml(path: Path) -> MoELoRAConfig:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds no YAML mapping")
    model = data.get("model")
    if isinstance(model, Mapping):
        init_args = model.get("init_args", model)
        if "adapter" in init_args and init_args["adapter"] is not None:
            return _description_to_config(init_args["adapter"], str(path))
        print(
            f"note: {path} gives the model no adapter; using MedMoEModule's default, "
            "MoELoRAConfig()",
            file=sys.stderr,
        )
        return MoELoRAConfig()
    if "adapter" in data:  # a bare adapter block
        return _description_to_config(data["adapter"], str(path))
    return _description_to_config(data, str(path))  # class_path/init_args or plain fields


def resolve_adapter_config(
    source: str | Path | None, states: Mapping[str, Any] | None = None
) -> MoELoRAConfig:
    """The adapter config from ``source`` (YAML, ``adapter_config.json`` or its directory), or,
    with ``source=None``, from the checkpoint's ``hyper_parameters["adapter"]``."""
    if source is None:
        hparams = (states or {}).get("hyper_parameters") or {}
        if "adapter" not in hparams:
            raise ValueError(
                "the checkpoint carries no hyper_parameters['adapter']; pass --config (the run's "
                "YAML, e.g. the config.yaml the CLI saved in its log directory, or an "
                "adapter_config.json)"
            )
        return _description_to_config(hparams["adapter"], "the checkpoint's hyper_parameters")
    path = Path(source)
    if path.is_dir():
        path = path / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no adapter configuration at {path}")
    if path.suffix == ".json":
        description = json.loads(path.read_text())
        if isinstance(description, Mapping) and "medmoe_config" in description:
            return MoELoRAConfig.from_dict(description["medmoe_config"])
        return _description_to_config(description, str(path))
    return _config_from_yaml(path)


# --------------------------------------------------------------------------- the adapter
def _adapter_tensors(module_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The MoE-LoRA tensors of a LightningModule state dict, keyed by HF model names."""
    tensors = {}
    for key, value in module_state.items():
        name = _strip(key)
        if name is not None and name.endswith(ADAPTER_SUFFIXES):
            tensors[name] = value
    return tensors


def _layer_prefixes(tensors: Mapping[str, Tensor]) -> list[str]:
    return sorted(
        (k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A")), key=_natural_key
    )


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)


def _set_tensor(layer: MoELoRALinear, name: str, value: Tensor, key: str) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = layer.get_submodule(owner_name) if owner_name else layer
    expected = getattr(owner, attribute)
    if name == "log_tau":
        value = scalar_log_tau_as_vector(value)
    if value.numel() == 0 and expected.numel() > 0:
        raise ZeroCheckpointError(
            f"{key} is empty: a placeholder of a partitioned (ZeRO-3) checkpoint?"
        )
    if tuple(value.shape) != tuple(expected.shape):
        raise ZeroCheckpointError(
            f"{key} has shape {tuple(value.shape)} but the adapter configuration gives "
            f"{tuple(expected.shape)}: the configuration is not the one the run trained with"
        )
    if isinstance(expected, nn.Parameter):
        setattr(owner, attribute, nn.Parameter(value.detach(), requires_grad=False))
    else:
        setattr(owner, attribute, value.detach())


def build_adapter_model(tensors: Mapping[str, Tensor], config: MoELoRAConfig) -> nn.Module:
    """A module tree holding only the MoE-LoRA layers at their HF names, filled with ``tensors``.

    The frozen base weights are meta tensors (never materialised); every adapter tensor is
    checked against the shapes ``config`` gives the layer it belongs to.
    """
    prefixes = _layer_prefixes(tensors)
    if not prefixes:
        raise ZeroCheckpointError(
            "the checkpoint's module states hold no MoE-LoRA tensors (*.lora_A under "
            f"'{MODULE_PREFIX}'): was it trained with a MoELoRAConfig adapter?"
        )
    by_layer: dict[int, list[str]] = {}
    for prefix in prefixes:
        match = _DECODER_INDEX.search(prefix)
        if match is None:
            raise ZeroCheckpointError(f"cannot tell the decoder layer of adapted module {prefix}")
        by_layer.setdefault(int(match.group(1)), []).append(prefix)
    num_layers = max(by_layer) + 1
    if sorted(by_layer) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(by_layer))
        raise ZeroCheckpointError(f"decoder layer(s) {missing} carry no MoE-LoRA tensors")
    targets = set(config.target_modules)
    ranks = config.layer_ranks(num_layers)
    root = nn.Module()
    for index in range(num_layers):
        for prefix in by_layer[index]:
            target = prefix.rsplit(".", 1)[-1]
            if target not in targets:
                raise ZeroCheckpointError(
                    f"{prefix} is adapted in the checkpoint but the configuration's "
                    f"target_modules are {config.target_modules}"
                )
            d_out, _ = tensors[f"{prefix}.lora_B"].shape
            d_in = tensors[f"{prefix}.lora_A"].shape[1]
            base = nn.Linear(d_in, d_out, bias=False, device="meta")
            layer = MoELoRALinear(base, ranks[index], **config.layer_kwargs(len(ranks[index])))
            for name in MoELoRALinear.adapter_tensor_names:
                key = f"{prefix}.{name}"
                if key not in tensors:
                    raise ZeroCheckpointError(f"the checkpoint lacks {key}")
                _set_tensor(layer, name, tensors[key], key)
            _attach(root, prefix, layer)
        found = {p.rsplit(".", 1)[-1] for p in by_layer[index]}
        if found != targets:
            raise ZeroCheckpointError(
                f"decoder layer {index} adapts {sorted(found)}, the configuration {sorted(targets)}"
            )
    setattr(root, CONFIG_ATTRIBUTE, config)
    return root


def _trained_names(states: Mapping[str, Any]) -> set[str]:
    """HF names of the parameters the optimizer trained (DeepSpeed's ``param_shapes``)."""
    names = set()
    for group in states.get("param_shapes") or []:
        for key in group:
            name = _strip(key)
            names.add(key if name is None else name)
    return names


def _master_weights(checkpoint_dir: Path, tag: str) -> dict[str, Tensor]:
    """fp32 master weights (trainable parameters and buffers) from the ZeRO optimizer files."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("--master-weights needs deepspeed (pip install deepspeed)") from error
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint_dir), tag, exclude_frozen_parameters=True
    )
    return dict(state)


def adapter_from_zero_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    config: str | Path | MoELoRAConfig | None = None,
    tag: str | None = None,
    master_weights: bool = False,
) -> Path:
    """Write the MoE-LoRA adapter of a ZeRO-0/1/2 or sharded (FSDP2) checkpoint to ``out_dir``."""
    if is_sharded_checkpoint(checkpoint_dir):
        if master_weights:
            raise ZeroCheckpointError(
                f"{checkpoint_dir} is a sharded (FSDP2) checkpoint: its tensors are the fp32 "
                "weights themselves, there is no separate master copy (drop --master-weights)"
            )
        folder = Path(checkpoint_dir)
        states = read_sharded_states(folder)
    else:
        folder = checkpoint_tag_dir(checkpoint_dir, tag)
        states = read_model_states(folder)
    if isinstance(config, MoELoRAConfig):
        adapter_config = config
    else:
        adapter_config = resolve_adapter_config(config, states)
        saved = (states.get("hyper_parameters") or {}).get("adapter")
        if config is not None and saved is not None:
            try:
                trained = _description_to_config(saved, "hyper_parameters")
            except ValueError:
                trained = None
            if trained is not None and trained.to_dict() != adapter_config.to_dict():
                print(
                    f"warning: {config} differs from the adapter configuration saved in the "
                    "checkpoint; using the one given",
                    file=sys.stderr,
                )
    module_state = states["module"]
    if master_weights:
        module_state = _master_weights(folder.parent, folder.name)
    tensors = _adapter_tensors(module_state)
    model = build_adapter_model(tensors, adapter_config)
    written = set(adapter_state_dict(model))
    unused = sorted(set(tensors) - written)
    if unused:
        raise ZeroCheckpointError(
            f"adapter tensors the configuration has no place for: {unused[:5]}"
        )
    beyond = sorted(_trained_names(states) - written)
    if beyond:
        raise ZeroCheckpointError(
            f"the run also trained {len(beyond)} parameter(s) outside the MoE-LoRA adapter, e.g. "
            f"{beyond[:3]}; an adapter file would silently drop them"
        )
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    metadata = {
        "source": "sharded checkpoint" if "ds_version" not in states else "deepspeed checkpoint",
        "checkpoint": str(folder),
        "weights": "fp32 master (optimizer)" if master_weights else "module states",
        "dtypes": dtypes,
        "zero_stage": _zero_stage(states),
        "global_step": states.get("global_step"),
        "epoch": states.get("epoch"),
        "ds_version": states.get("ds_version"),
    }
    return save_adapter(model, out_dir, metadata=_jsonable(metadata))


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        out[key] = value
    return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medmoe.zero_to_adapter",
        description="Convert a Lightning DeepSpeed ZeRO-2 or FSDP2 checkpoint directory into a medmoe "
        "adapter (adapter_model.safetensors + adapter_config.json).",
    )
    parser.add_argument("checkpoint_dir", help="e.g. runs/med/version_0/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the adapter directory to write (replaced atomically)")
    parser.add_argument(
        "--config",
        default=None,
        help="the run's YAML (e.g. its saved config.yaml) or an adapter_config.json; default: "
        "the adapter configuration stored in the checkpoint",
    )
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: read 'latest')")
    parser.add_argument(
        "--master-weights",
        action="store_true",
        help="take the fp32 master weights from the ZeRO optimizer partitions (needs deepspeed) "
        "instead of the module states (the training dtype)",
    )
    args = parser.parse_args(argv)
    try:
        out = adapter_from_zero_checkpoint(
            args.checkpoint_dir, args.out_dir, args.config, args.tag, args.master_weights
        )
    except (ZeroCheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    print(f"adapter written to {out} ({config['metadata'].get('weights')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
