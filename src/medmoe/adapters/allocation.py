"""Layer-wise expert allocation (eq 2, explicit ranges, uniform, bottom-heavy) and expert ranks.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction

DEFAULT_ALLOWED_RANKS = (8, 16, 32)
RANK_PATTERNS = ("cycle", "spread", "equal")

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def _check_bounds(n_min: int, n_max: int) -> None:
    if n_min < 1:
        raise ValueError(f"n_min must be >= 1, got {n_min}")
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must not exceed n_max ({n_max})")


def _check_num_layers(num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")


def expert_counts(num_layers: int, n_min: int, n_max: int, gamma: float = 1.0) -> list[int]:
    """``N_l = N_min + floor((N_max - N_min) * (l / L) ** gamma)`` for l = 1..L (eq 2)."""
    _check_num_layers(num_layers)
    _check_bounds(n_min, n_max)
    if not gamma >= 1:
        raise ValueError(f"gamma must be >= 1 (eq 2), got {gamma}")
    return [
        n_min + math.floor((n_max - n_min) * (layer / num_layers) ** gamma)
        for layer in range(1, num_layers + 1)
    ]


def bottom_heavy_counts(num_layers: int, n_min: int, n_max: int, gamma: float = 1.0) -> list[int]:
    """Eq 2 mirrored: the most experts at layer 1, the fewest at layer L (the ablation)."""
    return expert_counts(num_layers, n_min, n_max, gamma)[::-1]


def uniform_counts(num_layers: int, num_experts: int) -> list[int]:
    """The same number of experts in every layer."""
    _check_num_layers(num_layers)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return [num_experts] * num_layers


def parse_layer_range(spec: str | int, num_layers: int) -> range:
    """``"1-10"`` or ``"7"`` (1-based, inclusive) -> the 1-based range of layers it covers."""
    match = _RANGE.match(str(spec))
    if match is None:
        raise ValueError(f"layer range {spec!r} is not of the form 'FIRST-LAST' or 'LAYER'")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    if not 1 <= first <= last <= num_layers:
        raise ValueError(
            f"layer range {spec!r} must lie within 1-{num_layers} (the model has "
            f"{num_layers} decoder layers) with FIRST <= LAST"
        )
    return range(first, last + 1)


def counts_from_ranges(
    num_layers: int,
    ranges: Mapping[str, int],
    fill: Sequence[int] | int | None = None,
) -> list[int]:
    """Expert counts from explicit 1-based layer ranges, e.g. ``{"1-10": 2, "20-32": 8}``.

    This expresses the paper's experiment (layers 1-10 with N=2, layers 20-32 with N=8), which
    eq 2 cannot produce. Layers no range covers take ``fill``: a count for every layer (a list,
    e.g. eq 2's), a single count, or ``None`` to require that the ranges cover every layer.
    Overlapping ranges are an error.
    """
    _check_num_layers(num_layers)
    counts: list[int | None] = [None] * num_layers
    for spec, count in ranges.items():
        if int(count) < 1:
            raise ValueError(f"layer range {spec!r}: expert count must be >= 1, got {count}")
        for layer in parse_layer_range(spec, num_layers):
            if counts[layer - 1] is not None:
                raise ValueError(
                    f"layer {layer} is covered by more than one range in {dict(ranges)}"
                )
            counts[layer - 1] = int(count)
    if isinstance(fill, int):
        fill = [fill] * num_layers
    if fill is not None and len(fill) != num_layers:
        raise ValueError(f"fill has {len(fill)} counts for {num_layers} layers")
    missing = [layer for layer, n in enumerate(counts, start=1) if n is None]
    if missing and fill is None:
        raise ValueError(f"layers {missing} are covered by no range in {dict(ranges)} and no fill")
    return [n if n is not None else int(fill[i]) for i, n in enumerate(counts)]  # type: ignore[index]


# The paper's experiment (Sec. 4.1, Llama-3-8B, 32 layers: layers 1-10 get 2 experts, 20-32
# get 8) as fractions of depth, so it applies to a model of any depth.
PAPER_DEPTH_RANGES = {"0-10/32": 2, "19/32-1": 8}


def _depth_fraction(text: str, spec: str) -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"depth range {spec!r}: {text.strip()!r} is not a fraction of depth such as "
            "'0.25' or '10/32'"
        ) from None
    if not 0 <= value <= 1:
        raise ValueError(f"depth range {spec!r}: {text.strip()} must lie in [0, 1]")
    return value


def parse_depth_range(spec: str, num_layers: int) -> range:
    """``"LOW-HIGH"`` in fractions of depth -> the 1-based layers ``l`` with ``LOW < l/L <= HIGH``.

    Fractions are decimals or ratios (``"0-10/32"``, ``"0.6-1"``); the comparison is exact.
    ``"0-10/32"`` is layers 1-10 at L=32 and layers 1-3 at L=12; a range too narrow to hold a
    layer at this depth covers none.
    """
    _check_num_layers(num_layers)
    low_text, sep, high_text = str(spec).partition("-")
    if not sep:
        raise ValueError(f"depth range {spec!r} is not of the form 'LOW-HIGH' (fractions of depth)")
    low, high = _depth_fraction(low_text, spec), _depth_fraction(high_text, spec)
    if low >= high:
        raise ValueError(f"depth range {spec!r} needs LOW < HIGH")
    layers = [
        layer for layer in range(1, num_layers + 1) if low < Fraction(layer, num_layers) <= high
    ]
    return range(layers[0], layers[-1] + 1) if layers else range(0)


def depth_ranges_to_layer_ranges(ranges: Mapping[str, int], num_layers: int) -> dict[str, int]:
    """Depth-fraction ranges -> 1-based layer ranges (``"FIRST-LAST"``) at ``num_layers``."""
    layer_ranges = {}
    for spec, count in ranges.items():
        layers = parse_depth_range(spec, num_layers)
        if layers:
            layer_ranges[f"{layers[0]}-{layers[-1]}"] = int(count)
    return layer_ranges


def counts_from_depth_ranges(
    num_layers: int, ranges: Mapping[str, int], fill: Sequence[int] | int | None = None
) -> list[int]:
    """Expert counts from depth-fraction ranges (:func:`parse_depth_range`); layers no range
    covers take ``fill`` as in :func:`counts_from_ranges`."""
    return counts_from_ranges(num_layers, depth_ranges_to_layer_ranges(ranges, num_layers), fill)


def assign_ranks(
    num_experts: int,
    allowed_ranks: Sequence[int] = DEFAULT_ALLOWED_RANKS,
    pattern: str = "cycle",
    rank: int | None = None,
) -> list[int]:
    """Give each expert of a layer its rank from the allowed set (rank-wise decoupling).

    - ``"cycle"``: expert i gets ``allowed[i % len(allowed)]`` (2 experts: 8, 16; 8: 8,16,32,...).
    - ``"spread"``: ranks rise monotonically over the experts, covering the set evenly
      (2 experts: 8, 32; 8 experts: 8,8,16,16,16,16,32,32).
    - ``"equal"``: every expert gets ``rank`` (default: the smallest allowed rank).
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    allowed = sorted(set(int(r) for r in allowed_ranks))
    if not allowed or allowed[0] < 1:
        raise ValueError(f"allowed_ranks must be positive integers, got {list(allowed_ranks)}")
    if pattern == "cycle":
        return [allowed[i % len(allowed)] for i in range(num_experts)]
    if pattern == "spread":
        if num_experts == 1:
            return [allowed[-1]]
        return [
            allowed[round(i * (len(allowed) - 1) / (num_experts - 1))] for i in range(num_experts)
        ]
    if pattern == "equal":
        rank = allowed[0] if rank is None else int(rank)
        check_ranks([rank], allowed)
        return [rank] * num_experts
    raise ValueError(f"unknown rank pattern {pattern!r}; accepted: {', '.join(RANK_PATTERNS)}")


def check_ranks(ranks: Sequence[int], allowed_ranks: Sequence[int]) -> None:
    """Raise ValueError for a rank outside the allowed set."""
    bad = [r for r in ranks if r not in set(allowed_ranks)]
    if bad:
        raise ValueError(f"rank(s) {bad} are outside the allowed set {sorted(set(allowed_ranks))}")
