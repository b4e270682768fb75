"""Few-shot selection and chat rendering of evaluation examples, as lm-evaluation-harness does.

Samplers (:attr:`medmoe.data.tasks.Task.fewshot_sampler`), the harness's ``fewshot_config``:

- ``first_n`` (``FirstNSampler``, MMLU): the first n records of the task's pool for the record
  (MMLU: the ``dev`` records of its subject), in split order;
- ``random`` (the default ``ContextSampler``, GSM8K, MedQA, PubMedQA): one
  ``random.Random(1234)`` whose k-th ``sample(pool, n)`` gives the demonstrations of the k-th
  record of the evaluated split (the harness draws once per document in split order, with
  its ``fewshot_random_seed`` 1234). A record's demonstrations therefore depend only on its
  position in its split, so a fixed subset gets the same ones as the full split.

When the demonstrations come from the evaluated split itself, the record is removed from its
own pool (``rm_eval_doc``), the random sampler drawing ``n + 1`` as the harness does.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medmoe.data.tasks import HARNESS_FEWSHOT_SEED, Task
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["build_eval_examples", "chat_example", "random_shot_indices"]

Record = Mapping[str, Any]


def random_shot_indices(
    pool_size: int,
    n: int,
    positions: Sequence[int],
    seed: int = HARNESS_FEWSHOT_SEED,
    draw: int | None = None,
) -> dict[int, list[int]]:
    """Pool indices drawn for each split position: the ``position``-th of the successive
    ``Random(seed).sample(range(pool_size), draw)`` calls (``draw`` defaults to ``n``)."""
    draw = n if draw is None else draw
    if draw > pool_size:
        raise ValueError(f"cannot draw {draw} few-shot examples from a pool of {pool_size}")
    wanted = set(positions)
    rng = random.Random(seed)
    drawn: dict[int, list[int]] = {}
    for position in range(max(wanted, default=-1) + 1):
        indices = rng.sample(range(pool_size), draw)
        if position in wanted:
            drawn[position] = indices
    return drawn


def _first_n(task: Task, pool: Sequence[Record], record: Record, n: int, exclude: bool):
    candidates = task.fewshot_pool(pool, record)
    if exclude:
        candidates = [r for r in candidates if r != record]
    if n > len(candidates):
        raise ValueError(
            f"task {task.name!r}: {n} few-shot examples asked, but its few-shot pool for this "
            f"record has {len(candidates)}"
        )
    return candidates[:n]


def select_shots(
    task: Task,
    records: Sequence[Record],
    positions: Sequence[int],
    pool: Sequence[Record],
    n: int,
    same_split: bool,
) -> list[list[Record]]:
    """The demonstrations of ``records[p]`` for each ``p`` in ``positions`` (see the module)."""
    if n == 0:
        return [[] for _ in positions]
    if task.fewshot_sampler == "first_n":
        return [_first_n(task, pool, records[p], n, same_split) for p in positions]
    drawn = random_shot_indices(len(pool), n, positions, draw=n + 1 if same_split else None)
    shots = []
    for p in positions:
        chosen = [pool[i] for i in drawn[p]]
        if same_split:
            chosen = [r for r in chosen if r != records[p]][:n]
        shots.append(chosen)
    return shots


def chat_example(
    task: Task,
    record: Record,
    shots: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
) -> MultipleChoiceExample | GenerationExample:
    """``task.eval_example`` with its context rendered by the tokenizer's chat template (the
    harness's ``--apply_chat_template``): a system message with the description, one user
    message with the demonstrations and the question, the generation prompt; multiple-choice
    continuations then have no target delimiter (``"A"``, not ``" A"``), as in the harness."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"apply_chat_template is set but tokenizer {type(tokenizer).__name__} has no chat "
            "template; use an instruction-tuned base's tokenizer or set it to false"
        )
    prompt = tokenizer.apply_chat_template(
        task.messages(record, shots), tokenize=False, add_generation_prompt=True
    )
    example = task.eval_example(record, shots)
    if isinstance(example, MultipleChoiceExample):
        choices = tuple(c.removeprefix(example.target_delimiter) for c in example.choices)
        return MultipleChoiceExample(
            prompt, choices, example.answer, subject=example.subject, target_delimiter=""
        )
    return GenerationExample(prompt, example.reference)


def build_eval_examples(
    task: Task,
    records: Sequence[Record],
    positions: Sequence[int],
    pool: Sequence[Record],
    n: int,
    *,
    same_split: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[MultipleChoiceExample | GenerationExample]:
    """Examples of ``records[p]`` for ``p`` in ``positions`` with ``n`` demonstrations each
    from ``pool``; rendered through the chat template when a ``tokenizer`` is given."""
    shots = select_shots(task, records, positions, pool, n, same_split)
    if tokenizer is not None:
        return [
            chat_example(task, records[p], s, tokenizer)
            for p, s in zip(positions, shots, strict=True)
        ]
    return [task.eval_example(records[p], s) for p, s in zip(positions, shots, strict=True)]
