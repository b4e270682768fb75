"""One entry point from (examples, metric name) to a dict of scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from medmoe.eval.answers import exact_match_flexible, exact_match_strict
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample
from medmoe.eval.generation import generate_greedy
from medmoe.eval.multiple_choice import score_multiple_choice
from medmoe.eval.rouge import rouge_l

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["METRICS", "evaluate_examples"]

# metric name -> the example type it scores
METRICS: dict[str, type] = {
    "accuracy": MultipleChoiceExample,
    "gsm8k": GenerationExample,
    "rouge_l": GenerationExample,
}


def _check(examples: Sequence[object], metric: str) -> None:
    if metric not in METRICS:
        accepted = ", ".join(repr(name) for name in METRICS)
        raise ValueError(f"unknown metric {metric!r}; accepted metrics: {accepted}")
    expected = METRICS[metric]
    for i, ex in enumerate(examples):
        if not isinstance(ex, expected):
            raise TypeError(
                f"metric {metric!r} scores {expected.__name__} examples, "
                f"but example {i} is a {type(ex).__name__}"
            )
    if not examples:
        raise ValueError(f"no examples to evaluate with metric {metric!r}")


def _per_subject(examples: Sequence[MultipleChoiceExample], correct: Tensor) -> dict[str, float]:
    """``{"accuracy/<subject>": accuracy}`` over the examples that have a subject."""
    hits: dict[str, list[bool]] = {}
    for ex, ok in zip(examples, correct.tolist(), strict=True):
        if ex.subject:
            hits.setdefault(ex.subject, []).append(bool(ok))
    return {f"accuracy/{s}": sum(v) / len(v) for s, v in sorted(hits.items())}


def evaluate_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample] | Sequence[GenerationExample],
    metric: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    stop: Sequence[str] = ("\n\n",),
    add_bos_token: bool | None = None,
) -> dict[str, float]:
    """Score ``examples`` with ``metric``; few-shot demonstrations are part of each example's
    prompt (a task's :meth:`~medmoe.data.tasks.Task.context` builds them).

    - ``"accuracy"`` (multiple choice) -> ``{"accuracy", "acc_norm"}`` (the harness's ``acc``
      and ``acc_norm``) and, when examples carry a ``subject``, ``"accuracy/<subject>"`` per
      subject; ``accuracy`` over all examples is then the size-weighted average of the
      subjects' (the harness's MMLU group score);
    - ``"gsm8k"`` (generation) -> ``{"exact_match_strict", "exact_match_flexible"}``;
    - ``"rouge_l"`` (generation) -> ``{"rouge_l"}``.

    ``add_bos_token`` has the meaning of lm-eval ``HFLM``'s (``None``: the tokenizer's default).
    """
    _check(examples, metric)
    if metric == "accuracy":
        result = score_multiple_choice(
            model, tokenizer, examples, batch_size, add_bos_token=add_bos_token
        )
        return {
            "accuracy": result.accuracy,
            "acc_norm": result.acc_norm,
            **_per_subject(examples, result.correct),
        }
    predictions = generate_greedy(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=stop,
        add_bos_token=add_bos_token,
    )
    references = [ex.reference for ex in examples]
    if metric == "gsm8k":
        return {
            "exact_match_strict": exact_match_strict(predictions, references),
            "exact_match_flexible": exact_match_flexible(predictions, references),
        }
    return {"rouge_l": rouge_l(predictions, references)}
