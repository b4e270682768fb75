"""``claims.md``: a verdict for each claim of the paper (and Ortho-LoRA's), from paired differences
over seeds; then the testbed's own checks.

The claims are data: one row each of ``claims.yaml`` (shipped beside this module; key, text,
the paper's figure, methods, metric, rule, guards), and :func:`claims` is a loop over the rows.
Each row names a metric of :data:`METRICS` (what is measured), a rule of :data:`RULES` (how the
measured interval becomes a verdict) and guards of :data:`GUARDS` (when the baseline leaves
nothing to test: *untestable*). Every rule, metric and guard carries its own description, and
the text claims.md prints about them is generated from those objects; the size column
(:func:`size_verdict`) and the Holm-adjusted column (:func:`holm_verdicts`) likewise.

Method names (a grid's): full_finetune, lora, multi_lora, vanilla_moe_lora, ortho_lora,
med_moe_lora (eq-2 asymmetric allocation), alloc_uniform, alloc_bottom_heavy, alloc_asymmetric.
A claim whose runs are missing is "not run"; nothing here raises on a partial grid.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from medmoe.atomic import atomic_write_text
from medmoe.callbacks.table_format import GENERAL_TASKS, MEDICAL_TASKS, markdown_table
from medmoe.experiments.grid import Grid, load_grid
from medmoe.experiments.report import (
    CLAIMS_FILE,
    ORTHO,
    RUNS_CSV,
    Collected,
    PerSeed,
    medical_average,
    ortho_recovery,
    replay_runs,
    single_task_average,
    single_tasks,
    step_seconds,
    task_delta,
    task_score,
)
from medmoe.experiments.stats import (
    CONFIDENCE,
    Stat,
    holm,
    paired_difference,
    paired_ratio,
    t_tail,
)

__all__ = [
    "CLAIMS_TABLE",
    "CONTENTION_LIMIT",
    "EQUIVALENCE_MARGIN",
    "FAMILY_ALPHA",
    "GUARDS",
    "HOLDS",
    "INCONCLUSIVE",
    "METRICS",
    "NOT_HOLD",
    "NOT_RUN",
    "RULES",
    "UNTESTABLE",
    "Check",
    "Claim",
    "ClaimSpec",
    "Guard",
    "Measured",
    "Metric",
    "Rule",
    "checks",
    "claims",
    "claims_markdown",
    "claims_summary",
    "collect_runs_csv",
    "contention",
    "directional_verdict",
    "equivalence_verdict",
    "evaluate",
    "holm_rule",
    "holm_verdicts",
    "load_claims",
    "overhead_verdict",
    "rebuild_claims",
    "recovery_verdict",
    "rules_text",
    "size_verdict",
]

HOLDS, NOT_HOLD, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"
UNTESTABLE = "untestable"
CONSISTENT, SMALLER, LARGER = "consistent", "smaller", "larger"
EQUIVALENCE_MARGIN = 1.0  # points: a difference inside ±1 is "no effect"
RECOVERY_TARGET, RECOVERY_FLOOR = 0.95, 0.5
OVERHEAD_LIMIT = 1.10
CONTENTION_LIMIT = (
    1.10  # fit wall seconds / fit CPU seconds above which a run's timing is contended
)
SCORE_CEILING = 100.0  # every score metric is in % (accuracy, ROUGE-L x100)
FAMILY_ALPHA = 1 - CONFIDENCE  # Holm's family-wise level: the 95% intervals' 0.05
LOOP_STEP_KEY = "train_step_seconds"  # per-step time measured inside the training loop, if recorded
CLAIMS_TABLE = "claims.yaml"
CHANCE = {"medqa": 25.0, "pubmedqa": 100.0 / 3}  # the domain accuracy tasks (uniform guess)
GAP_TARGET, FORGET_TARGET, HEADROOM, CEILING = 5.0, 10.0, 20.0, 90.0
MISSING_TEXT = "n/a"
_M = f"{EQUIVALENCE_MARGIN:g}"
_PCT = f"{CONFIDENCE:.0%}"


@dataclass(frozen=True)
class Claim:
    """One row of claims.md.

    ``direction`` is the rule's verdict from the interval; ``verdict`` is the same unless a
    guard found the claim untestable (``untestable``: why). ``size``: whether the interval
    contains the paper's figure. ``p_value`` / ``p_holm``: the claim's test and its Holm-adjusted
    p-value over the claims.md's family (``None``: not in the family); ``holm_verdict`` the
    verdict after the adjustment (``None``: the rule has no test in the family)."""

    key: str
    claim: str
    paper: str
    measured: Stat | None  # None: a method it needs is not in the grid
    verdict: str
    unit: str = "points"
    paper_figure: float | None = None
    rule: str = ""
    metric: str = ""
    methods: tuple[str, ...] = ()
    guards: tuple[str, ...] = ()
    direction: str = ""
    size: str = MISSING_TEXT
    untestable: str | None = None
    p_value: float | None = None
    p_holm: float | None = None
    holm_verdict: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Check:
    """One testbed check: pass / fail / not run, with the figures it was decided on."""

    check: str
    figures: str
    status: str


# ----------------------------------------------------------------- verdict rules
def _too_few(stat: Stat | None) -> str | None:
    if stat is None or stat.mean is None:
        return NOT_RUN
    if stat.n < 2 or stat.low is None or stat.high is None:
        return INCONCLUSIVE
    return None


def directional_verdict(stat: Stat | None, paper: float, margin: float = EQUIVALENCE_MARGIN) -> str:
    """The directional rule: the CI on the paper's side of zero, the other side, within ±margin."""
    early = _too_few(stat)
    if early is not None:
        return early
    sign = 1.0 if paper >= 0 else -1.0
    low, high = sorted((sign * stat.low, sign * stat.high))
    if low > 0:
        return HOLDS
    if high < 0 or (-margin <= stat.low and stat.high <= margin):
        return NOT_HOLD
    return INCONCLUSIVE


def equivalence_verdict(stat: Stat | None, margin: float = EQUIVALENCE_MARGIN) -> str:
    """The no-change rule: the CI within ±margin holds, entirely outside it does not hold."""
    early = _too_few(stat)
    if early is not None:
        return early
    if -margin <= stat.low and stat.high <= margin:
        return HOLDS
    if stat.high < -margin or stat.low > margin:
        return NOT_HOLD
    return INCONCLUSIVE


def recovery_verdict(recovery: Stat | None, gap: Stat | None) -> str:
    """The gap-recovery rule (``gap``: LoRA single-task - joint, paired)."""
    early = _too_few(gap) or _too_few(recovery)
    if early is not None:
        return early
    if gap.low <= 0:
        return INCONCLUSIVE
    if recovery.high >= RECOVERY_TARGET and recovery.low >= RECOVERY_FLOOR:
        return HOLDS
    if recovery.high < RECOVERY_TARGET:
        return NOT_HOLD
    return INCONCLUSIVE


def overhead_verdict(ratio: Stat | None, limit: float = OVERHEAD_LIMIT) -> str:
    """The negligible-overhead rule on the step-time ratio's CI."""
    early = _too_few(ratio)
    if early is not None:
        return early
    if ratio.high <= limit:
        return HOLDS
    if ratio.low > limit:
        return NOT_HOLD
    return INCONCLUSIVE


def directional_pvalue(stat: Stat, paper: float | None) -> float | None:
    """The directional claim's test: ``H0``: no effect on the paper's side of zero, one-sided t
    test doubled, ``p = min(1, 2 P(T >= t))``; ``p < 0.05`` exactly when the two-sided 95% CI
    lies on the paper's side, i.e. when :func:`directional_verdict` says *holds*."""
    tail = t_tail(stat, 0.0, -1.0 if paper is not None and paper < 0 else 1.0)
    return None if tail is None else min(1.0, 2 * tail)


def equivalence_pvalue(
    stat: Stat, paper: float | None, margin: float = EQUIVALENCE_MARGIN
) -> float | None:
    """The equivalence claim's test: two one-sided t tests (TOST) of ``H0: |Δ| >= margin``,
    ``p = min(1, 2 max(p_low, p_high))``; ``p < 0.05`` exactly when the 95% CI lies within
    ±margin, i.e. when :func:`equivalence_verdict` says *holds*."""
    if stat.mean is None or stat.std is None or stat.n < 2:
        return None
    if stat.std == 0:  # the degenerate interval [mean, mean], inclusive bounds as the rule's
        return 0.0 if -margin <= stat.mean <= margin else 1.0
    low, high = t_tail(stat, -margin, 1.0), t_tail(stat, margin, -1.0)
    return min(1.0, 2 * max(low, high))


@dataclass(frozen=True)
class Measured:
    """What a metric measured for one claim: the interval the rule reads (``None``: a method
    the claim needs is not in the grid), the gap a recovery is a fraction of, and the runs left
    out of the figure (``excluded``: why, per run)."""

    stat: Stat | None
    gap: Stat | None = None
    excluded: tuple[str, ...] = ()
    source: str = ""  # where the figure came from, when a metric has more than one source


@dataclass(frozen=True)
class Rule:
    """How a claim's measured interval becomes a verdict. ``pvalue``: the claim's test in the
    Holm family (``None``: the rule is not a test of that family)."""

    name: str
    description: str
    decide: Callable[[Measured, float | None], str]
    pvalue: Callable[[Stat, float | None], float | None] | None = None


def _decide_overhead(measured: Measured, paper: float | None) -> str:
    return overhead_verdict(measured.stat)


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "directional",
            f"A claim *holds* if the {_PCT} CI of the measured figure lies entirely on the paper's "
            "side of zero (the side of the paper's figure's sign); *does not hold* if it lies "
            f"entirely on the other side of zero, or entirely within ±{_M} point (equivalence "
            "margin: no effect of the claimed kind); *inconclusive* otherwise (or fewer than 2 "
            "paired seeds). The conditions are tried in this order (a CI entirely on the paper's "
            f"side holds even if it also lies within ±{_M}). Missing runs: *not run*. Its test in "
            "the Holm family: H0 no effect on the paper's side, one-sided t test doubled "
            f"(p = 2 P(T ≥ t), n-1 df), so p < {FAMILY_ALPHA:g} exactly when the claim holds.",
            lambda m, paper: directional_verdict(m.stat, 0.0 if paper is None else paper),
            directional_pvalue,
        ),
        Rule(
            "equivalence",
            f"No change (Δ against the base model, ideally 0): *holds* if the {_PCT} CI lies "
            f"entirely within [-{_M}, +{_M}] points; *does not hold* if it lies entirely outside "
            "that band (below: measurable forgetting; above: a measurable change, not "
            "near-original either); *inconclusive* otherwise (or fewer than 2 seeds). Its test in "
            f"the Holm family: two one-sided t tests of |Δ| ≥ {_M} (TOST), p = 2 max(p_low, "
            f"p_high), so p < {FAMILY_ALPHA:g} exactly when the claim holds.",
            lambda m, paper: equivalence_verdict(m.stat),
            equivalence_pvalue,
        ),
        Rule(
            "recovery",
            "There must be a gap: if the CI of LoRA's paired single-task - joint gap does not lie "
            "above zero, the row is *inconclusive*. Otherwise it *holds* if the recovery "
            f"interval's upper bound is >= {RECOVERY_TARGET:g} (95% recovery is consistent with "
            f"the data) and its lower bound is >= {RECOVERY_FLOOR:g} (the data exclude "
            f"recovering half the gap or less); *does not hold* if the upper bound is < "
            f"{RECOVERY_TARGET:g} (the data exclude 95% recovery); *inconclusive* otherwise. Not "
            "a test of the Holm family (a bootstrap interval, no p-value).",
            lambda m, paper: recovery_verdict(m.stat, m.gap),
        ),
        Rule(
            "overhead",
            f'"Negligible" *holds* if the ratio\'s CI upper bound is <= {OVERHEAD_LIMIT:.2f}; '
            f"*does not hold* if its lower bound is > {OVERHEAD_LIMIT:.2f}; *inconclusive* "
            "otherwise, and when fewer than 2 paired seeds are left once contended runs are "
            "excluded (*inconclusive: contended timing*). Not a test of the Holm family.",
            _decide_overhead,
        ),
    )
}


# ----------------------------------------------------------------- metrics
Value = Callable[[dict[str, float]], float | None]


@dataclass(frozen=True)
class Metric:
    """What a claim measures, from its methods' runs. ``value``: the per-run score function
    of a score metric (``None`` for the others), which the guards read; ``task``: whether
    the metric takes a task argument (``task_score:medqa``)."""

    name: str
    description: str
    measure: Callable[[Collected, Sequence[str], str | None], Measured]
    value: Callable[[Collected, str | None], Value | None] | None = None
    task: bool = False
    counts: tuple[int, ...] = (1, 2)  # how many methods a claim may name


def _score_measure(
    value_of: Callable[[Collected, str | None], Value | None],
) -> Callable[[Collected, Sequence[str], str | None], Measured]:
    def measure(data: Collected, methods: Sequence[str], task: str | None) -> Measured:
        value = value_of(data, task)
        if value is None or not all(data.has(m) for m in methods):
            return Measured(None)
        if len(methods) == 2:
            a, b = methods
            return Measured(paired_difference(data.scores(a, value), data.scores(b, value)))
        return Measured(Stat.of(list(data.scores(methods[0], value).values()), signed=True))

    return measure


def _task_score(data: Collected, task: str | None) -> Value:
    return task_score(str(task))


def _medical_average(data: Collected, task: str | None) -> Value:
    return medical_average


def _task_delta(data: Collected, task: str | None) -> Value | None:
    return None if data.base_scores is None else task_delta(str(task), data.base_scores)


def _ortho_recovery(data: Collected, methods: Sequence[str], task: str | None) -> Measured:
    found = ortho_recovery(data, family=methods[1])
    return Measured(None) if found is None else Measured(found["recovery"], gap=found["gap"])


def contention(results: dict[str, Any]) -> float | None:
    """A run's fit wall seconds over its fit CPU seconds (``None`` if either is missing).

    A single-threaded fit (the runner's ``--threads 1``) with a core to itself spends its wall
    time on the CPU, so the ratio is about 1; above :data:`CONTENTION_LIMIT` it waited for a
    core (other jobs on the machine), and its CPU time is suspect too (shared caches)."""
    wall, cpu = results.get("fit_seconds"), results.get("fit_cpu_seconds")
    return None if wall is None or not cpu else float(wall) / float(cpu)


def _loop_step(results: dict[str, Any]) -> float | None:
    value = results.get(LOOP_STEP_KEY)
    return None if value is None else float(value)


def _step_time_ratio(data: Collected, methods: Sequence[str], task: str | None) -> Measured:
    a, b = methods
    if not (data.has(a) and data.has(b) and data.runs[a] and data.runs[b]):
        return Measured(None)  # not run (whatever the other method's timing)
    runs = [r for m in methods for r in data.runs[m]]
    in_loop = bool(runs) and all(r.get(LOOP_STEP_KEY) is not None for r in runs)
    per_step = _loop_step if in_loop else step_seconds
    kept: dict[str, PerSeed] = {}
    excluded = []
    for name in methods:
        kept[name] = {}
        for r in data.runs[name]:
            ratio = None if in_loop else contention(r)  # in-loop medians skip waiting steps
            if ratio is not None and ratio > CONTENTION_LIMIT:
                excluded.append(f"{name} seed {r['seed']} (wall/CPU {ratio:.2f})")
            else:
                kept[name][r["seed"]] = per_step(r)
    source = LOOP_STEP_KEY if in_loop else "fit_cpu_seconds / global_step"
    return Measured(paired_ratio(kept[a], kept[b]), excluded=tuple(excluded), source=source)


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "medical_average",
            "the run's mean score over the domain tasks it has scores for, in % (the paper's "
            "Average)",
            _score_measure(_medical_average),
            _medical_average,
        ),
        Metric(
            "task_score",
            "the run's score on the task, in % (accuracy; ROUGE-L x100); between two methods "
            "the difference of scores is the difference of their Δs against the one base model",
            _score_measure(_task_score),
            _task_score,
            task=True,
        ),
        Metric(
            "task_delta",
            "the run's change on the task against the base model (scored once), in points",
            _score_measure(_task_delta),
            task=True,
        ),
        Metric(
            "ortho_recovery",
            "recovery = (Ortho-LoRA joint - LoRA joint) / (LoRA single-task - LoRA joint) on "
            "the medical average: the point estimate from the means, the interval a 95% "
            "percentile bootstrap over seeds (seeds resampled with replacement, the three "
            "figures of a seed kept together; fixed RNG seed; with few seeds it is narrower than "
            "the true 95% interval, so read it as optimistic)",
            _ortho_recovery,
            counts=(2,),
        ),
        Metric(
            "step_time_ratio",
            "A's seconds per optimizer step over B's, per seed: the mean and t CI of the ratios. "
            f"Per-step time measured inside the training loop (results.json's {LOOP_STEP_KEY}) "
            "where every run has it (the median over the steps that did not wait for a core, "
            "medmoe.callbacks.timing.StepTimer), else the fit's CPU seconds per step "
            "(fit_cpu_seconds / global_step, which includes the fit's setup); then runs whose "
            f"fit wall / CPU seconds exceed {CONTENTION_LIMIT:.2f} waited for a core "
            "(contended: the timing is not the method's) and are excluded, each named in the row",
            _step_time_ratio,
            counts=(2,),
        ),
    )
}


# ----------------------------------------------------------------- untestable
@dataclass(frozen=True)
class Guard:
    """When a claim cannot be tested on this grid: ``check`` returns why (``None``: testable)."""

    name: str
    description: str
    check: Callable[[Collected, str, Metric, str | None], str | None]


def _nothing_to_forget(
    data: Collected, baseline: str, metric: Metric, task: str | None
) -> str | None:
    if task is None or not data.has(baseline) or data.base_scores is None:
        return None
    delta = Stat.of(list(data.scores(baseline, task_delta(task, data.base_scores)).values()), True)
    if delta.low is None or not (
        delta.low >= -EQUIVALENCE_MARGIN and delta.high <= EQUIVALENCE_MARGIN
    ):
        return None
    return f"nothing to forget: {baseline} {task} Δ vs base {delta.interval_text()} within ±{_M}"


def _at_ceiling(data: Collected, baseline: str, metric: Metric, task: str | None) -> str | None:
    value = None if metric.value is None or not data.has(baseline) else metric.value(data, task)
    if value is None:
        return None
    stat = Stat.of(list(data.scores(baseline, value).values()))
    if stat.low is None or stat.low < SCORE_CEILING - EQUIVALENCE_MARGIN:
        return None
    where = metric.name if task is None else task
    return (
        f"nothing to improve: {baseline} {where} {stat.interval_text()} within {_M} of "
        f"the ceiling {SCORE_CEILING:g}"
    )


GUARDS: dict[str, Guard] = {
    guard.name: guard
    for guard in (
        Guard(
            "nothing_to_forget",
            f"the baseline's change on the task against the base model has a {_PCT} CI (t, n-1 "
            f"df over its seeds) entirely within ±{_M} point: it forgot nothing, so there was "
            "nothing for the method to forget less of (or to keep)",
            _nothing_to_forget,
        ),
        Guard(
            "at_ceiling",
            f"the baseline's score has a {_PCT} CI whose lower bound is within {_M} point of the "
            f"ceiling ({SCORE_CEILING:g}): there is nothing left to improve on",
            _at_ceiling,
        ),
    )
}


# ----------------------------------------------------------------- size and multiplicity
SIZE_RULE = (
    "**Size.** Whether the measured CI contains the paper's figure, read in the direction of the "
    f"paper's figure's sign: *{CONSISTENT}* (it does), *{SMALLER}* (the whole CI is nearer zero "
    f"than the paper's figure, or beyond zero on the other side), *{LARGER}* (the whole CI is "
    f"farther from zero than it); {MISSING_TEXT} without a figure, an interval or a testable claim."
)


def size_verdict(stat: Stat | None, paper: float | None) -> str:
    """The size column: does the CI contain ``paper`` (in ``paper``'s direction)?"""
    if paper is None or stat is None or stat.low is None or stat.high is None:
        return MISSING_TEXT
    sign = -1.0 if paper < 0 else 1.0
    low, high = sorted((sign * stat.low, sign * stat.high))
    if high < sign * paper:
        return SMALLER
    if low > sign * paper:
        return LARGER
    return CONSISTENT


def holm_rule(family: int) -> str:
    return (
        f"**Holm-adjusted.** The family: the {family} claim(s) of this file whose rule has a test "
        "(directional, equivalence) and that were tested (run, at least 2 seeds, not "
        "untestable). Holm's step-down adjusts their p-values (sorted ascending, the k-th of m "
        "becomes max over j ≤ k of min(1, (m - j + 1) p_(j))); a claim *holds* after adjustment "
        f"if its adjusted p is < {FAMILY_ALPHA:g} (family-wise error {FAMILY_ALPHA:g} over the "
        "claims declared to hold). A claim that held before and not after is *inconclusive*; "
        "*does not hold* and *inconclusive* verdicts are not adjusted. Outside the family: "
        f"{MISSING_TEXT} (the rule has no test) or the verdict itself (not run, untestable, too "
        "few seeds)."
    )


def holm_verdicts(rows: Sequence[Claim]) -> list[Claim]:
    """``rows`` with ``p_holm`` and ``holm_verdict`` set (see :func:`holm_rule`)."""
    family = [i for i, c in enumerate(rows) if c.p_value is not None]
    adjusted = dict(zip(family, holm([rows[i].p_value for i in family]), strict=True))
    out = []
    for i, c in enumerate(rows):
        if i in adjusted:
            p = adjusted[i]
            verdict = (
                HOLDS if p < FAMILY_ALPHA else (INCONCLUSIVE if c.verdict == HOLDS else c.verdict)
            )
            out.append(dataclasses.replace(c, p_holm=p, holm_verdict=verdict))
        else:
            tested = RULES[c.rule].pvalue is not None if c.rule in RULES else False
            out.append(dataclasses.replace(c, holm_verdict=c.verdict if tested else None))
    return out


# ----------------------------------------------------------------- the claims table
_FIELDS = {
    "key",
    "claim",
    "paper",
    "paper_text",
    "methods",
    "metric",
    "rule",
    "untestable_if",
    "baseline",
    "at_replay",
    "unit",
}
AT_REPLAY = {"smallest_shared"}


@dataclass(frozen=True)
class ClaimSpec:
    """One row of ``claims.yaml`` (see the file's header for the fields)."""

    key: str
    claim: str
    paper: float | None
    paper_text: str
    methods: tuple[str, ...]
    metric: str
    rule: str
    untestable_if: tuple[str, ...] = ()
    baseline: str | None = None
    at_replay: str | None = None
    unit: str = "points"

    @property
    def metric_name(self) -> str:
        return self.metric.partition(":")[0]

    @property
    def task(self) -> str | None:
        return self.metric.partition(":")[2] or None


def _spec(row: Any, where: str) -> ClaimSpec:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a claim is a mapping of {sorted(_FIELDS)}, got {row!r}")
    unknown = set(row) - _FIELDS
    missing = {"key", "claim", "paper_text", "methods", "metric", "rule"} - set(row)
    if unknown or missing:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
    spec = ClaimSpec(
        key=str(row["key"]),
        claim=str(row["claim"]),
        paper=None if row.get("paper") is None else float(row["paper"]),
        paper_text=str(row["paper_text"]),
        methods=tuple(str(m) for m in row["methods"]),
        metric=str(row["metric"]),
        rule=str(row["rule"]),
        untestable_if=tuple(str(g) for g in row.get("untestable_if") or ()),
        baseline=None if row.get("baseline") is None else str(row["baseline"]),
        at_replay=None if row.get("at_replay") is None else str(row["at_replay"]),
        unit=str(row.get("unit", "points")),
    )
    where = f"{where} (claim {spec.key})"
    metric = METRICS.get(spec.metric_name)
    if metric is None:
        raise ValueError(f"{where}: unknown metric {spec.metric!r}; known: {sorted(METRICS)}")
    if metric.task != (spec.task is not None):
        form = f"{metric.name}:<task>" if metric.task else metric.name
        raise ValueError(f"{where}: metric {spec.metric!r} is written {form}")
    if len(spec.methods) not in metric.counts:
        raise ValueError(f"{where}: {metric.name} compares {metric.counts} method(s)")
    if metric.name == "ortho_recovery" and spec.methods[0] != ORTHO:
        raise ValueError(f"{where}: ortho_recovery's first method is {ORTHO}")
    if spec.rule not in RULES:
        raise ValueError(f"{where}: unknown rule {spec.rule!r}; known: {sorted(RULES)}")
    if spec.rule == "directional" and spec.paper is None:
        raise ValueError(f"{where}: a directional claim needs the paper's figure (its sign)")
    for name in spec.untestable_if:
        if name not in GUARDS:
            raise ValueError(f"{where}: unknown guard {name!r}; known: {sorted(GUARDS)}")
    if spec.at_replay is not None and spec.at_replay not in AT_REPLAY:
        raise ValueError(f"{where}: at_replay is one of {sorted(AT_REPLAY)}")
    return spec


def load_claims(path: str | Path | None = None) -> tuple[ClaimSpec, ...]:
    """The claims table (default: the ``claims.yaml`` shipped with this module), checked."""
    if path is None:
        return _default_claims()
    return _parse(Path(path).read_text(encoding="utf-8"), str(path))


@lru_cache(maxsize=1)
def _default_claims() -> tuple[ClaimSpec, ...]:
    source = files("medmoe.experiments") / CLAIMS_TABLE
    return _parse(source.read_text(encoding="utf-8"), CLAIMS_TABLE)


def _parse(text: str, where: str) -> tuple[ClaimSpec, ...]:
    rows = yaml.safe_load(text) or []
    if not isinstance(rows, list):
        raise ValueError(f"{where}: a list of claims, got {type(rows).__name__}")
    specs = tuple(_spec(row, f"{where} row {i + 1}") for i, row in enumerate(rows))
    keys = [s.key for s in specs]
    doubled = sorted({k for k in keys if keys.count(k) > 1})
    if doubled:
        raise ValueError(f"{where}: claim keys appear twice: {doubled}")
    return specs


def _at_replay(data: Collected, spec: ClaimSpec) -> ClaimSpec | None:
    """The claim on the replay-sweep runs at the smallest nonzero ratio every method it names
    (and its baseline) was swept at; ``None`` without such a ratio (the row is left out)."""
    names = [*spec.methods, *([] if spec.baseline is None else [spec.baseline])]
    sweeps = [{r: n for r, n in replay_runs(data.grid, name) if r} for name in names]
    shared = sorted(set.intersection(*(set(s) for s in sweeps)))
    if not shared:
        return None
    ratio = shared[0]
    swept = dict(zip(names, (s[ratio] for s in sweeps), strict=True))
    return dataclasses.replace(
        spec,
        claim=spec.claim.format(replay=f"{ratio:g}"),
        methods=tuple(swept[m] for m in spec.methods),
        baseline=None if spec.baseline is None else swept[spec.baseline],
        at_replay=None,
    )


def evaluate(data: Collected, spec: ClaimSpec) -> Claim:
    """One claim's row before the Holm adjustment (see :func:`holm_verdicts`)."""
    metric, rule = METRICS[spec.metric_name], RULES[spec.rule]
    measured = metric.measure(data, spec.methods, spec.task)
    stat = measured.stat
    direction = rule.decide(measured, spec.paper)
    untestable = None
    if direction != NOT_RUN:
        baseline = spec.baseline or spec.methods[-1]
        for name in spec.untestable_if:
            untestable = GUARDS[name].check(data, baseline, metric, spec.task)
            if untestable:
                break
    verdict = UNTESTABLE if untestable else direction
    p = None
    if rule.pvalue is not None and stat is not None and not untestable:
        p = rule.pvalue(stat, spec.paper)
    notes = []
    if measured.excluded:
        kept = 0 if stat is None else stat.n
        notes.append(
            f"contended timing, excluded: {', '.join(measured.excluded)}; {kept} paired seed(s) left"
        )
        if direction in (INCONCLUSIVE, NOT_RUN) and kept < 2:
            verdict = f"{INCONCLUSIVE}: contended timing"
    if measured.source and stat is not None and stat.mean is not None:
        notes.append(f"timing: {measured.source}")
    return Claim(
        key=spec.key,
        claim=spec.claim,
        paper=spec.paper_text,
        measured=stat,
        verdict=verdict,
        unit=spec.unit,
        paper_figure=spec.paper,
        rule=spec.rule,
        metric=spec.metric,
        methods=spec.methods,
        guards=spec.untestable_if,
        direction=direction,
        size=MISSING_TEXT if untestable or verdict == NOT_RUN else size_verdict(stat, spec.paper),
        untestable=untestable,
        p_value=p,
        note="; ".join(notes),
    )


def claims(data: Collected, table: Sequence[ClaimSpec] | None = None) -> list[Claim]:
    """Every claim's row: one per row of the claims table (default :func:`load_claims`), in its
    order; a row on replay-sweep runs without a shared ratio is left out."""
    rows = []
    for spec in load_claims() if table is None else table:
        if spec.at_replay is not None:
            spec = _at_replay(data, spec)
            if spec is None:
                continue
        rows.append(evaluate(data, spec))
    return holm_verdicts(rows)


# ----------------------------------------------------------------- shared helpers
def _difference(data: Collected, a: str, b: str, value: Value) -> Stat | None:
    if not (data.has(a) and data.has(b)):
        return None
    return paired_difference(data.scores(a, value), data.scores(b, value))


def _delta(data: Collected, name: str, task: str) -> Stat | None:
    if not data.has(name) or data.base_scores is None:
        return None
    return Stat.of(list(data.scores(name, task_delta(task, data.base_scores)).values()), True)


# ----------------------------------------------------------------- testbed checks
def _status(ok: bool | None) -> str:
    return NOT_RUN if ok is None else ("pass" if ok else "fail")


def _overlap(a: Stat, b: Stat) -> bool:
    return a.low is None or b.low is None or not (a.high < b.low or b.high < a.low)


def _lora_families(data: Collected, has: Callable[[str], bool]) -> list[str]:
    """The LoRA families (``lora`` and variants named ``lora*``, not generated) for which
    ``has(name)``; ``["lora"]`` when none, so the check is reported as not run."""
    names = [m.name for m in data.grid.methods if not m.generated and m.name.startswith("lora")]
    return [n for n in names if has(n)] or ["lora"]


def _lora_score(data: Collected, task: str) -> Stat:
    """Standard LoRA's score on ``task`` over its seeds (empty without LoRA runs)."""
    if not data.has("lora"):
        return Stat(None, None, 0)
    return Stat.of(list(data.scores("lora", task_score(task)).values()))


def checks(data: Collected) -> list[Check]:
    """The testbed's own targets (issue 14): interference gap and forgetting at the smallest
    nonzero replay ratio (each LoRA family that has single-task runs / a replay sweep), LoRA's
    headroom per accuracy task, FFT above LoRA."""
    rows: list[Check] = []
    grid = data.grid
    for family in _lora_families(data, lambda n: bool(single_tasks(grid, n))):
        joint = data.scores(family, medical_average) if data.has(family) else {}
        single: PerSeed = single_task_average(data, family) if data.has(family) else {}
        j, s = Stat.of(list(joint.values())), Stat.of(list(single.values()))
        gap = paired_difference(single, joint)
        ok = None
        if j.mean is not None and s.mean is not None:
            ok = s.mean - j.mean >= GAP_TARGET and not _overlap(j, s)
        rows.append(
            Check(
                f"Joint vs single-task gap of {family} ≥ {GAP_TARGET:g} points on the medical "
                "average, 95% CIs not overlapping",
                f"joint {j.interval_text()}, single-task {s.interval_text()}; paired single − "
                f"joint {gap.interval_text()}",
                _status(ok),
            )
        )

    for family in _lora_families(data, lambda n: bool(replay_runs(grid, n))):
        nonzero = [(r, n) for r, n in replay_runs(grid, family) if r is not None and r > 0]
        title = f"{family} forgets ≥ {FORGET_TARGET:g} points on MMLU or GSM8K"
        if not nonzero:
            rows.append(
                Check(f"At the smallest nonzero replay ratio {title}", "no replay sweep", NOT_RUN)
            )
            continue
        ratio, name = min(nonzero)
        deltas = {t: _delta(data, name, t) for t in ("mmlu", "gsm8k")}
        found = [d for d in deltas.values() if d is not None and d.mean is not None]
        ok = None if not found else any(d.mean <= -FORGET_TARGET for d in found)
        figures = ", ".join(
            f"{t.upper()} Δ {MISSING_TEXT if d is None else d.interval_text()}"
            for t, d in deltas.items()
        )
        rows.append(
            Check(f"At the smallest nonzero replay ratio ({ratio:g}) {title}", figures, _status(ok))
        )

    for task, chance in CHANCE.items():
        stat = _lora_score(data, task)
        ok = None if stat.mean is None else chance + HEADROOM <= stat.mean <= CEILING
        rows.append(
            Check(
                f"LoRA {task} accuracy between chance + {HEADROOM:g} ({chance + HEADROOM:.1f}) and "
                f"{CEILING:g}",
                f"LoRA {task} {stat.interval_text()}",
                _status(ok),
            )
        )

    rouge = _lora_score(data, "clinical_sum")
    rows.append(
        Check(
            f"LoRA clinical_sum ROUGE-L at most {CEILING:g} (well below its ceiling of 100)",
            f"LoRA clinical_sum {rouge.interval_text()}",
            _status(None if rouge.mean is None else rouge.mean <= CEILING),
        )
    )

    fft = _difference(data, "full_finetune", "lora", medical_average)
    ok = None if fft is None or fft.mean is None else fft.mean > 0
    rows.append(
        Check(
            "FFT above LoRA on the medical average (mean paired difference > 0)",
            f"FFT − LoRA {MISSING_TEXT if fft is None else fft.interval_text()}",
            _status(ok),
        )
    )
    return rows


# ----------------------------------------------------------------- the file
def _measured(claim: Claim) -> str:
    stat = claim.measured
    if stat is None or stat.mean is None:
        return MISSING_TEXT
    digits = 1 if claim.unit == "points" else 2
    return f"{stat.interval_text(digits)} {claim.unit}"


def _verdict_cell(claim: Claim) -> str:
    text = f"**{claim.verdict}**"
    if claim.untestable:
        text += f" ({claim.untestable}; the CI alone: {claim.direction})"
    if claim.note:
        text += f" ({claim.note})"
    return text


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 0.001 else f"{value:.0e}"


def _holm_cell(claim: Claim) -> str:
    if claim.holm_verdict is None:
        return MISSING_TEXT
    text = f"**{claim.holm_verdict}**"
    if claim.p_value is not None and claim.p_holm is not None:
        text += f" (p {_p(claim.p_value)}, Holm {_p(claim.p_holm)})"
    return text


def _rows_of(rows: Sequence[Claim], has: Callable[[Claim], bool]) -> str:
    return ", ".join(c.key for c in rows if has(c))


def rules_text(rows: Sequence[Claim]) -> str:
    """The rules, metrics and guards the rows use, each from its own object's description."""
    parts = [
        f"**Measured.** Two methods A, B: the paired difference A - B over the seeds both have "
        f"(a ratio A / B for step_time_ratio): the mean and the {_PCT} CI (Student t, n-1 df) of "
        "the per-seed values; one method: the mean and t CI over its seeds (the base model is "
        "scored once). The metrics:"
    ]
    bullets = []
    for name, metric in METRICS.items():
        used = _rows_of(rows, lambda c, n=name: c.metric.partition(":")[0] == n)
        if used:
            form = f"{name}:<task>" if metric.task else name
            bullets.append(f"- `{form}` (rows {used}): {metric.description}.")
    parts.append("\n".join(bullets))
    for name, rule in RULES.items():
        used = _rows_of(rows, lambda c, n=name: c.rule == n)
        if used:
            parts.append(f"**Rule `{name}` (rows {used}).** {rule.description}")
    for name, guard in GUARDS.items():
        used = _rows_of(rows, lambda c, n=name: n in c.guards)
        if used:
            parts.append(
                f"**Untestable `{name}` (rows {used}).** The claim is *{UNTESTABLE}* when "
                f"{guard.description} (the baseline: the claim's last method unless it names "
                "another); the CI's own verdict is shown beside it, and the claim leaves the "
                "Holm family."
            )
    family = sum(c.p_value is not None for c in rows)
    parts += [SIZE_RULE, holm_rule(family)]
    return "\n\n".join(parts) + "\n"


def claims_markdown(data: Collected) -> str:
    """The whole ``claims.md``: the rules, the claims table, the testbed checks."""
    seeds = list(data.grid.seeds)
    rows_ = claims(data)
    head = [
        f"# Claims: {data.grid.name}\n",
        f"Seeds {seeds}; every figure in percentage points of accuracy (ROUGE-L x100 for "
        "Clinical-Sum) unless its unit says otherwise; measured: mean [95% CI] (n = paired "
        "seeds). The claims are the rows of medmoe/experiments/claims.yaml.\n",
        rules_text(rows_),
    ]
    rows = [
        [c.key, c.claim, c.paper, _measured(c), _verdict_cell(c), c.size, _holm_cell(c)]
        for c in rows_
    ]
    table = markdown_table(
        "Claims of the paper (Med-MoE-LoRA) and of Ortho-LoRA",
        (
            "#",
            "Claim",
            "Paper",
            "Measured: mean [95% CI] (n)",
            "Verdict (direction)",
            "Size vs paper",
            "Holm-adjusted",
        ),
        rows,
        "",
    )
    check_rows = [[c.check, c.figures, f"**{c.status}**"] for c in checks(data)]
    testbed = markdown_table(
        "Testbed checks (the toy clinic's own targets, not claims of the paper)",
        ("Check", "Figures", "Status"),
        check_rows,
        "",
    )
    return "\n".join([*head, table, testbed])


def claims_summary(data: Collected) -> dict[str, list[dict[str, Any]]]:
    """The claims and checks as JSON-ready rows (for ``summary.json``)."""
    rows = []
    for c in claims(data):
        stat = c.measured or Stat(None, None, 0)
        rows.append(
            {
                "key": c.key,
                "claim": c.claim,
                "paper": c.paper,
                "paper_figure": c.paper_figure,
                "unit": c.unit,
                "rule": c.rule,
                "metric": c.metric,
                "methods": list(c.methods),
                "mean": stat.mean,
                "ci_low": stat.low,
                "ci_high": stat.high,
                "n": stat.n,
                "verdict": c.verdict,
                "direction": c.direction,
                "size": c.size,
                "untestable": c.untestable,
                "p_value": c.p_value,
                "p_holm": c.p_holm,
                "holm_verdict": c.holm_verdict,
                "note": c.note,
            }
        )
    tests = [{"check": c.check, "figures": c.figures, "status": c.status} for c in checks(data)]
    return {"claims": rows, "checks": tests}


# ----------------------------------------------------------------- from a committed runs.csv
def _number(text: str | None) -> float | None:
    return None if text in (None, "", MISSING_TEXT) else float(text)


def collect_runs_csv(grid: Grid, path: str | Path) -> Collected:
    """The results a report's ``runs.csv`` holds, as :func:`~medmoe.experiments.report.collect`
    would have read them from the runs' ``results.json`` (for a committed report whose run
    folders are gone). The grid is restricted to the seeds the file has; its methods without
    rows have no runs. What runs.csv lacks is absent: scores are the file's (in % to 2
    decimals), the parameter totals, metrics, thread counts and CPU time of the evaluation."""
    path = Path(path)
    tasks = [t for t, _ in (*MEDICAL_TASKS, *GENERAL_TASKS)]
    base = None
    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in grid.methods}
    seeds = set()
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scores = {
                t: _number(row.get(t)) / 100 for t in tasks if _number(row.get(t)) is not None
            }
            is_base = row["seed"] == ""
            results: dict[str, Any] = {
                "method": row["method"],
                "label": row.get("label", ""),
                "seed": None if is_base else int(row["seed"]),
                "base": is_base,
                "scores": scores,
                **{
                    k: _number(row.get(k))
                    for k in ("fit_seconds", "eval_seconds", "fit_cpu_seconds")
                },
                "global_step": int(_number(row.get("global_step")) or 0),
            }
            if is_base:
                base = results
                continue
            results["params"] = {
                "trainable": int(_number(row["trainable"]) or 0),
                "active": _number(row["active"]) or 0.0,
            }
            if row["method"] in runs:
                runs[row["method"]].append(results)
                seeds.add(results["seed"])
    if seeds:
        grid = grid.select(seeds=sorted(seeds))
    for name in runs:
        runs[name] = [r for r in runs[name] if r["seed"] in grid.seeds]
    return Collected(grid, path.parent.resolve(), base, runs)


def rebuild_claims(grid_path: str | Path, folder: str | Path) -> Path:
    """Rewrite ``folder``'s ``claims.md`` from its ``runs.csv`` and the grid file (see
    :func:`collect_runs_csv` for what that file lacks); returns the path written."""
    folder = Path(folder)
    data = collect_runs_csv(load_grid(grid_path), folder / RUNS_CSV)
    target = folder / CLAIMS_FILE
    atomic_write_text(target, claims_markdown(data))
    return target
