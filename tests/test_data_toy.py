"""The toy clinic: determinism, disjoint splits, upstream schemas, a closed vocabulary."""

from __future__ import annotations

from collections import Counter

import pytest

from medmoe.data.sources import load_records
from medmoe.data.tasks import get_task
from medmoe.data.tokenizers import toy_tokenizer
from medmoe.data.toy_clinic import (
    ATTRIBUTES,
    DISEASES,
    FACTS,
    TOY_TASKS,
    check_world,
    toy_records,
)

SPLITS = ("train", "validation", "test")


def test_letters_are_balanced():
    answers = Counter(r["answer"] for r in toy_records("mmlu", "train"))
    assert all(0.2 < answers[i] / 2000 < 0.3 for i in range(4))
    letters = Counter(r["answer_idx"] for r in toy_records("medqa", "train"))
    assert all(0.2 < letters[k] / 2000 < 0.3 for k in "ABCD")


def test_generator_is_deterministic():
    for task in TOY_TASKS:
        assert toy_records(task, "train", 50) == toy_records(task, "train", 50)
        assert toy_records(task, "test", 20) == toy_records(task, "test")[:20]  # prefixes agree
    assert toy_records("mmlu", "test", 20, seed=1) != toy_records("mmlu", "test", 20)


@pytest.mark.parametrize("task", TOY_TASKS)
def test_splits_are_disjoint_and_valid(task):
    t = get_task(task)
    prompts = {s: {t.format(r)[0] for r in toy_records(task, s)} for s in SPLITS}
    assert [len(prompts[s]) for s in SPLITS] == [2000, 200, 200]  # no duplicates either
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    for record in toy_records(task, "test", 50):
        t.validate(record)  # the real task's schema checks pass


def test_toy_source_maps_the_task_train_split():
    assert load_records("mmlu", "toy", "auxiliary_train")[:3] == toy_records("mmlu", "train", 3)
    with pytest.raises(ValueError, match="unknown toy split 'dev'"):
        load_records("mmlu", "toy", "dev")


def test_no_unk_and_short_sequences():
    tok = toy_tokenizer()
    assert 250 <= len(tok) <= 280
    longest = 0
    for task in TOY_TASKS:
        t = get_task(task).styled("toy")  # the toy clinic's own format
        for split in SPLITS:
            pairs = [t.format(r) for r in toy_records(task, split)]
            ids = tok([p + tg for p, tg in pairs])["input_ids"]
            assert all(tok.unk_token_id not in row for row in ids), task
            longest = max(longest, *map(len, ids))
    assert longest < 48  # prompt + target (with <s>), well under 64 word tokens


def test_world_is_well_posed():
    check_world()
    for animal, attrs in FACTS.items():
        assert set(attrs) == {"color", "habitat", "diet"}, animal
    record = toy_records("medqa", "test", 1)[0]
    disease = record["options"][record["answer_idx"]]
    assert disease == record["answer"] and disease in DISEASES
    assert set(record["metamap_phrases"][1:]) <= set(DISEASES[disease][0])


def test_answers_follow_the_world():
    for record in toy_records("mmlu", "test", 30):
        animal = next(w for w in record["question"].split() if w in FACTS)
        assert record["choices"][record["answer"]] == FACTS[animal][record["subject"]]
        order = ATTRIBUTES[record["subject"]]
        assert record["choices"] == sorted(record["choices"], key=order.index)  # canonical order
    for record in toy_records("gsm8k", "test", 30):
        numbers = [int(w) for w in record["question"].split() if w.isdigit()]
        assert record["answer"].endswith(f"#### {sum(numbers)}")
    for record in toy_records("clinical_sum", "test", 30):
        disease = next(d for d, (_, drug) in DISEASES.items() if f" {drug} " in record["text"])
        assert f" with {disease} on " in record["summary"]
    for record in toy_records("pubmedqa", "test", 30):
        result = record["context"]["contexts"][1]
        decision = "no" if " did not " in result else "maybe" if " may " in result else "yes"
        assert record["final_decision"] == decision
