"""Auxiliary routing losses against hand computations."""

from __future__ import annotations

import pytest
import torch

from medmoe.objectives import (
    expert_load,
    knowledge_preservation_loss,
    layer_balance_loss,
    layer_knowledge_preservation_loss,
    load_balance_loss,
)


def test_variance_form_by_hand():
    # two tokens routed [0.7, 0.2, 0.1] and [0.1, 0.6, 0.3]: mean load [0.4, 0.4, 0.2]
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]])
    torch.testing.assert_close(expert_load(probs), torch.tensor([0.4, 0.4, 0.2]))
    # population variance around 1/3: ((1/15)^2 * 2 + (2/15)^2) / 3 = 6 / 675
    torch.testing.assert_close(layer_balance_loss(probs), torch.tensor(6 / 675))
    torch.testing.assert_close(layer_balance_loss(probs, form="cv2"), torch.tensor(9 * 6 / 675))


def test_switch_form_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]])
    # top-1 fractions [0.5, 0.5, 0], loads [0.4, 0.4, 0.2]: 3 * (0.2 + 0.2) = 1.2
    torch.testing.assert_close(layer_balance_loss(probs, form="switch"), torch.tensor(1.2))


def test_padding_tokens_do_not_count():
    probs = torch.tensor([[[0.7, 0.3], [0.5, 0.5]], [[0.2, 0.8], [0.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    changed = probs.clone()
    changed[1, 1] = torch.tensor([1.0, 0.0])
    assert layer_balance_loss(probs, mask) == layer_balance_loss(changed, mask)
    torch.testing.assert_close(expert_load(probs, mask), torch.tensor([1.4 / 3, 1.6 / 3]))


def test_layers_with_different_expert_counts_average_per_layer():
    two = torch.tensor([[[1.0, 0.0]]])
    four = torch.full((1, 1, 4), 0.25)
    expected = (layer_balance_loss(two) + layer_balance_loss(four)) / 2
    torch.testing.assert_close(load_balance_loss([two, four]), expected)
    assert layer_balance_loss(four) == 0


def test_knowledge_preservation_minimum_and_direction():
    delta = 0.2
    # one general and one domain sample, 1 base + 1 specialist, one token each
    is_general = torch.tensor([True, False])
    ideal = torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]])  # matched / unmatched = 1.2 / 0.8
    loss = layer_knowledge_preservation_loss(ideal, is_general, 1, delta=delta)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)

    logits = torch.zeros(2, 1, 2, requires_grad=True)
    layer_knowledge_preservation_loss(logits.softmax(-1), is_general, 1, delta=delta).backward()
    # descending the gradient raises the base expert for the general sample and the
    # specialist for the domain sample
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]
    assert logits.grad[1, 0, 1] < 0 < logits.grad[1, 0, 0]


def test_knowledge_preservation_by_hand():
    probs = torch.tensor([[[0.5, 0.25, 0.25]]])  # a general sample, 1 base expert of 3
    z = torch.tensor([0.5 / 1.1, 0.25 / 0.9, 0.25 / 0.9])
    expected = z.var(unbiased=False) / z.mean()
    got = knowledge_preservation_loss([probs], torch.tensor([True]), [1], delta=0.1)
    torch.testing.assert_close(got, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown balance form"):
        layer_balance_loss(torch.ones(1, 1, 2) / 2, form="entropy")
    with pytest.raises(ValueError, match="token_mask has shape"):
        layer_balance_loss(torch.ones(1, 3, 2) / 2, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_base_experts > 0"):
        knowledge_preservation_loss([torch.ones(1, 1, 2) / 2], torch.tensor([True]), [0])


def _collapsed(num_experts: int, tokens: int = 6) -> torch.Tensor:
    probs = torch.zeros(1, tokens, num_experts)
    probs[..., 0] = 1.0  # every token on expert 0
    return probs


def test_collapsed_router_scores_one_at_every_n_in_the_normalized_form():
    raw = [float(layer_balance_loss(_collapsed(n))) for n in (2, 4, 8)]
    # the finding: the paper's variance shrinks with N, 0.25 at N = 2, 0.109 at N = 8
    assert raw == pytest.approx([0.25, 3 / 16, 7 / 64])
    normalized = [float(layer_balance_loss(_collapsed(n), form="normalized")) for n in (2, 4, 8)]
    assert normalized == pytest.approx([1.0, 1.0, 1.0])
    balanced = torch.full((1, 4, 8), 1 / 8)
    assert float(layer_balance_loss(balanced, form="normalized")) == pytest.approx(0.0, abs=1e-12)
    # layers of different N averaged: a collapsed model scores 1 whatever its allocation
    mixed = load_balance_loss([_collapsed(2), _collapsed(3), _collapsed(8)], form="normalized")
    assert float(mixed) == pytest.approx(1.0)


def test_normalized_form_is_cv2_over_n_minus_one():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]])
    torch.testing.assert_close(
        layer_balance_loss(probs, form="normalized"), layer_balance_loss(probs, form="cv2") / 2
    )
