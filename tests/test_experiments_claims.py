"""The report's statistics (t intervals, paired differences, one-sided t tests, Holm), Tables
5-6, claims.md (the claims table, its rules, size, Holm and untestable columns) and plots, from
fake results.json files (no training) and the committed toy_full runs.csv."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from medmoe.experiments import collect, load_grid, tables, write_report
from medmoe.experiments.claims import (
    GUARDS,
    HOLDS,
    INCONCLUSIVE,
    METRICS,
    NOT_HOLD,
    NOT_RUN,
    RULES,
    UNTESTABLE,
    Claim,
    checks,
    claims,
    claims_markdown,
    collect_runs_csv,
    directional_pvalue,
    directional_verdict,
    equivalence_pvalue,
    equivalence_verdict,
    holm_verdicts,
    load_claims,
    overhead_verdict,
    recovery_verdict,
    size_verdict,
)
from medmoe.experiments.report import ortho_recovery, replay_runs, single_task_average, to_csv
from medmoe.experiments.stats import (
    Stat,
    bootstrap,
    holm,
    paired_difference,
    paired_ratio,
    t_quantile,
    t_tail,
)
from medmoe.experiments.worker import write_json

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
BASE = {"medqa": 0.25, "pubmedqa": 0.5, "clinical_sum": 0.1, "mmlu": 0.6, "gsm8k": 0.4}


# ----------------------------------------------------------------- statistics
def test_t_interval_matches_a_hand_computation() -> None:
    stat = Stat.of([1, 2, 3, 4, 5])
    assert stat.mean == 3 and stat.n == 5
    assert stat.std == pytest.approx(1.5811, abs=1e-4)
    assert t_quantile(5) == pytest.approx(2.776445, abs=1e-6)
    assert stat.half_width == pytest.approx(1.9632, abs=1e-4)
    assert (stat.low, stat.high) == pytest.approx((3 - 1.9632, 3 + 1.9632), abs=1e-4)
    assert stat.text() == "3.0 ± 2.0" and stat.text(3) == "3.000 ± 1.963"
    assert Stat.of([None, 2.0, math.nan]).text() == "2.0"  # one value: the mean alone
    assert Stat.of([]).text() == "n/a" and Stat.of([]).n == 0
    with pytest.raises(ValueError):
        t_quantile(1)


def test_paired_difference_uses_the_shared_seeds() -> None:
    a = {0: 1.0, 1: 2.0, 2: 4.0, 5: 100.0}
    b = {0: 0.0, 1: 0.0, 2: 1.0, 3: 9.0, 5: None}
    diff = paired_difference(a, b)  # seeds 0, 1, 2: differences 1, 2, 3
    assert diff.n == 3 and diff.mean == pytest.approx(2.0)
    assert diff.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert diff.text() == "+2.0 ± 2.5"
    ratio = paired_ratio({0: 1.02, 1: 1.04, 2: 1.06}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert ratio.mean == pytest.approx(1.04)
    assert ratio.high == pytest.approx(1.04 + 4.302653 * 0.02 / math.sqrt(3), abs=1e-6)


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    rows = [(1.0, 2.0), (2.0, 2.0), (3.0, 2.0), (4.0, 2.0)]
    stat = bootstrap(rows, lambda r: sum(x for x, _ in r) / sum(y for _, y in r))
    assert stat.mean == pytest.approx(1.25) and stat.n == 4
    assert 0.5 <= stat.low < stat.mean < stat.high <= 2.0
    assert bootstrap(rows, lambda r: None).mean is None
    again = bootstrap(rows, lambda r: sum(x for x, _ in r) / sum(y for _, y in r))
    assert (again.low, again.high) == (stat.low, stat.high)  # fixed RNG seed


# ----------------------------------------------------------------- verdict rules
def test_directional_rule_in_each_branch() -> None:
    above = Stat.of([5, 6, 7])  # CI [3.5, 8.5]
    assert directional_verdict(above, 6.9) == HOLDS
    assert directional_verdict(above, -5.1) == NOT_HOLD  # entirely on the other side
    assert directional_verdict(Stat.of([-0.2, 0.0, 0.2]), 6.9) == NOT_HOLD  # within ±1
    assert directional_verdict(Stat.of([-5, 0, 5]), 6.9) == INCONCLUSIVE
    assert directional_verdict(Stat.of([3.0]), 6.9) == INCONCLUSIVE  # one seed
    assert directional_verdict(Stat.of([]), 6.9) == NOT_RUN
    assert directional_verdict(None, 6.9) == NOT_RUN
    assert directional_verdict(Stat.of([-7, -6, -5]), -5.1) == HOLDS


def test_equivalence_recovery_and_overhead_rules() -> None:
    assert equivalence_verdict(Stat.of([-0.1, 0.0, 0.1])) == HOLDS
    assert equivalence_verdict(Stat.of([-5, -4, -3])) == NOT_HOLD
    assert equivalence_verdict(Stat.of([-3, 0, 3])) == INCONCLUSIVE
    assert equivalence_verdict(None) == NOT_RUN
    gap = Stat.of([9, 10, 11])
    assert recovery_verdict(Stat(0.9, None, 3, low=0.7, high=1.1), gap) == HOLDS
    assert recovery_verdict(Stat(0.8, None, 3, low=0.7, high=0.9), gap) == NOT_HOLD
    assert recovery_verdict(Stat(0.6, None, 3, low=0.2, high=1.0), gap) == INCONCLUSIVE
    no_gap = Stat.of([-1, 0, 1])
    assert recovery_verdict(Stat(0.9, None, 3, low=0.7, high=1.1), no_gap) == INCONCLUSIVE
    assert recovery_verdict(None, None) == NOT_RUN
    assert overhead_verdict(Stat.of([1.02, 1.04, 1.06])) == HOLDS
    assert overhead_verdict(Stat.of([1.5, 1.6, 1.7])) == NOT_HOLD
    assert overhead_verdict(Stat.of([1.0, 1.1, 1.2])) == INCONCLUSIVE


# ----------------------------------------------------------------- a fake grid
def _grid(folder: Path) -> Path:
    baselines = ROOT / "configs" / "baselines"
    grid = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": list(SEEDS),
        "methods": [
            {"name": "full_finetune", "configs": [str(baselines / "full_finetune.yaml")]},
            {"name": "lora", "configs": [str(baselines / "lora.yaml")]},
            {"name": "ortho_lora", "configs": [str(baselines / "ortho_lora.yaml")]},
            {"name": "med_moe_lora", "tables": [1, 2, 3, 4], "allocation": {"lower": "2"}},
        ],
        "replay_sweep": {"methods": ["lora"], "ratios": [0.0, 0.05]},
        "single_task": {"methods": ["lora"], "overrides": {"data.init_args.batch_size": 11}},
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _write(out: Path, method: str, seed: int | None, scores: dict, cpu: float = 10.0) -> None:
    run = out / method if seed is None else out / method / f"seed_{seed}"
    results = {
        "method": method,
        "label": method,
        "seed": seed,
        "base": seed is None,
        "scores": scores,
        "params": {"total": 1000, "trainable": 100, "active": 100.0},
        "global_step": 10,
        "fit_seconds": cpu,
        "fit_cpu_seconds": cpu,
        "eval_seconds": 0.5,
    }
    write_json(run / "results.json", results)


def _fake_results(out: Path) -> None:
    _write(out, "base", None, BASE)
    for s in SEEDS:
        e = 0.01 * s
        lora = {"medqa": 0.50 + e, "pubmedqa": 0.60 + e, "clinical_sum": 0.30 + e}
        _write(out, "lora", s, {**lora, "mmlu": 0.55, "gsm8k": 0.35})
        _write(out, "lora-replay0", s, {**lora, "mmlu": 0.40, "gsm8k": 0.30})
        _write(out, "lora-replay0.05", s, {**lora, "mmlu": 0.48 + e, "gsm8k": 0.36})
        for task in lora:  # each task alone: 10 points above its joint score
            _write(out, f"lora-single-{task}", s, {task: lora[task] + 0.10, "mmlu": 0.5})
        bump = (0.07, 0.08, 0.09)[s]  # Ortho-LoRA recovers 70/80/90% of the 10-point gap
        ortho = {k: v + bump for k, v in lora.items()}
        _write(
            out, "ortho_lora", s, {**ortho, "mmlu": 0.55, "gsm8k": 0.35}, cpu=10.0 + 0.2 * (s + 1)
        )
        fft = {k: v + 0.10 for k, v in lora.items()}
        _write(out, "full_finetune", s, {**fft, "mmlu": 0.58, "gsm8k": 0.35 + 0.05 * (s - 1)})
        moe = {**lora, "medqa": lora["medqa"] + (0.05, 0.06, 0.07)[s]}
        _write(out, "med_moe_lora", s, {**moe, "mmlu": 0.60, "gsm8k": 0.40 + 0.001 * (s - 1)})


def test_tables_5_and_6_claims_and_files(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    data = collect(grid, out)
    assert data.missing() == []
    assert single_task_average(data, "lora") == pytest.approx({0: 56.6667, 1: 57.6667, 2: 58.6667})

    built = tables(data)
    assert [t.number for t in built] == [1, 2, 3, 4, 5, 5, 6]
    assert all(
        "-single-" not in str(r[0]) and "replay" not in str(r[0]) for t in built[:4] for r in t.rows
    )
    table5, table5b, table6 = built[4:]
    (row,) = table5.rows
    assert row[1].mean == pytest.approx(47.6667, abs=1e-4) and row[2].mean == pytest.approx(
        57.6667, abs=1e-4
    )
    assert row[3].mean == pytest.approx(-10.0) and row[3].n == 3 and row[-1] == 3
    assert row[4].mean == pytest.approx(71.0)  # PubMedQA alone (the first medical task)
    assert row[5].mean == pytest.approx(-10.0)  # its paired gap

    (ortho,) = table5b.rows
    assert ortho[2].mean == pytest.approx(8.0)  # Ortho-LoRA − LoRA joint
    recovery = ortho_recovery(data)["recovery"]
    assert (
        recovery.mean == pytest.approx(0.8)
        and 0.7 - 1e-9 <= recovery.low <= recovery.high <= 0.9 + 1e-9
    )
    assert ortho[4].mean == pytest.approx(1.04)  # step-time ratio

    assert [r[1] for r in table6.rows] == ["0", "0.05", "0.2"]
    assert table6.rows[0][2].mean == pytest.approx(-20.0) and table6.rows[1][
        2
    ].mean == pytest.approx(-11.0)
    assert table6.rows[2][3].mean == pytest.approx(-5.0)

    header = next(csv.reader(to_csv(table6).splitlines()))
    assert header[:7] == ["Method", "Replay ratio", "MMLU Δ", "MMLU Δ ci_low", "MMLU Δ ci_high"] + [
        "MMLU Δ std",
        "MMLU Δ n",
    ]

    verdicts = {c.key: c.verdict for c in claims(data)}
    assert verdicts["a"] == HOLDS and verdicts["b"] == HOLDS
    assert verdicts["c"] == NOT_RUN and verdicts["d"] == NOT_RUN  # no multi / vanilla runs
    assert verdicts["e1"] == HOLDS and verdicts["e2"] == HOLDS
    assert verdicts["f1"] == INCONCLUSIVE and verdicts["f2"] == NOT_HOLD  # FFT forgets less on MMLU
    assert verdicts["g1"] == HOLDS and verdicts["g2"] == HOLDS
    assert {verdicts[k] for k in ("h1", "h2", "h3")} == {NOT_RUN}
    assert verdicts["i1"] == NOT_HOLD and verdicts["i2"] == HOLDS
    measured = {c.key: c.measured for c in claims(data)}
    assert measured["a"].mean == pytest.approx(6.0) and measured["a"].n == 3
    assert measured["a"].half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)

    status = [c.status for c in checks(data)]
    assert status == ["pass"] * 6

    written = {p.name for p in write_report(grid, out)}
    assert {"tables.md", "claims.md", "summary.json", "runs.csv"} <= written
    assert {f"table{n}" for n in range(1, 7)} <= {name[:6] for name in written}
    assert "table5b_ortho_lora.csv" in written
    for png in ("domain_vs_forgetting.png", "forgetting_vs_replay.png", "interference_gap.png"):
        assert png in written and (out / png).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert {r["key"]: r["verdict"] for r in summary["claims"]} == verdicts
    assert [r["status"] for r in summary["checks"]] == status
    text = (out / "claims.md").read_text()
    assert "entirely on the paper's side of zero" in text and "**not run**" in text
    assert "95% CI (t, n-1 df) over seeds" in (out / "tables.md").read_text()


def test_a_partial_grid_reports_not_run(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    for seed in (0, 1):  # Ortho-LoRA and LoRA without single-task runs: overhead only
        _write(out, "ortho_lora", seed, {"medqa": 0.5}, cpu=30.0)
        _write(out, "lora", seed, {"medqa": 0.5, "pubmedqa": 0.6, "clinical_sum": 0.3})
    data = collect(grid, out)
    verdicts = {c.key: c.verdict for c in claims(data)}
    assert verdicts.pop("i2") == NOT_HOLD  # 3.0 s/step against 1.0
    assert set(verdicts.values()) == {NOT_RUN}
    assert {c.status for c in checks(data)} <= {NOT_RUN, "fail", "pass"}
    written = {p.name for p in write_report(grid, out)}
    assert "claims.md" in written and "forgetting_vs_replay.png" not in written  # no base


def test_replay_rows_use_the_methods_own_ratio(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    assert replay_runs(grid, "lora") == [(0.0, "lora-replay0"), (0.05, "lora-replay0.05")] + [
        (0.2, "lora")  # demo.yaml's replay_ratio
    ]
    assert replay_runs(grid, "med_moe_lora") == []  # no sweep
    values = yaml.safe_load((tmp_path / "grid.yaml").read_text())
    values["methods"][1]["overrides"] = {"data.init_args.replay_ratio": 0.1}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(values))
    assert replay_runs(load_grid(tmp_path / "grid.yaml"), "lora")[-1] == (0.1, "lora")


# ----------------------------------------------------------------- tests and multiplicity
def test_t_tail_matches_scipy_one_sample_t_tests() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for _ in range(50):
        values = [rng.gauss(0.5, 2.0) for _ in range(rng.randint(2, 7))]
        null = rng.uniform(-1, 1)
        stat = Stat.of(values)
        greater = scipy_stats.ttest_1samp(values, null, alternative="greater").pvalue
        less = scipy_stats.ttest_1samp(values, null, alternative="less").pvalue
        assert t_tail(stat, null, 1.0) == pytest.approx(greater, rel=1e-9)
        assert t_tail(stat, null, -1.0) == pytest.approx(less, rel=1e-9)
    assert t_tail(Stat.of([3.0])) is None and t_tail(Stat.of([])) is None
    assert t_tail(Stat.of([2.0, 2.0, 2.0])) == 0.0  # zero std: the mean decides
    assert t_tail(Stat.of([2.0, 2.0]), null=2.0) == 1.0


def test_claim_tests_reject_exactly_when_the_rule_says_holds() -> None:
    """p < 0.05 iff the 95% interval rule says holds: the Holm column adjusts the very tests
    the verdict column applies."""
    rng = random.Random(2)
    for _ in range(400):
        values = [
            rng.gauss(rng.uniform(-3, 3), rng.uniform(0.1, 3)) for _ in range(rng.randint(2, 6))
        ]
        stat = Stat.of(values, signed=True)
        for paper in (6.9, -5.1):
            p = directional_pvalue(stat, paper)
            assert (p < 0.05) == (directional_verdict(stat, paper) == HOLDS)
        p = equivalence_pvalue(stat, None)
        assert (p < 0.05) == (equivalence_verdict(stat) == HOLDS)
    # a hand case: differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641, 2 df, one-sided 0.03709
    assert directional_pvalue(Stat.of([1, 2, 3]), 6.9) == pytest.approx(2 * 0.037089, abs=1e-5)
    assert directional_pvalue(Stat.of([1, 2, 3]), -5.1) == 1.0  # the other side: capped at 1
    # TOST within ±1 of 0.1, 0.2, 0.3: t_high = (1 - 0.2) / (0.1 / sqrt 3) = 13.856, 2 df
    assert equivalence_pvalue(Stat.of([0.1, 0.2, 0.3]), None) == pytest.approx(
        2 * 0.0025840, rel=1e-3
    )
    assert equivalence_pvalue(Stat.of([0.0, 0.0, 0.0]), None) == 0.0  # g1's degenerate CI


def test_holm_against_a_hand_computed_case() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    # 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06; returned in the given order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, kept monotone
    assert holm([0.02]) == [0.02] and holm([]) == []
    # the toy_full family (rounded): only e3 is close: 6th of 10, 6 x 0.008147 = 0.04888
    p = [3e-4, 8.3e-5, 0.359, 1.0, 1.0, 0.0022, 1.05e-4, 0.008147, 0.488, 1.0]
    assert holm(p)[7] == pytest.approx(6 * 0.008147)


def test_holm_against_statsmodels_when_importable() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = random.Random(3)
    for _ in range(50):
        p = [rng.random() ** 3 for _ in range(rng.randint(1, 12))]
        reject, adjusted, _, _ = multitest.multipletests(p, alpha=0.05, method="holm")
        assert holm(p) == pytest.approx(list(adjusted), abs=1e-12)
        assert [q < 0.05 for q in holm(p)] == list(reject)


def _row(key: str, verdict: str, p: float | None, rule: str = "directional") -> Claim:
    return Claim(key, key, "+1", Stat.of([1.0, 2.0]), verdict, rule=rule, p_value=p)


def test_holm_verdicts_adjust_only_the_claims_that_held() -> None:
    rows = holm_verdicts(
        [
            _row("a", HOLDS, 0.005),  # 3 x 0.005 = 0.015: still holds
            _row("b", HOLDS, 0.02),  # 2 x 0.02 = 0.04: still holds
            _row("c", HOLDS, 0.04),  # max(0.04, 1 x 0.04) = 0.04: holds
            _row("d", NOT_HOLD, None),  # too few / untestable: outside the family
            _row("e", NOT_HOLD, None, rule="recovery"),
        ]
    )
    assert [r.holm_verdict for r in rows] == [HOLDS, HOLDS, HOLDS, NOT_HOLD, None]
    rows = holm_verdicts([_row("a", HOLDS, 0.03), _row("b", HOLDS, 0.04), _row("c", NOT_HOLD, 1.0)])
    assert [r.p_holm for r in rows] == pytest.approx([0.09, 0.09, 1.0])
    assert [r.holm_verdict for r in rows] == [INCONCLUSIVE, INCONCLUSIVE, NOT_HOLD]


def test_size_column_reads_the_ci_against_the_papers_figure() -> None:
    assert size_verdict(Stat.of([5, 6, 7]), 6.9) == "consistent"  # [3.5, 8.5]
    assert size_verdict(Stat.of([5, 6, 7]), 2.0) == "larger"
    assert size_verdict(Stat.of([5, 6, 7]), 9.0) == "smaller"
    assert size_verdict(Stat.of([-7, -6, -5]), -5.1) == "consistent"
    assert size_verdict(Stat.of([-16, -11, -6]), -1.0) == "consistent"
    assert size_verdict(Stat.of([-12, -11, -10]), -5.1) == "larger"  # more forgetting
    assert size_verdict(Stat.of([1, 2, 3]), -5.1) == "smaller"  # the other side of zero
    assert (
        size_verdict(Stat.of([3.0]), 6.9) == "n/a" and size_verdict(Stat.of([5, 6]), None) == "n/a"
    )


# ----------------------------------------------------------------- the claims table
PAPER = {  # the claims of the hand-written claims() this table replaced, a-d at matched capacity
    "a": (6.9, "+6.9 (65.8 vs 58.9)"),
    "b": (5.7, "+5.7 (59.5 vs 53.8)"),
    "c": (4.5, "+4.5 (65.8 vs 61.3)"),
    "d": (2.7, "+2.7 in Table 1 (59.5 vs 56.8); the text says +3.3 on average"),
    "a_matched": (6.9, "+6.9 (65.8 vs 58.9; the paper's LoRA is not matched)"),
    "b_matched": (5.7, "+5.7 (59.5 vs 53.8; the paper's LoRA is not matched)"),
    "c_matched": (4.5, "+4.5 (65.8 vs 61.3; the paper's Multi-LoRA is not matched)"),
    "d_matched": (2.7, "+2.7 (59.5 vs 56.8; the paper's Vanilla MoE-LoRA is not matched)"),
    "e1": (3.3, "+3.3 (−0.3 vs −3.6)"),
    "e2": (3.8, "+3.8 (−0.5 vs −4.3)"),
    "f1": (-5.1, "−5.1 (−8.7 vs −3.6)"),
    "f2": (-3.9, "−3.9 (−8.2 vs −4.3)"),
    "e3": (3.3, "+3.3 (−0.3 vs −3.6)"),
    "e4": (3.8, "+3.8 (−0.5 vs −4.3)"),
    "g1": (-0.3, "−0.3"),
    "g2": (-0.5, "−0.5"),
    "h1": (2.7, "+2.7 (59.5 vs 56.8)"),
    "h2": (5.3, "+5.3 (59.5 vs 54.2)"),
    "h3": (2.7, "+2.7 (59.5 vs 56.8)"),
    "i1": (0.95, "0.95"),
    "i2": (None, "negligible"),
}


def test_the_claims_table_keeps_every_claim_and_figure() -> None:
    table = load_claims()
    assert [s.key for s in table] == list(PAPER)
    assert {s.key: (s.paper, s.paper_text) for s in table} == PAPER
    for spec in table:
        assert spec.metric_name in METRICS and spec.rule in RULES
        assert set(spec.untestable_if) <= set(GUARDS)
    methods = {s.key: s.methods for s in table}
    assert methods["h3"] == ("alloc_asymmetric", "alloc_uniform")
    assert methods["c_matched"] == ("med_moe_lora", "multi_lora_matched")
    assert methods["f1"] == ("full_finetune", "lora") and methods["g1"] == ("med_moe_lora",)
    assert '"**/*.yaml"' in (ROOT / "pyproject.toml").read_text()  # shipped as package data


def test_a_claim_is_one_yaml_row(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    data = collect(grid, out)
    row = {
        "key": "z",
        "claim": "FFT − LoRA on PubMedQA",
        "paper": 1.0,
        "paper_text": "+1.0",
        "methods": ["full_finetune", "lora"],
        "metric": "task_score:pubmedqa",
        "rule": "directional",
    }
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump([row]))
    (claim,) = claims(data, load_claims(path))
    assert claim.key == "z" and claim.verdict == HOLDS and claim.measured.mean == pytest.approx(10)
    for bad, message in (
        ({"metric": "task_score"}, "is written task_score:<task>"),
        ({"metric": "nope"}, "unknown metric"),
        ({"rule": "nope"}, "unknown rule"),
        ({"untestable_if": ["nope"]}, "unknown guard"),
        ({"colour": "red"}, "unknown fields"),
    ):
        path.write_text(yaml.safe_dump([{**row, **bad}]))
        with pytest.raises(ValueError, match=message):
            load_claims(path)
    path.write_text(yaml.safe_dump([row, row]))
    with pytest.raises(ValueError, match="appear twice"):
        load_claims(path)


def test_untestable_when_the_baseline_forgets_nothing_or_is_at_the_ceiling(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    for s in SEEDS:  # LoRA keeps the base's GSM8K (0.40) and is perfect on MedQA
        e = 0.01 * s
        lora = {"medqa": 1.0, "pubmedqa": 0.60 + e, "clinical_sum": 0.30 + e}
        _write(out, "lora", s, {**lora, "mmlu": 0.55, "gsm8k": 0.40 + 0.001 * (s - 1)})
    rows = {c.key: c for c in claims(collect(grid, out))}
    for key in ("e1", "g1"):
        assert rows[key].verdict == UNTESTABLE and "nothing to forget" in rows[key].untestable
        assert rows[key].p_value is None and rows[key].holm_verdict == UNTESTABLE
        assert rows[key].size == "n/a"
    assert rows["g1"].direction == HOLDS  # the interval alone would say holds
    assert rows["a"].verdict == UNTESTABLE and "nothing to improve" in rows["a"].untestable
    assert rows["e2"].verdict == HOLDS and rows["e2"].untestable is None  # LoRA forgets MMLU
    assert rows["b"].verdict != UNTESTABLE  # the medical average is far from 100


def test_overhead_excludes_contended_timing(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    path = out / "ortho_lora" / "seed_2" / "results.json"
    results = json.loads(path.read_text())
    results["fit_seconds"] = 2 * results["fit_cpu_seconds"]  # waited for a core half the time
    path.write_text(json.dumps(results))
    (i2,) = [c for c in claims(collect(grid, out)) if c.key == "i2"]
    assert i2.measured.n == 2 and i2.measured.mean == pytest.approx((1.02 + 1.04) / 2)
    assert "ortho_lora seed 2 (wall/CPU 2.00)" in i2.note
    assert "fit_cpu_seconds / global_step" in i2.note
    for seed in (0, 1):
        path = out / "lora" / f"seed_{seed}" / "results.json"
        results = json.loads(path.read_text())
        results["fit_seconds"] = 1.5 * results["fit_cpu_seconds"]
        path.write_text(json.dumps(results))
    (i2,) = [c for c in claims(collect(grid, out)) if c.key == "i2"]
    assert i2.verdict == "inconclusive: contended timing" and i2.measured.n == 0
    # per-step time measured inside the loop wins where every run has it
    for name in ("ortho_lora", "lora"):
        for seed in SEEDS:
            path = out / name / f"seed_{seed}" / "results.json"
            results = json.loads(path.read_text())
            results["fit_seconds"] = 3 * results["fit_cpu_seconds"]  # a contended fit ...
            results["train_step_seconds"] = 0.5 if name == "lora" else 0.52  # ... clean steps
            path.write_text(json.dumps(results))
    (i2,) = [c for c in claims(collect(grid, out)) if c.key == "i2"]
    assert i2.measured.mean == pytest.approx(1.04) and "train_step_seconds" in i2.note
    assert i2.measured.n == len(SEEDS) and "wall/CPU" not in i2.note  # none excluded


def test_claims_md_prints_the_rule_objects_and_every_column(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    data = collect(grid, out)
    text = claims_markdown(data)
    for rule in RULES.values():
        assert rule.description in text
    for name in ("task_score", "medical_average", "ortho_recovery", "step_time_ratio"):
        assert METRICS[name].description in text
    assert GUARDS["nothing_to_forget"].description in text
    header = (
        "| # | Claim | Paper | Measured: mean [95% CI] (n) | Verdict (direction) | Size vs paper"
    )
    assert header in text and "| Holm-adjusted |" in text
    (a_line,) = [line for line in text.splitlines() if line.startswith("| a |")]
    assert "| **holds** | consistent | **holds** (p " in a_line  # +6.0 [+3.5, +8.5] vs +6.9


def test_runs_csv_rebuilds_the_claims(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    _fake_results(out)
    write_report(grid, out)
    again = collect_runs_csv(grid, out / "runs.csv")
    first = claims(collect(grid, out))
    rebuilt = claims(again)
    assert [c.verdict for c in rebuilt] == [c.verdict for c in first]
    for c, d in zip(first, rebuilt, strict=True):
        if c.measured is not None and c.measured.mean is not None:
            assert d.measured.mean == pytest.approx(c.measured.mean, abs=0.01)


def test_the_committed_toy_full_claims() -> None:
    """The verdicts the committed runs of toy_full give (seeds 0-4, runs.csv)."""
    grid = load_grid(ROOT / "configs" / "experiments" / "toy_full.yaml")
    rows = {
        c.key: c for c in claims(collect_runs_csv(grid, ROOT / "docs/results/toy_full/runs.csv"))
    }
    assert {k: rows[k].verdict for k in ("e1", "g1")} == {"e1": UNTESTABLE, "g1": UNTESTABLE}
    assert "lora gsm8k Δ vs base -0.1 [-0.4, +0.2]" in rows["e1"].untestable
    assert rows["i2"].verdict == "inconclusive: contended timing" and rows["i2"].measured.n == 1
    assert {k: rows[k].size for k in ("a", "c", "e3", "f1", "i1")} == {
        "a": "larger",
        "c": "consistent",
        "e3": "smaller",
        "f1": "larger",
        "i1": "smaller",
    }
    family = [c for c in rows.values() if c.p_value is not None]
    assert len(family) == 10  # a-d, e2-e4, f1, f2, g2
    assert rows["e3"].p_holm == pytest.approx(6 * rows["e3"].p_value)
    assert rows["e3"].holm_verdict == HOLDS  # 0.049: the closest call of the family
    assert [c.verdict for c in rows.values()].count(HOLDS) == 5
