"""Statistics over seeds: mean, sample std, Student-t 95% confidence intervals, paired
differences and ratios across seeds, a seed-bootstrap interval for
any other statistic (a ratio of means), one-sided t-test p-values and Holm's step-down
adjustment of a family of p-values.

Every run of a grid shares the grid's seeds, so two methods are compared on the seeds both have
(:func:`paired_difference`): the interval is the t interval of the per-seed differences.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = [
    "CONFIDENCE",
    "MISSING",
    "Stat",
    "bootstrap",
    "holm",
    "paired",
    "paired_difference",
    "paired_ratio",
    "t_quantile",
    "t_tail",
]

CONFIDENCE = 0.95
MISSING = "n/a"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile for ``n`` values (``n - 1`` degrees of freedom)."""
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    return float(student_t.ppf(0.5 + confidence / 2, n - 1))


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and 95% t confidence interval (``n - 1`` df) of ``n`` values.

    With one value the std and the interval are ``None``; with none everything is ``None``.
    ``low``/``high`` may be given directly for intervals that are not t intervals (bootstrap).
    """

    mean: float | None
    std: float | None
    n: int
    signed: bool = False
    low: float | None = None
    high: float | None = None
    symmetric: bool = True  # False: print the interval as [low, high] (bootstrap)

    @classmethod
    def of(cls, values: Sequence[float | None], signed: bool = False) -> Stat:
        """The statistics of ``values``, ``None`` and NaN dropped."""
        kept = [float(v) for v in values if v is not None and not math.isnan(v)]
        if not kept:
            return cls(None, None, 0, signed)
        mean = statistics.fmean(kept)
        if len(kept) < 2:
            return cls(mean, None, 1, signed)
        std = statistics.stdev(kept)
        half = t_quantile(len(kept)) * std / math.sqrt(len(kept))
        return cls(mean, std, len(kept), signed, mean - half, mean + half)

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (symmetric t intervals: the ``±`` figure)."""
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2

    @property
    def ok(self) -> bool:
        return self.mean is not None

    def text(self, digits: int = 1) -> str:
        """``mean ± half-width`` (``mean [low, high]`` for an asymmetric interval; the mean
        alone with one value, ``n/a`` with none)."""
        if self.mean is None:
            return MISSING
        sign = "+" if self.signed else ""
        mean = f"{self.mean:{sign}.{digits}f}"
        if not self.symmetric and self.low is not None and self.high is not None:
            return f"{mean} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"
        half = self.half_width
        return mean if half is None else f"{mean} ± {half:.{digits}f}"

    def interval_text(self, digits: int = 1) -> str:
        """``mean [low, high] (n = k)``: for intervals that need not be symmetric."""
        if self.mean is None:
            return MISSING
        sign = "+" if self.signed else ""
        head = f"{self.mean:{sign}.{digits}f}"
        if self.low is None or self.high is None:
            return f"{head} (n = {self.n})"
        return f"{head} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}] (n = {self.n})"


PerSeed = Mapping[int, float | None]


def _clean(values: PerSeed) -> dict[int, float]:
    return {s: float(v) for s, v in values.items() if v is not None and not math.isnan(v)}


def paired(a: PerSeed, b: PerSeed, combine: Callable[[float, float], float | None]) -> Stat:
    """The statistics of ``combine(a[s], b[s])`` over the seeds ``s`` both have."""
    a, b = _clean(a), _clean(b)
    return Stat.of([combine(a[s], b[s]) for s in sorted(set(a) & set(b))], signed=True)


def paired_difference(a: PerSeed, b: PerSeed) -> Stat:
    """``a - b`` per shared seed: mean and t interval of the differences."""
    return paired(a, b, lambda x, y: x - y)


def paired_ratio(a: PerSeed, b: PerSeed) -> Stat:
    """``a / b`` per shared seed (``b`` = 0 dropped): mean and t interval of the ratios."""
    result = paired(a, b, lambda x, y: None if y == 0 else x / y)
    return Stat(result.mean, result.std, result.n, False, result.low, result.high)


def bootstrap(
    rows: Sequence[tuple[float, ...]],
    statistic: Callable[[Sequence[tuple[float, ...]]], float | None],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Stat:
    """A statistic of per-seed tuples with a percentile bootstrap interval over seeds.

    ``rows`` holds one tuple per seed (e.g. (ortho, lora joint, lora single)); ``statistic``
    maps a list of such tuples to a number (``None`` where undefined). The point estimate is
    ``statistic`` of all seeds; the interval is the 2.5/97.5 percentiles of ``statistic`` over
    seed resamples drawn with replacement (fixed RNG seed, so reports are reproducible);
    resamples where the statistic is undefined are dropped.
    """
    rows = list(rows)
    point = statistic(rows) if rows else None
    if point is None:
        return Stat(None, None, len(rows))
    if len(rows) < 2:
        return Stat(point, None, len(rows))
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        value = statistic([rows[rng.randrange(len(rows))] for _ in rows])
        if value is not None and math.isfinite(value):
            draws.append(value)
    if not draws:
        return Stat(point, None, len(rows))
    draws.sort()
    tail = (1 - CONFIDENCE) / 2
    low = draws[min(len(draws) - 1, int(math.floor(tail * len(draws))))]
    high = draws[min(len(draws) - 1, int(math.ceil((1 - tail) * len(draws))) - 1)]
    return Stat(point, None, len(rows), False, low, high, symmetric=False)


def t_tail(stat: Stat, null: float = 0.0, direction: float = 1.0) -> float | None:
    """The one-sided p-value of the t test (``n - 1`` df) of ``H0: direction * (mu - null) <= 0``
    from a t statistic's ``mean``, ``std`` and ``n``: ``P(T >= direction * (mean - null) / se)``.

    ``None`` without a t interval (fewer than 2 values, or a bootstrap statistic). With a zero
    std the test is decided by the mean alone (0 if it lies strictly on the alternative's side,
    else 1), as the degenerate interval ``[mean, mean]`` is. The two-sided 95% interval lies
    above ``null`` (direction 1) exactly when this p-value is below 0.025.
    """
    if stat.mean is None or stat.std is None or stat.n < 2:
        return None
    effect = direction * (stat.mean - null)
    if stat.std == 0:
        return 0.0 if effect > 0 else 1.0
    return float(student_t.sf(effect / (stat.std / math.sqrt(stat.n)), stat.n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With the ``m`` p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of
    the k-th is ``max over j <= k of min(1, (m - j + 1) * p_(j))``; rejecting every hypothesis
    whose adjusted p-value is below ``alpha`` is Holm's procedure at family-wise level ``alpha``
    (Holm 1979; ``statsmodels.stats.multitest.multipletests(method="holm")``). Ties keep their
    given order (the adjusted values of tied p-values are equal either way).
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted
