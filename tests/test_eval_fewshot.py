"""Few-shot prompt assembly and the fixed evaluation subset."""

from __future__ import annotations

import pytest

from medmoe.eval import few_shot_prompt, fixed_subset


def test_few_shot_prompt_assembly():
    shots = [("Q: 1+1?\nA:", " 2"), ("Q: 2+2?\nA:", " 4")]
    prompt = few_shot_prompt(shots, "Q: 3+3?\nA:")
    assert prompt == "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"
    assert few_shot_prompt([], "Q: 3+3?\nA:") == "Q: 3+3?\nA:"
    assert few_shot_prompt(shots[:1], "Q", separator="\n", target_delimiter="|") == (
        "Q: 1+1?\nA:| 2\nQ"
    )


def test_fixed_subset_is_stable_and_nested():
    items = [f"item{i}" for i in range(100)]
    subset = fixed_subset(items, 10, seed=3)
    assert len(subset) == 10 and len(set(subset)) == 10
    assert subset == fixed_subset(list(items), 10, seed=3)  # same on every call
    assert subset == sorted(subset, key=items.index)  # original order kept
    assert set(subset) <= set(fixed_subset(items, 20, seed=3))  # larger n: a superset
    assert subset != fixed_subset(items, 10, seed=4)
    assert fixed_subset(items, 1000, seed=3) == items
    assert fixed_subset(items, 0, seed=3) == []


def test_fixed_subset_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0"):
        fixed_subset([1, 2], -1, seed=0)
