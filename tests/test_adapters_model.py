"""apply_moe_lora on a tiny Llama: invariants, adapter files, checkpointing, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from torch import nn

from medmoe.adapters import (
    MoELoRAConfig,
    adapter_state_dict,
    apply_moe_lora,
    enable_gradient_checkpointing,
    load_adapter,
    moe_lora_layers,
    parameter_counts,
    save_adapter,
)
from medmoe.adapters.state import ADAPTER_WEIGHTS
from medmoe.objectives import load_balance_loss, recorded_router_probs

SMALL = dict(allowed_ranks=[2, 4, 8], layer_ranges={"1-2": 2, "3-4": 4}, dropout=0.0)


def _perturb_adapters(model: nn.Module, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            layer.log_tau.fill_(-0.3)


def test_layer_plan_follows_the_config(tiny_llama):
    layers = apply_moe_lora(tiny_llama, MoELoRAConfig(**SMALL))
    assert len(layers) == 4 * 7
    per_layer = [layers[7 * i].num_experts for i in range(4)]
    assert per_layer == [2, 2, 4, 4]
    assert layers[0].ranks == (2, 4) and layers[-1].ranks == (2, 4, 8, 2)
    assert tiny_llama.model.layers[3].mlp.down_proj.num_experts == 4


def test_save_writes_the_config_and_metadata_and_only_adapter_tensors(tmp_path):
    # the logits round trip of every method is in tests/test_adapter_contract.py
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**SMALL, top_k=2))
    save_adapter(model, tmp_path / "adapter", metadata={"step": 7})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["medmoe_config"]["top_k"] == 2 and config["metadata"] == {"step": 7}
    fresh = make_tiny_llama()
    load_adapter(fresh, tmp_path / "adapter")
    assert set(adapter_state_dict(fresh)) == set(adapter_state_dict(model))
    assert set(adapter_state_dict(fresh)) == set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))


def test_save_replaces_a_good_adapter_only_when_complete(tmp_path, monkeypatch):
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    target = save_adapter(model, tmp_path / "adapter")
    before = (target / "adapter_model.safetensors").read_bytes()
    _perturb_adapters(model)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("medmoe.adapters.state.write_file_bytes", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_rejects_a_mismatched_adapter(tmp_path):
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    save_adapter(model, tmp_path / "adapter")
    other = make_tiny_llama()
    apply_moe_lora(other, MoELoRAConfig(**{**SMALL, "layer_ranges": {"1-4": 3}}))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(other, tmp_path / "adapter")


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
def test_router_receives_balancing_gradient(token_batch, checkpointing):
    def router_grads(use_checkpointing: bool) -> list[torch.Tensor]:
        model = make_tiny_llama()
        apply_moe_lora(model, MoELoRAConfig(**SMALL))
        _perturb_adapters(model)
        model.train()
        if use_checkpointing:
            enable_gradient_checkpointing(model)
        model(**token_batch)
        layers = [layer for _, layer in moe_lora_layers(model)]
        probs = recorded_router_probs(layers)
        load_balance_loss(probs, token_batch["attention_mask"].bool()).backward()
        return [layer.router.weight.grad.clone() for layer in layers]

    reference = router_grads(False)
    grads = router_grads(checkpointing == "non_reentrant")
    assert all(g.abs().sum() > 0 for g in grads)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want)


def test_reentrant_checkpointing_is_caught_not_silent(token_batch):
    model = make_tiny_llama()
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model(**token_batch)
    layers = [layer for _, layer in moe_lora_layers(model)]
    with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
        recorded_router_probs(layers)


def test_parameter_counts_by_hand(tiny_llama):
    config = MoELoRAConfig(
        target_modules=["q_proj"],
        allocation="uniform",
        num_experts=4,
        allowed_ranks=[2],
        rank_pattern="equal",
        num_base_experts=1,
        dropout=0.0,
    )
    apply_moe_lora(tiny_llama, config)
    # q_proj: 32 -> 32; per layer 4 experts of rank 2: 4 * 2 * (32 + 32) = 512, router 4 * 32,
    # one log tau; 4 decoder layers.
    per_layer = 512 + 128 + 1
    counts = parameter_counts(tiny_llama)
    assert counts.trainable == 4 * per_layer
    assert counts.active == counts.trainable  # soft merging uses every expert

    top2 = make_tiny_llama()
    apply_moe_lora(top2, MoELoRAConfig(**{**config.to_dict(), "top_k": 2}))
    assert parameter_counts(top2).active == 4 * (256 + 128 + 1)
    assert parameter_counts(top2).trainable == 4 * per_layer


def test_unknown_target_module_lists_what_exists(tiny_llama):
    with pytest.raises(ValueError, match=r"\['qkv'\] not found.*q_proj"):
        apply_moe_lora(tiny_llama, MoELoRAConfig(**SMALL, target_modules=["qkv"]))


def test_model_without_decoder_layers():
    with pytest.raises(ValueError, match="no decoder layers"):
        apply_moe_lora(nn.Sequential(nn.Linear(4, 4)), MoELoRAConfig(**SMALL))


def test_ranges_outside_the_model_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"'1-10' must lie within 1-4"):
        # the paper's 32-layer ranges, written as layers (the default writes them as depth)
        apply_moe_lora(tiny_llama, MoELoRAConfig(layer_ranges={"1-10": 2, "20-32": 8}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_min": 9, "n_max": 8}, "n_min <= n_max"),
        ({"gamma": 0.5}, "gamma must be >= 1"),
        ({"expert_rank": 12, "rank_pattern": "equal"}, r"expert_rank 12 is not in allowed_ranks"),
        ({"allocation": "zigzag"}, "unknown allocation 'zigzag'"),
        ({"rank_pattern": "random"}, "unknown rank_pattern"),
        ({"tau_init": 50.0}, "tau_init"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoELoRAConfig(**overrides)


def test_apply_twice_is_refused(tiny_llama):
    apply_moe_lora(tiny_llama, MoELoRAConfig(**SMALL))
    with pytest.raises(ValueError, match="already carries"):
        apply_moe_lora(tiny_llama, MoELoRAConfig(**SMALL))
