"""The experiment runner: grid files, run plans, resumable runs, the paper's tables."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from medmoe.experiments import (
    GridError,
    RunSpec,
    collect,
    load_grid,
    main,
    plan_runs,
    run_spec,
    tables,
    write_report,
)
from medmoe.experiments.report import to_csv, to_markdown
from medmoe.experiments.stats import Stat
from medmoe.experiments.worker import write_json

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FULL_GRID = ROOT / "configs" / "experiments" / "toy_full.yaml"
ALLOCATION_GRID = ROOT / "configs" / "experiments" / "toy_allocation.yaml"
TINY = (
    "model.init_args.tiny_llama={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4,"
    " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}"
)


def write_grid(folder: Path, **values) -> Path:
    grid = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": [0, 1],
        "methods": [
            {"name": "lora", "configs": [str(ROOT / "configs/baselines/lora.yaml")]},
            {"name": "med_moe_lora", "tables": [1, 2, 3, 4], "allocation": {"lower": "2"}},
        ],
    }
    grid.update(values)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


# ----------------------------------------------------------------- grid files
def test_full_grid_covers_every_method_five_seeds_the_sweep_and_single_tasks() -> None:
    grid = load_grid(FULL_GRID)
    plain = [m.name for m in grid.methods if not m.generated]
    assert plain == [
        "full_finetune",
        "lora",
        "multi_lora",
        "vanilla_moe_lora",
        "ortho_lora",
        "med_moe_lora",
    ]
    assert len(grid.seeds) >= 5 and grid.replay_ratio == 0.2
    for family in ("lora", "full_finetune", "vanilla_moe_lora", "med_moe_lora"):
        ratios = {m.replay_ratio for m in grid.family(family) if m.replay_ratio is not None}
        assert ratios == {0.0, 0.05}, family
    singles = [m for m in grid.family("lora") if m.single_task]
    assert [m.single_task for m in singles] == ["medqa", "pubmedqa", "clinical_sum"]
    assert len(grid.methods) == 6 + 8 + 3
    quick = grid.quick()
    assert len(quick.methods) == 2 and len(quick.seeds) == 1
    assert quick.overrides["trainer.max_steps"] <= 5 and quick.eval.limit <= 8

    allocation = load_grid(ALLOCATION_GRID)
    assert [m.name for m in allocation.methods if 3 in m.tables and m.allocation] == [
        "med_moe_lora",
        "alloc_uniform",
        "alloc_bottom_heavy",
        "alloc_asymmetric",
    ]
    assert allocation.seeds == grid.seeds
    assert allocation.overrides == grid.overrides  # the headline's budget


def test_missing_grid_and_missing_config_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="grid file .*nope.yaml not found"):
        load_grid(tmp_path / "nope.yaml")
    path = write_grid(tmp_path, methods=[{"name": "x", "configs": ["configs/baselines/no.yaml"]}])
    with pytest.raises(FileNotFoundError, match="configs/baselines/no.yaml"):
        load_grid(path)


def test_unknown_method_and_bad_keys_are_clear(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    with pytest.raises(GridError, match="unknown method 'dora'.*lora, med_moe_lora"):
        grid.select(["dora"])
    with pytest.raises(GridError, match="unknown key"):
        load_grid(write_grid(tmp_path, sedes=[1]))
    with pytest.raises(GridError, match="duplicate"):
        load_grid(write_grid(tmp_path, methods=["a", "a"]))
    with pytest.raises(GridError, match="quick.methods names unknown method"):
        load_grid(write_grid(tmp_path, quick={"methods": ["zzz"]}))


def test_command_line_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(write_grid(tmp_path)), "--methods", "lora,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------- plans
def test_plan_orders_configs_overrides_and_seeds(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, overrides={"trainer.max_steps": 7}))
    specs = plan_runs(grid, tmp_path / "out", extra=["--model.init_args.learning_rate=0.1"])
    assert [(s.method, s.seed) for s in specs] == [
        ("base", None),
        ("lora", 0),
        ("lora", 1),
        ("med_moe_lora", 0),
        ("med_moe_lora", 1),
    ]
    base, lora_1 = specs[0], specs[2]
    assert base.cli_args[0] == "validate" and base.base
    assert "--trainer.limit_val_batches=0" in base.cli_args
    args = lora_1.cli_args
    assert args[0] == "fit"
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert [Path(c).name for c in configs] == ["demo.yaml", "lora.yaml"]
    order = [
        args.index(a) for a in ("--trainer.max_steps=7", "--model.init_args.learning_rate=0.1")
    ]
    assert order == sorted(order) and order[0] > args.index(configs[-1])
    assert "--seed_everything=1" in args and "--data.init_args.seed=1" in args
    assert lora_1.run_dir == (tmp_path / "out" / "lora" / "seed_1").resolve()
    logger = next(a for a in args if a.startswith("--trainer.logger="))
    assert json.loads(logger.partition("=")[2])["init_args"]["save_dir"] == str(lora_1.run_dir)
    assert RunSpec.from_dict(json.loads(json.dumps(lora_1.to_dict()))) == lora_1


def test_dry_run_prints_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(write_grid(tmp_path)), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("medmoe fit --config") == 4 and "medmoe validate" in printed
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------- report
def _fake_results(method: str, seed: int | None, scores: dict, trainable: int, active: float):
    return {
        "method": method,
        "label": method,
        "seed": seed,
        "scores": scores,
        "metrics": {},
        "params": {"total": 1000, "trainable": trainable, "active": active},
        "global_step": 10,
        "fit_seconds": 1.0,
        "eval_seconds": 0.5,
    }


def test_report_means_stds_and_deltas(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    out = tmp_path / "out"
    base = {"pubmedqa": 0.5, "medqa": 0.25, "clinical_sum": 0.0, "mmlu": 0.6, "gsm8k": 0.4}
    write_json(out / "base" / "results.json", _fake_results("base", None, base, 5, 5))
    for seed, bump in ((0, 0.1), (1, 0.3)):
        scores = {k: v + bump for k, v in base.items()}
        scores["mmlu"] = 0.5  # forgets 10 points whatever the seed
        write_json(
            out / "med_moe_lora" / f"seed_{seed}" / "results.json",
            _fake_results("med_moe_lora", seed, scores, 2_000_000, 500_000.0),
        )
    data = collect(grid, out)
    assert data.missing() == ["lora seed 0", "lora seed 1"]
    table1, table2, table3, table4 = tables(data)[:4]
    row = dict((r[0], r[1:]) for r in table1.rows)["med_moe_lora"]
    pubmedqa, average = row[0], row[3]
    assert pubmedqa.mean == pytest.approx(70.0) and pubmedqa.std == pytest.approx(14.1421, 1e-4)
    # 95% t interval, 1 df: 12.7062 x 14.1421 / sqrt(2) = 127.06 points either side
    assert pubmedqa.half_width == pytest.approx(127.062, 1e-4)
    assert average.mean == pytest.approx((70 + 45 + 20) / 3) and average.n == 2
    assert dict((r[0], r[-1]) for r in table1.rows)["lora"] == 0  # no runs yet: n/a cells
    general = dict((r[0], r[1:]) for r in table2.rows)["med_moe_lora"]
    assert general[1].mean == pytest.approx(-10.0) and general[1].text() == "-10.0 ± 0.0"
    assert general[3].mean == pytest.approx(20.0) and general[3].text().startswith("+20.0")
    assert [r[0] for r in table3.rows] == ["med_moe_lora"] and table3.rows[0][1] == "2"
    assert "Trainable Params (M)" in table4.header
    assert table4.rows[-1][1].mean == pytest.approx(2.0) and table4.rows[-1][2].mean == 0.5
    markdown = to_markdown(table1)
    assert "| Base Model (Zero-shot) | 50.0 | 25.0 | 0.0 | 25.0 | 1 |" in markdown
    assert "70.0 ± 127.1" in markdown and "n/a" in markdown
    header = next(csv.reader(to_csv(table2).splitlines()))
    stat_columns = ["ci_low", "ci_high", "std", "n"]
    expected = ["Method"]
    for name in ("MMLU", "Δ", "GSM8K", "Δ"):
        expected += [name, *(f"{name} {k}" for k in stat_columns)]
    assert header == [*expected, "Seeds"]
    written = {p.name for p in write_report(grid, out)}
    assert {"tables.md", "table1_medical.csv", "table4_params.csv", "runs.csv"} <= written
    assert {"summary.json", "domain_vs_forgetting.png", "allocation.png", "claims.md"} <= written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["med_moe_lora"]["forgetting"]["mean"] == pytest.approx(5.0)


def test_stat_formatting() -> None:
    assert Stat.of([]).text() == "n/a"
    assert Stat.of([1.0]).text() == "1.0"
    assert Stat.of([1.0, 3.0]).text(2) == "2.00 ± 12.71"  # t(0.975, 1) x 1.414 / sqrt(2)
    assert Stat.of([-0.25], signed=True).text() == "-0.2"


# ----------------------------------------------------------------- running
def test_failed_worker_is_reported_not_raised(tmp_path: Path) -> None:
    """A subprocess run that fails leaves error.txt and the log tail; nothing raises."""
    spec = RunSpec(
        method="broken",
        seed=0,
        run_dir=tmp_path / "broken",
        cli_args=["fit", "--config", str(tmp_path / "absent.yaml")],
        threads=1,
    )
    outcome = run_spec(spec)
    assert outcome.status == "failed" and "worker exited with code" in outcome.error
    assert "absent.yaml" in outcome.error  # the log's tail names the missing config
    assert (tmp_path / "broken" / "error.txt").is_file()
    assert "absent.yaml" in (tmp_path / "broken" / "run.log").read_text()
    assert not (tmp_path / "broken" / "results.json").exists()


def test_quick_grid_runs_scores_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "quick"
    args = [str(FULL_GRID), "--quick", "--in-process", "--threads", "1", "--out", str(out)]
    assert main([*args, "--set", TINY]) == 0
    printed = capsys.readouterr().out
    assert "[3/3, " in printed and "FAILED" not in printed
    for run in ("base", "lora/seed_0", "med_moe_lora/seed_0"):
        results = json.loads((out / run / "results.json").read_text())
        assert set(results["scores"]) == {"pubmedqa", "medqa", "clinical_sum", "mmlu", "gsm8k"}
        assert all(0.0 <= v <= 1.0 for v in results["scores"].values())
        assert results["params"]["trainable"] > 0
    lora = json.loads((out / "lora/seed_0/results.json").read_text())
    assert lora["global_step"] == 3 and lora["adapter"].endswith("LoRA")
    assert lora["train_steps_timed"] == 3  # StepTimer: too few steps for a step time
    assert lora["train_step_seconds"] is None and 0 <= lora["train_steps_uncontended"] <= 3
    assert (out / "med_moe_lora/seed_0/adapter/adapter_model.safetensors").is_file()
    markdown = (out / "tables.md").read_text()
    assert "Standard LoRA (r = 4)" in markdown and "Med-MoE-LoRA (Ours)" in markdown
    assert not (out / "table3_allocation.csv").exists()  # no allocation rows in this grid
    for name in ("table1_medical.csv", "table2_general.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "table4_params.csv").read_text().count("\n") == 3  # header + 2 methods
    assert (out / "domain_vs_forgetting.png").stat().st_size > 1000

    # resumable: a second invocation finds every results.json and trains nothing
    stamp = os.path.getmtime(out / "lora/seed_0/results.json")
    assert main([*args, "--set", TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("results exist, skipped") == 3
    assert os.path.getmtime(out / "lora/seed_0/results.json") == stamp

    # a run interrupted after its last checkpoint resumes from it instead of starting over
    (out / "lora/seed_0/results.json").unlink()
    assert main([*args, "--methods", "lora", "--set", TINY]) == 0
    resumed = json.loads((out / "lora/seed_0/results.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["global_step"] == 3


def test_base_scoring_of_a_method_without_an_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning cannot switch its adapter off: untrained, it *is* the base model and is
    scored as it is; trained, asking for its base is an error, not a silent wrong number."""
    import types

    import medmoe.callbacks.scoring as scoring
    from medmoe.experiments import EvalSettings, score_trained

    class Scorer:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def present(self, trainer, tasks, owner):
            return list(tasks)

        def score(self, trainer, module, task, base=False):
            if base:
                raise NotImplementedError("no off switch")
            return {"accuracy": 0.5}

        def primary(self, task, values):
            return values["accuracy"]

    monkeypatch.setattr(scoring, "TaskScorer", Scorer)
    settings = EvalSettings(tasks=("mmlu",))
    untrained = types.SimpleNamespace(global_step=0)
    assert score_trained(untrained, None, settings, base=True)["scores"] == {"mmlu": 0.5}
    with pytest.raises(NotImplementedError):
        score_trained(types.SimpleNamespace(global_step=5), None, settings, base=True)
