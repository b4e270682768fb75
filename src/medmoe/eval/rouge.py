"""ROUGE-L F-measure through Google's ``rouge-score`` package (the literature's ROUGE).

Settings, stated because published numbers depend on them:

- ``rougeL``: the longest common subsequence over the whole text, not ``rougeLsum`` (which
  splits summaries into sentences at newlines and takes the union LCS per sentence);
- ``rouge_score``'s default tokenizer: lower-case, every non-``[a-z0-9]`` character becomes a
  space, split on whitespace;
- no stemming by default (``use_stemmer=True`` applies the Porter stemmer, as some papers do);
- one F-measure per (prediction, reference) pair, averaged over pairs (no bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from rouge_score import rouge_scorer

__all__ = ["rouge_l"]


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    use_stemmer: bool = False,
    key: Literal["rougeL", "rougeLsum"] = "rougeL",
) -> float:
    """Mean over pairs of ``rouge_score``'s ``key`` F-measure (defaults: see the module)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=use_stemmer)
    scores = [
        scorer.score(reference, prediction)[key].fmeasure  # score(target, prediction)
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)
