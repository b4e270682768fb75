"""Multiple-choice scoring by continuation log-likelihood (lm-evaluation-harness style).

Each choice is scored as ``sum_t log p(continuation_t | prompt, continuation_<t)``, with the
requests tokenised as lm-evaluation-harness's ``HFLM`` does (``_encode_pair``): trailing
whitespace of the prompt moves to the continuation, ``prompt + choice`` and ``prompt`` are each
encoded, and the continuation is the tokens of the whole past the prompt's. The prediction is
the choice with the highest summed log-likelihood (the first one on ties): the harness's
``acc``; ``acc_norm`` divides by each choice's character length first.

Special tokens (:func:`encode_contexts`): ``add_bos_token`` has ``HFLM``'s meaning. ``None``
(the default, as ``HFLM`` in lm-eval 0.4.13) encodes with the tokenizer's default special
tokens, i.e. its BOS for Llama, Mistral and Gemma tokenizers; ``True`` asks for them
explicitly; ``False`` encodes without any (older harness versions' default). A text that
already starts with the BOS string is never given a second one.

Batches are right-padded, so every real token keeps its natural position id and the padding
(after all real tokens, under causal attention) cannot change any score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from medmoe.eval.examples import MultipleChoiceExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MultipleChoiceResult",
    "encode_contexts",
    "eval_mode",
    "model_device",
    "score_multiple_choice",
]


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Scores of a multiple-choice evaluation.

    ``loglikelihoods`` is ``[N, C_max]`` float64 (``-inf`` where an example has fewer than
    ``C_max`` choices); ``predictions`` is ``[N]`` long, the argmax of each row; ``accuracy``
    is the harness's ``acc``, ``acc_norm`` its length-normalised one.
    """

    predictions: Tensor
    loglikelihoods: Tensor
    accuracy: float
    acc_norm: float = float("nan")
    correct: Tensor | None = None  # [N] bool, the argmax is the answer


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode under ``torch.no_grad``; restore every submodule's mode after.

    ``no_grad`` rather than ``inference_mode``: a model that lazily caches tensors (rotary
    tables, masks) during evaluation must still be trainable afterwards.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def encode_contexts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_bos_token: bool | None = None
) -> list[list[int]]:
    """Token ids of each text as ``HFLM.tok_encode`` gives them.

    ``add_special_tokens`` is ``add_bos_token`` (``None``: the tokenizer's default, ``True``),
    except for a text that already starts with the BOS string (a rendered chat template).
    """
    special = True if add_bos_token is None else add_bos_token
    bos_text = tokenizer.bos_token
    encoded = []
    for text in texts:
        starts_with_bos = bool(bos_text) and text.startswith(bos_text)
        add = special and not starts_with_bos
        encoded.append(list(tokenizer(text, add_special_tokens=add)["input_ids"]))
    return encoded


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any valid token id for padding (it is masked out and never scored)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-padded ``[B, T]`` ids and attention mask."""
    ids = pad_sequence(
        [torch.tensor(seq, dtype=torch.long) for seq in seqs],
        batch_first=True,
        padding_value=pad_id,
    )
    lengths = torch.tensor([len(seq) for seq in seqs])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # [B, T]
    return ids.to(device), mask.to(device)


def _split_requests(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    add_bos_token: bool | None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Context ids per example and continuation ids per (example, choice), as ``HFLM``.

    Trailing whitespace of a prompt moves to the front of its continuations, so
    ``"Answer: " + "A"`` is scored as ``"Answer:" + " A"``; the continuation's ids are those
    of ``context + continuation`` past the context's own ids.
    """
    contexts, continuations = [], []
    for ex in examples:
        context = ex.prompt.rstrip()
        moved = ex.prompt[len(context) :]
        contexts.append(context)
        continuations.append([moved + choice for choice in ex.choices])
    context_ids = encode_contexts(tokenizer, contexts, add_bos_token)
    wholes = [
        ctx + cont for ctx, conts in zip(contexts, continuations, strict=True) for cont in conts
    ]
    whole_ids = iter(encode_contexts(tokenizer, wholes, add_bos_token))
    choice_ids = [
        [next(whole_ids)[len(ctx_ids) :] for _ in ex.choices]
        for ex, ctx_ids in zip(examples, context_ids, strict=True)
    ]
    for ex, ctx, ctx_ids, ids in zip(examples, contexts, context_ids, choice_ids, strict=True):
        if not ctx_ids:
            raise ValueError(
                f"prompt {ctx!r} encodes to no tokens and the tokenizer adds no BOS: "
                "the first continuation token would have no context"
            )
        for choice, seq in zip(ex.choices, ids, strict=True):
            if not seq:
                raise ValueError(f"choice {choice!r} of prompt {ex.prompt!r} encodes to no tokens")
    return context_ids, choice_ids


def _validate(examples: Sequence[MultipleChoiceExample]) -> None:
    if not examples:
        raise ValueError("no examples to score")
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {i} has no choices")
        if not 0 <= ex.answer < len(ex.choices):
            raise ValueError(f"example {i}: answer {ex.answer} is not in [0, {len(ex.choices)})")


def _log_softmax(logits: Tensor) -> Tensor:
    """Log-softmax in at least float32 (float64 logits stay float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first (little padding, early OOM)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _score_single_token(
    model: nn.Module,
    context_ids: list[list[int]],
    choice_ids: list[list[list[int]]],
    scores: Tensor,
    batch_size: int,
    pad_id: int,
) -> None:
    """Fill ``scores`` [N, C_max] from one forward per prompt: every choice is one token."""
    device = model_device(model)
    for batch in _length_sorted_batches([len(c) for c in context_ids], batch_size):
        ids, mask = _right_pad([context_ids[i] for i in batch], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        last = mask.sum(dim=1) - 1  # [B] position of each prompt's last token
        last_logits = logits[torch.arange(len(batch), device=device), last]  # [B, V]
        log_probs = _log_softmax(last_logits)  # [B, V]
        tokens, valid = _right_pad([[seq[0] for seq in choice_ids[i]] for i in batch], 0, device)
        chosen = log_probs.gather(1, tokens)  # [B, C_batch]
        chosen = torch.where(valid.bool(), chosen, torch.full_like(chosen, float("-inf")))
        scores[torch.tensor(batch), : tokens.shape[1]] = chosen.double().cpu()


def _score_general(
    model: nn.Module,
    context_ids: list[list[int]],
    choice_ids: list[list[list[int]]],
    scores: Tensor,
    batch_size: int,
    pad_id: int,
) -> None:
    """Fill ``scores`` [N, C_max]: one padded row per (prompt, choice) request."""
    device = model_device(model)
    requests = [(i, j) for i, choices in enumerate(choice_ids) for j in range(len(choices))]
    # The model reads context + continuation minus its last token; each continuation token
    # is predicted at the position just before it.
    inputs = [(context_ids[i] + choice_ids[i][j])[:-1] for i, j in requests]
    for batch in _length_sorted_batches([len(seq) for seq in inputs], batch_size):
        ids, mask = _right_pad([inputs[r] for r in batch], pad_id, device)
        conts = [choice_ids[requests[r][0]][requests[r][1]] for r in batch]
        cont_len = torch.tensor([len(c) for c in conts], device=device)  # [B]
        width = int(cont_len.max())  # K, the longest continuation in the batch
        targets, _ = _right_pad(conts, 0, device)  # [B, K]
        steps = torch.arange(width, device=device)[None, :]  # [1, K]
        in_cont = steps < cont_len[:, None]  # [B, K]
        start = mask.sum(dim=1) - cont_len  # [B] position predicting the first cont token
        positions = (start[:, None] + steps).clamp(max=ids.shape[1] - 1)  # [B, K]
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        window = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        log_probs = _log_softmax(window)  # [B, K, V]
        token_lp = log_probs.gather(-1, targets[..., None]).squeeze(-1)  # [B, K]
        summed = torch.where(in_cont, token_lp, torch.zeros_like(token_lp)).sum(dim=1)  # [B]
        rows = torch.tensor([requests[r][0] for r in batch])
        cols = torch.tensor([requests[r][1] for r in batch])
        scores[rows, cols] = summed.double().cpu()


def score_multiple_choice(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    batch_size: int = 16,
    *,
    add_bos_token: bool | None = None,
) -> MultipleChoiceResult:
    """Score every choice of every example by its summed continuation log-likelihood.

    When every choice of every example is a single token (letters, yes/no/maybe) each prompt
    needs a single forward and the scores are read at its last position; otherwise each
    (prompt, choice) pair is a padded row of a batch of ``batch_size`` rows.
    """
    _validate(examples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    context_ids, choice_ids = _split_requests(tokenizer, examples, add_bos_token)
    width = max(len(ex.choices) for ex in examples)
    scores = torch.full((len(examples), width), float("-inf"), dtype=torch.float64)  # [N, C]
    single = all(len(seq) == 1 for choices in choice_ids for seq in choices)
    score = _score_single_token if single else _score_general
    with eval_mode(model):
        score(model, context_ids, choice_ids, scores, batch_size, _pad_id(tokenizer))
    predictions = scores.argmax(dim=1)  # [N]
    answers = torch.tensor([ex.answer for ex in examples])
    correct = predictions == answers  # [N]
    lengths = torch.ones_like(scores)  # [N, C]; padding columns stay -inf / 1
    for i, ex in enumerate(examples):
        lengths[i, : len(ex.choices)] = torch.tensor(ex.choice_lengths(), dtype=torch.float64)
    normed = (scores / lengths.clamp(min=1)).argmax(dim=1) == answers  # [N]
    return MultipleChoiceResult(
        predictions=predictions,
        loglikelihoods=scores,
        accuracy=correct.double().mean().item(),
        acc_norm=normed.double().mean().item(),
        correct=correct,
    )
