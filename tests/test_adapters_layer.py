"""MoELoRALinear against independent references: a float64 per-expert loop and peft's LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from medmoe.adapters import MoELoRALinear


def _randomised_layer(ranks, dtype=torch.float64, **kwargs) -> MoELoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=True, dtype=dtype)
    layer = MoELoRALinear(base, ranks, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every expert
        layer.router.weight.normal_()
    return layer


def _reference_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Per-expert loop in float64, written from eq 1, 3 and 4 without the layer's helpers."""
    x = x.double()
    logits = x @ layer.router.weight.double().T
    tau = float(layer.tau)  # the clamp itself is tested in test_tau_is_clamped_and_learnable
    gates = torch.softmax(logits / tau, dim=-1)
    if layer.top_k is not None:
        kept = torch.zeros_like(gates)
        for token in range(gates.shape[0]):
            order = sorted(range(layer.num_experts), key=lambda i: -float(gates[token, i]))
            chosen = order[: layer.top_k]
            total = sum(float(gates[token, i]) for i in chosen)
            for i in chosen:
                kept[token, i] = gates[token, i] / total
        gates = kept
    out = x @ layer.base.weight.double().T + layer.base.bias.double()
    for i in range(layer.num_experts):
        a, b = layer.expert(i)
        out = out + gates[:, i : i + 1] * layer.scales[i] * (x @ a.double().T @ b.double().T)
    return out


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_matches_per_expert_loop_with_mixed_ranks(top_k, alpha):
    layer = _randomised_layer((8, 16, 32, 8), top_k=top_k, alpha=alpha, tau_init=0.7)
    x = torch.randn(13, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference_forward(layer, x), rtol=1e-10, atol=1e-10)


def test_gates_accessor_is_what_forward_uses_and_sums_to_one():
    layer = _randomised_layer((2, 4, 8), top_k=2)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    gates = layer.gates(x)
    assert gates.shape == (2, 5, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert ((gates > 0).sum(-1) == 2).all()
    layer(x)
    torch.testing.assert_close(layer.last_gates, gates)


def test_expert_accessor_shapes_and_distinct_initialisation():
    layer = MoELoRALinear(nn.Linear(24, 20), (8, 16, 32))
    shapes = [tuple(t.shape) for i in range(3) for t in layer.expert(i)]
    assert shapes == [(8, 24), (20, 8), (16, 24), (20, 16), (32, 24), (20, 32)]
    a0, _ = layer.expert(0)
    a2, _ = layer.expert(2)
    assert not torch.allclose(a0, a2[:8]), "experts' A must differ or they stay identical"
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.num_experts == 3 and layer.ranks == (8, 16, 32)


def test_tau_is_clamped_and_learnable():
    layer = MoELoRALinear(nn.Linear(8, 8), (2, 2), tau_init=2.0, tau_range=(0.5, 4.0))
    assert isinstance(layer.log_tau, nn.Parameter)
    torch.testing.assert_close(layer.tau, torch.tensor(2.0))
    with torch.no_grad():
        layer.log_tau.fill_(10.0)
    torch.testing.assert_close(layer.tau, torch.tensor(4.0))
    fixed = MoELoRALinear(nn.Linear(8, 8), (2, 2), learn_tau=False)
    assert not isinstance(fixed.log_tau, nn.Parameter)


def test_router_runs_in_float32_for_bf16_models():
    layer = MoELoRALinear(nn.Linear(16, 16, dtype=torch.bfloat16), (4, 4))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert layer.gates(x).dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("rank", [4, 16])
def test_single_expert_equals_peft_lora(rank):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(24, 20))
    peft_model = get_peft_model(
        nn.Sequential(nn.Linear(24, 20)),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], lora_dropout=0.0),
    )
    base[0].load_state_dict(peft_model.base_model.model[0].base_layer.state_dict())
    layer = MoELoRALinear(base[0], (rank,), alpha_over_r=2.0)
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="at least one specialist"):
        MoELoRALinear(nn.Linear(4, 4), (2, 2), num_base_experts=2)
    with pytest.raises(ValueError, match="top_k"):
        MoELoRALinear(nn.Linear(4, 4), (2, 2), top_k=0)
    with pytest.raises(ValueError, match="tau_init"):
        MoELoRALinear(nn.Linear(4, 4), (2, 2), tau_init=20.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        MoELoRALinear(nn.Conv1d(4, 4, 1), (2,))


def test_fused_router_path_matches_the_separate_one():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(24, 20), (2, 4, 8), dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, requires_grad=True)
    assert layer._can_fuse_router(x, layer.dropout(x))
    fused = layer(x)
    grads = torch.autograd.grad(fused.square().sum(), [x, layer.lora_A, layer.router.weight])
    x64 = x.detach().double().requires_grad_()
    layer64 = layer.double()
    reference = layer64(x64)  # float64 takes the separate path
    ref_grads = torch.autograd.grad(
        reference.square().sum(), [x64, layer64.lora_A, layer64.router.weight]
    )
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_half_precision_router_runs_in_float32_and_gets_the_same_gradient():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 16, dtype=torch.bfloat16), (4, 4))
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    probs = layer.router_probs(x)
    grad_x, grad_w = torch.autograd.grad(probs[:, 0].sum(), [x, layer.router.weight])
    # reference: plain autograd through an explicit float32 cast
    x_ref = x.detach().requires_grad_()
    logits = torch.nn.functional.linear(x_ref.float(), layer.router.weight)
    ref = torch.softmax(logits / layer.tau, dim=-1)
    ref_x, ref_w = torch.autograd.grad(ref[:, 0].sum(), [x_ref, layer.router.weight])
    assert probs.dtype == torch.float32 and grad_x.dtype == torch.bfloat16
    torch.testing.assert_close(probs, ref)
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_w, ref_w)


def test_router_stays_float32_under_autocast():
    layer = MoELoRALinear(nn.Linear(16, 16), (4, 4), dropout=0.0)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert layer.last_probs.dtype == torch.float32
    torch.testing.assert_close(layer.last_probs, layer.router_probs(x))


def test_a_subclassed_gate_is_used_on_every_path():
    class UniformGate(MoELoRALinear):
        def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
            return torch.full_like(logits, 1.0 / self.num_experts)

    layer = UniformGate(nn.Linear(8, 8), (2, 2), dropout=0.0)
    layer(torch.randn(4, 8))  # float32, no dropout: the fused router path
    torch.testing.assert_close(layer.last_probs, torch.full((4, 2), 0.5))
