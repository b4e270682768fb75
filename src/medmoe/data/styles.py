"""Prompt styles: how a task's records are rendered and evaluated, one renderer per style.

A :class:`~medmoe.data.tasks.Task` knows its schema and how its question reads in each style
(:meth:`~medmoe.data.tasks.Task.harness_prompt`, :meth:`~medmoe.data.tasks.Task.toy_prompt`);
the renderer of its ``prompt_style``, chosen once when the task is styled, decides everything
else that differs between styles:

- :class:`HarnessStyle` (``"harness"``, real data): EleutherAI lm-evaluation-harness 0.4.x's
  ``doc_to_text``, ``description``, ``num_fewshot``, ``fewshot_split``, sampler, ``until`` and
  ``max_gen_toks``, from the task's ``harness_*`` settings;
- :class:`ToyStyle` (``"toy"``, the toy clinic): the short format the shipped toy base was
  trained on: no description, zero-shot, demonstrations (when asked for) the first ones of
  the training split, generation cut at a blank line after at most 64 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

__all__ = ["PROMPT_STYLES", "HarnessStyle", "PromptStyle", "Renderer", "ToyStyle", "renderer"]

Record = Mapping[str, Any]
PromptStyle = Literal["harness", "toy"]
FewshotSampler = Literal["first_n", "random"]


class Task(Protocol):
    """What a renderer reads of a task (:class:`medmoe.data.tasks.Task` provides it)."""

    harness_num_fewshot: int
    harness_fewshot_split: str | None
    harness_sampler: FewshotSampler
    harness_stop: tuple[str, ...]
    harness_max_new_tokens: int

    def harness_description(self, record: Record) -> str: ...

    def harness_prompt(self, record: Record) -> str: ...

    def toy_prompt(self, record: Record) -> str: ...


class Renderer:
    """What a prompt style decides for a task (subclasses: one per style)."""

    name: str

    def description(self, task: Task, record: Record) -> str:
        """Text before the demonstrations and the question."""
        raise NotImplementedError

    def prompt(self, task: Task, record: Record) -> str:
        """The question text, ending before the answer."""
        raise NotImplementedError

    def num_fewshot(self, task: Task) -> int:
        """Default number of demonstrations per evaluated record."""
        raise NotImplementedError

    def sampler(self, task: Task) -> FewshotSampler:
        """How demonstrations are drawn (see :mod:`medmoe.data.eval_protocol`)."""
        raise NotImplementedError

    def fewshot_split(self, task: Task, train_split: str) -> str:
        """The split demonstrations come from, given the training split in force."""
        raise NotImplementedError

    def stop(self, task: Task) -> tuple[str, ...]:
        """Stop strings of generation."""
        raise NotImplementedError

    def max_new_tokens(self, task: Task) -> int:
        """Generation budget in tokens."""
        raise NotImplementedError


class HarnessStyle(Renderer):
    """lm-evaluation-harness's task settings (the task's ``harness_*`` class attributes)."""

    name = "harness"

    def description(self, task: Task, record: Record) -> str:
        return task.harness_description(record)

    def prompt(self, task: Task, record: Record) -> str:
        return task.harness_prompt(record)

    def num_fewshot(self, task: Task) -> int:
        return task.harness_num_fewshot

    def sampler(self, task: Task) -> FewshotSampler:
        return task.harness_sampler

    def fewshot_split(self, task: Task, train_split: str) -> str:
        return task.harness_fewshot_split or train_split

    def stop(self, task: Task) -> tuple[str, ...]:
        return task.harness_stop

    def max_new_tokens(self, task: Task) -> int:
        return task.harness_max_new_tokens


class ToyStyle(Renderer):
    """The toy clinic's format: the words the toy base knows, zero-shot by default."""

    name = "toy"
    stop_strings: tuple[str, ...] = ("\n\n",)
    generation_budget = 64

    def description(self, task: Task, record: Record) -> str:
        return ""

    def prompt(self, task: Task, record: Record) -> str:
        return task.toy_prompt(record)

    def num_fewshot(self, task: Task) -> int:
        return 0

    def sampler(self, task: Task) -> FewshotSampler:
        return "first_n"

    def fewshot_split(self, task: Task, train_split: str) -> str:
        return train_split

    def stop(self, task: Task) -> tuple[str, ...]:
        return self.stop_strings

    def max_new_tokens(self, task: Task) -> int:
        return self.generation_budget


RENDERERS: dict[str, Renderer] = {r.name: r for r in (HarnessStyle(), ToyStyle())}
PROMPT_STYLES: tuple[str, ...] = tuple(RENDERERS)


def renderer(style: str, owner: str) -> Renderer:
    """The renderer of ``style``; ValueError naming ``owner`` (a task) and the styles known."""
    try:
        return RENDERERS[style]
    except KeyError:
        raise ValueError(
            f"{owner}: prompt_style {style!r} is not one of {', '.join(map(repr, PROMPT_STYLES))}"
        ) from None
