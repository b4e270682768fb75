"""ROUGE-L F-measure through torchmetrics."""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics.text.rouge import ROUGEScore

__all__ = ["rouge_l"]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over pairs of the sentence-level ROUGE-L F-measure (LCS of lower-cased words).

    Text is normalised as ``rouge_score`` does (lower-case, non-alphanumerics become spaces),
    without stemming, so no ``nltk`` is needed.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    metric = ROUGEScore(rouge_keys="rougeL")
    scores = metric(list(predictions), list(references))
    return float(scores["rougeL_fmeasure"])
