"""Target-only, chunked next-token loss against the full-vocabulary reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from medmoe.adapters import MoELoRA
from medmoe.adapters.lora import LoRA
from medmoe.losses import IGNORE_INDEX, full_vocabulary_token_losses, target_token_losses

VOCAB = 96


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (3, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :9] = IGNORE_INDEX  # prompt
    labels[2, :13] = IGNORE_INDEX  # a short target
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _adapted(kind: str, **config):
    model = make_tiny_llama(seed=0, **config).double().train()
    if kind == "moe":
        model = MoELoRA(
            allocation="uniform", num_experts=2, allowed_ranks=[2, 4], dropout=0.0
        ).apply(model)
    else:
        model = LoRA(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]).apply(model)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)  # the head's own gradient is checked too
    return model


def _loss_and_grads(model, loss_fn, **kwargs):
    model.zero_grad(set_to_none=True)
    token_loss, mask = loss_fn(model, _batch(), **kwargs)
    loss = token_loss.sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return token_loss.detach(), mask, grads


@pytest.mark.parametrize(
    ("kind", "config"),
    [("moe", {}), ("lora", {}), ("moe", {"final_logit_softcapping": None, "logit_scale": 1.0})],
    ids=["moe-lora", "peft-lora", "logits_to_keep-fallback"],
)
def test_target_only_chunked_loss_equals_the_full_vocabulary_loss_and_gradients(kind, config):
    model = _adapted(kind, **config)
    torch.manual_seed(0)
    reference = _loss_and_grads(model, full_vocabulary_token_losses)
    torch.manual_seed(0)
    chunked = _loss_and_grads(model, target_token_losses, chunk_rows=4)  # several chunks
    assert torch.equal(reference[1], chunked[1])
    assert torch.count_nonzero(chunked[0][~chunked[1]]) == 0
    torch.testing.assert_close(chunked[0], reference[0] * reference[1], rtol=1e-12, atol=1e-12)
    assert reference[2].keys() == chunked[2].keys() and len(reference[2]) > 2
    for name, grad in reference[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_no_tensor_of_vocabulary_width_beyond_one_chunk_is_saved_for_backward():
    model = _adapted("moe")
    widest: list[int] = []

    def pack(tensor):
        if tensor.shape and tensor.shape[-1] == VOCAB:
            widest.append(tensor.numel() // VOCAB)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss, mask = target_token_losses(model, _batch(), chunk_rows=4)
    assert max(widest, default=0) <= 4  # rows of logits kept: one chunk at most
    (token_loss.sum() / mask.sum()).backward()
    widest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_vocabulary_token_losses(model, _batch())
    assert max(widest) >= 3 * 15  # the reference keeps logits of every position


def test_a_batch_without_targets_gives_zero_losses_and_a_graph():
    model = _adapted("moe")
    batch = _batch()
    batch["labels"][:] = IGNORE_INDEX
    token_loss, mask = target_token_losses(model, batch)
    assert not mask.any() and torch.count_nonzero(token_loss) == 0


def test_the_loss_forward_builds_no_kv_cache_in_evaluation():
    """Validation forwards used to build a KV cache (config.use_cache is True in eval mode):
    ~2 GiB per 8 x 2048 micro-batch at 8B, never read by a loss."""
    model = make_tiny_llama(seed=0).eval()
    assert model.config.use_cache
    caches = []
    decoder = model.get_decoder()
    hook = decoder.register_forward_hook(lambda m, i, out: caches.append(out.past_key_values))
    try:
        with torch.no_grad():
            target_token_losses(model, _batch())
            decoder(input_ids=_batch()["input_ids"])  # the reference: a plain forward builds one
    finally:
        hook.remove()
    assert caches[0] is None and caches[1] is not None
