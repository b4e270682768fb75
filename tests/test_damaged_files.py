"""Damaged files are named, not crashed on, and never half-loaded: a truncated or corrupted
checkpoint, adapter safetensors file or ``adapter_config.json`` is refused with one line naming
the file and what is wrong, and the model it was to load into is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from medmoe.adapters import MoELoRAConfig, apply_moe_lora, load_adapter, save_adapter
from medmoe.adapters.full import FullFineTune
from medmoe.adapters.lora import LoRA
from medmoe.adapters.multi_lora import MultiLoRA
from medmoe.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from medmoe.errors import read_checkpoint

SMALL = dict(allowed_ranks=[2, 4, 8], layer_ranges={"1-2": 2, "3-4": 4}, dropout=0.0)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


def one_line(error: BaseException, *names: str) -> str:
    message = str(error)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    state = {"state_dict": {"w": torch.ones(20_000)}, "hyper_parameters": {}, "global_step": 3}
    torch.save(state, path)
    return path


def test_a_checkpoint_with_a_flipped_byte_is_refused_by_its_crc(ckpt: Path) -> None:
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2  # inside the tensor's record: torch.load alone would load it
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError) as caught:
        read_checkpoint(ckpt)
    one_line(caught.value, str(ckpt), "corrupted", "CRC-32")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_a_truncated_checkpoint_is_refused(ckpt: Path, keep: float) -> None:
    truncate(ckpt, keep)
    with pytest.raises(ValueError) as caught:
        read_checkpoint(ckpt)
    one_line(caught.value, str(ckpt), "truncated")


def test_a_whole_checkpoint_still_loads(ckpt: Path) -> None:
    assert read_checkpoint(ckpt)["global_step"] == 3


# --- MoE-LoRA adapter directory -------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("adapted", [False, True], ids=["bare_base", "adapted_model"])
@pytest.mark.parametrize(
    "damage", ["config_truncated", "config_garbage", "weights_truncated", "weights_nan"]
)
def test_a_damaged_adapter_is_refused_and_the_model_unchanged(
    adapter: Path, damage: str, adapted: bool
) -> None:
    if damage == "config_truncated":
        truncate(adapter / ADAPTER_CONFIG)
        names = (str(adapter / ADAPTER_CONFIG), "adapter config", "truncated")
    elif damage == "config_garbage":
        (adapter / ADAPTER_CONFIG).write_bytes(b'{"medmoe_config": {,,}')
        names = (str(adapter / ADAPTER_CONFIG), "not valid JSON", "line 1")
    elif damage == "weights_truncated":
        truncate(adapter / ADAPTER_WEIGHTS)
        names = (str(adapter / ADAPTER_WEIGHTS), "truncated")
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(adapter / ADAPTER_WEIGHTS)
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, adapter / ADAPTER_WEIGHTS)
        names = (str(adapter / ADAPTER_WEIGHTS), "damaged", "non-finite", first)
    model = make_tiny_llama(seed=2)
    if adapted:
        apply_moe_lora(model, MoELoRAConfig(**SMALL))
    before = snapshot(model)
    with pytest.raises(ValueError) as caught:
        load_adapter(model, adapter)
    one_line(caught.value, *names)
    assert unchanged(model, before)  # no layer injected, no tensor copied


def test_a_truncated_adapter_config_is_named_when_read_alone(adapter: Path) -> None:
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"medmoe_config": {}})[:-3])
    with pytest.raises(ValueError) as caught:
        read_adapter_config(adapter)
    one_line(caught.value, str(adapter / ADAPTER_CONFIG), "truncated")


# --- baselines: peft LoRA, multi-LoRA, full fine-tuning -------------------------------------


def saved_baseline(method: str, tmp_path: Path):
    if method == "lora":
        spec = LoRA(r=4)
    elif method == "multi_lora":
        spec = MultiLoRA(num_tasks=2, r=4)
    else:
        spec = FullFineTune()
    model = spec.apply(make_tiny_llama())
    return spec, spec.save(model, tmp_path / "adapter")


@pytest.mark.parametrize("adapted", [False, True], ids=["bare_base", "adapted_model"])
@pytest.mark.parametrize("method", ["lora", "multi_lora", "full"])
@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_damaged_baseline_directory_is_refused_and_the_model_unchanged(
    tmp_path: Path, method: str, damage: str, adapted: bool
) -> None:
    spec, directory = saved_baseline(method, tmp_path)
    if damage == "config" and method == "full":
        pytest.skip("full fine-tuning's config.json is read by transformers, not here")
    if damage == "weights":
        weights = sorted(directory.glob("*.safetensors"))[0]
        truncate(weights)
        names = (str(weights), "truncated")
    else:
        truncate(directory / ADAPTER_CONFIG)
        names = (str(directory / ADAPTER_CONFIG), "truncated")
    model = make_tiny_llama(seed=2)
    if adapted:
        model = spec.apply(model)
    before = snapshot(model)
    with pytest.raises(ValueError) as caught:
        spec.load(model, directory)
    one_line(caught.value, *names)
    assert unchanged(model, before)
