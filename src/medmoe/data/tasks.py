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

Prompt styles (:attr:`Task.prompt_style`, set per task config, see
:class:`~medmoe.data.task_config.TaskConfig`); each has one renderer
(:mod:`medmoe.data.styles`), chosen when the task is styled:

- ``"harness"`` (default for real data): the prompts, few-shot selection, generation settings
  and metrics of EleutherAI's lm-evaluation-harness 0.4.x tasks ``mmlu_<subject>``,
  ``medqa_4options``, ``pubmedqa`` and ``gsm8k`` (see docs/evaluation.md for the table):
  :meth:`Task.harness_prompt`, :meth:`Task.harness_description` and the ``harness_*`` settings;
- ``"toy"`` (the toy clinic's): the short format the shipped toy base was trained on, words its
  264-word vocabulary has (:meth:`Task.toy_prompt`: MMLU ``"Question: "`` without a subject
  line, PubMedQA ``"Context: "`` with contexts joined by spaces; zero-shot by default,
  generation cut at a blank line).

Splits an upstream lacks are carved from another split by a fixed seeded permutation
(:class:`Carve`): PubMedQA's ``pqa_labeled`` ships 1000 records as ``train`` only, so
``test`` (50%) and ``validation`` (10%) come from it and ``train`` keeps the rest.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from medmoe.data.styles import FewshotSampler, PromptStyle, Renderer, renderer
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample

Record = Mapping[str, Any]
Group = Literal["domain", "general"]
Metric = Literal["accuracy", "gsm8k", "rouge_l"]
# lm-evaluation-harness: target_delimiter " " between a question and its answer, and
# fewshot_delimiter "\n\n" after each demonstration; the default sampler's seed.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
HARNESS_FEWSHOT_SEED = 1234
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


def prompt_mc(question: str, options: Sequence[str], label: str = "Question: ") -> str:
    """The multiple-choice template: ``label`` + question, lettered options, ``Answer:``.

    ``label=""`` with a stripped question is the harness's MMLU ``doc_to_text``; the default is
    its MedQA one (``preprocess_medqa.doc_to_text``).
    """
    lines = [f"{label}{question}"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join([*lines, "Answer:"])


def _choice_example(
    task: Task, record: Record, shots: Sequence[Record], letters: Sequence[str], answer: int
) -> MultipleChoiceExample:
    """Letter choices ``" A"`` .. scored after the few-shot context (harness ``acc``)."""
    choices = tuple(f"{TARGET_DELIMITER}{k}" for k in letters)
    return MultipleChoiceExample(
        task.context(record, shots), choices, answer, subject=task.subject(record)
    )


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

    Subclasses implement :meth:`harness_prompt` (and :meth:`toy_prompt` where the toy clinic's
    question reads differently), :meth:`answer_text`, :meth:`eval_example` and, for value
    checks beyond the presence of :attr:`required_fields`, :meth:`check`. Everything that
    differs between prompt styles is :attr:`renderer`'s (:mod:`medmoe.data.styles`).
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
    prompt_style: PromptStyle = "harness"
    required_fields: ClassVar[tuple[str, ...]] = ()
    # Harness settings (lm-evaluation-harness task YAML); the toy style overrides some below.
    harness_num_fewshot: ClassVar[int] = 0
    harness_fewshot_split: ClassVar[str | None] = None  # None: the training split
    harness_sampler: ClassVar[FewshotSampler] = "random"
    harness_stop: ClassVar[tuple[str, ...]] = ("\n\n",)
    harness_max_new_tokens: ClassVar[int] = 256

    def __post_init__(self) -> None:
        # the one place the style is looked up (ValueError naming the accepted styles)
        object.__setattr__(self, "_renderer", renderer(self.prompt_style, f"task {self.name!r}"))

    @property
    def renderer(self) -> Renderer:
        """The renderer of :attr:`prompt_style` (:mod:`medmoe.data.styles`)."""
        return self._renderer  # type: ignore[attr-defined]

    def styled(self, prompt_style: PromptStyle) -> Task:
        """This task with ``prompt_style`` (``"harness"`` or ``"toy"``)."""
        return replace(self, prompt_style=prompt_style)

    # --- evaluation protocol (the style's) ----------------------------------------------------

    @property
    def num_fewshot(self) -> int:
        """Default number of demonstrations (harness convention; 0 for the toy style)."""
        return self.renderer.num_fewshot(self)

    @property
    def fewshot_sampler(self) -> FewshotSampler:
        """``first_n`` (the pool's first n, in order) or ``random`` (the harness's default
        sampler: ``random.Random(1234)``, one draw per evaluated record in split order)."""
        return self.renderer.sampler(self)

    def fewshot_split(self, train_split: str | None = None) -> str:
        """The split demonstrations come from (the harness's ``fewshot_split``, e.g. MMLU's
        ``dev``), else the training split in force (default: the task's own)."""
        return self.renderer.fewshot_split(self, train_split or self.train_split)

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings of generation (the harness's ``until``)."""
        return self.renderer.stop(self)

    @property
    def max_new_tokens(self) -> int:
        """Generation budget (the harness's ``max_gen_toks``, 256 by default)."""
        return self.renderer.max_new_tokens(self)

    def fewshot_pool(self, pool: Sequence[Record], record: Record) -> list[Record]:
        """The records demonstrations for ``record`` are drawn from (default: all of ``pool``)."""
        return list(pool)

    # --- rendering ----------------------------------------------------------------------------

    def subject(self, record: Record) -> str:
        """The record's subject for per-subject scores (MMLU); ``""`` for the others."""
        return ""

    def description(self, record: Record) -> str:
        """Text before the demonstrations and the question, in this task's style."""
        return self.renderer.description(self, record)

    def prompt(self, record: Record) -> str:
        """The question text, ending before the answer, in this task's style."""
        return self.renderer.prompt(self, record)

    def harness_description(self, record: Record) -> str:
        """The harness's ``description`` (default: none)."""
        return ""

    def harness_prompt(self, record: Record) -> str:
        """The harness's ``doc_to_text``: the question, ending before the answer."""
        raise NotImplementedError

    def toy_prompt(self, record: Record) -> str:
        """The toy clinic's question text (default: the harness's)."""
        return self.harness_prompt(record)

    def answer_text(self, record: Record) -> str:
        """The gold answer without its delimiter (``doc_to_choice[doc_to_target]``)."""
        raise NotImplementedError

    def format(self, record: Record) -> tuple[str, str]:
        """``(prompt, target)`` for training: the zero-shot prompt and ``" " + answer``."""
        return self.description(record) + self.prompt(record), (
            TARGET_DELIMITER + self.answer_text(record)
        )

    def demonstrations(self, shots: Sequence[Record]) -> str:
        """Each demonstration as ``prompt + " " + answer + "\n\n"`` (the harness's few-shot
        block, before the question)."""
        return "".join(
            f"{self.prompt(s)}{TARGET_DELIMITER}{self.answer_text(s)}{FEWSHOT_DELIMITER}"
            for s in shots
        )

    def messages(self, record: Record, shots: Sequence[Record] = ()) -> list[dict[str, str]]:
        """The context as chat messages, as the harness builds them for ``apply_chat_template``
        without ``fewshot_as_multiturn``: the description as the system message, then one user
        message with the demonstrations and the prompt."""
        description = self.description(record)
        system = [{"role": "system", "content": description}] if description else []
        user = self.demonstrations(shots) + self.prompt(record)
        return [*system, {"role": "user", "content": user}]

    def context(self, record: Record, shots: Sequence[Record] = ()) -> str:
        """Description, the demonstrations, then the prompt: the harness's ``fewshot_context``
        (plain text, no chat template)."""
        return self.description(record) + self.demonstrations(shots) + self.prompt(record)

    def eval_example(
        self, record: Record, shots: Sequence[Record] = ()
    ) -> MultipleChoiceExample | GenerationExample:
        """The example the task's scorer consumes, preceded by the demonstrations ``shots``."""
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

    def harness_prompt(self, record: Record) -> str:
        """``preprocess_pubmedqa.doc_to_text``: ``Abstract:`` and the contexts one per line."""
        contexts = record["context"]["contexts"]
        return f"Abstract: {chr(10).join(contexts)}\nQuestion: {record['question']}\nAnswer:"

    def toy_prompt(self, record: Record) -> str:
        """``Context:`` and the contexts joined by spaces."""
        contexts = record["context"]["contexts"]
        return f"Context: {' '.join(contexts)}\nQuestion: {record['question']}\nAnswer:"

    def answer_text(self, record: Record) -> str:
        return record["final_decision"]

    def eval_example(self, record: Record, shots: Sequence[Record] = ()) -> MultipleChoiceExample:
        answer = self.decisions.index(record["final_decision"])
        return _choice_example(self, record, shots, self.decisions, answer)


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

    def harness_prompt(self, record: Record) -> str:
        """``Question: {question}``, one ``X. option`` line per letter, ``Answer:`` (both
        styles; the harness's ``preprocess_medqa.doc_to_text``)."""
        options = [record["options"][k] for k in self._letters(record)]
        return prompt_mc(record["question"], options)

    def answer_text(self, record: Record) -> str:
        return record["answer_idx"]

    def eval_example(self, record: Record, shots: Sequence[Record] = ()) -> MultipleChoiceExample:
        letters = self._letters(record)
        return _choice_example(self, record, shots, letters, letters.index(record["answer_idx"]))


@dataclass(frozen=True)
class MMLUTask(Task):
    """``cais/mmlu`` (config ``all``): ``question``, ``subject``, ``choices`` (4), ``answer`` (0-3).

    The ``auxiliary_train`` config nests its rows under a ``train`` struct; those are unwrapped.
    """

    required_fields: ClassVar[tuple[str, ...]] = ("question", "choices", "answer")
    harness_num_fewshot: ClassVar[int] = 5  # the MMLU convention (the harness's CLI default: 0)
    harness_fewshot_split: ClassVar[str | None] = "dev"
    harness_sampler: ClassVar[FewshotSampler] = "first_n"

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

    def subject(self, record: Record) -> str:
        return str(record.get("subject") or "")

    def fewshot_pool(self, pool: Sequence[Record], record: Record) -> list[Record]:
        """The pool's records of ``record``'s subject (the harness's tasks are per subject)."""
        subject = self.subject(record)
        return [r for r in pool if self.subject(r) == subject]

    def harness_description(self, record: Record) -> str:
        """``"The following are multiple choice questions (with answers) about {subject with
        spaces}.\\n\\n"`` (none without a subject)."""
        subject = self.subject(record)
        if not subject:
            return ""
        return (
            "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n"
        )

    def harness_prompt(self, record: Record) -> str:
        """The stripped question (no label), ``A. ..`` lines, ``Answer:``."""
        return prompt_mc(record["question"].strip(), record["choices"], label="")

    def toy_prompt(self, record: Record) -> str:
        """The question after ``Question: ``, ``A. ..`` lines, ``Answer:``."""
        return prompt_mc(record["question"], record["choices"])

    def answer_text(self, record: Record) -> str:
        return LETTERS[record["answer"]]

    def eval_example(self, record: Record, shots: Sequence[Record] = ()) -> MultipleChoiceExample:
        letters = LETTERS[: len(record["choices"])]
        return _choice_example(self, record, shots, letters, record["answer"])


@dataclass(frozen=True)
class GSM8KTask(Task):
    """``openai/gsm8k`` (config ``main``): ``question``, ``answer`` (solution ending ``#### N``)."""

    required_fields: ClassVar[tuple[str, ...]] = ("question", "answer")
    harness_num_fewshot: ClassVar[int] = 5
    harness_stop: ClassVar[tuple[str, ...]] = ("Question:", "</s>", "<|im_end|>")

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

    def harness_prompt(self, record: Record) -> str:
        """``Question: {question}\\nAnswer:`` (both styles; the harness's ``doc_to_text``)."""
        return f"Question: {record['question']}\nAnswer:"

    def answer_text(self, record: Record) -> str:
        return record["answer"]

    def eval_example(self, record: Record, shots: Sequence[Record] = ()) -> GenerationExample:
        return GenerationExample(self.context(record, shots), record["answer"])


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

    harness_max_new_tokens: ClassVar[int] = 128  # no harness task; one summary, cut at "\n\n"

    def harness_prompt(self, record: Record) -> str:
        """``Note: {text}\\nSummary:`` (both styles; no harness task exists)."""
        return f"Note: {record['text']}\nSummary:"

    def answer_text(self, record: Record) -> str:
        return record["summary"]

    def eval_example(self, record: Record, shots: Sequence[Record] = ()) -> GenerationExample:
        return GenerationExample(self.context(record, shots), record["summary"])


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
