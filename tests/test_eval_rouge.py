"""ROUGE-L F-measure against hand-computed longest common subsequences."""

from __future__ import annotations

import pytest

from medmoe.eval import rouge_l


def f_measure(lcs: int, n_pred: int, n_ref: int) -> float:
    precision, recall = lcs / n_pred, lcs / n_ref
    return 2 * precision * recall / (precision + recall)


# (prediction, reference, LCS length worked out by hand, prediction words, reference words)
PAIRS = [
    # the cat [sat] on [the] mat / the cat [lay] on [a] mat -> "the cat on mat"
    ("the cat sat on the mat", "the cat lay on a mat", 4, 6, 6),
    # a [b] c [d] / [b] [d] e -> "b d"
    ("a b c d", "b d e", 2, 4, 3),
    # case and punctuation are normalised away: "patient chest pain"
    ("Patient denies chest pain.", "patient reports no chest-pain", 3, 4, 5),
]


@pytest.mark.parametrize(("prediction", "reference", "lcs", "n_pred", "n_ref"), PAIRS)
def test_single_pair(prediction, reference, lcs, n_pred, n_ref):
    expected = f_measure(lcs, n_pred, n_ref)
    assert rouge_l([prediction], [reference]) == pytest.approx(expected, abs=1e-6)


def test_mean_over_pairs():
    expected = sum(f_measure(*pair[2:]) for pair in PAIRS) / len(PAIRS)
    predictions, references = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    assert rouge_l(predictions, references) == pytest.approx(expected, abs=1e-6)


def test_identical_and_disjoint():
    assert rouge_l(["fever and cough"], ["fever and cough"]) == pytest.approx(1.0)
    assert rouge_l(["rash"], ["fever"]) == 0.0


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])
