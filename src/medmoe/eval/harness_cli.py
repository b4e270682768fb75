"""``medmoe harness``: lm-evaluation-harness on a base model with a trained adapter.

::

    medmoe harness --base meta-llama/Meta-Llama-3-8B --adapter runs/med/version_0/adapter \\
        --tasks pubmedqa,medqa_4options,mmlu_clinical_knowledge --num_fewshot 5 \\
        [--apply_chat_template] [--include_path my_tasks/] [--limit N] [--batch_size 8] \\
        [--device cuda] [--dtype auto] [--output_dir harness_out]

The adapted model (``medmoe.load_adapted``: MoE-LoRA or peft LoRA) goes to the harness as an
in-memory ``HFLM`` (:func:`medmoe.eval.harness.harness_lm`), and
``lm_eval.simple_evaluate`` runs the tasks, so the numbers are the harness's own. Written into
``--output_dir``: ``results.json`` (the harness's results dictionary, serialised as its CLI does)
and ``summary.md`` (its results table). ``--include_path`` adds a folder of task YAMLs, e.g. a
task reading local dataset files (``dataset_path: json`` with ``dataset_kwargs.data_files``).
Task names for the paper's benchmarks and their pitfalls: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medmoe.atomic import atomic_write_text

__all__ = ["harness_main", "run_harness"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="medmoe harness", description=__doc__.split("\n")[0].strip("`: ")
    )
    parser.add_argument("--base", required=True, help="base model: hub id, local dir or 'toy'")
    parser.add_argument("--adapter", required=True, help="an adapter directory (AdapterExport)")
    parser.add_argument("--tasks", required=True, help="comma-separated harness task names")
    parser.add_argument("--num_fewshot", type=int, default=None, help="default: each task's")
    parser.add_argument("--apply_chat_template", action="store_true", help="for chat models")
    parser.add_argument("--include_path", default=None, help="a folder of extra task YAMLs")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (testing)")
    parser.add_argument("--batch_size", default="8", help="an integer or 'auto'")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu")
    parser.add_argument("--dtype", default="auto", help="the base's torch dtype (auto, bfloat16)")
    parser.add_argument("--seed", type=int, default=1234, help="the harness's few-shot seed")
    parser.add_argument("--output_dir", default="harness_out", help="results.json, summary.md")
    return parser.parse_args(argv)


def run_harness(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` on ``args.tasks`` (the harness's results)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from medmoe.eval.harness import harness_lm

    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    lm = harness_lm(model, tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        task_manager=TaskManager(include_path=args.include_path),
        limit=args.limit,
        random_seed=args.seed,
        fewshot_random_seed=args.seed,
        log_samples=False,
    )


def write_results(results: dict[str, Any], output_dir: str | Path) -> tuple[Path, str]:
    """``results.json`` and ``summary.md`` into ``output_dir``; returns the folder and table."""
    from lm_eval.utils import handle_non_serializable, make_table

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(out / "results.json", text)
    table = make_table(results)
    atomic_write_text(out / "summary.md", table + "\n")
    return out, table


def harness_main(argv: list[str]) -> int:
    """Entry point of ``medmoe harness``."""
    from medmoe.predict import load_adapted

    args = parse_args(argv)
    model = load_adapted(args.base, args.adapter, dtype=args.dtype)
    if args.device is not None:
        model.to(args.device)
    from transformers import AutoTokenizer

    from medmoe.errors import local_or_hub

    base = args.base
    if base == "toy":
        from medmoe.data import toy_base_path

        base = str(toy_base_path())
    tokenizer = AutoTokenizer.from_pretrained(local_or_hub(base, "base model"))
    results = run_harness(model, tokenizer, args)
    out, table = write_results(results, args.output_dir)
    print(table)
    print(f"harness results written to {out / 'results.json'} and {out / 'summary.md'}")
    return 0
