"""Target-only, chunked next-token loss against the full-vocabulary reference (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from medmoe.adapters import MoELoRA
from medmoe.adapters.lora import LoRA
from medmoe.losses import (
    IGNORE_INDEX,
    full_vocabulary_token_losses,
    step_token_objective,
    target_token_losses,
    task_mean_objective,
)

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


# ----------------------------------------------------------------- step objectives
def _step(seed: int, tasks: int, shape=(2, 2, 3, 7)):
    """Token losses [world, accumulate, B, T], a target mask and task ids [world, accumulate, B]."""
    generator = torch.Generator().manual_seed(seed)
    world, accumulate, batch, width = shape
    mask = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.6
    loss = torch.rand(shape, generator=generator, dtype=torch.float64) * 4 * mask
    task_id = torch.randint(0, tasks, (world, accumulate, batch), generator=generator)
    return loss, mask, task_id


def _task_counts(mask: torch.Tensor, task_id: torch.Tensor, tasks: int) -> torch.Tensor:
    counts = torch.zeros(tasks, dtype=torch.long)
    return counts.index_add_(0, task_id.flatten(), mask.sum(-1).flatten())


def _accumulated(objective, loss, mask, task_id, tasks, routing=0.0) -> torch.Tensor:
    """What the optimizer step sees: each micro-batch's objective / accumulate (Lightning),
    summed over micro-batches, then averaged over ranks (DDP)."""
    world, accumulate = loss.shape[:2]
    counts = _task_counts(mask, task_id, tasks)
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(world):
        for micro in range(accumulate):
            batch = {
                "task_id": task_id[rank, micro],
                "step_task_tokens": counts,
                "step_target_tokens": counts.sum(),
            }
            value = objective(
                loss[rank, micro],
                torch.tensor(routing, dtype=torch.float64),
                batch,
                accumulate=accumulate,
                world_size=world,
            )
            total = total + value / accumulate
    return total / world


def _reference_task_mean(loss, mask, task_id, tasks) -> float:
    """Hand-written: every task present in the step, its token mean; their plain mean."""
    sums, counts = [0.0] * tasks, [0] * tasks
    flat_loss, flat_mask = loss.reshape(-1, loss.shape[-1]), mask.reshape(-1, mask.shape[-1])
    for row, task in enumerate(task_id.flatten().tolist()):
        for value, is_target in zip(flat_loss[row].tolist(), flat_mask[row].tolist(), strict=True):
            if is_target:
                sums[task] += value
                counts[task] += 1
    means = [total / n for total, n in zip(sums, counts, strict=True) if n > 0]
    return sum(means) / len(means)


@pytest.mark.parametrize("seed", range(4))
def test_task_mean_is_the_mean_of_task_token_means_over_the_whole_step(seed):
    tasks = 5
    loss, mask, task_id = _step(seed, tasks)
    got = _accumulated(task_mean_objective, loss, mask, task_id, tasks)
    assert got.item() == pytest.approx(_reference_task_mean(loss, mask, task_id, tasks), rel=1e-12)


def test_task_mean_leaves_an_absent_task_out_and_does_not_depend_on_the_split():
    tasks = 4
    loss, mask, task_id = _step(11, tasks, shape=(1, 1, 12, 5))
    task_id[:] = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2])  # task 3 absent
    mask[..., 0] = True  # every sample has a target
    reference = _reference_task_mean(loss, mask, task_id, tasks)
    counts = _task_counts(mask, task_id, tasks)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    sums = [float(loss[0, 0][task_id[0, 0] == t].sum()) for t in range(3)]
    assert reference == pytest.approx(
        sum(s / int(n) for s, n in zip(sums, counts[:3], strict=True)) / 3
    )
    for world, accumulate in ((1, 1), (1, 4), (2, 2), (4, 3), (2, 6)):
        split = (world, accumulate, 12 // (world * accumulate), 5)
        got = _accumulated(
            task_mean_objective,
            loss.reshape(split),
            mask.reshape(split),
            task_id.reshape(split[:3]),
            tasks,
        )
        assert got.item() == pytest.approx(reference, rel=1e-12), (world, accumulate)


def test_task_mean_of_one_task_is_its_token_mean_and_routing_stays_a_mean():
    loss, mask, _ = _step(3, 1)
    task_id = torch.zeros(loss.shape[:3], dtype=torch.long)
    token_mean = float(loss.sum() / mask.sum())
    got = _accumulated(task_mean_objective, loss, mask, task_id, 3, routing=0.25)
    assert got.item() == pytest.approx(token_mean + 0.25, rel=1e-12)
    same = _accumulated(step_token_objective, loss, mask, task_id, 3, routing=0.25)
    assert same.item() == pytest.approx(got.item(), rel=1e-12)


def test_step_tokens_objective_is_its_previous_formula_bit_for_bit():
    """The default path (loss_normalization: step_tokens) must not move: the demo's loss."""
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        token_loss = torch.rand(3, 9, generator=generator).to(dtype)
        routing = torch.rand((), generator=generator).to(dtype)
        batch = {"step_target_tokens": torch.tensor(37), "task_id": torch.tensor([0, 1, 1])}
        batch["step_task_tokens"] = torch.tensor([30, 7])  # ignored by step_tokens
        for accumulate, world in ((1, 1), (4, 1), (4, 8)):
            got = step_token_objective(
                token_loss, routing, batch, accumulate=accumulate, world_size=world
            )
            step_tokens = batch["step_target_tokens"].to(dtype).clamp_min(1.0)
            previous = token_loss.sum() * (accumulate * world / step_tokens) + routing
            assert torch.equal(got, previous)


def test_task_mean_without_per_task_step_counts_names_the_fix():
    with pytest.raises(KeyError, match="step_task_tokens.*micro_batch"):
        task_mean_objective(
            torch.zeros(1, 2),
            torch.zeros(()),
            {"task_id": torch.zeros(1)},
            accumulate=1,
            world_size=1,
        )


def test_an_unknown_loss_normalization_names_every_accepted_value():
    from medmoe.model import MedMoEModule

    with pytest.raises(ValueError, match="step_tokens, task_mean, micro_batch.*'per_task'"):
        MedMoEModule(tiny_llama={}, loss_normalization="per_task")
