"""``medmoe harness``: the command's results equal ``lm_eval.simple_evaluate`` on the same model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from medmoe.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_harness_adapter import RECORDS, trained_adapter  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")


def _local_task(tmp_path: Path) -> Path:
    """A harness task YAML reading local JSONL files (MMLU's multiple-choice format)."""
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    test.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[2:]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_anatomy.yaml").write_text(
        "task: local_anatomy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    dev: {dev}\n    test: {test}\n"
        "test_split: test\nfewshot_split: dev\n"
        "fewshot_config:\n  sampler: first_n\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\n'
        'C. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def test_medmoe_harness_writes_the_results_simple_evaluate_gives(tmp_path, capsys):
    from medmoe.eval.harness import harness_lm
    from medmoe.predict import load_adapted

    _, tokenizer = trained_adapter(tmp_path, seed=5)
    tasks = _local_task(tmp_path)
    out = tmp_path / "out"
    args = ["harness", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    args += ["--tasks", "local_anatomy", "--num_fewshot", "2", "--include_path", str(tasks)]
    args += ["--batch_size", "4", "--dtype", "float32", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert "local_anatomy" in capsys.readouterr().out  # the table is printed
    written = json.loads((out / "results.json").read_text())
    assert "local_anatomy" in (out / "summary.md").read_text()

    # the same model, the same task, through the harness's own entry point
    adapted = load_adapted(tmp_path / "base", tmp_path / "adapter", dtype=torch.float32)
    direct = lm_eval.simple_evaluate(
        model=harness_lm(adapted, tokenizer, batch_size=4),
        tasks=["local_anatomy"],
        num_fewshot=2,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
        random_seed=1234,
        fewshot_random_seed=1234,
        log_samples=False,
    )
    assert written["results"] == json.loads(json.dumps(direct["results"]))
    assert (
        written["results"]["local_anatomy"]["acc,none"]
        == direct["results"]["local_anatomy"]["acc,none"]
    )
    assert written["n-samples"]["local_anatomy"]["effective"] == len(RECORDS) - 2
