"""GSM8K answer extraction and exact match, exactly as lm-evaluation-harness's ``gsm8k`` task.

The harness's ``gsm8k.yaml`` (0.4.x) scores a generation twice:

- ``strict-match``: ``regex`` filter ``#### (\\-?[0-9\\.\\,]+)``, the first match;
- ``flexible-extract``: ``regex`` filter ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, the last match (its
  first non-empty group);

each stripped, ``"[invalid]"`` when nothing matches, then ``exact_match`` against the full
reference solution with ``ignore_case`` and ``regexes_to_ignore`` ``","``, ``"\\$"``,
``"(?s).*#### "`` and ``"\\.$"`` applied, in that order, to both sides (the third one keeps
only what follows the reference's last ``"#### "``). Strings are compared, so ``"1,234."``
matches ``"1234"`` and ``"42.0"`` does not match ``"42"``. Here a failed extraction is
``None`` (the harness's ``"[invalid]"``, which matches no numeric reference).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = [
    "FLEXIBLE_PATTERN",
    "IGNORE_PATTERNS",
    "STRICT_PATTERN",
    "exact_match_flexible",
    "exact_match_strict",
    "extract_flexible",
    "extract_strict",
    "gsm8k_reference_answer",
    "normalize_answer",
]

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_PATTERNS: tuple[str, ...] = (",", r"\$", r"(?s).*#### ", r"\.$")


def normalize_answer(answer: str) -> str:
    """The harness's ``regexes_to_ignore`` (in order) and ``ignore_case``."""
    for pattern in IGNORE_PATTERNS:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def _extract(pattern: re.Pattern[str], text: str, select: int) -> str | None:
    """The harness's ``RegexFilter``: ``findall``, pick ``select``, first non-empty group."""
    matches = pattern.findall(text)
    if not matches:
        return None
    match = matches[select]
    if isinstance(match, tuple):
        groups = [group for group in match if group]
        if not groups:
            return None
        match = groups[0]
    return normalize_answer(match.strip())


def extract_strict(text: str) -> str | None:
    """The normalised number after the first ``"#### "``, or ``None``."""
    return _extract(STRICT_PATTERN, text, 0)


def extract_flexible(text: str) -> str | None:
    """The normalised last number in ``text`` (``$``/``,``/``.`` allowed inside), or ``None``."""
    return _extract(FLEXIBLE_PATTERN, text, -1)


def gsm8k_reference_answer(solution: str) -> str:
    """The gold answer of a GSM8K solution as the harness compares it: the normalised text
    after its last ``"#### "`` (a reference without one, e.g. ``"72"``, is taken whole)."""
    return normalize_answer(solution)


def _exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    extract: Callable[[str], str | None],
) -> float:
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
