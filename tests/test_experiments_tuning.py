"""Learning rates chosen on validation (``tune:``): the selection rule on fabricated validation
results, the plan's directories and stages, the runner's order and resumption, and a real
tuning run that never reads a test record."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml

from medmoe.experiments import GridError, load_grid, plan_runs, run_grid
from medmoe.experiments import runner as runner_module
from medmoe.experiments.grid import LR_KEY, ROUTER_LR_KEY
from medmoe.experiments.report import collect, tuning_table
from medmoe.experiments.tuning import (
    TUNING_FILE,
    Point,
    TuningIncomplete,
    points,
    select,
    tuning_run_dir,
    validation_average,
)
from medmoe.experiments.worker import RESULTS_FILE, write_json

ROOT = Path(__file__).resolve().parents[1]
LORA = str(ROOT / "configs/baselines/lora.yaml")
TINY = "model.init_args.tiny_llama={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2}"


def write_grid(folder: Path, tune: dict | None = None, **values) -> Path:
    grid = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": [0, 1],
        "overrides": {"trainer.max_steps": 30},
        "methods": [{"name": "lora", "configs": [LORA]}, {"name": "med_moe_lora"}],
        "tune": tune
        or {
            "seeds": [100, 101, 102],
            "learning_rate": {"lora": [1e-3, 3e-3]},
            "router_learning_rate": {"med_moe_lora": [1e-2]},
        },
        **values,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def validation_results(method: str, seed: int, average: float, split: str = "validation"):
    third = average / 100.0
    return {
        "method": method,
        "seed": seed,
        "scores": {"medqa": third, "pubmedqa": third, "clinical_sum": third, "mmlu": 0.9},
        "eval": {"split": split},
    }


def test_selection_picks_the_best_mean_and_breaks_ties_toward_the_smaller_rate() -> None:
    low, mid, high = Point(1e-4), Point(3e-4), Point(1e-3)
    seeds = [100, 101, 102]
    scored = {
        low: {100: 50.0, 101: 60.0, 102: 70.0},  # mean 60
        mid: {100: 80.0, 101: 40.0, 102: 63.0},  # mean 61: the best mean, not the best seed
        high: {100: 90.0, 101: 30.0, 102: 61.0},  # mean 60.33
    }
    choice = select("full_finetune", scored, seeds)
    assert choice.point == mid and choice.overrides == {LR_KEY: 3e-4}
    assert choice.scores["lr_0.0003"]["mean"] == pytest.approx(61.0)
    assert choice.scores["lr_0.0001"]["per_seed"] == {"100": 50.0, "101": 60.0, "102": 70.0}

    tied = {high: {s: 55.0 for s in seeds}, low: {s: 55.0 for s in seeds}}
    assert select("m", tied, seeds).point == low  # equal means: the smaller rate
    pairs = {Point(1e-3, 3e-2): {s: 5.0 for s in seeds}, Point(1e-3, 1e-2): {s: 5.0 for s in seeds}}
    chosen = select("m", pairs, seeds).point
    assert chosen == Point(1e-3, 1e-2)  # then the smaller router rate
    assert chosen.overrides == {LR_KEY: 1e-3, ROUTER_LR_KEY: 1e-2}

    with pytest.raises(TuningIncomplete, match="lr_0.001 seed 101"):
        select("m", {high: {100: 1.0, 101: None, 102: 2.0}}, seeds)


def test_validation_average_refuses_a_run_scored_on_test() -> None:
    assert validation_average(validation_results("m", 0, 60.0)) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="split 'test'"):
        validation_average(validation_results("m", 0, 60.0, split="test"))


def test_tune_section_is_checked(tmp_path: Path) -> None:
    cases = [
        ({"seeds": [1], "learning_rate": {"nope": [1e-3]}}, "unknown method 'nope'"),
        ({"seeds": [1], "learning_rate": {"lora": [1e-3, 1e-3]}}, "distinct rates > 0"),
        ({"seeds": [1], "learning_rate": {"lora": [-1.0]}}, "distinct rates > 0"),
        ({"seeds": [], "learning_rate": {"lora": [1e-3]}}, "tune.seeds"),
        ({"seeds": [1]}, "sweeps nothing"),
        ({"seeds": [1], "learning_rate": {"lora": [1e-3]}, "eval": {"split": "test"}}, "never"),
        ({"seeds": [1], "learning_rates": {}}, "unknown key"),
    ]
    for tune, message in cases:
        with pytest.raises(GridError, match=message):
            load_grid(write_grid(tmp_path, tune))
    grid = load_grid(write_grid(tmp_path))
    assert grid.tune.eval.split == "validation" and grid.eval.split == "test"
    assert grid.tune.methods == ["lora", "med_moe_lora"]
    assert points(grid.tune, "lora") == [Point(1e-3), Point(3e-3)]
    assert points(grid.tune, "med_moe_lora") == [Point(None, 1e-2)]


def test_plan_tuning_dirs_validation_split_and_the_reporting_runs_wait(tmp_path: Path) -> None:
    single = {"methods": ["lora"], "overrides": {"data.init_args.batch_size": 11}}
    grid = load_grid(write_grid(tmp_path, single_task=single))
    out = tmp_path / "out"
    specs = plan_runs(grid, out)
    tuning = [s for s in specs if s.method.startswith("tune/")]
    assert len(tuning) == (2 + 1) * 3
    assert {s.run_dir for s in tuning} >= {
        (out / "tune/lora/lr_0.001/seed_100").resolve(),
        (out / "tune/lora/lr_0.003/seed_102").resolve(),
        (out / "tune/med_moe_lora/rlr_0.01/seed_101").resolve(),
    }
    assert all(s.eval.split == "validation" for s in tuning)
    assert f"--{LR_KEY}=0.003" in next(s for s in tuning if "lr_0.003" in s.method).cli_args
    # every method is tuned: nothing but the base model and the tuning runs can be planned yet
    assert [s.method for s in specs if not s.method.startswith("tune/")] == ["base"]

    # lora's tuning results on disk (3e-3 best on validation): its runs and variants appear
    for point, averages in ((Point(1e-3), [50, 52, 54]), (Point(3e-3), [60, 40, 59])):
        for seed, average in zip(grid.tune.seeds, averages, strict=True):
            run = tuning_run_dir(out.resolve(), "lora", point, seed)
            write_json(run / RESULTS_FILE, validation_results("lora", seed, average))
    specs = plan_runs(grid, out)
    reporting = [s for s in specs if s.method.startswith("lora")]
    assert len(reporting) == 2 * 4  # lora and its 3 single-task runs, 2 seeds
    assert all(f"--{LR_KEY}=0.001" not in s.cli_args for s in reporting)
    assert all(f"--{LR_KEY}=0.003" in s.cli_args for s in reporting)
    assert all(s.eval.split == "test" for s in reporting)
    assert not any(s.method == "med_moe_lora" for s in specs)  # its tuning has no results
    assert not (out / TUNING_FILE).exists()  # planning writes nothing

    # a tuning run scored on test can never choose a rate
    run = tuning_run_dir(out.resolve(), "lora", Point(1e-3), 100)
    write_json(run / RESULTS_FILE, validation_results("lora", 100, 99.0, split="test"))
    assert not any(s.method == "lora" for s in plan_runs(grid, out))


def test_runner_tunes_first_then_trains_at_the_choice_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = load_grid(write_grid(tmp_path))
    out = tmp_path / "out"
    executed = []

    def fake_execute(spec):
        args = spec.cli_args
        lr = next(
            (float(a.split("=")[1]) for a in reversed(args) if a.startswith(f"--{LR_KEY}=")), None
        )
        rlr = next(
            (float(a.split("=")[1]) for a in reversed(args) if a.startswith(f"--{ROUTER_LR_KEY}=")),
            None,
        )
        executed.append((spec.method, spec.seed, spec.eval.split, lr, rlr))
        average = 70.0 if lr == 1e-3 else 50.0  # lora: 1e-3 is the better rate on validation
        results = validation_results(spec.method, spec.seed, average, split=spec.eval.split)
        results.update(params={"trainable": 1, "active": 1.0}, base=spec.base, label=spec.label)
        write_json(spec.results_path, results)
        return results

    monkeypatch.setattr(runner_module, "execute", fake_execute)
    lines: list[str] = []
    outcome = run_grid(grid, out, in_process=True, log=lines.append)
    assert outcome.exit_code == 0 and len(outcome.runs) == 1 + 9 + 4
    names = [e[0] for e in executed]
    assert names[0] == "base"
    last_lora_tuning = max(i for i, n in enumerate(names) if n.startswith("tune/lora/"))
    first_lora = names.index("lora")
    assert last_lora_tuning < first_lora  # tuning first, then the reporting runs
    for method, seed, split, lr, rlr in executed:
        if method.startswith("tune/"):
            assert split == "validation" and seed in (100, 101, 102)
        elif method == "lora":
            assert split == "test" and lr == 1e-3 and seed in (0, 1)
        elif method == "med_moe_lora":
            assert split == "test" and rlr == 1e-2
    assert any(line.startswith("tuning: lora -> lr_0.001") for line in lines)
    chosen = json.loads((out / TUNING_FILE).read_text())
    assert chosen["lora"]["chosen_name"] == "lr_0.001" and chosen["lora"]["split"] == "validation"

    table = tuning_table(collect(grid, out))
    assert table is not None and table.title == "Learning rate selection"
    rows = {(r[0], r[1]): r for r in table.rows}
    assert rows["lora", "lr_0.001"][-1] == "chosen" and rows["lora", "lr_0.003"][-1] == ""
    assert rows["lora", "lr_0.001"][4].mean == pytest.approx(70.0)

    # resumed: every run (tuning included) has results: nothing is executed again
    executed.clear()
    outcome = run_grid(grid, out, in_process=True, log=lines.append)
    assert outcome.exit_code == 0 and executed == []
    assert {r.status for r in outcome.runs} == {"skipped"}


def test_a_failed_tuning_run_blocks_its_method_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = load_grid(write_grid(tmp_path))
    out = tmp_path / "out"

    def fake_execute(spec):
        if spec.method == "tune/lora/lr_0.003" and spec.seed == 101:
            raise RuntimeError("diverged")
        results = validation_results(spec.method, spec.seed, 60.0, split=spec.eval.split)
        results.update(params={"trainable": 1, "active": 1.0}, base=spec.base)
        write_json(spec.results_path, results)
        return results

    monkeypatch.setattr(runner_module, "execute", fake_execute)
    outcome = run_grid(grid, out, in_process=True, log=lambda line: None)
    failed = {(r.spec.method, r.spec.seed) for r in outcome.failed}
    assert failed == {("tune/lora/lr_0.003", 101), ("lora", 0), ("lora", 1)}
    blocked = [r for r in outcome.failed if r.spec.method == "lora"]
    assert all("no learning rate chosen" in r.error for r in blocked)
    done = {(r.spec.method, r.spec.seed) for r in outcome.runs if r.status == "done"}
    assert ("med_moe_lora", 0) in done and ("med_moe_lora", 1) in done
    assert outcome.exit_code == 1


def test_a_real_tuning_run_never_reads_test_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medmoe.data
    import medmoe.data.datamodule as datamodule

    tune = {"seeds": [7], "learning_rate": {"lora": [2e-3]}, "eval": {"limit": 4}}
    grid = load_grid(
        write_grid(
            tmp_path,
            tune,
            overrides={"trainer.max_steps": 2, "data.init_args.batch_size": 4},
            eval={"limit": 4, "batch_size": 4, "max_new_tokens": 12},
        )
    )
    spec = next(
        s
        for s in plan_runs(grid, tmp_path / "out", [f"--{TINY}"], 1)
        if s.method.startswith("tune/")
    )
    splits: list[str] = []
    # every module of the data package that loads records by name: the record loader
    holders = [m for m in vars(medmoe.data).values() if hasattr(m, "load_records")]
    holders = [m for m in holders if isinstance(m, types.ModuleType)] + [datamodule]
    for holder in holders:
        original = holder.load_records

        def recording(task, source, split, *args, _original=original, **kwargs):
            splits.append(split)
            return _original(task, source, split, *args, **kwargs)

        monkeypatch.setattr(holder, "load_records", recording)
    outcome = runner_module.run_spec(spec, mode="in-process")
    assert outcome.status == "done", outcome.error
    assert outcome.results["eval"]["split"] == "validation"
    assert "validation" in splits and "test" not in splits
