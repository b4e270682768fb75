"""TaskScorer's few-shot demonstrations: the task's split and sampler, or the scorer's override."""

from __future__ import annotations

from types import SimpleNamespace

from medmoe.callbacks.scoring import TaskScorer
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.data.toy_clinic import toy_records


def test_shots_default_to_the_task_training_split():
    data = MultiTaskDataModule(
        tasks=[TaskConfig("medqa", source="toy")],
        replay=[TaskConfig("mmlu", source="toy", split="validation")],  # e.g. MMLU's dev/aux
        batch_size=4,
    )
    trainer = SimpleNamespace(datamodule=data)
    [mmlu] = TaskScorer(split="test", limit=1, shots=2)._fetch(trainer, "mmlu")
    # first n of the training split's records of the same subject (MMLU's pools are per subject)
    shots = [r for r in toy_records("mmlu", "validation") if r["subject"] == mmlu.subject][:2]
    assert mmlu.prompt.startswith(f"Question: {shots[0]['question']}\n")
    assert f"\n\nQuestion: {shots[1]['question']}\n" in mmlu.prompt
    [medqa] = TaskScorer(split="test", limit=1, shots=1)._fetch(trainer, "medqa")
    assert toy_records("medqa", "train")[0]["question"] in medqa.prompt
    [override] = TaskScorer(split="test", limit=1, shots=1, shot_split="validation")._fetch(
        trainer, "medqa"
    )
    assert toy_records("medqa", "validation")[0]["question"] in override.prompt


def test_generation_settings_come_from_the_task_unless_overridden():
    data = MultiTaskDataModule(
        tasks=[TaskConfig("clinical_sum", source="toy")],
        replay=[TaskConfig("gsm8k", source="tests/fixtures/gsm8k.jsonl")],
        batch_size=4,
        tokenizer="byte",
    )
    trainer = SimpleNamespace(datamodule=data)
    harness = {"stop": ("Question:", "</s>", "<|im_end|>"), "max_new_tokens": 256}
    assert TaskScorer()._generation(trainer, "gsm8k") == harness
    assert TaskScorer()._generation(trainer, "clinical_sum") == {
        "stop": ("\n\n",),
        "max_new_tokens": 64,
    }
    assert TaskScorer(max_new_tokens=8)._generation(trainer, "gsm8k")["max_new_tokens"] == 8


def test_callbacks_score_real_data_with_the_harness_rendering_on_a_fixed_subset(tmp_path):
    import shutil

    from medmoe.data.eval_protocol import build_eval_examples
    from medmoe.data.records import fixed_subset
    from medmoe.data.sources import load_records
    from medmoe.data.tasks import get_task

    for split in ("dev", "test"):  # a local copy of cais/mmlu with its dev split
        shutil.copy("tests/fixtures/mmlu.jsonl", tmp_path / f"{split}.jsonl")
    data = MultiTaskDataModule(
        tasks=[TaskConfig("medqa", source="tests/fixtures/medqa.jsonl")],
        replay=[TaskConfig("mmlu", source=str(tmp_path))],
        batch_size=4,
        tokenizer="byte",
    )
    trainer = SimpleNamespace(datamodule=data)
    scorer = TaskScorer(split="test", limit=3, shots=1)  # each subject has one dev record
    examples = scorer._fetch(trainer, "mmlu")
    records = load_records("mmlu", str(tmp_path), "test")
    positions = fixed_subset(range(len(records)), 3)
    dev = load_records("mmlu", str(tmp_path), "dev")
    expected = build_eval_examples(get_task("mmlu"), records, positions, dev, 1)
    assert examples == expected and len(examples) == 3
    assert examples[0].prompt.startswith("The following are multiple choice questions")
    assert TaskScorer(split="test", limit=3, shots=1)._fetch(trainer, "mmlu") == examples
    medqa = TaskScorer(split="test", limit=2)._fetch(trainer, "medqa")  # 0-shot by default
    assert all(ex.prompt.startswith("Question: ") for ex in medqa)


def test_chat_template_switch_needs_a_template():
    import pytest

    data = MultiTaskDataModule(
        tasks=[TaskConfig("medqa", source="tests/fixtures/medqa.jsonl")],
        replay=[],
        tokenizer="byte",
        apply_chat_template=True,
    )
    with pytest.raises(ValueError, match="has no chat template"):
        data.eval_records.eval_examples("medqa", split="test", limit=1)
    data.tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"
    [example] = data.eval_records.eval_examples("medqa", split="test", limit=1)
    assert example.prompt.startswith("[Question: ") and example.prompt.endswith("Answer:]>")
    assert example.choices == ("A", "B", "C", "D")
