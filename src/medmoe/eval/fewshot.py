"""Few-shot prompt assembly and a reproducible evaluation subset."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["few_shot_prompt", "fixed_subset"]

T = TypeVar("T")


def few_shot_prompt(
    shots: Sequence[tuple[str, str]],
    prompt: str,
    separator: str = "\n\n",
    *,
    target_delimiter: str = "",
) -> str:
    """``shot_prompt + target_delimiter + shot_target`` for each shot, then ``prompt``.

    Parts are joined by ``separator``; targets carry their own leading space by default
    (as choices do), so ``target_delimiter`` is empty. No shots gives ``prompt`` unchanged.
    """
    solved = [f"{shot_prompt}{target_delimiter}{target}" for shot_prompt, target in shots]
    return separator.join([*solved, prompt])


def _rank(seed: int, index: int) -> bytes:
    """A pseudo-random key for ``index`` that is the same on every platform and version."""
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()


def fixed_subset(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """The same ``n`` items (all of them if fewer) on every call, in their original order.

    Items are ranked by a hash of (seed, index), so the subset depends only on the number of
    items, ``n`` and ``seed``, and a larger ``n`` gives a superset of a smaller one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ranked = sorted(range(len(items)), key=lambda i: _rank(seed, i))
    return [items[i] for i in sorted(ranked[:n])]
