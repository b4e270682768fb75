"""Evaluation: multiple-choice log-likelihood, greedy generation, GSM8K answers, ROUGE-L."""

from medmoe.eval.answers import (
    exact_match_flexible,
    exact_match_strict,
    extract_flexible,
    extract_strict,
    gsm8k_reference_answer,
    normalize_answer,
)
from medmoe.eval.evaluate import METRICS, evaluate_examples
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample
from medmoe.eval.generation import generate_greedy
from medmoe.eval.multiple_choice import MultipleChoiceResult, score_multiple_choice
from medmoe.eval.rouge import rouge_l

__all__ = [
    "METRICS",
    "GenerationExample",
    "MultipleChoiceExample",
    "MultipleChoiceResult",
    "evaluate_examples",
    "exact_match_flexible",
    "exact_match_strict",
    "extract_flexible",
    "extract_strict",
    "generate_greedy",
    "gsm8k_reference_answer",
    "normalize_answer",
    "rouge_l",
    "score_multiple_choice",
]
