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


# --------------------------------------------------------------- depth-fraction default
def test_default_config_reproduces_the_papers_counts_at_32_layers():
    counts = MoELoRAConfig().layer_expert_counts(32)
    assert counts[:10] == [2] * 10  # the paper's L_1-10: N = 2
    assert counts[19:] == [8] * 13  # the paper's L_20-32: N = 8
    # layers 11-19, on which the paper is silent, follow eq 2 (N_min 2, N_max 8, gamma 1)
    assert counts[10:19] == [2 + math.floor(6 * layer / 32) for layer in range(11, 20)]
    explicit = MoELoRAConfig(allocation="ranges", layer_ranges={"1-10": 2, "20-32": 8})
    assert explicit.layer_expert_counts(32) == counts


@pytest.mark.parametrize("depth", [4, 24, 32])
def test_default_config_applies_to_tiny_llamas_of_any_depth(depth):
    from conftest import make_tiny_llama

    from medmoe.adapters import apply_moe_lora

    model = make_tiny_llama(num_hidden_layers=depth, hidden_size=16, intermediate_size=16)
    config = MoELoRAConfig(allowed_ranks=[1, 2], target_modules=["q_proj"])
    layers = apply_moe_lora(model, config)
    per_layer = [layer.num_experts for layer in layers]
    assert per_layer == config.layer_expert_counts(depth)
    top_third = per_layer[-(depth // 3) :]
    assert per_layer[0] == 2 and top_third == [8] * len(top_third)


def test_depth_ranges_select_layers_by_exact_fraction():
    from medmoe.adapters.allocation import depth_ranges_to_layer_ranges, parse_depth_range

    assert list(parse_depth_range("0-10/32", 32)) == list(range(1, 11))
    assert list(parse_depth_range("19/32-1", 32)) == list(range(20, 33))
    assert list(parse_depth_range("0.5-1", 4)) == [3, 4]
    assert list(parse_depth_range("0-0.1", 4)) == []  # too narrow to hold a layer at L=4
    assert depth_ranges_to_layer_ranges({"0-10/32": 2, "19/32-1": 8}, 24) == {
        "1-7": 2,
        "15-24": 8,
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0.5", "LOW-HIGH"),
        ("a-1", "not a fraction"),
        ("0-1.5", r"\[0, 1\]"),
        ("0.6-0.2", "LOW < HIGH"),
    ],
)
def test_bad_depth_ranges_are_refused_with_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        MoELoRAConfig(depth_ranges={spec: 2})


def test_layer_ranges_given_without_allocation_are_used():
    config = MoELoRAConfig(layer_ranges={"1-2": 3, "3-4": 4})
    assert config.allocation == "ranges" and config.layer_expert_counts(4) == [3, 3, 4, 4]
    assert MoELoRAConfig().allocation == "depth_ranges"


def test_docs_show_the_default_plan_that_the_code_gives():
    from pathlib import Path

    from medmoe.adapters.plan_table import allocation_plan_table

    table = allocation_plan_table(MoELoRAConfig(), (4, 16, 24, 28, 32))
    docs = (Path(__file__).parents[1] / "docs" / "mechanisms.md").read_text()
    assert table in docs
