"""Tokenise (prompt, target) pairs and pad them into training batches.

A sample is ``prompt tokens + target tokens + eos``; its labels are ``-100`` on the prompt (and
later on padding) so the loss covers the target and the eos only. The prompt is tokenised as
the tokenizer does by default (the toy tokenizers and Llama's prepend ``<s>``), the target
without special tokens. Too long a sample loses prompt tokens from the left, never target
tokens; a leading ``<s>`` is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One tokenised training sample."""

    input_ids: list[int]
    labels: list[int]
    task_id: int = 0
    is_general: bool = False


def token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, straight from the Rust backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    task: str = "?",
) -> list[tuple[list[int], list[int]]]:
    """Tokenise ``(prompt, target)`` pairs into ``(input_ids, labels)``, truncating prompts.

    Raises ValueError if a target (plus eos and one prompt token) cannot fit ``max_length``.
    """
    if not pairs:
        return []
    eos = tokenizer.eos_token_id
    prompts = token_ids(tokenizer, [p for p, _ in pairs])
    targets = token_ids(tokenizer, [t for _, t in pairs], add_special_tokens=False)
    bos = tokenizer.bos_token_id
    out = []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        target = [*target, eos]
        budget = max_length - len(target)
        if budget < 1:
            raise ValueError(
                f"task {task!r} record {i + 1}: target of {len(target)} tokens (with eos) "
                f"does not fit max_length={max_length}; raise max_length"
            )
        if len(prompt) > budget:  # keep the tail of the prompt next to the target
            head = [bos] if bos is not None and prompt[0] == bos else []
            prompt = head + prompt[len(prompt) - budget + len(head) :]
        out.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    return out


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch dict.

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (``-100`` on prompt and
    padding), task_id [B] (long) and is_general [B] (bool), with T the longest sample, and
    target_index [M]: the flat indices into [B, T-1] of the positions whose next token is a
    target (row-major), so the loss can gather them on the GPU without a host sync.
    """
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_id": torch.tensor([s.task_id for s in samples], dtype=torch.long),
        "is_general": torch.tensor([s.is_general for s in samples], dtype=torch.bool),
        "target_index": (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1),
    }
