"""Routing recorded under gradient checkpointing: only the loss's forward records it.

Non-reentrant checkpointing re-runs every decoder layer during backward. A layer that recorded
its router probabilities (with their autograd graph) in that re-run would keep the recomputed
activations alive until the next forward, which voids checkpointing.
"""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from medmoe.adapters import MoELoRAConfig, apply_moe_lora, enable_gradient_checkpointing
from medmoe.objectives import load_balance_loss, recorded_router_probs


def reachable_saved_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages that the autograd graphs of ``tensors`` still save.

    Walks every node reachable through ``grad_fn.next_functions`` and reads its ``_saved_*``
    tensors; a node whose saved tensors were freed by a backward raises and counts nothing.
    """
    seen_nodes: set[int] = set()
    storages: dict[int, int] = {}
    stack = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed by backward
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for item in values:
                if isinstance(item, torch.Tensor):
                    storage = item.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def _model(checkpointing: bool):
    model = make_tiny_llama(seed=0, num_hidden_layers=2, max_position_embeddings=128)
    layers = apply_moe_lora(
        model, MoELoRAConfig(allocation="uniform", num_experts=3, allowed_ranks=[2, 4])
    )
    torch.manual_seed(1)
    for layer in layers:  # B != 0 so the router gets a gradient
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model, layers


def _step(model, layers, input_ids):
    logits = model(input_ids=input_ids).logits
    task = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()
    )
    balance = load_balance_loss(recorded_router_probs(layers))
    (task + 0.5 * balance).backward()
    return task.detach(), balance.detach()


def test_checkpoint_recomputation_does_not_replace_or_keep_recorded_routing():
    model, layers = _model(checkpointing=True)
    input_ids = torch.randint(1, 96, (2, 48), generator=torch.Generator().manual_seed(2))
    logits = model(input_ids=input_ids).logits
    recorded = [layer._last_probs for layer in layers]
    loss = logits.float().logsumexp(-1).mean() + load_balance_loss(recorded_router_probs(layers))
    loss.backward()
    # the recomputation in backward did not record: the loss's own tensors are still there
    assert all(layer._last_probs is r for layer, r in zip(layers, recorded, strict=True))
    # and nothing they reach still holds activations (the backward freed the saved tensors)
    assert reachable_saved_bytes([layer._last_probs for layer in layers]) == 0


def test_recorded_routing_under_checkpointing_holds_no_activation_bytes_after_backward():
    model, layers = _model(checkpointing=True)
    input_ids = torch.randint(1, 96, (2, 48), generator=torch.Generator().manual_seed(2))
    _step(model, layers, input_ids)
    # reference: what one forward without checkpointing saves for its backward
    reference, ref_layers = _model(checkpointing=False)
    logits = reference(input_ids=input_ids).logits
    saved = reachable_saved_bytes([logits])
    assert saved > 0
    kept = reachable_saved_bytes([layer._last_probs for layer in layers])
    assert kept == 0, f"{kept} bytes of recomputed activations kept alive (forward saves {saved})"


def test_balancing_gradient_under_checkpointing_equals_the_one_without():
    input_ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for checkpointing in (False, True):
        model, layers = _model(checkpointing)
        losses.append(_step(model, layers, input_ids))
        grads.append([layer.router.weight.grad.clone() for layer in layers])
        grads[-1] += [layer.lora_A.grad.clone() for layer in layers]
    torch.testing.assert_close(losses[0], losses[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_callbacks_read_detached_gates_and_the_loss_keeps_the_graph():
    model, layers = _model(checkpointing=False)
    input_ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    model(input_ids=input_ids)
    assert layers[0].last_probs.requires_grad  # what the routing losses differentiate
    assert not layers[0].last_gates.requires_grad  # what callbacks read
    assert not layers[0].last_probs_detached.requires_grad


def test_a_forward_with_the_adapter_off_clears_the_recorded_routing():
    model, layers = _model(checkpointing=False)
    input_ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    model(input_ids=input_ids)
    assert layers[0].last_probs is not None
    for layer in layers:
        layer.adapter_enabled = False
    model(input_ids=input_ids)
    assert all(layer.last_probs is None and layer.last_gates is None for layer in layers)
