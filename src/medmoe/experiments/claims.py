"""``claims.md``: a verdict for each claim of the paper (and Ortho-LoRA's), from paired differences
over seeds, by the rules stated at the top of the file; then the testbed's own checks.

Method names (a grid's): full_finetune, lora, multi_lora, vanilla_moe_lora, ortho_lora,
med_moe_lora (eq-2 asymmetric allocation), alloc_uniform, alloc_bottom_heavy, alloc_asymmetric.
A claim whose runs are missing is "not run"; nothing here raises on a partial grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medmoe.callbacks.table_format import markdown_table
from medmoe.experiments.report import (
    ORTHO,
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
from medmoe.experiments.stats import Stat, paired_difference, paired_ratio

__all__ = [
    "EQUIVALENCE_MARGIN",
    "HOLDS",
    "INCONCLUSIVE",
    "NOT_HOLD",
    "NOT_RUN",
    "Claim",
    "Check",
    "checks",
    "claims",
    "claims_markdown",
    "claims_summary",
    "directional_verdict",
    "equivalence_verdict",
    "overhead_verdict",
    "recovery_verdict",
]

HOLDS, NOT_HOLD, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"
EQUIVALENCE_MARGIN = 1.0  # points: a difference inside ±1 is "no effect"
RECOVERY_TARGET, RECOVERY_FLOOR = 0.95, 0.5
OVERHEAD_LIMIT = 1.10
CHANCE = {"medqa": 25.0, "pubmedqa": 100.0 / 3}  # the domain accuracy tasks (uniform guess)
GAP_TARGET, FORGET_TARGET, HEADROOM, CEILING = 5.0, 10.0, 20.0, 90.0
MISSING_TEXT = "n/a"

_M = f"{EQUIVALENCE_MARGIN:g}"
RULE = (
    "\n\n".join(
        [
            "**Rule (directional claims, rows a-f and h).** The measured figure is the paired "
            "difference A - B over the seeds both methods have: the mean and the 95% CI (Student t, "
            "n-1 df) of the per-seed differences. A claim *holds* if the 95% CI of the paired "
            "difference lies entirely on the paper's side of zero; *does not hold* if it lies "
            f"entirely on the other side of zero, or entirely within ±{_M} point (equivalence "
            "margin: no effect of the claimed kind); *inconclusive* otherwise (or fewer than 2 "
            "paired seeds). The conditions are tried in this order (a CI entirely on the paper's "
            f"side holds even if it also lies within ±{_M}). Missing runs: *not run*.",
            "**Rule (no-forgetting claims, rows g: Δ against the base model, ideally 0).** An "
            f"equivalence test: *holds* if the 95% CI of Δ (t, n-1 df over seeds; the base model "
            f"is scored once) lies entirely within [-{_M}, +{_M}] points; *does not hold* if it lies "
            "entirely outside that band (below: measurable forgetting; above: a measurable change, "
            "not near-original either); *inconclusive* otherwise (or fewer than 2 seeds).",
            "**Rule (gap recovery, row i1).** Recovery = (Ortho-LoRA joint - LoRA joint) / (LoRA "
            "single-task - LoRA joint) on the medical average: the point estimate from the means, "
            "the interval a 95% percentile bootstrap over seeds (seeds resampled with replacement, "
            "the three figures of a seed kept together; fixed RNG seed; with few seeds it is "
            "narrower than the true 95% interval, so read it as optimistic). There must be a gap: if "
            "the CI of LoRA's paired single-task - joint gap does not lie above zero, the row is "
            f"*inconclusive*. Otherwise it *holds* if the interval's upper bound is >= "
            f"{RECOVERY_TARGET:g} (95% recovery is consistent with the data) and its lower bound is "
            f">= {RECOVERY_FLOOR:g} (the data exclude recovering half the gap or less); *does not "
            f"hold* if the upper bound is < {RECOVERY_TARGET:g} (the data exclude 95% recovery); "
            "*inconclusive* otherwise.",
            "**Rule (overhead, row i2).** Step-time ratio = Ortho-LoRA's fit CPU seconds per "
            "optimizer step (fit_cpu_seconds / global_step) over LoRA's, per seed: the mean and t CI "
            f'of the ratios. "Negligible" *holds* if the CI\'s upper bound is <= {OVERHEAD_LIMIT:.2f}; '
            f"*does not hold* if its lower bound is > {OVERHEAD_LIMIT:.2f}; *inconclusive* otherwise.",
        ]
    )
    + "\n"
)


@dataclass(frozen=True)
class Claim:
    """One row of claims.md."""

    key: str
    claim: str
    paper: str
    measured: Stat | None  # None: a method it needs is not in the grid
    verdict: str
    unit: str = "points"


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


# ----------------------------------------------------------------- measured figures
Value = Callable[[dict[str, float]], float | None]


def _difference(data: Collected, a: str, b: str, value: Value) -> Stat | None:
    if not (data.has(a) and data.has(b)):
        return None
    return paired_difference(data.scores(a, value), data.scores(b, value))


def _delta(data: Collected, name: str, task: str) -> Stat | None:
    if not data.has(name) or data.base_scores is None:
        return None
    return Stat.of(list(data.scores(name, task_delta(task, data.base_scores)).values()), True)


def _directional(
    data: Collected,
    key: str,
    claim: str,
    paper: float,
    paper_text: str,
    a: str,
    b: str,
    value: Value,
) -> Claim:
    stat = _difference(data, a, b, value)
    return Claim(key, claim, paper_text, stat, directional_verdict(stat, paper))


def _forgetting_at_low_replay(data: Collected) -> list[Claim]:
    """Rows e3 / e4: claim e again at the smallest nonzero replay ratio both Med-MoE-LoRA and
    LoRA were swept at, where LoRA forgets measurably (none without a shared sweep ratio)."""
    ours = {r: n for r, n in replay_runs(data.grid, "med_moe_lora") if r}
    theirs = {r: n for r, n in replay_runs(data.grid, "lora") if r}
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return []
    ratio = shared[0]
    rows = []
    for key, task, title, paper, text in (
        ("e3", "gsm8k", "GSM8K", 3.3, "+3.3 (−0.3 vs −3.6)"),
        ("e4", "mmlu", "MMLU", 3.8, "+3.8 (−0.5 vs −4.3)"),
    ):
        claim = f"{title} forgetting at replay {ratio:g}: Med-MoE-LoRA Δ − LoRA Δ"
        rows.append(
            _directional(
                data, key, claim, paper, text, ours[ratio], theirs[ratio], task_score(task)
            )
        )
    return rows


def claims(data: Collected) -> list[Claim]:
    """Every claim's row (see the module's RULE for the verdicts)."""
    medqa, average = task_score("medqa"), medical_average
    gsm8k, mmlu = task_score("gsm8k"), task_score("mmlu")
    rows = [
        _directional(
            data,
            "a",
            "Med-MoE-LoRA − LoRA on MedQA",
            6.9,
            "+6.9 (65.8 vs 58.9)",
            "med_moe_lora",
            "lora",
            medqa,
        ),
        _directional(
            data,
            "b",
            "Med-MoE-LoRA − LoRA on the medical average",
            5.7,
            "+5.7 (59.5 vs 53.8)",
            "med_moe_lora",
            "lora",
            average,
        ),
        _directional(
            data,
            "c",
            "Med-MoE-LoRA − Multi-LoRA on MedQA",
            4.5,
            "+4.5 (65.8 vs 61.3)",
            "med_moe_lora",
            "multi_lora",
            medqa,
        ),
        _directional(
            data,
            "d",
            "Med-MoE-LoRA − Vanilla MoE-LoRA on the medical average",
            2.7,
            "+2.7 in Table 1 (59.5 vs 56.8); the text says +3.3 on average",
            "med_moe_lora",
            "vanilla_moe_lora",
            average,
        ),
        _directional(
            data,
            "e1",
            "GSM8K forgetting: Med-MoE-LoRA Δ − LoRA Δ",
            3.3,
            "+3.3 (−0.3 vs −3.6)",
            "med_moe_lora",
            "lora",
            gsm8k,
        ),
        _directional(
            data,
            "e2",
            "MMLU forgetting: Med-MoE-LoRA Δ − LoRA Δ",
            3.8,
            "+3.8 (−0.5 vs −4.3)",
            "med_moe_lora",
            "lora",
            mmlu,
        ),
        _directional(
            data,
            "f1",
            "FFT forgets more than LoRA: GSM8K Δ_FFT − Δ_LoRA",
            -5.1,
            "−5.1 (−8.7 vs −3.6)",
            "full_finetune",
            "lora",
            gsm8k,
        ),
        _directional(
            data,
            "f2",
            "FFT forgets more than LoRA: MMLU Δ_FFT − Δ_LoRA",
            -3.9,
            "−3.9 (−8.2 vs −4.3)",
            "full_finetune",
            "lora",
            mmlu,
        ),
    ]
    rows += _forgetting_at_low_replay(data)
    for key, task, paper in (("g1", "gsm8k", "−0.3"), ("g2", "mmlu", "−0.5")):
        stat = _delta(data, "med_moe_lora", task)
        title = "GSM8K" if task == "gsm8k" else "MMLU"
        rows.append(
            Claim(
                key,
                f"Med-MoE-LoRA keeps near-original {title} (Δ vs base ≈ 0; equivalence rule)",
                paper,
                stat,
                equivalence_verdict(stat),
            )
        )
    rows += [
        _directional(
            data,
            "h1",
            "Asymmetric (eq. 2, med_moe_lora) − uniform allocation, medical average",
            2.7,
            "+2.7 (59.5 vs 56.8)",
            "med_moe_lora",
            "alloc_uniform",
            average,
        ),
        _directional(
            data,
            "h2",
            "Asymmetric (eq. 2, med_moe_lora) − bottom-heavy allocation, medical average",
            5.3,
            "+5.3 (59.5 vs 54.2)",
            "med_moe_lora",
            "alloc_bottom_heavy",
            average,
        ),
        _directional(
            data,
            "h3",
            "Asymmetric (2/8 ranges, alloc_asymmetric) − uniform allocation, medical average",
            2.7,
            "+2.7 (59.5 vs 56.8)",
            "alloc_asymmetric",
            "alloc_uniform",
            average,
        ),
    ]
    ortho = ortho_recovery(data)
    recovery = None if ortho is None else ortho["recovery"]
    rows.append(
        Claim(
            "i1",
            "Ortho-LoRA recovers 95% of the multi-task vs single-task gap (LoRA "
            "joint vs single-task, medical average; bootstrap interval)",
            "0.95",
            recovery,
            recovery_verdict(recovery, None if ortho is None else ortho["gap"]),
            unit="fraction of the gap",
        )
    )
    ratio = None  # needs Ortho-LoRA and LoRA runs only (not the single-task runs)
    if data.has(ORTHO) and data.has("lora"):
        ratio = paired_ratio(
            data.per_seed(ORTHO, step_seconds), data.per_seed("lora", step_seconds)
        )
    rows.append(
        Claim(
            "i2",
            "Ortho-LoRA's overhead is negligible (step-time ratio vs LoRA)",
            "negligible",
            ratio,
            overhead_verdict(ratio),
            unit="ratio",
        )
    )
    return rows


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


def claims_markdown(data: Collected) -> str:
    """The whole ``claims.md``: the rules, the claims table, the testbed checks."""
    seeds = list(data.grid.seeds)
    head = [
        f"# Claims: {data.grid.name}\n",
        f"Seeds {seeds}; every figure in percentage points of accuracy (ROUGE-L x100 for "
        "Clinical-Sum) unless its unit says otherwise; measured: mean [95% CI] (n = paired "
        "seeds).\n",
        RULE,
    ]
    rows = [[c.key, c.claim, c.paper, _measured(c), f"**{c.verdict}**"] for c in claims(data)]
    table = markdown_table(
        "Claims of the paper (Med-MoE-LoRA) and of Ortho-LoRA",
        ("#", "Claim", "Paper", "medmoe (paired difference, 95% CI, n)", "Verdict"),
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
                "unit": c.unit,
                "mean": stat.mean,
                "ci_low": stat.low,
                "ci_high": stat.high,
                "n": stat.n,
                "verdict": c.verdict,
            }
        )
    tests = [{"check": c.check, "figures": c.figures, "status": c.status} for c in checks(data)]
    return {"claims": rows, "checks": tests}
