"""Knowledge preservation: the KP loss's optimum separates general from domain routing as the
docs state (docs/mechanisms.md), and base groups sized as halves."""

from __future__ import annotations

import pytest
import torch
from conftest import MODULE_TINY_LLAMA

from medmoe.adapters import MoELoRAConfig
from medmoe.model import MedMoEModule
from medmoe.objectives import layer_knowledge_preservation_loss


def _optimum_base_shares(num_experts: int, num_base: int, delta: float) -> tuple[float, float]:
    """Minimise the KP loss over free gates of one general and one domain sample (float64)."""
    logits = torch.zeros(2, 1, num_experts, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # start away from uniform, the wrong way round
        logits[0, 0, num_base:] += 1.0
        logits[1, 0, :num_base] += 1.0
    is_general = torch.tensor([True, False])
    optimizer = torch.optim.LBFGS(
        [logits], max_iter=500, tolerance_grad=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = layer_knowledge_preservation_loss(
            logits.softmax(-1), is_general, num_base, delta=delta
        )
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    gates = logits.detach().softmax(-1)[:, 0]  # [2, N]
    return float(gates[0, :num_base].sum()), float(gates[1, :num_base].sum())


@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("delta", [0.1, 0.5])
def test_halves_give_general_samples_one_plus_delta_over_two_of_their_gate(num_experts, delta):
    general, domain = _optimum_base_shares(num_experts, num_experts // 2, delta)
    # the docs: base share (1 + delta) / 2 for general samples, (1 - delta) / 2 for domain
    assert general == pytest.approx((1 + delta) / 2, abs=1e-4)
    assert domain == pytest.approx((1 - delta) / 2, abs=1e-4)


def test_one_base_expert_of_eight_at_delta_0_1_barely_separates():
    # the finding: med.yaml's old setting gives general samples ~0.15 on the base expert
    # against 0.125 for a uniform router
    general, domain = _optimum_base_shares(8, 1, 0.1)
    assert 0.13 < general < 0.16 and general - domain < 0.05


def test_base_expert_fraction_sizes_each_layer_in_halves():
    config = MoELoRAConfig(allocation="eq2", n_min=2, n_max=8, base_expert_fraction=0.5)
    counts = config.layer_expert_counts(4)  # 3, 5, 6, 8
    assert [config.base_experts_for(n) for n in counts] == [1, 2, 3, 4]
    assert config.base_experts_for(2) == 1
    with pytest.raises(ValueError, match="base_expert_fraction"):
        MoELoRAConfig(base_expert_fraction=1.0)


def test_applied_layers_carry_their_own_base_group(tiny_llama):
    from medmoe.adapters import apply_moe_lora

    config = MoELoRAConfig(layer_ranges={"1-2": 2, "3-4": 6}, base_expert_fraction=0.5)
    layers = apply_moe_lora(tiny_llama, config)
    assert {(layer.num_experts, layer.num_base_experts) for layer in layers} == {(2, 1), (6, 3)}


def test_a_knowledge_preservation_weight_without_base_experts_is_refused() -> None:
    """L_kp routes general tokens to the base group: with none, a configured lambda_kp would do
    nothing, so the model build refuses it (naming the key and both ways out)."""

    def module(lambda_kp: float) -> MedMoEModule:
        adapter = MoELoRAConfig(
            allocation="uniform", num_experts=2, num_base_experts=0, base_expert_fraction=None
        )
        return MedMoEModule(
            tiny_llama=MODULE_TINY_LLAMA, adapter=adapter, vocab_size=64, lambda_kp=lambda_kp
        )

    with pytest.raises(ValueError, match=r"lambda_kp=1.0 but no routed layer has base experts"):
        module(1.0).configure_model()
    module(0.0).configure_model()  # without the loss the same adapter builds
