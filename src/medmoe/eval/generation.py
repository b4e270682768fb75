"""Batched greedy generation with left padding, returning only the new text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from medmoe.eval.multiple_choice import encode_contexts, eval_mode, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["cut_at_stop", "generate_greedy"]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    cuts = [index for s in stop if s and (index := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Left-padded ``[B, T]`` ids and attention mask (pad, flip twice: torch<2.6 safe)."""
    flipped = [torch.tensor(seq, dtype=torch.long).flip(0) for seq in seqs]
    ids = pad_sequence(flipped, batch_first=True, padding_value=pad_id).flip(1)  # [B, T]
    lengths = torch.tensor([len(seq) for seq in seqs])
    mask = (torch.arange(ids.shape[1])[None, :] >= ids.shape[1] - lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def _pad_id(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS (Llama-3 has no pad token), else the model's."""
    config = getattr(model, "generation_config", None)
    candidates = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(config, "pad_token_id", None),
    )
    for token_id in candidates:
        if isinstance(token_id, int):
            return token_id
    raise ValueError("cannot pad: the tokenizer has neither a pad nor an EOS token")


def generate_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n\n",),
    *,
    add_bos_token: bool | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, cut at the first stop string (``HFLM``'s
    ``generate_until`` with ``do_sample=False``: ``until`` strings cut the decoded text).

    Prompts are encoded as in :func:`~medmoe.eval.multiple_choice.score_multiple_choice`
    (``add_bos_token`` as ``HFLM``'s) and left-padded in batches of
    similar length; ``model.generate`` derives position ids from the attention mask, so a
    batched output equals the one-at-a-time output. Only the new tokens are decoded
    (special tokens skipped); generation also ends at the model's EOS. The tokenizer is never
    mutated: padding is done here, so its ``padding_side`` is left as it was.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    encoded = encode_contexts(tokenizer, prompts, add_bos_token)
    if any(not seq for seq in encoded):
        raise ValueError("a prompt encodes to no tokens and the tokenizer adds no BOS")
    pad_id = _pad_id(model, tokenizer)
    device = model_device(model)
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in batch], pad_id, device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )  # [B, T + new]
            new_tokens = generated[:, ids.shape[1] :].cpu()  # [B, new]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = cut_at_stop(text, stop)
    return outputs
