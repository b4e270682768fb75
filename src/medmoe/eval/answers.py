"""GSM8K answer extraction and exact match, as lm-evaluation-harness's ``gsm8k`` task does.

- strict: the number after ``"#### "`` (the first such match);
- flexible: the last number anywhere in the text.

Extracted answers and references are normalised the same way (commas, ``$`` and one trailing
``.`` removed, whitespace stripped) and compared as strings: ``"1,234."`` matches ``"1234"``,
``"42.0"`` does not match ``"42"`` (as in the harness). Text without a number never matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "exact_match_flexible",
    "exact_match_strict",
    "extract_flexible",
    "extract_strict",
    "gsm8k_reference_answer",
    "normalize_answer",
]

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_answer(answer: str) -> str:
    """Drop commas, ``$`` and one trailing ``.``; strip whitespace."""
    return re.sub(r"\.$", "", answer.strip().replace(",", "").replace("$", "")).strip()


def extract_strict(text: str) -> str | None:
    """The normalised number after the first ``"#### "``, or ``None``."""
    match = STRICT_PATTERN.search(text)
    return normalize_answer(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The normalised last number in ``text`` (``$``/``,``/``.`` allowed inside), or ``None``."""
    matches = FLEXIBLE_PATTERN.findall(text)
    if not matches:
        return None
    money_like, plain = matches[-1]
    return normalize_answer(money_like or plain)


def gsm8k_reference_answer(solution: str) -> str:
    """The gold answer of a GSM8K solution: the normalised text after its last ``####``.

    A reference without ``####`` is taken whole (a bare number such as ``"72"`` works).
    """
    return normalize_answer(solution.split("####")[-1])


def _exact_match(predictions: Sequence[str], references: Sequence[str], extract) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(
        extract(pred) == gsm8k_reference_answer(ref)
        for pred, ref in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def exact_match_strict(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose ``#### N`` answer equals the reference's."""
    return _exact_match(predictions, references, extract_strict)


def exact_match_flexible(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose last number equals the reference's."""
    return _exact_match(predictions, references, extract_flexible)
