"""The report's statistics (t intervals, paired differences), Tables 5-6, claims.md and plots,
from fake results.json files (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from medmoe.experiments import collect, load_grid, tables, write_report
from medmoe.experiments.claims import (
    HOLDS,
    INCONCLUSIVE,
    NOT_HOLD,
    NOT_RUN,
    checks,
    claims,
    directional_verdict,
    equivalence_verdict,
    overhead_verdict,
    recovery_verdict,
)
from medmoe.experiments.report import ortho_recovery, replay_runs, single_task_average, to_csv
from medmoe.experiments.stats import (
    Stat,
    bootstrap,
    paired_difference,
    paired_ratio,
    t_quantile,
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
