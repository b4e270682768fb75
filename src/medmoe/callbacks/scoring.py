"""The scorer the evaluation callbacks share: a task's fixed subset through ``evaluate_examples``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from medmoe.adapters import routing_recording_paused, task_routing
from medmoe.eval import evaluate_examples

__all__ = ["PRIMARY_METRIC", "EvalClock", "TaskScorer", "task_metric"]

# The number a table or a delta reports for each metric family.
PRIMARY_METRIC: dict[str, str] = {
    "accuracy": "accuracy",
    "gsm8k": "exact_match_strict",
    "rouge_l": "rouge_l",
}


def task_metric(task: str) -> str:
    """The metric family (``accuracy``, ``gsm8k``, ``rouge_l``) of a registered task."""
    from medmoe.data import get_task

    return get_task(task).metric


def _routing_recording_paused(model: nn.Module) -> AbstractContextManager[None]:
    """Evaluation forwards leave the training step's recorded routing in place."""
    return routing_recording_paused(model)


def _task_routing(
    trainer: Trainer, pl_module: LightningModule, task: str
) -> AbstractContextManager[object]:
    """Route by ``task`` for adapters that pick an adapter per task (``task_context``, e.g.
    multi-LoRA), with the task id the model was trained with; a no-op for the others."""
    routed_by_task = task_routing(pl_module.adapter)
    if routed_by_task is None:
        return nullcontext()
    names = list(getattr(pl_module, "task_names", None) or trainer.datamodule.task_names)
    if task not in names:
        raise ValueError(f"{type(pl_module.adapter).__name__} has no adapter for task {task!r}")
    return routed_by_task.task_context(pl_module.model, names.index(task))


def _answering_adapters(
    trainer: Trainer, pl_module: LightningModule, task: str
) -> list[tuple[str, int]] | None:
    """For a per-task-adapter method and a task without an adapter of its own (a general
    benchmark under multi-LoRA), the ``(name, id)`` of every domain adapter that could be
    deployed to answer it; ``None`` when the task has its own adapter or the method has none."""
    routed_by_task = task_routing(pl_module.adapter)
    if routed_by_task is None:
        return None
    num_adapters = routed_by_task.num_tasks
    names = list(getattr(pl_module, "task_names", None) or trainer.datamodule.task_names)
    if task in names and names.index(task) < num_adapters:
        return None
    return [(names[i] if i < len(names) else str(i), i) for i in range(num_adapters)]


@dataclass
class TaskScorer:
    """Scores tasks of the trainer's datamodule on their fixed evaluation subsets.

    The datamodule provides ``task_names``, ``tokenizer`` and ``eval_records`` (a
    :class:`~medmoe.data.records.TaskRecords`: ``eval_examples(task, split, limit, ...)``); the
    task's metric comes from the task registry.
    Methods with one adapter per task (a :class:`~medmoe.adapters.TaskRoutedAdapter`) score each task with
    its own adapter.
    The evaluation protocol is the task's (:class:`medmoe.data.tasks.Task`, harness-identical
    for real data): its prompt, ``shots`` demonstrations (``None``: the task's ``num_fewshot``)
    chosen by its sampler from ``shot_split`` (``None``: the task's few-shot split, e.g. MMLU
    ``dev``, else its training split), its stop strings and ``max_new_tokens`` (``None``: the
    task's, 256 for GSM8K). The BOS switch and the chat template are the datamodule's
    (``add_bos_token``, ``apply_chat_template``), so every scorer uses the same.
    Examples are fetched once per (datamodule, task, split). Every rank scores the same examples (safe
    under any strategy); loggers write on rank zero.
    """

    split: str = "validation"
    limit: int | None = 64
    batch_size: int = 16
    max_new_tokens: int | None = None
    shots: int | None = None
    shot_split: str | None = None
    _examples: dict[tuple[Any, ...], list[Any]] = field(
        default_factory=dict, init=False, repr=False
    )

    def present(
        self, trainer: Trainer, tasks: Sequence[str], owner: str, warn: bool = True
    ) -> list[str]:
        """The ``tasks`` the datamodule has; a warning names the others (if ``warn``)."""
        datamodule = trainer.datamodule
        for attribute in ("task_names", "tokenizer", "eval_records"):
            if not hasattr(datamodule, attribute):
                raise TypeError(
                    f"{owner} needs a datamodule with {attribute!r} (a MultiTaskDataModule); "
                    f"got {type(datamodule).__name__}"
                )
        known = set(datamodule.task_names)
        missing = [t for t in tasks if t not in known]
        if missing and warn:
            rank_zero_warn(
                f"{owner}: task(s) {missing} are not in the datamodule ({sorted(known)}); skipped"
            )
        return [t for t in tasks if t in known]

    def _fetch(self, trainer: Trainer, task: str) -> list[Any]:
        key = (id(trainer.datamodule), task, self.split, self.limit, self.shots, self.shot_split)
        if key not in self._examples:
            examples = trainer.datamodule.eval_records.eval_examples(
                task,
                split=self.split,
                limit=self.limit,
                num_fewshot=self.shots,
                fewshot_split=self.shot_split,
            )
            self._examples[key] = list(examples)
        return self._examples[key]

    def _generation(self, trainer: Trainer, task: str) -> dict[str, Any]:
        """Stop strings and budget of ``task`` (the datamodule's styled task, when it has one)."""
        configs = getattr(trainer.datamodule, "configs", None)
        names = [c.name for c in configs] if configs is not None else []
        if task in names:
            spec = configs[names.index(task)].task
        else:
            from medmoe.data import get_task

            spec = get_task(task)
        budget = spec.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        return {"stop": spec.stop, "max_new_tokens": budget}

    def score(
        self, trainer: Trainer, pl_module: LightningModule, task: str, *, base: bool = False
    ) -> dict[str, float]:
        """``{metric: value}`` of ``task``; with ``base``, the model with its adapter off.

        A task with no adapter of its own under a per-task-adapter method (a general benchmark
        under multi-LoRA, which has one adapter per domain task) is scored under each domain
        adapter: ``<metric>`` is their mean, ``<metric>_worst`` the lowest and
        ``<metric>_under_<adapter task>`` each one.

        Raises NotImplementedError when ``base`` is asked of a method that cannot switch its
        adapter off (full fine-tuning).
        """
        adapters = _answering_adapters(trainer, pl_module, task)
        if adapters is not None and base:  # the adapters are off: no task routing needed
            return self._score_with(trainer, pl_module, task, nullcontext(), True)
        if adapters is not None:
            context = task_routing(pl_module.adapter).task_context
            runs = {}
            for name, index in adapters:
                with context(pl_module.model, index):
                    runs[name] = self._score_with(trainer, pl_module, task, nullcontext(), False)
            merged: dict[str, float] = {}
            for metric_name in next(iter(runs.values())):
                values = [scores[metric_name] for scores in runs.values()]
                merged[metric_name] = sum(values) / len(values)
                merged[f"{metric_name}_worst"] = min(values)
                for name, scores in runs.items():
                    merged[f"{metric_name}_under_{name}"] = scores[metric_name]
            return merged
        return self._score_with(
            trainer, pl_module, task, _task_routing(trainer, pl_module, task), base
        )

    def _score_with(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        task: str,
        routing: AbstractContextManager[object],
        base: bool,
    ) -> dict[str, float]:
        metric = task_metric(task)
        examples = self._fetch(trainer, task)
        model = pl_module.model
        kwargs = {
            "batch_size": self.batch_size,
            "add_bos_token": getattr(trainer.datamodule, "add_bos_token", None),
            **self._generation(trainer, task),
        }
        tokenizer = trainer.datamodule.tokenizer
        # The training numerics (autocast under mixed precision), the task's adapter where the
        # method has one per task, and the training step's recorded routing left in place.
        with (
            trainer.precision_plugin.forward_context(),
            routing,
            _routing_recording_paused(model),
        ):
            if base:
                with pl_module.adapter.disabled(model):
                    return evaluate_examples(model, tokenizer, examples, metric, **kwargs)
            return evaluate_examples(model, tokenizer, examples, metric, **kwargs)

    def primary(self, task: str, scores: dict[str, float]) -> float:
        """The headline number of ``scores`` (accuracy, GSM8K strict match, ROUGE-L)."""
        return scores[PRIMARY_METRIC[task_metric(task)]]


class EvalClock:
    """Wall time spent in evaluation, cumulative, and its share of the time since fit start."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._origin: float | None = None

    def start(self) -> None:
        if self._origin is None:
            self._origin = time.perf_counter()

    @contextmanager
    def measure(self) -> Iterator[None]:
        self.start()
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - began

    def fraction(self) -> float:
        """Evaluation seconds over wall seconds since :meth:`start` (0 before any)."""
        if self._origin is None:
            return 0.0
        return self.seconds / max(time.perf_counter() - self._origin, 1e-9)
