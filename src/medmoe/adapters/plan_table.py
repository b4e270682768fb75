"""A markdown table of the expert plan a config gives at several model depths (for the docs)."""

from __future__ import annotations

from collections.abc import Sequence

from medmoe.adapters.config import MoELoRAConfig


def _runs(counts: Sequence[int]) -> str:
    """``[2, 2, 5, 8, 8]`` -> ``"1-2: 2, 3: 5, 4-5: 8"`` (1-based layers)."""
    parts, start = [], 0
    for index in range(1, len(counts) + 1):
        if index == len(counts) or counts[index] != counts[start]:
            span = f"{start + 1}" if index - 1 == start else f"{start + 1}-{index}"
            parts.append(f"{span}: {counts[start]}")
            start = index
    return ", ".join(parts)


def allocation_plan_table(config: MoELoRAConfig, depths: Sequence[int]) -> str:
    """One row per depth L: the experts per layer (runs of equal counts) and their total."""
    lines = ["| L | experts per layer (layers: N) | experts in all |", "|---|---|---|"]
    for depth in depths:
        counts = config.layer_expert_counts(depth)
        lines.append(f"| {depth} | {_runs(counts)} | {sum(counts)} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m medmoe.adapters.plan_table
    print(allocation_plan_table(MoELoRAConfig(), (4, 16, 24, 28, 32)))
