"""The PEFT-style model under the real trainers, on CPU: transformers.Trainer and TRL's SFTTrainer
train a tiny Llama with Med-MoE-LoRA, the routing terms reach the routers, checkpoints hold the
adapter only and reload to the same logits; gradient checkpointing and bf16 behave as under
Lightning (non-reentrant, autocast over a float32 adapter)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import medmoe
from medmoe.adapted_model import AdaptedModel, get_adapted_model
from medmoe.adapters import MoELoRAConfig
from medmoe.adapters.baselines import FullFineTune, LoRA, MultiLoRA
from medmoe.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from medmoe.data.tokenizers import word_level_tokenizer

SMALL = dict(allowed_ranks=[2, 4], layer_ranges={"1-2": 2, "3-4": 4}, dropout=0.0)
# (prompt, completion, is_general): a domain question and a general one
PAIRS = [
    ("question : the patient has fever and cough . diagnosis ?", "answer : flu", False),
    ("question : what is two plus three ?", "answer : five", True),
    ("question : the patient has chest pain . diagnosis ?", "answer : angina", False),
    ("question : what is four plus one ?", "answer : five", True),
]
TOKENIZER = word_level_tokenizer(" ".join(p + " " + c for p, c, _ in PAIRS).split())
BASE_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _base():
    return make_tiny_llama(vocab_size=len(TOKENIZER), pad_token_id=TOKENIZER.pad_token_id)


def _rows(copies: int = 4) -> list[dict]:
    """Tokenised samples: labels -100 on the prompt, the completion and eos as targets."""
    rows = []
    for task, (prompt, completion, general) in enumerate(PAIRS * copies):
        prompt_ids = TOKENIZER(prompt)["input_ids"]
        target = TOKENIZER(completion, add_special_tokens=False)["input_ids"]
        target = [*target, TOKENIZER.eos_token_id]
        rows.append(
            {
                "input_ids": prompt_ids + target,
                "labels": [-100] * len(prompt_ids) + target,
                "is_general": general,
                "task_ids": task % 2,
            }
        )
    return rows


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    ids = padded("input_ids", TOKENIZER.pad_token_id)
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
        "labels": padded("labels", -100),
        "is_general": torch.tensor([r["is_general"] for r in rows]),
        "task_ids": torch.tensor([r["task_ids"] for r in rows]),
    }


class FirstStepGradients(TrainerCallback):
    """Before the first optimizer step (B still zero): the gradient every router and tau got."""

    def __init__(self) -> None:
        self.router: list[float] = []
        self.tau: list[float] = []
        self.b_nonzero = None
        self.checkpointing = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0:
            return
        layers = model.moe_layers
        self.router = [float(layer.router.weight.grad.abs().sum()) for layer in layers]
        self.tau = [float(layer.log_tau.grad.abs().sum()) for layer in layers]
        self.b_nonzero = sum(int(torch.count_nonzero(layer.lora_B)) for layer in layers)
        self.checkpointing = model.is_activation_checkpointing


def _args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _eval_batch() -> dict[str, torch.Tensor]:
    return _collate(_rows(1))


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **({"task_ids": batch["task_ids"]} if isinstance(model, AdaptedModel) else {}),
        ).logits


def _assert_adapter_only(checkpoint: Path, model: AdaptedModel, base_bytes: int) -> None:
    """The checkpoint holds the adapter's tensors and nothing of the base."""
    names = {p.name for p in checkpoint.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG} <= names and not names & set(BASE_FILES), names
    weights = checkpoint / ADAPTER_WEIGHTS
    tensors = model.adapter_tensors()
    # peft writes its LoRA tensors without the adapter's name ("default")
    assert set(load_file(weights)) == {k.replace(".default.", ".") for k in tensors}
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    size = weights.stat().st_size
    assert adapter_bytes <= size <= adapter_bytes + 32 * 1024 < base_bytes, (size, base_bytes)
    # the optimizer state covers the adapter's tensors only (two moments each)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(tensors)


def _base_bytes() -> int:
    return sum(p.numel() * p.element_size() for p in _base().parameters())


def test_trainer_trains_med_moe_lora_and_checkpoints_the_adapter_only(tmp_path):
    model = get_adapted_model(_base(), MoELoRAConfig(**SMALL))
    optimizer = torch.optim.AdamW(
        model.parameter_groups(learning_rate=1e-2, router_learning_rate=2e-2), lr=1e-2
    )
    grads = FirstStepGradients()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_rows(),
        data_collator=_collate,
        optimizers=(optimizer, None),
        callbacks=[grads],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # B was zero at the first step: only the routing terms could give routers and tau gradient
    assert grads.b_nonzero == 0
    assert min(grads.router) > 0 and min(grads.tau) > 0
    assert any(torch.count_nonzero(layer.lora_B) for layer in model.moe_layers)
    assert trainer.evaluate(eval_dataset=_rows(1))["eval_loss"] > 0

    checkpoint = tmp_path / "checkpoint-4"
    _assert_adapter_only(checkpoint, model, _base_bytes())
    batch = _eval_batch()
    trained = _logits(model, batch)
    assert torch.equal(_logits(AdaptedModel.from_pretrained(_base(), checkpoint), batch), trained)
    # the adapter a Trainer wrote loads with medmoe.load_adapted (as medmoe predict does)
    assert torch.equal(_logits(medmoe.load_adapted(_base(), checkpoint), batch), trained)
    # save_model into the output_dir keeps the checkpoints beside the adapter
    trainer.save_model()
    assert (tmp_path / ADAPTER_WEIGHTS).is_file() and (checkpoint / "optimizer.pt").is_file()


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param(dict(gradient_checkpointing=True), id="gradient_checkpointing"),
        pytest.param(dict(bf16=True), id="bf16"),
    ],
)
def test_trainer_gradient_checkpointing_and_bf16_behave_as_under_lightning(tmp_path, setting):
    """Non-reentrant checkpointing keeps the routing gradient; bf16 on CPU is autocast over the
    float32 base and adapter, which stay float32."""
    model = get_adapted_model(_base(), MoELoRAConfig(**SMALL))
    dtypes: list[torch.dtype] = []  # what an adapted linear computes in
    model.moe_layers[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    grads = FirstStepGradients()
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=1, save_steps=10, **setting)
    trainer = Trainer(
        model=model, args=args, train_dataset=_rows(), data_collator=_collate, callbacks=[grads]
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert min(grads.router) > 0 and min(grads.tau) > 0
    assert grads.checkpointing is bool(setting.get("gradient_checkpointing"))
    assert {t.dtype for t in model.adapter_tensors().values()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert set(dtypes) == {torch.bfloat16 if setting.get("bf16") else torch.float32}


@pytest.mark.parametrize("name", ["lora", "multi_lora", "full"])
def test_trainer_trains_every_baseline(tmp_path, name):
    """LoRA and multi-LoRA (task_ids per sample) checkpoint their adapter; full fine-tuning the
    whole model. Each checkpoint reloads to the trained logits."""
    adapter = {
        "lora": lambda: LoRA(r=4, dropout=0.0),
        "multi_lora": lambda: MultiLoRA(task_names=["a", "b"], r=4, dropout=0.0),
        "full": FullFineTune,
    }[name]()
    model = get_adapted_model(_base(), adapter)
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=1, save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), data_collator=_collate)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    if name == "full":
        assert "model.safetensors" in names and ADAPTER_CONFIG not in names
    else:
        _assert_adapter_only(checkpoint, model, _base_bytes())
    batch = _eval_batch()
    trained = _logits(model, batch)
    assert torch.equal(_logits(AdaptedModel.from_pretrained(_base(), checkpoint), batch), trained)


def _sft_dataset():
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(
        [{"prompt": p, "completion": " " + c} for p, c, _ in PAIRS * 4]
    )


def _sft_args(output_dir: Path, **overrides):
    trl = pytest.importorskip("trl")
    values = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
        seed=0,
    )
    values.update(overrides)
    return trl.SFTConfig(**values)


def test_sft_trainer_trains_med_moe_lora_with_the_routing_terms(tmp_path):
    """SFTTrainer computes the task loss itself (TRL's fused LM head); the routing terms come
    back as the model's aux_loss, which it adds (and logs) as for transformers' MoE models."""
    from trl import SFTTrainer

    model = get_adapted_model(_base(), MoELoRAConfig(**SMALL), lambda_kp=0.0)
    grads = FirstStepGradients()
    trainer = SFTTrainer(
        model=model,
        args=_sft_args(tmp_path),
        train_dataset=_sft_dataset(),
        processing_class=TOKENIZER,
        callbacks=[grads],
    )
    assert trainer.aux_loss_enabled
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["aux_loss"] > 0 for h in logs)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert grads.b_nonzero == 0 and min(grads.router) > 0 and min(grads.tau) > 0
    assert grads.checkpointing  # SFTConfig's default, non-reentrant
    checkpoint = tmp_path / "checkpoint-4"
    _assert_adapter_only(checkpoint, model, _base_bytes())
    batch = _eval_batch()
    # SFTConfig trains in bf16 by default: accelerate left its autocast on the model's forward,
    # so the trained logits come from the wrapped causal LM itself, in float32
    trained = _logits(model.get_base_model(), batch)
    assert torch.equal(_logits(AdaptedModel.from_pretrained(_base(), checkpoint), batch), trained)


def test_sft_trainer_router_aux_loss_coef_zero_turns_the_routing_terms_off(tmp_path):
    from trl import SFTTrainer

    model = get_adapted_model(_base(), MoELoRAConfig(**SMALL), lambda_kp=0.0)
    grads = FirstStepGradients()
    args = _sft_args(tmp_path, max_steps=1, save_steps=10, router_aux_loss_coef=0.0)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_sft_dataset(),
        processing_class=TOKENIZER,
        callbacks=[grads],
    )
    trainer.train()
    assert not trainer.aux_loss_enabled and max(grads.router) == 0 and max(grads.tau) == 0


def test_an_adapter_from_medmoe_fit_loads_into_the_adapted_model(trained_run):
    adapter = trained_run / "adapter"
    model = AdaptedModel.from_pretrained("toy", adapter)
    reference = medmoe.load_adapted("toy", adapter)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert os.path.samefile(Path(model.name_or_path), Path(reference.name_or_path))


def test_an_adapter_from_the_trainer_serves_medmoe_predict(trained_run, tmp_path):
    """Trained by the Trainer on the toy base with the demo's adapter config, the checkpoint is
    what `medmoe predict --adapter_dir` reads: its scores are load_adapted's."""
    import json

    from test_predict import predict, read_lines

    from medmoe.adapters.state import read_adapter_config
    from medmoe.data import MultiTaskDataModule, toy_base_path
    from medmoe.eval import MultipleChoiceExample, score_multiple_choice

    tokenizer = MultiTaskDataModule(tokenizer="toy").tokenizer
    config = read_adapter_config(trained_run / "adapter")  # the demo's, as the CLI builds it
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(toy_base_path())
    model = get_adapted_model(base, config)
    prompt = "Question: Is fever a symptom of pneumonia ?\nAnswer:"
    prompt_ids = tokenizer(prompt)["input_ids"]
    target = [*tokenizer(" yes", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    row = {"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target}
    rows = [{**row, "is_general": False, "task_ids": 0}] * 8
    args = _args(tmp_path / "run", max_steps=2, gradient_accumulation_steps=1, save_steps=2)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt, "choices": [" yes", " no"]}) + "\n")
    out = tmp_path / "scores.jsonl"
    predict(
        "--adapter_dir", str(checkpoint), "--prompts", str(prompts), "--mode", "score",
        "--output", str(out),
    )  # fmt: skip
    [line] = read_lines(out)
    example = MultipleChoiceExample(prompt, (" yes", " no"), 0)
    expected = score_multiple_choice(medmoe.load_adapted("toy", checkpoint), tokenizer, [example])
    assert line["scores"] == pytest.approx(expected.loglikelihoods[0].tolist(), rel=1e-6)
