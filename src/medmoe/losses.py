"""Next-token cross-entropy on target tokens only, without a [B, T, V] float32 logits tensor.

A causal LM's logits are ``lm_head(h)`` of the decoder's last hidden states. Prompt and padding
positions carry no label, so their logits are never needed: the LM head runs only on the hidden
states of positions whose *next* token is a target, in chunks of rows, each chunk under
activation checkpointing. The float32 logits of one chunk exist at a time, in forward and in
backward; at Llama-3's vocabulary (128256) a full-sequence float32 copy would be 4 GiB per
4 x 2048 micro-batch, plus as much again in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medmoe.data.collate import IGNORE_INDEX

# float32 logits elements per chunk: 2**26 = 256 MiB (523 rows at a 128256-token vocabulary)
CHUNK_ELEMENTS = 2**26


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Labels [B, T] -> next-token targets [B, T-1] and their mask (a label exists) [B, T-1]."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder (last hidden states) and LM head of a causal LM, when logits = head(h).

    Unwraps a peft model. ``None`` when the model does more than ``lm_head(h)`` (logit
    soft-capping, e.g. Gemma 2) or does not expose its parts.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _chunk_token_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    # [rows, H] -> [rows, V] float32 logits -> [rows]
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_cross_entropy(
    head: nn.Module, hidden: Tensor, targets: Tensor, chunk_rows: int | None = None
) -> Tensor:
    """``cross_entropy(head(hidden).float(), targets)`` per row, [M, H] x [M] -> [M] float32.

    Runs ``chunk_rows`` rows at a time; with autograd on, every chunk is checkpointed, so its
    logits are recomputed in backward instead of being kept.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    if chunk_rows is None:
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab)
    keep_graph = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    losses = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if keep_graph:
            losses.append(
                checkpoint(
                    _chunk_token_loss,
                    head,
                    hidden[rows],
                    targets[rows],
                    use_reentrant=False,
                    preserve_rng_state=False,
                )
            )
        else:
            losses.append(_chunk_token_loss(head, hidden[rows], targets[rows]))
    return torch.cat(losses)


def target_token_losses(
    model: nn.Module, batch: Mapping[str, Tensor], chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token next-token loss [B, T-1] (0 where no label) and the target mask [B, T-1].

    Logits are computed only at positions ``t`` whose label ``t+1`` exists. Models whose
    logits are not ``lm_head(h)`` get them through transformers' ``logits_to_keep`` mask.
    """
    targets, target_mask = shifted_targets(batch["labels"])
    # flat indices into [B, T-1] of the positions t whose label t+1 exists: [M]. The collate
    # computes them on the host; a boolean mask index would sync with the GPU.
    index = batch.get("target_index")
    if index is None:
        index = target_mask.flatten().nonzero().squeeze(1)
    flat_targets = targets.flatten().index_select(0, index)  # [M]
    parts = _decoder_and_head(model)
    if parts is None:
        keep = F.pad(target_mask, (0, 1), value=False)  # [B, T], the last position never
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,  # no KV cache: a loss never generates (~2 GiB per 8 x 2048 at 8B)
        ).logits  # [M, V]
        flat_loss = F.cross_entropy(logits.float(), flat_targets, reduction="none")
    else:
        decoder, head = parts
        hidden = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,  # no KV cache: a loss never generates (~2 GiB per 8 x 2048 at 8B)
        ).last_hidden_state  # [B, T, H]
        width = hidden.shape[1]
        # index into [B, T-1] -> into [B * T] (row b, position t: b * T + t), no copy of hidden
        rows = hidden.flatten(0, 1).index_select(0, index + index // (width - 1))  # [M, H]
        flat_loss = chunked_cross_entropy(head, rows, flat_targets, chunk_rows)
    token_loss = flat_loss.new_zeros(target_mask.numel()).index_put((index,), flat_loss)
    return token_loss.view_as(target_mask), target_mask


def full_vocabulary_token_losses(
    model: nn.Module, batch: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The reference path: logits at every position, one float32 copy, then the masked loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets, target_mask = shifted_targets(batch["labels"])
    token_loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),  # [B*(T-1), V]
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    return token_loss, target_mask


def step_token_objective(
    token_loss: Tensor,
    routing_loss: Tensor,
    batch: Mapping[str, Tensor],
    *,
    accumulate: int,
    world_size: int,
) -> Tensor:
    """A micro-batch's loss such that the optimizer step's gradient is the token mean of the step.

    ``sum(token_loss) * accumulate * world_size / step_target_tokens + routing_loss``: Lightning
    divides the training-step loss by ``accumulate`` and DDP (or ZeRO) averages gradients over
    the ``world_size`` ranks, so summed over the step's micro-batches and ranks the task term
    becomes ``sum of every target token's loss / step_target_tokens`` (the tokens of all of
    them). The routing terms stay per-micro-batch means, averaged as before.
    """
    if "step_target_tokens" not in batch:
        raise KeyError(
            "loss_normalization='step_tokens' needs the batch's 'step_target_tokens' (the target "
            "tokens of the whole optimizer step), which medmoe.data.MultiTaskDataModule's training "
            "stream attaches; with another data source set model.loss_normalization: micro_batch"
        )
    step_tokens = batch["step_target_tokens"].to(token_loss.dtype).clamp_min(1.0)
    scale = accumulate * world_size / step_tokens
    return token_loss.sum() * scale + routing_loss


def task_mean_objective(
    token_loss: Tensor,
    routing_loss: Tensor,
    batch: Mapping[str, Tensor],
    *,
    accumulate: int,
    world_size: int,
) -> Tensor:
    """A micro-batch's loss such that the optimizer step's gradient is the mean of task means.

    Over the optimizer step (all ``accumulate`` micro-batches on all ``world_size`` ranks), with
    ``N_t`` the target tokens of task ``t`` in the step (the batch's ``step_task_tokens[t]``),
    ``S_t`` the sum of their token losses and ``P = {t : N_t > 0}`` the tasks present::

        L_step = (1 / |P|) * sum_{t in P} S_t / N_t

    so every task present in the step weighs the same, whatever its target length or sample
    count. Replay (general) tasks are tasks like any other: each task id present weighs
    ``1 / |P|``. A task absent from the step (no target token in it) is left out of ``P``: it
    neither contributes nor dilutes the others, and with one task present ``L_step`` is that
    task's token mean (the same value as ``step_tokens``).

    Each micro-batch returns ``sum_b token_loss[b].sum() * accumulate * world_size /
    (N_{task_b} * |P|) + routing_loss``; Lightning divides by ``accumulate`` and DDP (or ZeRO)
    averages over ranks, so the step's gradient is that of ``L_step``, however its samples are
    split over micro-batches and ranks (``N_t`` and ``P`` are counts over the whole step,
    computed by the data stream without communication). The routing terms stay per-micro-batch
    means, averaged as before.
    """
    for key in ("step_task_tokens", "task_id"):
        if key not in batch:
            raise KeyError(
                f"loss_normalization='task_mean' needs the batch's {key!r} ('step_task_tokens': "
                "the target tokens of each task in the whole optimizer step), which "
                "medmoe.data.MultiTaskDataModule's training stream attaches; with another data "
                "source set model.loss_normalization: micro_batch"
            )
    counts = batch["step_task_tokens"].to(token_loss.dtype)  # [K]
    present = (counts > 0).sum().clamp_min(1)  # |P|
    weight = (accumulate * world_size) / (counts.clamp_min(1.0) * present)  # [K]
    per_sample = token_loss.sum(1)  # [B]
    return (per_sample * weight[batch["task_id"].to(per_sample.device)]).sum() + routing_loss


class NonFiniteLossWatch:
    """Remembers, on the device, the first training step whose loss was NaN or infinite.

    :meth:`record` runs every step without a host synchronisation; :meth:`raise_if_seen` reads
    the flag back (one sync) and raises ``FloatingPointError`` naming the first bad step. The
    training step calls it on logging steps, and the module before writing any checkpoint, so
    a run stops at the next of those after a bad step and no checkpoint after it is written.
    """

    def __init__(self) -> None:
        self._seen: Tensor | None = None  # bool, 0-dim
        self._first: Tensor | None = None  # [step, loss, task loss] of the first bad step

    def record(self, step: int, loss: Tensor, objective: Tensor, task_loss: Tensor) -> None:
        loss, objective, task_loss = (t.detach().float() for t in (loss, objective, task_loss))
        bad = ~(torch.isfinite(loss) & torch.isfinite(objective))
        values = torch.stack([loss.new_full((), float(step)), loss, task_loss])  # [3]
        if self._seen is None:
            self._seen, self._first = bad, values
            return
        self._first = torch.where(bad & ~self._seen, values, self._first)
        self._seen = self._seen | bad

    def raise_if_seen(self, any_rank: Callable[[Tensor], Tensor] | None = None) -> None:
        """Raise if a bad step was seen; with ``any_rank`` (a max-reduction over the ranks, a
        collective every rank must call at the same point), on every rank when any saw one."""
        seen = self._seen if self._seen is not None else torch.zeros((), dtype=torch.bool)
        if any_rank is not None:
            seen = any_rank(seen.float()) > 0
        if not bool(seen):
            return
        if self._seen is None or not bool(self._seen):
            raise FloatingPointError(
                "another rank's training loss is not finite (its error names the step); the "
                "run stops on every rank and the last good checkpoint is kept"
            )
        step, loss, task_loss = self._first.tolist()
        raise FloatingPointError(
            f"training loss is {loss} at global step {int(step)} (task loss {task_loss}); the "
            "run stops here and the last good checkpoint is kept"
        )

    def reset(self) -> None:
        self._seen = self._first = None
