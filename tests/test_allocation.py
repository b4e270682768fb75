"""Layer-wise expert allocation (eq 2 and the explicit forms) and rank assignment."""

from __future__ import annotations

import math

import pytest

from medmoe.adapters import (
    MoELoRAConfig,
    assign_ranks,
    bottom_heavy_counts,
    counts_from_ranges,
    expert_counts,
    uniform_counts,
)


def test_eq2_by_hand():
    # L = 4, N_min = 2, N_max = 8, gamma = 1: 2 + floor(6 * l / 4) = 3, 5, 6, 8
    assert expert_counts(4, 2, 8, 1.0) == [3, 5, 6, 8]
    # gamma = 2: 2 + floor(6 * (l/4)^2) = 2 + floor(0.375, 1.5, 3.375, 6) = 2, 3, 5, 8
    assert expert_counts(4, 2, 8, 2.0) == [2, 3, 5, 8]


def test_eq2_against_the_formula_for_llama3_depth():
    for gamma in (1.0, 1.5, 3.0):
        counts = expert_counts(32, 2, 8, gamma)
        assert counts == [2 + math.floor(6 * (layer / 32) ** gamma) for layer in range(1, 33)]
        assert counts[-1] == 8 and counts == sorted(counts)


def test_paper_experiment_ranges():
    fill = expert_counts(32, 2, 8, 1.0)
    counts = counts_from_ranges(32, {"1-10": 2, "20-32": 8}, fill=fill)
    assert counts[:10] == [2] * 10 and counts[19:] == [8] * 13
    assert counts[10:19] == fill[10:19]
    # Table 3's reading: the top block starts at 23
    table3 = counts_from_ranges(32, {"1-10": 2, "11-22": 4, "23-32": 8})
    assert table3[22:] == [8] * 10 and table3[10] == 4
    assert MoELoRAConfig().layer_expert_counts(32) == counts


def test_uniform_and_bottom_heavy():
    assert uniform_counts(3, 4) == [4, 4, 4]
    assert bottom_heavy_counts(4, 2, 8) == [8, 6, 5, 3]


def test_range_errors():
    with pytest.raises(ValueError, match="covered by more than one range"):
        counts_from_ranges(8, {"1-4": 2, "4-8": 8})
    with pytest.raises(ValueError, match=r"layers \[5, 6\] are covered by no range"):
        counts_from_ranges(6, {"1-4": 2})
    with pytest.raises(ValueError, match="not of the form"):
        counts_from_ranges(6, {"first half": 2})


def test_rank_patterns():
    assert assign_ranks(2) == [8, 16]
    assert assign_ranks(8) == [8, 16, 32, 8, 16, 32, 8, 16]
    assert assign_ranks(2, pattern="spread") == [8, 32]
    assert assign_ranks(5, pattern="spread") == [8, 8, 16, 32, 32]
    assert assign_ranks(8, pattern="spread") == [8, 8, 16, 16, 16, 16, 32, 32]
    assert assign_ranks(3, pattern="equal", rank=16) == [16, 16, 16]
    with pytest.raises(ValueError, match="outside the allowed set"):
        assign_ranks(3, pattern="equal", rank=12)


def test_eq2_errors():
    with pytest.raises(ValueError, match="must not exceed"):
        expert_counts(4, 9, 8)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        expert_counts(4, 2, 8, 0.9)


def test_a_layer_without_specialists_is_rejected():
    config = MoELoRAConfig(allocation="uniform", num_experts=1, num_base_experts=1)
    with pytest.raises(ValueError, match="no specialist"):
        config.layer_expert_counts(4)
