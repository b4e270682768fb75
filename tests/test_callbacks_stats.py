"""Routing statistics, layer names, tables and step cadence on hand-made inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from medmoe.adapters import MoELoRAConfig, apply_moe_lora
from medmoe.callbacks import (
    coefficient_of_variation,
    expert_utilisation,
    group_base_share,
    router_entropy,
    routing_mask,
    task_gate_sums,
)
from medmoe.callbacks.figures import heatmap_image
from medmoe.callbacks.naming import adapted_layers
from medmoe.callbacks.table_format import general_table, medical_table, to_csv, to_markdown
from medmoe.callbacks.temperature import at_clamp_bound
from medmoe.callbacks.writers import StepCadence


def _uniform(b: int, t: int, n: int) -> torch.Tensor:
    return torch.full((b, t, n), 1.0 / n)


def _one_hot(b: int, t: int, n: int, expert: int) -> torch.Tensor:
    gates = torch.zeros(b, t, n)
    gates[..., expert] = 1.0
    return gates


@pytest.mark.parametrize("n", [2, 3, 8])
def test_entropy_of_uniform_is_ln_n_and_of_one_hot_is_zero(n: int) -> None:
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert router_entropy(_uniform(2, 5, n), mask).item() == pytest.approx(math.log(n), abs=1e-6)
    assert router_entropy(_one_hot(2, 5, n, n - 1), mask).item() == pytest.approx(0.0, abs=1e-7)


def test_padding_is_masked_out() -> None:
    # real tokens route uniformly, padding tokens all to expert 2
    gates = _uniform(2, 4, 3)
    gates[1, 2:] = torch.tensor([0.0, 0.0, 1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    utilisation = expert_utilisation(gates, mask)
    assert torch.allclose(utilisation, torch.full((3,), 1 / 3))
    assert utilisation.sum().item() == pytest.approx(1.0)
    assert router_entropy(gates, mask).item() == pytest.approx(math.log(3), abs=1e-6)
    assert coefficient_of_variation(utilisation).item() == pytest.approx(0.0, abs=1e-6)
    # unmasked, the padding shifts utilisation towards expert 2
    unmasked = expert_utilisation(gates, torch.ones_like(mask))
    assert unmasked[2] > unmasked[0]
    assert unmasked.sum().item() == pytest.approx(1.0)


def test_coefficient_of_variation_of_one_expert_is_sqrt_n_minus_1() -> None:
    assert coefficient_of_variation(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(
        math.sqrt(3)
    )


def test_routing_mask_all_and_target() -> None:
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100]]),
    }
    assert routing_mask(batch, "all").tolist() == [[True, True, True, True, False]]
    # positions 1 and 2 predict the target tokens at 2 and 3
    assert routing_mask(batch, "target").tolist() == [[False, True, True, False, False]]
    with pytest.raises(ValueError, match="tokens"):
        routing_mask(batch, "prompt")


def test_group_base_share_separates_general_and_domain() -> None:
    gates = torch.cat([_one_hot(1, 3, 4, 0), _one_hot(1, 3, 4, 2)])  # general -> base expert 0
    mask = torch.ones(2, 3, dtype=torch.bool)
    general, domain = group_base_share(gates, mask, torch.tensor([True, False]), 1)
    assert general.item() == pytest.approx(1.0)
    assert domain.item() == pytest.approx(0.0)
    general, domain = group_base_share(gates, mask, torch.tensor([False, False]), 1)
    assert math.isnan(general.item())
    assert domain.item() == pytest.approx(0.5)


def test_task_gate_sums_average_per_task() -> None:
    gates = torch.cat([_one_hot(1, 2, 3, 0), _one_hot(1, 2, 3, 1), _uniform(1, 2, 3)])
    mask = torch.ones(3, 2, dtype=torch.bool)
    mask[2, 1] = False
    sums, counts = task_gate_sums(gates, mask, torch.tensor([0, 0, 2]), num_tasks=4)
    assert counts.tolist() == [4.0, 0.0, 1.0, 0.0]
    assert torch.allclose(sums[0] / counts[0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(sums[2], torch.full((3,), 1 / 3))


def test_mismatched_mask_raises() -> None:
    with pytest.raises(ValueError, match="do not match"):
        router_entropy(_uniform(2, 3, 2), torch.ones(2, 4, dtype=torch.bool))


def test_adapted_layer_names() -> None:
    model = make_tiny_llama(num_hidden_layers=3)
    config = MoELoRAConfig(
        target_modules=["q_proj", "down_proj"],
        allocation="uniform",
        num_experts=2,
        allowed_ranks=[4],
        rank_pattern="equal",
    )
    apply_moe_lora(model, config)
    layers = adapted_layers(model)
    assert [a.name for a in layers] == [
        f"L{i:02d}.{m}" for i in range(3) for m in ("q_proj", "down_proj")
    ]
    assert [a.block for a in layers][:2] == ["L00", "L00"]
    assert adapted_layers(make_tiny_llama()) == []


def test_at_clamp_bound() -> None:
    tau = torch.tensor([0.1, 0.5, 10.0, 9.99])
    assert at_clamp_bound(tau, 0.1, 10.0).tolist() == [True, False, True, False]


def test_step_cadence_counts_each_step_once() -> None:
    trainer = SimpleNamespace(global_step=0)
    cadence = StepCadence(4, "test")
    due = []
    for step in [0, 1, 2, 3, 4, 4, 5, 8, 8]:  # repeated steps: accumulated micro-batches
        trainer.global_step = step
        due.append(cadence.due(trainer))
    assert due == [False, False, False, False, True, False, False, True, False]
    with pytest.raises(ValueError, match=">= 1"):
        StepCadence(0, "test")


def test_tables_markdown_and_csv() -> None:
    base = {"pubmedqa": 0.5, "medqa": 0.25, "mmlu": 0.6, "gsm8k": 0.4}
    ours = {"pubmedqa": 0.75, "medqa": 0.5, "mmlu": 0.55, "gsm8k": 0.4}
    medical = medical_table([("Base Model", base), ("Ours", ours), ("FFT", None)])
    markdown = to_markdown(medical)
    assert "| Method | PubMedQA | MedQA | Clinical-Sum | Average |" in markdown
    assert "| Ours | 75.0 | 50.0 | n/a | 62.5 |" in markdown
    assert "| FFT | n/a | n/a | n/a | n/a |" in markdown
    general = general_table(base, [("Ours", ours)])
    markdown = to_markdown(general)
    assert "| Base Model | 60.0 | - | 40.0 | - |" in markdown
    assert "| Ours | 55.0 | -5.0 | 40.0 | +0.0 |" in markdown
    csv_text = to_csv(general_table(None, [("Ours", {"mmlu": 0.5})]))
    assert csv_text.splitlines() == [
        "Method,MMLU,Δ,GSM8K,Δ",
        "Base Model,n/a,-,n/a,-",
        "Ours,50.00,n/a,n/a,n/a",
    ]


def test_heatmap_image_with_padding() -> None:
    values = np.array([[0.5, 0.5, np.nan], [0.2, 0.3, 0.5]])
    image = heatmap_image(values, ["L00", "L01"], ["e0", "e1", "e2"], "t", base_columns=1)
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
