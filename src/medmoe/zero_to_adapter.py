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

This tool reads those module states and converts them for any registered method (MoE-LoRA and
its subclasses, peft LoRA, multi-LoRA, full fine-tuning): the method (from ``--config`` or the
checkpoint's ``hyper_parameters["adapter"]``) is applied with its own ``apply`` to the base
architecture built on the meta device (``--base``, or the checkpoint's ``tiny_llama`` /
``model_name_or_path``), the tensors it declares (``AdapterSpec.adapter_tensors``) are filled
from the module states (the ``model.`` prefix of ``MedMoEModule.model`` stripped) and checked by
name and shape, and the method writes its own adapter directory (``AdapterSpec.save``: the one
format, atomically), so that ``medmoe.adapters.load_adapted(base, OUT_DIR)`` on a freshly
loaded base gives the trained model's logits.

``--master-weights`` takes the fp32 master copy from the ZeRO optimizer partitions instead
(through DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``; needs ``deepspeed``).

The adapter configuration comes from ``--config`` (a medmoe/LightningCLI YAML such as the
``config.yaml`` the CLI saves in the run's log directory, an adapter directory of any method or
its description file) or, by default, from the checkpoint's own ``hyper_parameters``.

ZeRO-3 checkpoints partition every parameter across ranks (``zero_pp_rank_*_model_states.pt``
hold placeholders); they are refused with an error: medmoe supports ZeRO-2.

Like DeepSpeed and Lightning, this loads the checkpoint with ``torch.load(weights_only=False)``
(it holds pickled Python objects): convert only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medmoe.adapters.config import MoELoRAConfig
from medmoe.adapters.format import ADAPTER_CONFIG, DESCRIPTION_BESIDE, read_description
from medmoe.adapters.moe_lora import scalar_log_tau_as_vector
from medmoe.adapters.registry import adapter_spec, saved_method
from medmoe.adapters.spec import AdapterConfig, AdapterSpec

MODEL_STATES = "mp_rank_00_model_states.pt"
MODULE_PREFIX = "model."  # MedMoEModule.model holds the Hugging Face model
LEGACY_PREFIX = "_forward_module."  # Lightning < 2.1 wrapped the module

__all__ = [
    "ZeroCheckpointError",
    "adapter_from_zero_checkpoint",
    "checkpoint_tag_dir",
    "main",
    "read_model_states",
    "resolve_adapter",
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


# --------------------------------------------------------------------------- the method
def _description_to_method(description: Any, where: str) -> AdapterSpec:
    """``{"class_path": ..., "init_args": {...}}`` (any registered method or config), a bare
    MoE-LoRA field mapping, or a method/config object -> the method."""
    if isinstance(description, AdapterSpec | AdapterConfig):
        return adapter_spec(description)
    if not isinstance(description, Mapping):
        raise ValueError(f"{where}: the adapter is {description!r}, not an adapter description")
    if "class_path" not in description:
        return adapter_spec(MoELoRAConfig.from_dict(dict(description)))
    class_path = str(description["class_path"])
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{where}: cannot import adapter class {class_path!r}") from error
    if not (isinstance(cls, type) and issubclass(cls, AdapterSpec | AdapterConfig)):
        raise ValueError(f"{where}: {class_path} is no adapter method or config")
    try:
        return adapter_spec(cls(**dict(description.get("init_args") or {})))
    except TypeError as error:
        raise ValueError(f"{where}: {class_path}: {error}") from None


def _method_from_yaml(path: Path) -> AdapterSpec:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds no YAML mapping")
    model = data.get("model")
    if isinstance(model, Mapping):
        init_args = model.get("init_args", model)
        if "adapter" in init_args and init_args["adapter"] is not None:
            return _description_to_method(init_args["adapter"], str(path))
        print(
            f"note: {path} gives the model no adapter; using MedMoEModule's default, "
            "MoELoRAConfig()",
            file=sys.stderr,
        )
        return adapter_spec(MoELoRAConfig())
    if "adapter" in data:  # a bare adapter block
        return _description_to_method(data["adapter"], str(path))
    return _description_to_method(data, str(path))  # class_path/init_args or plain fields


def resolve_adapter(
    source: str | Path | AdapterSpec | AdapterConfig | None,
    states: Mapping[str, Any] | None = None,
) -> AdapterSpec:
    """The method (with its config) from ``source``: a method or config object, a YAML, an
    adapter directory or its description file (any method, any format), or, with
    ``source=None``, the checkpoint's ``hyper_parameters["adapter"]``."""
    if isinstance(source, AdapterSpec | AdapterConfig):
        return adapter_spec(source)
    if source is None:
        hparams = (states or {}).get("hyper_parameters") or {}
        if "adapter" not in hparams:
            raise ValueError(
                "the checkpoint carries no hyper_parameters['adapter']; pass --config (the run's "
                "YAML, e.g. the config.yaml the CLI saved in its log directory, or an "
                "adapter directory)"
            )
        return _description_to_method(hparams["adapter"], "the checkpoint's hyper_parameters")
    path = Path(source)
    if path.is_dir():
        return saved_method(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter configuration at {path}")
    if path.suffix == ".json":
        if path.name in (ADAPTER_CONFIG, DESCRIPTION_BESIDE):
            try:
                return saved_method(path.parent)
            except (ValueError, FileNotFoundError):
                pass
        return _description_to_method(json.loads(path.read_text()), str(path))
    return _method_from_yaml(path)


def resolve_adapter_config(
    source: str | Path | None, states: Mapping[str, Any] | None = None
) -> AdapterSpec:
    """Alias of :func:`resolve_adapter` (the name from when only MoE-LoRA converted)."""
    return resolve_adapter(source, states)


# --------------------------------------------------------------------------- the model
def base_skeleton(hparams: Mapping[str, Any], base: str | Path | None = None) -> nn.Module:
    """The base architecture on the meta device (no weight materialised): from ``base`` (a
    model directory, ``"toy"`` or a hub id whose config is cached), else from the checkpoint's
    ``hyper_parameters`` (``tiny_llama`` + ``vocab_size``, or ``model_name_or_path``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from medmoe.errors import local_or_hub

    tiny = hparams.get("tiny_llama")
    if base is None and tiny is not None:
        values = dict(tiny)
        if hparams.get("vocab_size") is not None:
            values.setdefault("vocab_size", hparams["vocab_size"])
        config = LlamaConfig(**values)
    else:
        name = str(base if base is not None else hparams.get("model_name_or_path") or "toy")
        if name == "toy":
            from medmoe.data import toy_base_path

            name = str(toy_base_path())
        config = AutoConfig.from_pretrained(local_or_hub(name, "base model"))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _checkpoint_tensors(module_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LightningModule state dict's tensors keyed by their names in ``MedMoEModule.model``."""
    tensors = {}
    for key, value in module_state.items():
        name = _strip(key)
        if name is not None:
            tensors[name] = value
    return tensors


def adapted_model_from_tensors(
    spec: AdapterSpec, skeleton: nn.Module, tensors: Mapping[str, Tensor]
) -> nn.Module:
    """``spec.apply(skeleton)`` with the method's tensors (:meth:`AdapterSpec.adapter_tensors`)
    taken from ``tensors``, checked by name and shape; the frozen base stays on the meta
    device. Every other tensor of ``tensors`` must be a frozen base one."""
    try:
        model = spec.apply(skeleton)
    except ValueError as error:
        raise ZeroCheckpointError(
            f"the adapter configuration does not fit the base: {error}"
        ) from None
    expected = spec.adapter_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ZeroCheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) of the adapter, e.g. {missing[:3]}: "
            "the configuration (e.g. its target_modules) is not the one the run trained with"
        )
    state_names = set(model.state_dict())
    unused = sorted(k for k in tensors if k not in expected and k not in state_names)
    if unused:
        raise ZeroCheckpointError(
            f"checkpoint tensors the adapter configuration has no place for: {unused[:5]} "
            "(check its target_modules)"
        )
    for key, target in expected.items():
        value = tensors[key]
        if value.numel() == 0 and target.numel() > 0:
            raise ZeroCheckpointError(
                f"{key} is empty: a placeholder of a partitioned (ZeRO-3) checkpoint?"
            )
        if key.endswith(".log_tau"):
            value = scalar_log_tau_as_vector(value)
        if tuple(value.shape) != tuple(target.shape):
            raise ZeroCheckpointError(
                f"{key} has shape {tuple(value.shape)} but the adapter configuration gives "
                f"{tuple(target.shape)}: the configuration is not the one the run trained with"
            )
    subset = {k: tensors[k].detach() for k in expected}
    with torch.no_grad():
        model.load_state_dict(subset, strict=False, assign=True)
    return model


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
    config: str | Path | AdapterSpec | AdapterConfig | None = None,
    tag: str | None = None,
    master_weights: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Write the adapter of a ZeRO-0/1/2 or sharded (FSDP2) checkpoint to ``out_dir``, for
    any method: the method (``config``, default the checkpoint's) is applied to the base
    architecture on the meta device (``base``, default the checkpoint's), its declared tensors
    are filled from the checkpoint, and the method saves itself (:meth:`AdapterSpec.save`)."""
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
    hparams = states.get("hyper_parameters") or {}
    spec = resolve_adapter(config, states)
    saved = hparams.get("adapter")
    if config is not None and saved is not None:
        try:
            trained = _description_to_method(saved, "hyper_parameters")
        except (ValueError, TypeError):
            trained = None
        if trained is not None and trained != spec:
            print(
                f"warning: {config} differs from the adapter configuration saved in the "
                "checkpoint; using the one given",
                file=sys.stderr,
            )
    module_state = states["module"]
    if master_weights:
        module_state = _master_weights(folder.parent, folder.name)
    tensors = _checkpoint_tensors(module_state)
    model = adapted_model_from_tensors(spec, base_skeleton(hparams, base), tensors)
    written = set(spec.adapter_tensors(model))
    beyond = sorted(_trained_names(states) - written)
    if beyond:
        raise ZeroCheckpointError(
            f"the run also trained {len(beyond)} parameter(s) outside the {spec.method_name} "
            f"adapter, e.g. {beyond[:3]}; an adapter file would silently drop them"
        )
    dtypes = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in written})
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
    return spec.save(model, out_dir, metadata=_jsonable(metadata))


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
        "--base",
        default=None,
        help="the base model (directory, 'toy' or a cached hub id) whose architecture the "
        "adapter is applied to, on the meta device; default: the checkpoint's hyper_parameters",
    )
    parser.add_argument(
        "--master-weights",
        action="store_true",
        help="take the fp32 master weights from the ZeRO optimizer partitions (needs deepspeed) "
        "instead of the module states (the training dtype)",
    )
    args = parser.parse_args(argv)
    try:
        out = adapter_from_zero_checkpoint(
            args.checkpoint_dir,
            args.out_dir,
            args.config,
            args.tag,
            args.master_weights,
            args.base,
        )
    except (ZeroCheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    description = read_description(out)
    print(f"{description.method} adapter written to {out} ({description.metadata.get('weights')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
