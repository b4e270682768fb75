"""One task of a DataModule's mixture, as the config gives it, and the splits it resolves to."""

from __future__ import annotations

from dataclasses import dataclass

from medmoe.data.styles import PromptStyle, renderer
from medmoe.data.tasks import Task, get_task

__all__ = ["TaskConfig"]


@dataclass
class TaskConfig:
    """One task of the mixture.

    Args:
        name: a registered task (``pubmedqa``, ``medqa``, ``clinical_sum``, ``mmlu``, ``gsm8k``).
        source: ``"toy"``, a hub id, or a local file/directory; ``None`` = the task's hub id.
        split: the training split; ``None`` = the task's (``train``; ``auxiliary_train`` for MMLU).
        eval_split: the validation split; ``None`` = ``validation`` (carved where missing).
        eval_source: where ``eval_split`` comes from; ``None`` = ``source``.
        max_train: keep this many training records (a fixed subset); ``None`` = all.
        max_eval: keep this many validation (and test) records, a fixed subset; ``None`` = all.
        weight: mixture weight multiplier (the weight itself with ``sampling: fixed``); 1.0.
        field_map: renames upstream fields to the task's schema, e.g. ``{"note": "text"}``;
            every key must be a field of the source.
        allow_overlap: evaluate although some evaluation records are also training records
            (warned loudly); by default such a task is refused.
        prompt_style: ``harness`` (lm-evaluation-harness's prompts, few-shot selection,
            generation settings) or ``toy`` (the toy clinic's short format, which the shipped
            toy base was trained on); ``None`` = ``toy`` for ``source: toy``, else ``harness``.
        num_fewshot: demonstrations per evaluated example; ``None`` = the task's default
            (harness style: MMLU 5 from ``dev``, GSM8K 5 from ``train``, others 0; toy: 0).
    """

    name: str
    source: str | None = None
    split: str | None = None
    eval_split: str | None = None
    eval_source: str | None = None
    max_train: int | None = None
    max_eval: int | None = None
    weight: float | None = None
    field_map: dict[str, str] | None = None
    allow_overlap: bool = False
    prompt_style: PromptStyle | None = None
    num_fewshot: int | None = None

    def __post_init__(self) -> None:
        get_task(self.name)  # ValueError listing the known tasks
        if self.prompt_style is not None:
            renderer(self.prompt_style, self.name)  # ValueError naming the accepted styles
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(
                f"{self.name}: num_fewshot must be >= 0 or None, got {self.num_fewshot}"
            )
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1 or None, got {value}")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"{self.name}: weight must be >= 0, got {self.weight}")

    @property
    def style(self) -> PromptStyle:
        """The prompt style in force (``prompt_style``, or the source's when unset)."""
        if self.prompt_style is not None:
            return self.prompt_style
        return "toy" if self.source == "toy" else "harness"

    @property
    def task(self) -> Task:
        """The registered task in this config's prompt style."""
        return get_task(self.name).styled(self.style)

    # The splits in force: the one place the config's split keys meet the task's defaults.

    @property
    def train_split_name(self) -> str:
        """The training split (``split``, else the task's: ``train``, MMLU ``auxiliary_train``)."""
        return self.split or get_task(self.name).train_split

    @property
    def eval_split_name(self) -> str:
        """The validation split (``eval_split``, else the task's: ``validation``)."""
        return self.eval_split or get_task(self.name).eval_split

    @property
    def test_split_name(self) -> str:
        """The test split (the task's: ``test``)."""
        return get_task(self.name).test_split

    def source_of(self, split: str) -> str | None:
        """Where ``split`` is read from: ``source`` for the training split, else
        ``eval_source`` when given."""
        if split == self.train_split_name:
            return self.source
        return self.eval_source or self.source

    @property
    def separate_eval_file(self) -> bool:
        """Training and evaluation come from two sources, each used whole (none is carved)."""
        return self.eval_source is not None and self.eval_source != self.source
