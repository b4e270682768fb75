"""One contract suite for every method, in the spirit of peft's ``PeftCommonTester``.

Each row of ``CASES`` is (method, tiny model, config); every shared check below runs on every
row. A new method gets all of them by adding one row. Rows state what they cannot do (full
fine-tuning has no base to switch back to) instead of being left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, make_tiny_llama
from torch import Tensor, nn

from medmoe.adapters import (
    MoELoRA,
    MoELoRAConfig,
    MoELoRALinear,
    adapter_spec,
    register_method,
    registered_methods,
    routed_layers,
)
from medmoe.adapters.baselines import FullFineTune, LoRA, MultiLoRA
from medmoe.adapters.spec import AdapterSpec
from medmoe.model import MedMoEModule
from medmoe.optimization import parameter_groups

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

MOE = dict(target_modules=["q_proj", "v_proj", "down_proj"], layer_ranges=None, dropout=0.0)


class SharpMoELoRALinear(MoELoRALinear):
    """A subclassed router: the gate is ``softmax(2 W_g x / tau)``."""

    def probs_from_logits(self, logits: Tensor) -> Tensor:
        return torch.softmax(2.0 * logits / self.tau.to(logits.dtype), dim=-1)


class SharpMoELoRA(MoELoRA):
    layer_cls = SharpMoELoRALinear


@dataclass(frozen=True)
class Case:
    """One method on the tiny Llama.

    ``make`` builds the spec from keyword overrides; ``bad`` are overrides it must reject with
    a ValueError whose message matches ``bad_message``; ``disable`` is ``None`` when the method
    can switch its adapter off, else the reason it cannot (checked as the error it raises).
    """

    make: Callable[..., Any]
    bad: dict[str, Any]
    bad_message: str
    disable: str | None = None


CASES = {
    "moe_lora_soft": Case(
        lambda **kw: MoELoRAConfig(**{**MOE, "allocation": "eq2", "allowed_ranks": [2], **kw}),
        {"tau_init": 50.0},
        "tau_init",
    ),
    "moe_lora_top_k": Case(
        lambda **kw: MoELoRA(
            **{**MOE, "allocation": "uniform", "num_experts": 4, "top_k": 2, **kw},
            allowed_ranks=[2],
        ),
        {"top_k": 0},
        "top_k",
    ),
    "moe_lora_mixed_ranks": Case(
        lambda **kw: MoELoRAConfig(
            **{**MOE, "allocation": "eq2", "n_max": 5, "allowed_ranks": [2, 4, 8], **kw}
        ),
        {"allowed_ranks": [0, 2]},
        "allowed_ranks",
    ),
    "moe_lora_subclassed_router": Case(
        lambda **kw: SharpMoELoRA(**{**MOE, "allocation": "eq2", "allowed_ranks": [2, 4], **kw}),
        {"gamma": 0.5},
        "gamma",
    ),
    "peft_lora": Case(
        lambda **kw: LoRA(**{"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kw}),
        {"r": 0},
        r"\br\b",
    ),
    "multi_lora": Case(
        lambda **kw: MultiLoRA(**{"num_tasks": 3, "r": 4, "dropout": 0.0, **kw}),
        {"num_tasks": 0},
        "num_tasks",
    ),
    "full_fine_tune": Case(
        lambda **kw: FullFineTune(**kw),
        {"max_shard_size": "big"},
        "max_shard_size",
        disable="overwrites the base weights",  # N/A: the trained weights are the base's
    ),
}


def _batch() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 96, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a right-padded row
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "task_id": torch.tensor([0, 2, 1]),
    }


def _logits(spec: AdapterSpec, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        spec.prepare_batch(model, batch)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(spec: AdapterSpec, model: nn.Module, batch: dict[str, Tensor], steps: int = 3) -> None:
    """A few AdamW steps on next-token loss, so every adapter tensor moves away from its init."""
    optimizer = torch.optim.AdamW(parameter_groups(spec, model, weight_decay=0.01), lr=0.05)
    model.train()
    for _ in range(steps):
        spec.prepare_batch(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _adapted(name: str) -> tuple[AdapterSpec, nn.Module]:
    spec = adapter_spec(CASES[name].make())
    return spec, spec.apply(make_tiny_llama())


@pytest.fixture(params=sorted(CASES))
def case_name(request) -> str:
    return request.param


def test_logits_equal_the_base_at_initialisation(case_name):
    batch = _batch()
    expected = _logits(FullFineTune(), make_tiny_llama(), batch)
    spec, model = _adapted(case_name)
    torch.testing.assert_close(_logits(spec, model, batch), expected, rtol=0, atol=0)


def test_only_the_adapter_trains(case_name):
    spec, model = _adapted(case_name)
    declared = spec.adapter_tensors(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert set(trainable) <= set(declared), sorted(set(trainable) - set(declared))[:5]
    grouped = [p for group in parameter_groups(spec, model, 0.1) for p in group["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in trainable.values()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: t.detach().clone() for n, t in declared.items()}
    _train(spec, model, _batch())
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} is frozen but changed"
    assert any(not torch.equal(t, before[n]) for n, t in declared.items()), (
        "no adapter tensor moved"
    )


def test_switched_off_adapter_gives_the_base_after_training(case_name):
    batch = _batch()
    expected = _logits(FullFineTune(), make_tiny_llama(), batch)
    spec, model = _adapted(case_name)
    _train(spec, model, batch)
    if CASES[case_name].disable is not None:
        reason = CASES[case_name].disable
        with pytest.raises(NotImplementedError, match=reason), spec.disabled(model):
            pass
        return
    assert not torch.allclose(_logits(spec, model, batch), expected), "training changed nothing"
    with spec.disabled(model):
        torch.testing.assert_close(_logits(spec, model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(_logits(spec, model, batch), expected), "the switch stayed off"


def test_save_then_load_onto_a_fresh_base_gives_identical_logits(case_name, tmp_path: Path):
    batch = _batch()
    spec, model = _adapted(case_name)
    _train(spec, model, batch)
    expected = _logits(spec, model, batch)
    spec.save(model, tmp_path / "adapter")
    loaded = spec.load(
        make_tiny_llama(seed=9 if case_name == "full_fine_tune" else 0), tmp_path / "adapter"
    )
    torch.testing.assert_close(_logits(spec, loaded.eval(), batch), expected, rtol=0, atol=0)


def test_a_bad_value_is_a_clear_error(case_name):
    case = CASES[case_name]
    with pytest.raises(ValueError, match=case.bad_message):
        case.make(**case.bad)


def test_the_checkpoint_keeps_the_adapter_and_nothing_of_the_frozen_base(case_name):
    module = MedMoEModule(
        model_name_or_path=None,
        tiny_llama=TINY_LLAMA,
        adapter=CASES[case_name].make(),
        task_names=["a", "b", "c"],
        lambda_balance=0.0,
    )
    module.configure_model()
    state = module.state_dict()
    checkpoint = {"state_dict": dict(state)}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == {f"model.{n}" for n in module.adapter.adapter_tensors(module.model)}
    frozen = {f"model.{n}" for n, p in module.model.named_parameters() if not p.requires_grad}
    assert set(state) - kept == frozen  # everything left out is the frozen base, and all of it
    # full fine-tuning: the whole model is the adapter, nothing is frozen
    assert bool(frozen) == (case_name != "full_fine_tune")


@pytest.mark.parametrize("name", ["moe_lora_soft", "multi_lora"])
def test_a_misspelled_target_module_is_one_clear_error(name):
    """Every method that replaces linear layers goes through the one injection path."""
    spec = adapter_spec(CASES[name].make(target_modules=["q_proj", "v_prj"]))
    real = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(ValueError) as error:
        spec.apply(make_tiny_llama())
    assert str(error.value) == (
        f"target module(s) ['v_prj'] not found in LlamaDecoderLayer; its linear layers are: {real}"
    )


def test_a_config_subclass_cannot_pretend_to_be_the_method():
    class Custom(MoELoRAConfig):
        def apply(self, model):  # would be silently ignored if the config were wrapped
            return model

    with pytest.raises(TypeError, match="subclass medmoe.adapters.MoELoRA"):
        adapter_spec(Custom(**{**MOE, "allocation": "eq2"}))


def test_a_trainable_tensor_the_adapter_does_not_declare_is_an_error():
    spec, model = _adapted("moe_lora_soft")
    model.lm_head.weight.requires_grad_(True)  # would train but no checkpoint would keep it
    with pytest.raises(ValueError, match="lm_head.weight trains but MoELoRA does not declare"):
        parameter_groups(spec, model, 0.0)


# ----------------------------------------------------------------- the one adapter format
FIXTURES = Path(__file__).parent / "fixtures" / "adapters_v0"


def _saved_logits(spec: AdapterSpec, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return _logits(spec, model.eval(), batch)


def test_every_method_saves_one_description_and_the_one_loader_reads_it(case_name, tmp_path):
    """save -> medmoe.adapters.load_adapted (the method read from the directory) and
    medmoe.load_adapted (from a base): the logits of the model that saved it, bit for bit."""
    import json

    import medmoe
    from medmoe.adapters import load_adapted, read_description, saved_method

    batch = _batch()
    spec, model = _adapted(case_name)
    _train(spec, model, batch)
    expected = _logits(spec, model, batch)
    spec.save(model, tmp_path / "adapter", metadata={"step": 3})

    description = read_description(tmp_path / "adapter")
    assert description.format_version == 1 and description.method == spec.method_name
    assert description.metadata == {"step": 3}
    raw = json.loads(description.path.read_text())
    assert raw["format"] == "medmoe-adapter"
    assert raw["config"] == json.loads(json.dumps(spec.config_dict()))
    assert raw["class_path"] == f"{type(spec).__module__}.{type(spec).__qualname__}"
    found = saved_method(tmp_path / "adapter")
    assert type(found) is type(spec) and found == spec  # a subclassed method comes back as itself

    seed = 9 if case_name == "full_fine_tune" else 0
    loaded = load_adapted(make_tiny_llama(seed=seed), tmp_path / "adapter")
    torch.testing.assert_close(_saved_logits(found, loaded, batch), expected, rtol=0, atol=0)
    again = medmoe.load_adapted(make_tiny_llama(seed=seed), tmp_path / "adapter")
    torch.testing.assert_close(_saved_logits(found, again, batch), expected, rtol=0, atol=0)


def test_a_peft_lora_directory_is_still_peft_s_own(tmp_path):
    """The LoRA directory loads with peft alone (an independent reader) to the same logits."""
    from peft import PeftModel

    batch = _batch()
    spec, model = _adapted("peft_lora")
    _train(spec, model, batch)
    spec.save(model, tmp_path / "lora")
    names = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "medmoe_adapter.json"]
    by_peft = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(
        _logits(spec, by_peft, batch), _logits(spec, model, batch), rtol=0, atol=0
    )


@pytest.mark.parametrize("method", ["moe_lora", "multi_lora", "peft_lora", "full_fine_tune"])
def test_directories_of_the_format_before_load_to_the_outputs_that_wrote_them(method):
    """tests/fixtures/adapters_v0 (generate.py, run with the code of that format): each loads
    through the one loader and gives the stored logits of the model that saved it."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from medmoe.adapters import load_adapted, read_description, saved_method, task_routing

    reference = load_file(FIXTURES / "reference.safetensors")
    names = {
        "moe_lora": "MoELoRA",
        "multi_lora": "MultiLoRA",
        "peft_lora": "LoRA",
        "full_fine_tune": "FullFineTune",
    }
    description = read_description(FIXTURES / method)
    assert (description.format_version, description.method) == (0, names[method])
    base = LlamaForCausalLM.from_pretrained(FIXTURES / "base").eval()
    with torch.no_grad():
        assert torch.equal(base(input_ids=reference["input_ids"]).logits, reference["base"])
    spec = saved_method(FIXTURES / method)
    model = load_adapted(base, FIXTURES / method).eval()
    routed_by_task = task_routing(spec)
    with torch.no_grad():
        if routed_by_task is not None:
            with routed_by_task.task_context(model, reference["task_ids"]):
                logits = model(input_ids=reference["input_ids"]).logits
        else:
            logits = model(input_ids=reference["input_ids"]).logits
    torch.testing.assert_close(logits, reference[method], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits, reference["base"])  # the adapter matters


def test_a_newer_format_and_an_unknown_method_are_refused_by_name(tmp_path):
    import json

    from medmoe.adapters import load_adapted, read_description

    spec, model = _adapted("moe_lora_soft")
    spec.save(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    description = json.loads(path.read_text())
    path.write_text(json.dumps({**description, "format_version": 7}))
    with pytest.raises(ValueError, match="adapter format 7, written by a newer medmoe"):
        read_description(tmp_path / "a")
    path.write_text(json.dumps({**description, "method": "Prefix"}))
    with pytest.raises(KeyError, match="no adapter method 'Prefix' is registered"):
        load_adapted(make_tiny_llama(), tmp_path / "a")


def test_a_method_refuses_another_method_s_directory(tmp_path):
    spec, model = _adapted("moe_lora_soft")
    spec.save(model, tmp_path / "moe")
    with pytest.raises(ValueError, match="holds a MoELoRA adapter, not a LoRA one"):
        LoRA(r=4).load(make_tiny_llama(), tmp_path / "moe")


# ----------------------------------------------------------------- registry and configs
class WideConfig(MoELoRAConfig):
    """A subclassed config that registers a method of its own."""


class NarrowConfig(MoELoRAConfig):
    """A subclassed config with no method of its own: it selects its parent's."""


@register_method("WideMoELoRA", config_class=WideConfig)
class WideMoELoRA(MoELoRA):
    layer_cls = SharpMoELoRALinear


def test_a_subclassed_config_selects_its_method():
    fields = {**MOE, "allocation": "eq2", "allowed_ranks": [2]}
    wide = adapter_spec(WideConfig(**fields))
    assert type(wide) is WideMoELoRA and type(wide.config) is WideConfig
    narrow = adapter_spec(NarrowConfig(**fields))
    assert type(narrow) is MoELoRA and type(narrow.config) is NarrowConfig
    assert registered_methods()["WideMoELoRA"] is WideMoELoRA
    model = wide.apply(make_tiny_llama())
    assert {type(layer) for _, layer in routed_layers(model)} == {SharpMoELoRALinear}


def test_the_method_holds_its_config_and_yaml_still_builds_it_from_the_fields():
    from jsonargparse import ArgumentParser

    assert not issubclass(MoELoRA, MoELoRAConfig)
    fields = {**MOE, "allocation": "uniform", "num_experts": 4, "top_k": 2}
    spec = MoELoRA(**fields)
    assert spec == MoELoRA(MoELoRAConfig(**fields)) and spec.top_k == 2
    assert MoELoRA.from_config_dict(spec.config_dict()) == spec
    parser = ArgumentParser()
    parser.add_argument("--adapter", type=AdapterSpec)
    parsed = parser.parse_object(
        {"adapter": {"class_path": "medmoe.adapters.MoELoRA", "init_args": fields}}
    )
    built = parser.instantiate_classes(parsed).adapter
    assert type(built) is MoELoRA and built == spec


def test_a_zero_checkpoint_of_every_method_converts_through_the_method(case_name, tmp_path):
    """A ZeRO-2 checkpoint (DeepSpeed's layout, written on CPU) of every method -> the
    method's own adapter directory, which loads onto a fresh base to the trained logits."""
    from test_zero_to_adapter import write_zero2_checkpoint

    from medmoe.adapters import load_adapted, read_description, saved_method
    from medmoe.zero_to_adapter import adapter_from_zero_checkpoint

    batch = _batch()
    spec, model = _adapted(case_name)
    _train(spec, model, batch)
    expected = _logits(spec, model, batch)
    checkpoint = write_zero2_checkpoint(tmp_path / "last.ckpt", model, spec)
    out = adapter_from_zero_checkpoint(checkpoint, tmp_path / "adapter")
    description = read_description(out)
    assert description.method == spec.method_name and description.metadata["zero_stage"] == 2
    assert saved_method(out) == spec
    seed = 9 if case_name == "full_fine_tune" else 0
    loaded = load_adapted(make_tiny_llama(seed=seed), out)
    torch.testing.assert_close(_logits(spec, loaded.eval(), batch), expected, rtol=0, atol=0)
