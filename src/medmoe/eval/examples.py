"""The evaluation examples that tasks produce and scorers consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MultipleChoiceExample:
    """Score each continuation in ``choices`` after ``prompt``; ``answer`` indexes the right one.

    Continuations carry their own leading space (``" A"``), so ``prompt + choices[i]`` is the
    full text whose continuation log-likelihood is compared.
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenerationExample:
    """Generate greedily after ``prompt``; ``reference`` is the gold answer text.

    For GSM8K-style tasks the reference is the full solution ending in ``#### N``;
    for summarisation it is the reference summary.
    """

    prompt: str
    reference: str
