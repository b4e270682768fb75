"""The interference comparisons of docs/results/README.md, paired on the seeds every grid ran
(0-2): toy_full (loss_normalization step_tokens, single-task runs at the task's share of the
joint batch, 11) against toy_norm (task_mean) and toy_budget (single-task runs at the joint
batch size, 32).

    python docs/results/compare_interference.py

Reads the committed runs.csv files; prints one Markdown table (mean over the shared seeds, and
the per-seed values' range in brackets). toy_budget has no Ortho-LoRA or Med-MoE-LoRA rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("pubmedqa", "medqa", "clinical_sum")
GRIDS = {
    "step_tokens, single-task batch 11 (toy_full)": HERE / "toy_full",
    "task_mean, single-task batch 11 (toy_norm)": HERE / "toy_norm",
    "step_tokens, single-task batch 32 (toy_budget)": HERE / "toy_budget",
}


def scores(folder: Path) -> dict[tuple[str, int], dict[str, float]]:
    with (folder / "runs.csv").open() as f:
        return {
            (row["method"], int(row["seed"])): {
                k: float(row[k]) for k in (*TASKS, "medical_avg") if row[k] not in ("", "n/a")
            }
            for row in csv.DictReader(f)
            if row["seed"]
        }


def cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:+.1f} [{min(values):+.1f}, {max(values):+.1f}]"


def plain(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f}"


def main() -> None:
    runs = {name: scores(folder) for name, folder in GRIDS.items()}
    seeds = sorted(
        set.intersection(*({s for (m, s) in r if m == "lora-single-medqa"} for r in runs.values()))
    )
    header = [
        "Grid",
        "LoRA joint avg.",
        "LoRA single-task avg.",
        "LoRA gap (joint − single)",
        *(f"LoRA {t} gap" for t in TASKS),
        "Ortho-LoRA − LoRA joint",
        "Med-MoE-LoRA joint avg.",
    ]
    print(f"Seeds {seeds} (every grid); mean [min, max] over seeds.\n")
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for name, r in runs.items():
        joint = [r[("lora", s)]["medical_avg"] for s in seeds]
        single = [sum(r[(f"lora-single-{t}", s)][t] for t in TASKS) / 3 for s in seeds]
        gaps = [j - g for j, g in zip(joint, single, strict=True)]
        task_gaps = [
            cell([r[("lora", s)][t] - r[(f"lora-single-{t}", s)][t] for s in seeds]) for t in TASKS
        ]
        ortho = moe = "not run"
        if all(("ortho_lora", s) in r for s in seeds):
            ortho = cell(
                [r[("ortho_lora", s)]["medical_avg"] - r[("lora", s)]["medical_avg"] for s in seeds]
            )
        if all(("med_moe_lora", s) in r for s in seeds):
            moe = plain([r[("med_moe_lora", s)]["medical_avg"] for s in seeds])
        row = [name, plain(joint), plain(single), cell(gaps), *task_gaps, ortho, moe]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
