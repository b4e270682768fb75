"""GSM8K answer extraction (strict vs flexible) and exact match."""

from __future__ import annotations

import pytest

from medmoe.eval import (
    exact_match_flexible,
    exact_match_strict,
    extract_flexible,
    extract_strict,
    gsm8k_reference_answer,
    normalize_answer,
)

SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = 72.\n#### 1,234"


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        (SOLUTION, "1234", "1234"),
        ("so the answer is $42.", None, "42"),
        ("It drops 3 degrees to -5", None, "-5"),
        ("#### -3.", "-3", "-3"),
        ("#### 5 and then 6 more", "5", "6"),
        ("costs $1,000.50 in total.", None, "1000.50"),
        ("no number here", None, None),
        ("", None, None),
    ],
)
def test_strict_and_flexible_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalisation_and_reference():
    assert normalize_answer("$1,234.") == "1234"
    assert normalize_answer(" 1234. ") == " 1234. "  # the harness strips nothing else
    assert normalize_answer("42.0") == "42.0"  # compared as strings, as the harness does
    assert gsm8k_reference_answer(SOLUTION) == "1234"
    assert gsm8k_reference_answer("#### -7") == "-7"
    assert gsm8k_reference_answer("72") == "72"


def test_exact_match_strict_vs_flexible():
    predictions = [
        "48 + 24 = 1,234.\n#### 1234",  # both
        "so the answer is $1,234.",  # flexible only
        "#### 1234, or maybe 12",  # strict only
        "I do not know",  # neither
    ]
    references = [SOLUTION] * 4
    assert exact_match_strict(predictions, references) == 0.5
    assert exact_match_flexible(predictions, references) == 0.5
    assert exact_match_strict(predictions[:2], references[:2]) == 0.5
    assert exact_match_flexible(predictions[:2], references[:2]) == 1.0


def test_exact_match_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match_strict(["1", "2"], ["#### 1"])
    with pytest.raises(ValueError, match="no predictions"):
        exact_match_flexible([], [])
