"""Baselines: full fine-tuning, peft LoRA, multi-LoRA, vanilla MoE-LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from medmoe.adapters import (
    apply_moe_lora,
    enable_gradient_checkpointing,
    moe_lora_layers,
    parameter_counts,
)
from medmoe.adapters.baselines import (
    FullFineTune,
    LoRA,
    MultiLoRA,
    MultiLoRALinear,
    vanilla_moe_lora,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")


def _perturb_lora_b(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


# ----------------------------------------------------------------- LoRA (peft)
def test_lora_defaults_are_the_papers():
    config = LoRA().peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert set(config.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_lora_loads_onto_the_peft_model_it_applied(tmp_path, token_batch):
    # onto a bare base: tests/test_adapter_contract.py
    spec = LoRA(r=4)
    model = spec.apply(make_tiny_llama())
    _perturb_lora_b(model)
    expected = model(**token_batch).logits
    spec.save(model, tmp_path / "lora")
    onto_adapted = spec.load(spec.apply(make_tiny_llama()), tmp_path / "lora")
    torch.testing.assert_close(onto_adapted(**token_batch).logits, expected, rtol=0, atol=0)


def test_lora_needs_the_peft_model():
    with pytest.raises(TypeError, match="PeftModel"), LoRA().disabled(make_tiny_llama()):
        pass


# ----------------------------------------------------------------- multi-LoRA
def test_multi_lora_layer_routes_each_sample_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(5, 3).double()
    layer = MultiLoRALinear(base, num_tasks=2, r=2, lora_alpha=4.0)  # scale 2
    a = torch.randn(2, 2, 5, dtype=torch.float64)  # [T, r, d_in]
    b = torch.randn(2, 3, 2, dtype=torch.float64)  # [T, d_out, r]
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    task_ids = torch.tensor([1, 0, 0, 1])
    layer.set_task_ids(task_ids)
    out = layer(x)
    for sample, task in enumerate(task_ids.tolist()):
        expected = base(x[sample]) + 2.0 * x[sample] @ a[task].T @ b[task].T
        torch.testing.assert_close(out[sample], expected, rtol=1e-12, atol=1e-12)
    assert layer.active_parameter_count() == 2 * (5 + 3)


def test_multi_lora_layer_without_task_ids_raises():
    layer = MultiLoRALinear(nn.Linear(4, 4), num_tasks=2, r=2, lora_alpha=4.0)
    with pytest.raises(RuntimeError, match="task ids"):
        layer(torch.randn(2, 3, 4))
    layer.set_task_ids(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="batch dimension"):
        layer(torch.randn(2, 3, 4))


def test_multi_lora_model_routes_like_single_task_batches(token_batch):
    spec = MultiLoRA(task_names=["diagnosis", "qa"], r=4, dropout=0.0)
    base_logits = make_tiny_llama()(**token_batch).logits
    model = spec.apply(make_tiny_llama())
    mixed = {**token_batch, "task_id": torch.tensor([1, 0, 1])}
    spec.prepare_batch(model, mixed)
    torch.testing.assert_close(model(**token_batch).logits, base_logits, rtol=0, atol=0)

    _perturb_lora_b(model)
    logits = model(**token_batch).logits
    for sample, task in enumerate([1, 0, 1]):
        single = {k: v[sample : sample + 1] for k, v in token_batch.items()}
        spec.prepare_batch(model, {**single, "task_id": torch.tensor([task])})
        torch.testing.assert_close(model(**single).logits[0], logits[sample], rtol=1e-5, atol=1e-5)
        spec.prepare_batch(model, {**single, "task_id": torch.tensor([1 - task])})
        assert not torch.allclose(model(**single).logits[0], logits[sample], atol=1e-4)
    with spec.disabled(model):
        torch.testing.assert_close(model(**token_batch).logits, base_logits, rtol=0, atol=0)


def test_multi_lora_needs_task_ids_in_every_batch(token_batch):
    spec = MultiLoRA(num_tasks=2, r=4)
    model = spec.apply(make_tiny_llama()).eval()
    with pytest.raises(KeyError, match="task_id"):
        spec.prepare_batch(model, token_batch)
    with pytest.raises(RuntimeError, match="task ids"):
        model(**token_batch)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        spec.prepare_batch(model, {**token_batch, "task_id": torch.tensor([0, 2, 1])})


def test_multi_lora_task_ids_never_go_stale(token_batch):
    spec = MultiLoRA(task_names=["a", "b"], r=4, dropout=0.0)
    model = spec.apply(make_tiny_llama())
    _perturb_lora_b(model)
    batch = {**token_batch, "task_id": torch.tensor([1, 0, 1])}
    with torch.no_grad():  # evaluation ids serve one forward
        spec.prepare_batch(model, batch)
        expected = model(**token_batch).logits
        with pytest.raises(RuntimeError, match="no task ids"):
            model(**token_batch)
    spec.prepare_batch(model, batch)  # training ids stay (checkpointing re-runs the layers)
    torch.testing.assert_close(model(**token_batch).logits, expected, rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="training batch"):
        model(**token_batch)
    with torch.no_grad(), spec.task_context(model, batch["task_id"]):  # pinned: many forwards
        for _ in range(2):
            torch.testing.assert_close(model(**token_batch).logits, expected, rtol=0, atol=0)


def test_multi_lora_generates_inside_a_task_context():
    spec = MultiLoRA(task_names=["a", "b"], r=4, dropout=0.0)
    model = spec.apply(make_tiny_llama())
    _perturb_lora_b(model)
    prompt = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    with spec.task_context(model, "b"):
        generated = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        first = model(input_ids=prompt).logits[:, -1].argmax(-1)
    assert generated.shape == (2, 8) and torch.equal(generated[:, 5], first)
    with pytest.raises(RuntimeError, match="no task ids"):
        model(input_ids=prompt)


def test_multi_lora_trains_under_gradient_checkpointing(token_batch):
    def lora_b_grads(checkpointing: bool) -> torch.Tensor:
        spec = MultiLoRA(num_tasks=2, r=4, dropout=0.0)
        model = spec.apply(make_tiny_llama()).train()
        _perturb_lora_b(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        spec.prepare_batch(model, {**token_batch, "task_id": torch.tensor([0, 1, 1])})
        model(**token_batch, labels=token_batch["input_ids"]).loss.backward()
        return model.model.layers[1].self_attn.q_proj.lora_B.grad

    grads = lora_b_grads(checkpointing=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads, lora_b_grads(checkpointing=False))


def test_multi_lora_counts_one_adapter_as_active():
    spec = MultiLoRA(num_tasks=3, r=4, target_modules=["q_proj"])
    model = spec.apply(make_tiny_llama())
    counts = parameter_counts(model)
    one = 4 * (32 + 32) * 4  # r (d_in + d_out) per layer, 4 layers
    assert counts.trainable == 3 * one
    assert counts.active == one
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_multi_lora_file_names_its_method_and_refuses_another_shape(tmp_path):
    # the logits round trip: tests/test_adapter_contract.py
    spec = MultiLoRA(num_tasks=2, r=4)
    spec.save(spec.apply(make_tiny_llama()), tmp_path / "multi")
    config = json.loads((tmp_path / "multi" / "adapter_config.json").read_text())
    assert config["method"] == "MultiLoRA" and config["config"]["num_tasks"] == 2
    with pytest.raises(ValueError, match="num_tasks"):
        MultiLoRA(num_tasks=3, r=4).load(make_tiny_llama(), tmp_path / "multi")


# ----------------------------------------------------------------- vanilla MoE-LoRA
def test_vanilla_moe_lora_is_uniform_top_k_without_base_experts():
    config = vanilla_moe_lora(num_experts=4, top_k=2, rank=4, dropout=0.0)
    model = make_tiny_llama()
    apply_moe_lora(model, config)
    layers = [layer for _, layer in moe_lora_layers(model)]
    assert {layer.ranks for layer in layers} == {(4, 4, 4, 4)}
    assert all(layer.top_k == 2 and layer.num_base_experts == 0 for layer in layers)


# ----------------------------------------------------------------- bad config values
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: LoRA(r=0), "r"),
        (lambda: LoRA(lora_alpha=0), "lora_alpha"),
        (lambda: LoRA(dropout=1.0), "dropout"),
        (lambda: LoRA(target_modules=[]), "target_modules"),
        (lambda: LoRA(bias="some"), "bias"),
        (lambda: MultiLoRA(), "num_tasks"),
        (lambda: MultiLoRA(num_tasks=0), "num_tasks"),
        (lambda: MultiLoRA(num_tasks=3, task_names=["a", "b"]), "num_tasks"),
        (lambda: MultiLoRA(task_names=["a", "a"]), "task_names"),
        (lambda: MultiLoRA(num_tasks=2, r=-1), "r"),
        (lambda: MultiLoRA(num_tasks=2, dropout=-0.1), "dropout"),
        (lambda: FullFineTune(max_shard_size="big"), "max_shard_size"),
        (lambda: vanilla_moe_lora(num_experts=2, top_k=3), "top_k"),
    ],
)
def test_bad_values_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_declares_exactly_what_peft_trains(bias):
    spec = LoRA(r=2, target_modules=["q_proj"], bias=bias)
    model = spec.apply(make_tiny_llama(attention_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(spec.adapter_tensors(model)) == trainable
    biases = {n for n in trainable if n.endswith(".bias")}
    assert len(biases) == {"none": 0, "all": 4 * 4, "lora_only": 4}[bias]  # q, k, v, o per layer


def test_multi_lora_has_one_adapter_per_domain_task_and_deals_replay_out():
    spec = MultiLoRA(num_tasks=3, r=4)
    task_ids = torch.tensor([0, 3, 2, 4, 1, 3, 3])  # 3 domain tasks, replay tasks 3 and 4
    general = task_ids >= 3
    assert spec.adapter_ids(task_ids, general).tolist() == [0, 0, 2, 1, 1, 2, 0]
    off = MultiLoRA(num_tasks=3, r=4, replay_routing="base")
    assert off.adapter_ids(task_ids, general).tolist() == [0, -1, 2, -1, 1, -1, -1]
    with pytest.raises(ValueError, match="number of domain tasks"):
        spec.adapter_ids(task_ids, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="replay_routing"):
        MultiLoRA(num_tasks=3, replay_routing="shared")


def test_multi_lora_task_id_minus_one_is_the_base_model(token_batch):
    spec = MultiLoRA(num_tasks=2, r=4, dropout=0.0)
    model = spec.apply(make_tiny_llama()).eval()
    _perturb_lora_b(model)
    with torch.no_grad():
        with spec.disabled(model):
            base = model(**token_batch).logits
        spec.set_task_ids(model, torch.tensor([-1, 0, -1]))
        mixed = model(**token_batch).logits
        spec.set_task_ids(model, torch.tensor([1, 0, 1]))
        adapted = model(**token_batch).logits
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], adapted[1])
    assert not torch.allclose(adapted[0], base[0])
