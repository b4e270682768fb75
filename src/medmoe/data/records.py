"""The evaluation record store: each task's records by split, loaded once, and the examples
scorers read from them.

:class:`TaskRecords` serves a DataModule's tasks (their :class:`TaskConfig` s): the records of a
split (:meth:`TaskRecords.records`), the refusal of evaluation records that are also training
records (:meth:`TaskRecords.check_disjoint`), and scorer examples over a fixed subset with the
harness's few-shot selection (:meth:`TaskRecords.eval_examples`, through
:mod:`medmoe.data.eval_protocol`). It holds no tokenised data and no Lightning state.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from medmoe.data.eval_protocol import build_eval_examples
from medmoe.data.sources import Record, load_records
from medmoe.data.task_config import TaskConfig
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SUBSET_SEED", "TaskRecords", "fixed_subset"]

SUBSET_SEED = 0  # fixes every max_train / max_eval / limit subset, whatever the run's seed
T = TypeVar("T")


def fixed_subset(items: Sequence[T], limit: int | None) -> list[T]:
    """The first ``limit`` of a fixed pseudo-random order (the same for every call and every
    run, so a larger limit extends a smaller one); ``None`` = all, shuffled."""
    order = list(range(len(items)))
    random.Random(SUBSET_SEED).shuffle(order)
    return [items[i] for i in order[:limit]]


def _fingerprint(record: Record) -> str:
    return json.dumps(record, sort_keys=True, default=str)


class TaskRecords:
    """The records of ``configs``' tasks by ``(task, split)``, each loaded once.

    Args:
        configs: the tasks, in task-id order.
        chat_tokenizer: returns the tokenizer whose chat template renders evaluation prompts
            (the harness's ``--apply_chat_template``), or ``None`` for plain text; called only
            when examples are built.
    """

    def __init__(
        self,
        configs: Sequence[TaskConfig],
        chat_tokenizer: Callable[[], PreTrainedTokenizerBase | None] = lambda: None,
    ) -> None:
        self.configs = {c.name: c for c in configs}
        self.chat_tokenizer = chat_tokenizer
        self._loaded: dict[tuple[str, str], list[Record]] = {}

    def config(self, name: str) -> TaskConfig:
        try:
            return self.configs[name]
        except KeyError:
            raise ValueError(
                f"task {name!r} is not in this DataModule; it has {list(self.configs)}"
            ) from None

    def records(self, name: str, split: str | None = None) -> list[Record]:
        """All records of task ``name``'s ``split`` (default: its validation split)."""
        cfg = self.config(name)
        split = split or cfg.eval_split_name
        if (name, split) not in self._loaded:
            self._loaded[name, split] = load_records(
                cfg.task,
                cfg.source_of(split),
                split,
                cfg.field_map,
                whole_file=cfg.separate_eval_file,
            )
        return self._loaded[name, split]

    def check_disjoint(self, name: str, split: str) -> None:
        """Refuse (or, with ``allow_overlap``, warn) if ``split`` shares records with training."""
        cfg = self.config(name)
        train_split = cfg.train_split_name
        if split == train_split:
            return
        train = {_fingerprint(r) for r in self.records(name, train_split)}
        evaluated = self.records(name, split)
        shared = sum(_fingerprint(r) in train for r in evaluated)
        if not shared:
            return
        message = (
            f"task {name!r}: {shared} of {len(evaluated)} {split} records are also training "
            f"({train_split}) records (source {cfg.source}, eval_source {cfg.eval_source}): "
            "its scores would measure memorisation; give disjoint splits"
        )
        if not cfg.allow_overlap:
            raise ValueError(f"{message}, or set allow_overlap: true on the task to accept it")
        warnings.warn(f"CONTAMINATED EVALUATION: {message}", stacklevel=2)

    def eval_examples(
        self,
        name: str,
        split: str | None = None,
        limit: int | None = None,
        num_fewshot: int | None = None,
        fewshot_split: str | None = None,
    ) -> list[MultipleChoiceExample | GenerationExample]:
        """Scorer examples over a fixed subset of ``split`` (default: the validation split).

        The subset is the first ``limit`` (default: ``max_eval``) of :func:`fixed_subset`'s
        order. Each example's context holds ``num_fewshot`` demonstrations (default: the task
        config's, else the task's) from ``fewshot_split`` (default: the task's, e.g. MMLU
        ``dev``, else its training split in force), selected as the harness does.
        """
        cfg = self.config(name)
        task = cfg.task
        split = split or cfg.eval_split_name
        records = self.records(name, split)
        positions = fixed_subset(range(len(records)), limit or cfg.max_eval)
        n = next(v for v in (num_fewshot, cfg.num_fewshot, task.num_fewshot) if v is not None)
        fewshot_split = fewshot_split or task.fewshot_split(cfg.train_split_name)
        pool = self.records(name, fewshot_split) if n > 0 else []
        return build_eval_examples(
            task,
            records,
            positions,
            pool,
            n,
            same_split=fewshot_split == split,
            tokenizer=self.chat_tokenizer(),
        )
