"""A trained adapter scored by lm-evaluation-harness itself (offline, tiny local Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.adapters import MoELoRAConfig, apply_moe_lora, moe_lora_layers, save_adapter
from medmoe.data.eval_protocol import build_eval_examples
from medmoe.data.tasks import get_task
from medmoe.data.tokenizers import byte_level_tokenizer
from medmoe.eval import evaluate_examples
from medmoe.eval.harness import harness_lm, load_adapted_for_harness

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.evaluator import evaluate  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

SMALL = dict(allowed_ranks=[2, 4], layer_ranges={"1-1": 2, "2-2": 3}, dropout=0.0)
RECORDS = [
    {"question": f"Which nerve supplies muscle {i}?", "subject": "anatomy",
     "choices": ["vagus", "facial", "ulnar", "radial"], "answer": i % 4}
    for i in range(6)
]  # fmt: skip


def tiny_base(tmp_path):
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return model, tokenizer


def trained_adapter(tmp_path, seed: int = 3):
    """``tmp_path/base`` (a tiny Llama) and ``tmp_path/adapter`` (MoE-LoRA, B away from zero)."""
    model, tokenizer = tiny_base(tmp_path)
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_lora_layers(model):  # a "trained" adapter: B away from zero
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    save_adapter(model, tmp_path / "adapter")
    return model, tokenizer


def test_adapted_model_through_hflm_equals_medmoe_scorer(tmp_path):
    trained_adapter(tmp_path)

    adapted, tok = load_adapted_for_harness(
        tmp_path / "base", tmp_path / "adapter", torch_dtype=torch.float32
    )
    assert len(moe_lora_layers(adapted)) == 2 * 7

    # The harness's own MMLU anatomy task over local files, run by its evaluator.
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    test.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[2:]))
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks/mmlu/default/mmlu_anatomy.yaml")
    config |= {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"dev": str(dev), "test": str(test)}},
        "num_fewshot": 2,
    }
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)
    lm = harness_lm(adapted, tok, batch_size=4)
    results = evaluate(lm, {"mmlu_anatomy": task}, bootstrap_iters=0, log_samples=True)
    harness_acc = results["results"]["mmlu_anatomy"]["acc,none"]

    examples = build_eval_examples(get_task("mmlu"), RECORDS[2:], range(4), RECORDS[:2], 2)
    ours = evaluate_examples(adapted, tok, examples, "accuracy", batch_size=2)
    assert ours["accuracy"] == pytest.approx(harness_acc)
    # the harness's logged requests carry exactly medmoe's prompts and choices
    for sample, ex in zip(results["samples"]["mmlu_anatomy"], examples, strict=True):
        assert [tuple(a) for a in sample["arguments"]] == [(ex.prompt, c) for c in ex.choices]
