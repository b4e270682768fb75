"""Grid sections that generate runs: the replay sweep, single-task baselines; progress lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medmoe.experiments import GridError, load_grid, plan_runs
from medmoe.experiments.runner import RunOutcome, _Progress
from medmoe.experiments.worker import RunSpec

ROOT = Path(__file__).resolve().parents[1]


def write_grid(folder: Path, **values) -> Path:
    grid = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": [3],
        "overrides": {"trainer.max_steps": 30},
        "methods": [
            {"name": "lora", "configs": [str(ROOT / "configs/baselines/lora.yaml")]},
            {"name": "med_moe_lora"},
        ],
    }
    grid.update(values)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _arg(spec: RunSpec, key: str) -> str:
    return next(a.partition("=")[2] for a in spec.cli_args if a.startswith(f"--{key}="))


def test_replay_sweep_and_single_task_generate_runs(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(
            tmp_path,
            replay_sweep={"methods": ["lora", "med_moe_lora"], "ratios": [0.0, 0.05]},
            single_task={"methods": ["lora"], "overrides": {"data.init_args.batch_size": 11}},
        )
    )
    assert grid.replay_ratio == 0.2  # demo.yaml's own ratio: the plain rows
    assert [m.name for m in grid.family("lora")] == [
        "lora",
        "lora-replay0",
        "lora-replay0.05",
        "lora-single-medqa",
        "lora-single-pubmedqa",
        "lora-single-clinical_sum",
    ]
    sweep = grid.method("med_moe_lora-replay0.05")
    assert sweep.family == "med_moe_lora" and sweep.replay_ratio == 0.05 and sweep.generated
    assert sweep.tables == () and not grid.method("lora").generated
    single = grid.method("lora-single-pubmedqa")
    assert single.single_task == "pubmedqa" and single.replay_ratio is None

    specs = {(s.method, s.seed): s for s in plan_runs(grid, tmp_path / "out")}
    assert _arg(specs["lora-replay0.05", 3], "data.init_args.replay_ratio") == "0.05"
    spec = specs["lora-single-pubmedqa", 3]
    tasks = yaml.safe_load(_arg(spec, "data.init_args.tasks"))
    assert tasks == [  # demo.yaml's own entry for the task, alone
        {"name": "pubmedqa", "source": "toy", "prompt_style": "toy", "max_eval": 64}
    ]
    assert _arg(spec, "data.init_args.batch_size") == "11"  # the per-task budget
    assert _arg(spec, "trainer.max_steps") == "30"  # the joint run's steps
    assert spec.run_dir == (tmp_path / "out" / "lora-single-pubmedqa" / "seed_3").resolve()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"replay_sweep": {"methods": ["lora"], "ratios": [0.2]}}, "repeats the grid's own"),
        ({"replay_sweep": {"methods": ["lora"], "ratios": [1.5]}}, r"ratios in \[0, 1\)"),
        ({"replay_sweep": {"methods": ["dora"], "ratios": [0.0]}}, "unknown method 'dora'"),
        ({"replay_sweep": {"methods": ["lora"], "rates": [0.0]}}, "unknown key"),
        ({"single_task": {"methods": ["lora"]}}, "overrides must set the per-task budget"),
        ({"single_task": {"methods": ["x"], "overrides": {"a.b": 1}}}, "unknown method 'x'"),
    ],
)
def test_bad_generated_sections_are_named(tmp_path: Path, section: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        load_grid(write_grid(tmp_path, **section))


def test_progress_counts_elapsed_and_remaining() -> None:
    progress = _Progress(total=5, jobs=2)
    spec = RunSpec(method="lora", seed=0, run_dir=Path("/nowhere"), cli_args=[])
    assert progress.step(RunOutcome(spec, "skipped")).endswith("remaining unknown]")
    line = progress.step(RunOutcome(spec, "done", seconds=60.0))
    assert line.startswith("[2/5, 0m00s elapsed, ~1m30s left]")  # 60 s x 3 runs left / 2 jobs
    progress.step(RunOutcome(spec, "done", seconds=60.0))
    progress.step(RunOutcome(spec, "done", seconds=60.0))
    assert progress.step(RunOutcome(spec, "failed", seconds=1.0)).endswith("done]")


TINY = (
    "model.init_args.tiny_llama={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
    " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}"
)


@pytest.mark.slow
def test_pooled_workers_run_log_and_report_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two long-lived workers: each run's output lands in its run.log, a failing run is
    reported with its error while the others finish."""
    from medmoe.experiments import main

    path = write_grid(
        tmp_path,
        seeds=[0, 1],
        overrides={"trainer.max_steps": 2, "trainer.limit_val_batches": 0},
        eval={"limit": 2, "batch_size": 4, "max_new_tokens": 4},
        methods=[
            {"name": "lora", "configs": [str(ROOT / "configs/baselines/lora.yaml")]},
            {"name": "broken", "overrides": {"model.init_args.learning_rate": "fast"}},
        ],
    )
    out = tmp_path / "out"
    code = main([str(path), "--jobs", "2", "--threads", "1", "--out", str(out), "--set", TINY])
    printed = capsys.readouterr().out
    assert code == 1  # the broken runs failed
    assert "[5/5, " in printed and printed.count("FAILED") == 2
    for seed in (0, 1):
        assert (out / "lora" / f"seed_{seed}" / "results.json").is_file()
        log = (out / "lora" / f"seed_{seed}" / "run.log").read_text()
        assert "max_steps=2" in log  # Lightning's own stop message, captured per run
        broken = (out / "broken" / f"seed_{seed}" / "run.log").read_text()
        assert "fast" in broken and not (out / "broken" / f"seed_{seed}" / "results.json").exists()
