"""medmoe.get_adapted_model / AdaptedModel: the PEFT-style model, for every method, on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from torch import nn

import medmoe
from medmoe.adapted_model import AdaptedModel, get_adapted_model, saved_adapter
from medmoe.adapters import MoELoRAConfig, moe_lora_layers
from medmoe.adapters.baselines import FullFineTune, LoRA, MultiLoRA, vanilla_moe_lora
from medmoe.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from medmoe.objectives import knowledge_preservation_loss, load_balance_loss

SMALL = dict(allowed_ranks=[2, 4], layer_ranges={"1-2": 2, "3-4": 4}, dropout=0.0)


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 96, (4, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a right-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # prompt tokens
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "is_general": torch.tensor([True, False, False, True]),
    }


def _moe(**weights) -> AdaptedModel:
    return get_adapted_model(make_tiny_llama(), MoELoRAConfig(**SMALL), **weights)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every adapter tensor off its initial value (B = 0 would hide a bad load)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.adapter_tensors().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.05)


def test_exported_from_medmoe():
    assert medmoe.get_adapted_model is get_adapted_model
    assert medmoe.AdaptedModel is AdaptedModel
    assert {"get_adapted_model", "AdaptedModel", "load_adapted"} <= set(dir(medmoe))


def test_loss_is_the_task_loss_plus_the_weighted_routing_terms():
    model = _moe(lambda_balance=0.3, lambda_kp=0.2, kp_delta=0.5)
    batch = _batch()
    out = model(**batch)
    reference = make_tiny_llama()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(out.task_loss, reference.loss)  # B = 0: the base model's loss
    layers = model.moe_layers
    probs = [layer.last_probs for layer in layers]
    mask = batch["attention_mask"].bool()
    balance = load_balance_loss(probs, mask)
    kp = knowledge_preservation_loss(
        probs, batch["is_general"], [layer.num_base_experts for layer in layers], mask, 0.5
    )
    torch.testing.assert_close(out.balance_loss, balance)
    torch.testing.assert_close(out.kp_loss, kp)
    torch.testing.assert_close(out.aux_loss, 0.3 * balance + 0.2 * kp)
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)


def test_target_routing_tokens_average_over_target_predicting_positions():
    model = _moe(lambda_kp=0.0, routing_tokens="target")
    batch = _batch()
    out = model(**batch)
    target = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)
    expected = load_balance_loss([layer.last_probs for layer in model.moe_layers], target)
    torch.testing.assert_close(out.balance_loss, expected)


def test_router_and_tau_get_gradient_from_the_routing_terms_alone_while_b_is_zero():
    """With B = 0 the expert path adds nothing, so the task loss gives the routers and
    temperatures exactly zero gradient: what they get comes from the routing terms."""
    for lambdas, expect_gradient in (((0.01, 0.01), True), ((0.0, 0.0), False)):
        model = _moe(lambda_balance=lambdas[0], lambda_kp=lambdas[1])
        model(**_batch()).loss.backward()
        for layer in model.moe_layers:
            assert torch.count_nonzero(layer.lora_B) == 0
            router, tau = layer.router.weight.grad, layer.log_tau.grad
            if expect_gradient:
                assert router.abs().sum() > 0 and tau.abs().sum() > 0
            else:
                assert not router.any() and not tau.any()


def test_num_items_in_batch_normalises_the_step_and_weighs_routing_by_token_share():
    """Trainer's gradient-accumulation contract: sum of token losses / step tokens; the routing
    terms weighted by this micro-batch's share of the step's target tokens."""
    model = _moe()
    batch = _batch()
    plain = model(**batch)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    out = model(**batch, num_items_in_batch=torch.tensor(4 * tokens))
    torch.testing.assert_close(out.task_loss, plain.task_loss / 4)
    torch.testing.assert_close(out.loss, plain.task_loss / 4 + plain.aux_loss / 4)


def test_knowledge_preservation_without_flags_is_left_out_with_one_warning():
    model = _moe(lambda_balance=0.01, lambda_kp=0.5)
    batch = {k: v for k, v in _batch().items() if k != "is_general"}
    with pytest.warns(UserWarning, match="is_general"):
        out = model(**batch)
    assert out.kp_loss is None
    torch.testing.assert_close(out.loss, out.task_loss + 0.01 * out.balance_loss)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)  # once only


def test_no_labels_no_routing_terms_and_bad_weights_raise():
    model = _moe()
    out = model(input_ids=_batch()["input_ids"])
    assert out.loss is None and out.aux_loss is None and out.logits.shape == (4, 10, 96)
    with pytest.raises(ValueError, match="lambda_balance"):
        _moe(lambda_balance=-1.0)
    with pytest.raises(ValueError, match="kp_delta"):
        _moe(kp_delta=1.0)
    with pytest.raises(ValueError, match="routing_tokens"):
        _moe(routing_tokens="prompt")


def test_print_trainable_parameters_reports_trainable_and_active(capsys):
    soft = _moe()
    counts = soft.parameter_counts()
    soft.print_trainable_parameters()
    line = capsys.readouterr().out
    assert f"trainable params: {counts.trainable:,}" in line
    assert f"all params: {counts.total:,}" in line
    assert counts.active == counts.trainable  # soft merging uses every expert
    top_k = get_adapted_model(make_tiny_llama(), vanilla_moe_lora(num_experts=4, top_k=1, rank=2))
    counts = top_k.parameter_counts()
    assert counts.active < counts.trainable
    top_k.print_trainable_parameters()
    assert f"active params per token: {round(counts.active):,}" in capsys.readouterr().out


def test_save_pretrained_writes_the_adapter_only_and_reloads_the_same_logits(tmp_path):
    model = _moe()
    _perturb(model)
    saved = model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in saved.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert set(load_file(saved / ADAPTER_WEIGHTS)) == set(model.adapter_tensors())
    assert "medmoe_config" in json.loads((saved / ADAPTER_CONFIG).read_text())
    batch = _batch()
    model.eval()
    loaded = AdaptedModel.from_pretrained(make_tiny_llama(), saved)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        assert torch.equal(loaded(**batch).loss, model(**batch).loss)
    trainable = AdaptedModel.from_pretrained(make_tiny_llama(), saved, is_trainable=True)
    names = {n.removeprefix("model.") for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == set(trainable.adapter_tensors())


def test_save_pretrained_replaces_an_adapter_whole_and_keeps_a_shared_directorys_files(tmp_path):
    model = _moe()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    _perturb(model)
    model.save_pretrained(target)  # replaced whole
    assert not list(tmp_path.glob(".adapter*"))  # no staging or retired folder left
    saved = load_file(target / ADAPTER_WEIGHTS)
    assert all(torch.equal(saved[k], v.detach()) for k, v in model.adapter_tensors().items())
    # a Trainer's output_dir holds its checkpoints: they stay
    output = tmp_path / "output"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (output / "training_args.bin").write_bytes(b"x")
    model.save_pretrained(output)
    assert (output / "checkpoint-2" / "trainer_state.json").read_text() == "{}"
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "training_args.bin"} <= {
        p.name for p in output.iterdir()
    }


def test_save_pretrained_writes_nothing_off_the_main_process(tmp_path):
    assert _moe().save_pretrained(tmp_path / "a", is_main_process=False) is None
    assert not (tmp_path / "a").exists()


def test_disable_adapter_runs_the_base_model_exactly():
    model = _moe()
    _perturb(model)
    batch = _batch()
    base = make_tiny_llama()
    with torch.no_grad():
        adapted = model(**batch)
        with model.disable_adapter() as same:
            assert same is model
            off = model(**batch)
        reference = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(off.logits, reference.logits)
    assert not torch.equal(adapted.logits, reference.logits)
    assert off.aux_loss is None and adapted.aux_loss is not None


def test_generate_is_the_wrapped_models():
    model = _moe()
    _perturb(model)
    prompt = _batch()["input_ids"][:1, :4]
    ours = model.generate(prompt, max_new_tokens=4, do_sample=False)
    theirs = model.get_base_model().generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, theirs) and ours.shape == (1, 8)
    with pytest.raises(TypeError, match="multi-LoRA"):
        model.generate(prompt, max_new_tokens=1, task_ids=0)


def test_reentrant_gradient_checkpointing_is_refused_with_routing_losses():
    model = _moe()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable()  # non-reentrant by default
    assert model.is_activation_checkpointing
    model.train()
    out = model(**_batch())
    out.loss.backward()
    assert model.moe_layers[0].router.weight.grad.abs().sum() > 0


def test_parameter_groups_give_routers_and_temperatures_their_own_learning_rate():
    model = _moe()
    groups = {g["name"]: g for g in model.parameter_groups(0.1, 5e-5, 2e-3)}
    routing = {id(p) for p in groups["routing"]["params"]}
    layer = model.moe_layers[0]
    assert id(layer.router.weight) in routing and id(layer.log_tau) in routing
    assert groups["routing"]["lr"] == 2e-3 and groups["routing"]["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == 5e-5


# ------------------------------------------------------------------ every method
def _multi_lora() -> MultiLoRA:
    return MultiLoRA(task_names=["a", "b"], r=4, dropout=0.0)


METHODS = {
    "med_moe_lora": lambda: MoELoRAConfig(**SMALL),
    "lora": lambda: LoRA(r=4, dropout=0.0),
    "multi_lora": _multi_lora,
    "full": FullFineTune,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_saves_and_reloads(name, tmp_path):
    model = get_adapted_model(make_tiny_llama(), METHODS[name]())
    batch = {**_batch(), "task_ids": torch.tensor([0, 1, 1, 0])}
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trained = [n for n, t in model.adapter_tensors().items() if t.grad is not None]
    assert trained, name
    assert (out.aux_loss is not None) == (name == "med_moe_lora")
    _perturb(model)
    saved = model.save_pretrained(tmp_path / name)
    assert type(saved_adapter(saved)) is type(model.adapter)
    model.eval()
    loaded = AdaptedModel.from_pretrained(make_tiny_llama(), saved)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    if name == "full":
        assert (saved / "model.safetensors").is_file() and not (saved / ADAPTER_CONFIG).exists()
        with pytest.raises(NotImplementedError), model.disable_adapter():
            pass
    else:
        # peft LoRA: medmoe's description beside peft's own files (which peft alone reads)
        beside = ["medmoe_adapter.json"] if name == "lora" else []
        assert sorted(p.name for p in saved.iterdir() if p.suffix != ".md") == sorted(
            [ADAPTER_CONFIG, ADAPTER_WEIGHTS, *beside]
        )
        base = make_tiny_llama()
        with torch.no_grad(), model.disable_adapter():
            off = model(input_ids=batch["input_ids"], task_ids=batch["task_ids"])
        assert torch.equal(off.logits, base(input_ids=batch["input_ids"]).logits)


def test_multi_lora_needs_task_ids_and_generates_per_task():
    model = get_adapted_model(make_tiny_llama(), _multi_lora())
    _perturb(model)
    batch = _batch()
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch)
    prompt = batch["input_ids"][:1, :4]
    outputs = [model.generate(prompt, max_new_tokens=4, do_sample=False, task_ids=t) for t in "ab"]
    with torch.no_grad():
        for task, generated in zip((0, 1), outputs, strict=True):
            logits = model(input_ids=generated[:, :-1], task_ids=torch.tensor([task])).logits
            assert torch.equal(logits[0, 3:].argmax(-1), generated[0, 4:])


def test_saved_adapter_names_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        saved_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="is a peft IA3 adapter; medmoe's methods read peft LoRA"):
        saved_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="describes no adapter"):
        saved_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        saved_adapter(tmp_path)


def test_from_pretrained_takes_a_subclass_method(tmp_path):
    from medmoe.adapters import MoELoRA, MoELoRALinear

    class Marked(MoELoRALinear):
        pass

    class MarkedMoELoRA(MoELoRA):
        layer_cls = Marked

    model = _moe()
    saved = model.save_pretrained(tmp_path / "adapter")
    loaded = AdaptedModel.from_pretrained(
        make_tiny_llama(), saved, adapter=MarkedMoELoRA(**saved_adapter(saved).to_dict())
    )
    assert all(isinstance(layer, Marked) for _, layer in moe_lora_layers(loaded.model))
