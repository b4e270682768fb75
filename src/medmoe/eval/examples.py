"""The evaluation examples that tasks produce and scorers consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MultipleChoiceExample:
    """Score each continuation in ``choices`` after ``prompt``; ``answer`` indexes the right one.

    Continuations carry their own leading space (``" A"``, the harness's ``target_delimiter``
    followed by its ``doc_to_choice``), so ``prompt + choices[i]`` is the full text whose
    continuation log-likelihood is compared. ``acc_norm`` divides each log-likelihood by the
    character length of the choice without ``target_delimiter`` (the harness's
    ``completion_len``). ``subject`` groups per-subject accuracies (MMLU; ``""`` = none).
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    target_delimiter: str = " "

    def choice_lengths(self) -> tuple[int, ...]:
        """Characters of each choice without the leading ``target_delimiter``."""
        return tuple(len(c.removeprefix(self.target_delimiter)) for c in self.choices)


@dataclass(frozen=True)
class GenerationExample:
    """Generate greedily after ``prompt``; ``reference`` is the gold answer text.

    For GSM8K-style tasks the reference is the full solution ending in ``#### N``;
    for summarisation it is the reference summary.
    """

    prompt: str
    reference: str
