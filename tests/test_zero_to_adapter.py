"""ZeRO-2 checkpoint directory -> medmoe adapter, on CPU with hand-built DeepSpeed layouts.

The directories are written the way Lightning's ``DeepSpeedStrategy.save_checkpoint`` makes
DeepSpeed write them (``engine.save_checkpoint(path, client_state=..., tag="checkpoint",
exclude_frozen_parameters=...)``, see ``DeepSpeedEngine._save_checkpoint``,
``_common_checkpoint_state`` and ``_save_zero_checkpoint`` in deepspeed/runtime/engine.py).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_LLAMA, make_tiny_llama
from safetensors.torch import load_file
from torch import nn

from medmoe.adapters import MoELoRAConfig, adapter_state_dict, apply_moe_lora, load_adapter
from medmoe.zero_to_adapter import (
    ZeroCheckpointError,
    adapter_from_zero_checkpoint,
    main,
    read_model_states,
)

CONFIG = dict(
    allocation="eq2", n_min=2, n_max=4, allowed_ranks=[2, 4], num_base_experts=1, dropout=0.0
)
DS_VERSION = "0.19.8"


def _trained_model(dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A tiny Llama with a MoE-LoRA adapter whose every tensor moved away from its init."""
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**{**CONFIG, **config}))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    # DeepSpeed casts every parameter to the training dtype (routers and log tau included)
    return model.to(dtype)


def _lightning_module(model: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.model = model  # MedMoEModule.model
    return holder


def _module_states(holder: nn.Module, exclude_frozen: bool = True) -> dict[str, torch.Tensor]:
    """``DeepSpeedEngine.module_state_dict(exclude_frozen_parameters=...)``."""
    state = holder.state_dict()
    if exclude_frozen:
        for name, param in holder.named_parameters():
            if not param.requires_grad and name in state:
                del state[name]
    return state


def _persistent_buffers(holder: nn.Module) -> list[str]:
    names = []
    for module_name, module in holder.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def _ds_config(stage: int) -> dict:
    return {
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": True},
        "bf16": {"enabled": True},
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
    }


def write_zero2_checkpoint(
    directory: Path,
    model: nn.Module,
    config: Any,
    master: nn.Module | None = None,
    exclude_frozen: bool = True,
    extra_trained: tuple[str, ...] = (),
) -> Path:
    """A single-rank ZeRO-2 checkpoint of ``MedMoEModule(model)`` in DeepSpeed's layout.

    ``config``: the module's adapter (a ``MoELoRAConfig`` or any method), recorded in its
    ``hyper_parameters`` as ``MedMoEModule`` records it.

    ``master``: the fp32 copy whose flattened trainable parameters fill the optimizer's
    ``single_partition_of_fp32_groups`` (default: ``model`` itself in float32).
    """
    holder = _lightning_module(model)
    trainable = OrderedDict(
        (name, param.shape) for name, param in holder.named_parameters() if param.requires_grad
    )
    for name in extra_trained:
        trainable[name] = holder.get_parameter(name).shape
    folder = directory / "checkpoint"
    folder.mkdir(parents=True)
    (directory / "latest").write_text("checkpoint")
    client_state = {  # what Lightning hands DeepSpeed (its checkpoint minus state_dict/optimizer)
        "epoch": 0,
        "global_step": 7,
        "pytorch-lightning_version": "2.6.6",
        "loops": {"fit_loop": {}},
        "callbacks": {},
        "lr_schedulers": [{"last_epoch": 7}],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "tiny_llama": dict(TINY_LLAMA),  # MedMoEModule's: the base architecture
            "adapter": {  # MedMoEModule's hparams: the adapter as given (a config or a method)
                "class_path": f"{type(config).__module__}.{type(config).__qualname__}",
                "init_args": config.init_args() if hasattr(config, "init_args") else vars(config),
            },
        },
        "medmoe_rng_states": {"torch": torch.get_rng_state()},
    }
    states = {
        "module": _module_states(holder, exclude_frozen),
        "buffer_names": _persistent_buffers(holder),
        "optimizer": None,
        "param_shapes": [trainable],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": 7,
        "global_samples": 28,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": _ds_config(2),
        "ds_version": DS_VERSION,
        **client_state,
    }
    torch.save(states, folder / "mp_rank_00_model_states.pt")

    source = _lightning_module(master if master is not None else model)
    flat = torch.cat([source.get_parameter(n).detach().float().reshape(-1) for n in trainable])
    padding = 2 * math.ceil(flat.numel() / 2) - flat.numel()  # ZeRO-2 aligns to 2 x world
    flat = torch.cat([flat, flat.new_zeros(padding)])
    optimizer_state = {
        "optimizer_state_dict": {
            "loss_scaler": None,
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": 1.0,
            "base_optimizer_state": {"state": {}, "param_groups": []},
            "single_partition_of_fp32_groups": [flat],
            "zero_stage": 2,
            "group_paddings": [padding],
            "partition_count": [1],
            "ds_version": DS_VERSION,
        },
        "ds_config": _ds_config(2),
        "ds_version": DS_VERSION,
    }
    torch.save(optimizer_state, folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return directory


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def test_module_state_emulation_matches_deepspeed():
    engine = pytest.importorskip("deepspeed.runtime.engine")
    holder = _lightning_module(_trained_model())
    fake_engine = SimpleNamespace(module=holder, random_ltd_enabled=lambda: False)
    expected = engine.DeepSpeedEngine.module_state_dict(fake_engine, exclude_frozen_parameters=True)
    ours = _module_states(holder)
    assert list(ours) == list(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    assert not any(k.endswith("base.weight") or "embed_tokens" in k for k in ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_adapter_loads_onto_a_fresh_base_with_identical_logits(tmp_path, dtype):
    trained = _trained_model(dtype)
    config = MoELoRAConfig(**CONFIG)
    ckpt = write_zero2_checkpoint(tmp_path / "last.ckpt", trained, config)

    assert main([str(ckpt), str(tmp_path / "adapter")]) == 0  # config from the checkpoint

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = adapter_state_dict(trained)
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k].detach()) for k in saved)
    description = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert MoELoRAConfig.from_dict(description["medmoe_config"]) == config
    assert description["metadata"]["global_step"] == 7
    assert description["metadata"]["zero_stage"] == 2

    fresh = make_tiny_llama().to(dtype)
    base_logits = _logits(fresh, IDS)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(fresh, IDS), _logits(trained, IDS))
    assert not torch.allclose(base_logits, _logits(trained, IDS))  # the adapter matters


def test_master_weights_come_from_the_zero_optimizer_partition(tmp_path):
    pytest.importorskip("deepspeed")
    master = _trained_model(torch.float32)
    module = _trained_model(torch.bfloat16)  # what the engine's module holds: bf16 copies
    ckpt = write_zero2_checkpoint(tmp_path / "ckpt", module, MoELoRAConfig(**CONFIG), master)

    assert main([str(ckpt), str(tmp_path / "fp32"), "--master-weights"]) == 0
    saved = load_file(tmp_path / "fp32" / "adapter_model.safetensors")
    expected = adapter_state_dict(master)
    assert all(saved[k].dtype == torch.float32 for k in saved)
    assert all(torch.equal(saved[k], expected[k].detach()) for k in expected)


def _yaml_config(path: Path, config: MoELoRAConfig) -> Path:
    data = {
        "trainer": {"max_steps": 10},
        "model": {
            "class_path": "medmoe.model.MedMoEModule",
            "init_args": {
                "adapter": {
                    "class_path": "medmoe.adapters.MoELoRAConfig",
                    "init_args": {**config.to_dict(), "tau_range": list(config.tau_range)},
                }
            },
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_from_yaml_json_or_directory(tmp_path):
    config = MoELoRAConfig(**CONFIG)
    trained = _trained_model()
    ckpt = write_zero2_checkpoint(tmp_path / "ckpt", trained, config)
    reference = tmp_path / "reference"
    adapter_from_zero_checkpoint(ckpt, reference)
    sources = {
        "yaml": _yaml_config(tmp_path / "config.yaml", config),
        "json": reference / "adapter_config.json",
        "dir": reference,
    }
    for label, source in sources.items():
        out = adapter_from_zero_checkpoint(ckpt, tmp_path / label, config=source)
        written = json.loads((out / "adapter_config.json").read_text())["medmoe_config"]
        assert MoELoRAConfig.from_dict(written) == config, label
        assert (out / "adapter_model.safetensors").read_bytes() == (
            reference / "adapter_model.safetensors"
        ).read_bytes(), label


def test_the_tag_folder_itself_and_a_full_module_state_are_accepted(tmp_path):
    trained = _trained_model()
    ckpt = write_zero2_checkpoint(
        tmp_path / "ckpt", trained, MoELoRAConfig(**CONFIG), exclude_frozen=False
    )
    assert any("embed_tokens" in k for k in read_model_states(ckpt / "checkpoint")["module"])
    out = adapter_from_zero_checkpoint(ckpt / "checkpoint", tmp_path / "adapter")
    assert set(load_file(out / "adapter_model.safetensors")) == set(adapter_state_dict(trained))


def test_a_config_that_does_not_match_the_tensors_is_named(tmp_path):
    ckpt = write_zero2_checkpoint(tmp_path / "ckpt", _trained_model(), MoELoRAConfig(**CONFIG))
    wrong = MoELoRAConfig(**{**CONFIG, "allowed_ranks": [4, 8]})
    with pytest.raises(ZeroCheckpointError, match="lora_A has shape .* configuration gives"):
        adapter_from_zero_checkpoint(ckpt, tmp_path / "out", config=wrong)
    fewer_targets = MoELoRAConfig(**{**CONFIG, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ZeroCheckpointError, match="target_modules"):
        adapter_from_zero_checkpoint(ckpt, tmp_path / "out", config=fewer_targets)
    assert not (tmp_path / "out").exists()


def test_parameters_trained_outside_the_adapter_are_refused(tmp_path):
    trained = _trained_model()
    ckpt = write_zero2_checkpoint(
        tmp_path / "ckpt",
        trained,
        MoELoRAConfig(**CONFIG),
        extra_trained=("model.lm_head.weight",),
    )
    with pytest.raises(ZeroCheckpointError, match="outside the MoELoRA adapter.*lm_head"):
        adapter_from_zero_checkpoint(ckpt, tmp_path / "out")


def test_zero3_checkpoints_are_refused_with_a_clear_error(tmp_path):
    trained = _trained_model()
    holder = _lightning_module(trained)
    # ZeRO-3: one partitioned model-states file per rank, parameters as empty placeholders
    folder = tmp_path / "z3" / "checkpoint"
    folder.mkdir(parents=True)
    (tmp_path / "z3" / "latest").write_text("checkpoint")
    placeholders = {k: torch.empty(0) for k in _module_states(holder)}
    for rank in range(2):
        torch.save(
            {"module": placeholders, "ds_config": _ds_config(3), "param_shapes": []},
            folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        )
    with pytest.raises(ZeroCheckpointError, match="ZeRO-3 .*supports DeepSpeed ZeRO-2"):
        adapter_from_zero_checkpoint(tmp_path / "z3", tmp_path / "out")

    # a stage-3 config in an mp_rank_00 file is refused too
    ckpt = write_zero2_checkpoint(tmp_path / "z3b", trained, MoELoRAConfig(**CONFIG))
    path = ckpt / "checkpoint" / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=False)
    states["ds_config"] = _ds_config(3)
    torch.save(states, path)
    with pytest.raises(ZeroCheckpointError, match="ZeRO-3"):
        adapter_from_zero_checkpoint(ckpt, tmp_path / "out")


def test_what_is_not_a_deepspeed_checkpoint_gets_a_clear_message(tmp_path, capsys):
    (tmp_path / "plain.ckpt").write_bytes(b"not a directory")
    assert main([str(tmp_path / "plain.ckpt"), str(tmp_path / "out")]) == 2
    assert "is a file; a DeepSpeed checkpoint is a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no 'latest' file" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
