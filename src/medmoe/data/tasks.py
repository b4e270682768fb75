"""Task definitions: upstream schema -> (prompt, target) for training, and an eval example.

A task is a source (hub id + config, or a local export), its splits, ONE prompt template
shared by the real data and the toy clinic, the training target, and a metric. Targets start
with a space, so ``prompt + target`` is the training text.

==============  ===================================  ========  ===============================
task            default source                       metric    eval example
==============  ===================================  ========  ===============================
pubmedqa        qiaojin/PubMedQA (pqa_labeled)       accuracy  choices " yes" / " no" / " maybe"
medqa           GBaker/MedQA-USMLE-4-options         accuracy  choices " A" .. " D"
clinical_sum    AGBonnet/augmented-clinical-notes    rouge_l   generation, reference summary
                (stand-in) or a local MIMIC-III
                export (see :class:`ClinicalSumTask`)
mmlu            cais/mmlu (all)                      accuracy  choices " A" .. " D"
gsm8k           openai/gsm8k (main)                  gsm8k     generation, reference solution
==============  ===================================  ========  ===============================

Splits an upstream lacks are carved from another split by a fixed seeded permutation
(:class:`Carve`): PubMedQA's ``pqa_labeled`` ships 1000 records as ``train`` only, so
``test`` (50%) and ``validation`` (10%) come from it and ``train`` keeps the rest.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from medmoe.eval.examples import GenerationExample, MultipleChoiceExample

Record = Mapping[str, Any]
Group = Literal["domain", "general"]
Metric = Literal["accuracy", "gsm8k", "rouge_l"]
LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F", "G", "H")


class RecordError(ValueError):
    """A record breaks its task's schema; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Carve:
    """Split ``source`` by a seeded permutation: the first ``fractions`` go to the named splits.

    What is left keeps the name ``source``. Carving applies only when none of the carved splits
    exists upstream. Each carved split gets at least one record when there are more records
    than splits (tiny local files stay usable).
    """

    source: str
    fractions: tuple[tuple[str, float], ...]
    seed: int = 0

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fractions)

    def indices(self, n: int, part: str) -> list[int]:
        """Indices of ``part`` (a carved split or ``source`` for the rest) among ``n`` records."""
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        start = 0
        for name, fraction in self.fractions:
            size = max(1, round(fraction * n)) if n > len(self.fractions) else 0
            if name == part:
                return sorted(order[start : start + size])
            start += size
        if part != self.source:
            raise ValueError(f"carve has no part {part!r}; parts: {[*self.parts, self.source]}")
        return sorted(order[start:])


def prompt_mc(question: str, options: Sequence[str]) -> str:
    """The multiple-choice template: question, lettered options, ``Answer:``."""
    lines = [f"Question: {question}"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join([*lines, "Answer:"])


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _require_str(record: Record, name: str) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(name, f"field {name!r} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class Task:
    """One task: where its records come from, how they are formatted, how they are scored.

    Subclasses implement :meth:`format`, :meth:`eval_example` and, for value checks beyond the
    presence of :attr:`required_fields`, :meth:`check`.
    """

    name: str
    group: Group
    metric: Metric
    hub_id: str | None
    hub_config: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    carve: Carve | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    field_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    required_fields: ClassVar[tuple[str, ...]] = ()

    def format(self, record: Record) -> tuple[str, str]:
        """``(prompt, target)`` for training; the target starts with a space."""
        raise NotImplementedError

    def eval_example(self, record: Record) -> MultipleChoiceExample | GenerationExample:
        """The example the task's scorer consumes."""
        raise NotImplementedError

    def check(self, record: Record) -> None:
        """Raise :class:`RecordError` if a required field's value is unusable."""

    def normalize(self, record: Record) -> Record:
        """Map an upstream variant of the schema onto the documented one (default: as is)."""
        return record

    def validate(self, record: Record) -> None:
        """Check presence (``None`` counts as missing) and values of the required fields."""
        for name in self.required_fields:
            if record.get(name) is None:
                raise RecordError(name, f"missing required field {name!r}")
        self.check(record)

    def resolve_split(self, split: str, available: Sequence[str]) -> tuple[str, str | None]:
        """``(upstream split, carved part or None)`` for ``split`` given the ``available`` ones."""
        carve = self.carve
        carving = (
            carve is not None
            and carve.source in available
            and not any(p in available for p in carve.parts)
        )
        if carving and carve is not None and (split in carve.parts or split == carve.source):
            return carve.source, split
        if split in available:
            return split, None
        raise ValueError(
            f"task {self.name!r} has no split {split!r}; available: {', '.join(available)}"
        )


@dataclass(frozen=True)
class PubMedQATask(Task):
    """``qiaojin/PubMedQA`` ``pqa_labeled``: yes/no/maybe from abstract contexts.

    Record: ``pubid`` (int), ``question``, ``context`` {``contexts``: list[str], ``labels``,
    ``meshes``, ``reasoning_required_pred``, ``reasoning_free_pred``}, ``long_answer``,
    ``final_decision`` ("yes" | "no" | "maybe").
    """

    required_fields: ClassVar[tuple[str, ...]] = ("pubid", "question", "context", "final_decision")
    decisions: ClassVar[tuple[str, ...]] = ("yes", "no", "maybe")

    def check(self, record: Record) -> None:
        _require_str(record, "question")
        contexts = (
            record["context"].get("contexts") if isinstance(record["context"], dict) else None
        )
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise RecordError(
                "context", "field 'context' must be a dict with 'contexts': list[str]"
            )
        if record["final_decision"] not in self.decisions:
            raise RecordError(
                "final_decision",
                f"field 'final_decision' has value {record['final_decision']!r}; "
                f"accepted: {', '.join(map(repr, self.decisions))}",
            )

    def prompt(self, record: Record) -> str:
        context = " ".join(record["context"]["contexts"])
        return f"Context: {context}\nQuestion: {record['question']}\nAnswer:"

    def format(self, record: Record) -> tuple[str, str]:
        return self.prompt(record), f" {record['final_decision']}"

    def eval_example(self, record: Record) -> MultipleChoiceExample:
        choices = tuple(f" {d}" for d in self.decisions)
        answer = self.decisions.index(record["final_decision"])
        return MultipleChoiceExample(self.prompt(record), choices, answer)


@dataclass(frozen=True)
class MedQATask(Task):
    """``GBaker/MedQA-USMLE-4-options``: USMLE questions with lettered options.

    Record: ``question``, ``answer`` (option text), ``options`` {"A".."D": str}, ``meta_info``,
    ``answer_idx`` ("A".."D"), ``metamap_phrases`` (list[str]).
    """

    required_fields: ClassVar[tuple[str, ...]] = ("question", "options", "answer_idx")

    def _letters(self, record: Record) -> list[str]:
        options = record["options"]
        if not isinstance(options, dict):
            raise RecordError("options", f"field 'options' must be a dict, got {options!r}")
        letters = [k for k in LETTERS if options.get(k) is not None]
        if len(letters) < 2 or letters != list(LETTERS[: len(letters)]):
            raise RecordError("options", f"field 'options' needs keys A, B, ...; got {options!r}")
        return letters

    def check(self, record: Record) -> None:
        _require_str(record, "question")
        letters = self._letters(record)
        if record["answer_idx"] not in letters:
            raise RecordError(
                "answer_idx",
                f"field 'answer_idx' has value {record['answer_idx']!r}; accepted: "
                f"{', '.join(map(repr, letters))}",
            )

    def format(self, record: Record) -> tuple[str, str]:
        options = [record["options"][k] for k in self._letters(record)]
        return prompt_mc(record["question"], options), f" {record['answer_idx']}"

    def eval_example(self, record: Record) -> MultipleChoiceExample:
        letters = self._letters(record)
        prompt, _ = self.format(record)
        choices = tuple(f" {k}" for k in letters)
        return MultipleChoiceExample(prompt, choices, letters.index(record["answer_idx"]))


@dataclass(frozen=True)
class MMLUTask(Task):
    """``cais/mmlu`` (config ``all``): ``question``, ``subject``, ``choices`` (4), ``answer`` (0-3).

    The ``auxiliary_train`` config nests its rows under a ``train`` struct; those are unwrapped.
    """

    required_fields: ClassVar[tuple[str, ...]] = ("question", "choices", "answer")

    def normalize(self, record: Record) -> Record:
        nested = record.get("train")
        if "question" not in record and isinstance(nested, dict):
            return nested
        return record

    def check(self, record: Record) -> None:
        _require_str(record, "question")
        choices, answer = record["choices"], record["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise RecordError("choices", f"field 'choices' must be a list of 2-8, got {choices!r}")
        if (
            isinstance(answer, bool)
            or not isinstance(answer, int)
            or not 0 <= answer < len(choices)
        ):
            raise RecordError(
                "answer",
                f"field 'answer' has value {answer!r}; accepted: an int in 0..{len(choices) - 1}",
            )

    def format(self, record: Record) -> tuple[str, str]:
        return prompt_mc(record["question"], record["choices"]), f" {LETTERS[record['answer']]}"

    def eval_example(self, record: Record) -> MultipleChoiceExample:
        choices = tuple(f" {k}" for k in LETTERS[: len(record["choices"])])
        return MultipleChoiceExample(self.format(record)[0], choices, record["answer"])


@dataclass(frozen=True)
class GSM8KTask(Task):
    """``openai/gsm8k`` (config ``main``): ``question``, ``answer`` (solution ending ``#### N``)."""

    required_fields: ClassVar[tuple[str, ...]] = ("question", "answer")

    def check(self, record: Record) -> None:
        _require_str(record, "question")
        answer = _require_str(record, "answer")
        final = answer.rsplit("####", 1)[-1].strip().replace(",", "")
        if "####" not in answer or not final.lstrip("-").replace(".", "", 1).isdigit():
            raise RecordError(
                "answer",
                f"field 'answer' has value {_clip(answer)!r}; accepted: a solution ending in "
                "'#### <number>'",
            )

    def prompt(self, record: Record) -> str:
        return f"Question: {record['question']}\nAnswer:"

    def format(self, record: Record) -> tuple[str, str]:
        return self.prompt(record), f" {record['answer']}"

    def eval_example(self, record: Record) -> GenerationExample:
        return GenerationExample(self.prompt(record), record["answer"])


@dataclass(frozen=True)
class ClinicalSumTask(Task):
    """Clinical-note summarisation.

    The local MIMIC-III export (credentialed, no hub) is a JSONL or CSV file, or a directory of
    ``train`` / ``validation`` / ``test`` files, with one record per note:

    - ``note_id`` (str or int): the note's id (e.g. MIMIC-III ``NOTEEVENTS.ROW_ID``),
    - ``text`` (str): the clinical note,
    - ``summary`` (str): its reference summary.

    The open stand-in ``AGBonnet/augmented-clinical-notes`` (``train`` only, so validation and
    test are carved from it) is mapped by :attr:`field_maps`: ``idx`` -> ``note_id``,
    ``note`` -> ``text``, ``summary`` -> ``summary``. Other exports can pass their own map.
    """

    required_fields: ClassVar[tuple[str, ...]] = ("note_id", "text", "summary")

    def check(self, record: Record) -> None:
        _require_str(record, "text")
        _require_str(record, "summary")

    def prompt(self, record: Record) -> str:
        return f"Note: {record['text']}\nSummary:"

    def format(self, record: Record) -> tuple[str, str]:
        return self.prompt(record), f" {record['summary']}"

    def eval_example(self, record: Record) -> GenerationExample:
        return GenerationExample(self.prompt(record), record["summary"])


CLINICAL_STAND_IN = "AGBonnet/augmented-clinical-notes"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        PubMedQATask(
            "pubmedqa",
            "domain",
            "accuracy",
            "qiaojin/PubMedQA",
            "pqa_labeled",
            splits=("train",),
            carve=Carve("train", (("test", 0.5), ("validation", 0.1))),
        ),
        MedQATask(
            "medqa",
            "domain",
            "accuracy",
            "GBaker/MedQA-USMLE-4-options",
            carve=Carve("train", (("validation", 0.05),)),
        ),
        ClinicalSumTask(
            "clinical_sum",
            "domain",
            "rouge_l",
            CLINICAL_STAND_IN,
            splits=("train",),
            carve=Carve("train", (("test", 0.1), ("validation", 0.05))),
            field_maps={CLINICAL_STAND_IN: {"idx": "note_id", "note": "text"}},
        ),
        MMLUTask(
            "mmlu",
            "general",
            "accuracy",
            "cais/mmlu",
            "all",
            splits=("auxiliary_train", "dev", "validation", "test"),
            train_split="auxiliary_train",
        ),
        GSM8KTask(
            "gsm8k",
            "general",
            "gsm8k",
            "openai/gsm8k",
            "main",
            carve=Carve("train", (("validation", 0.05),)),
        ),
    )
}


# The task names of each group, in registry order: the one place the medical tuple is written.
DOMAIN_TASK_NAMES: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.group == "domain")
GENERAL_TASK_NAMES: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.group == "general")


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
