"""MoELoRAConfig: what Med-MoE-LoRA adapts and how, validated on construction.

Data only, as peft keeps ``LoraConfig`` apart from ``LoraModel``: the method that applies,
disables, saves and loads it is :class:`medmoe.adapters.med_moe_lora.MoELoRA`.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from medmoe.adapters.allocation import (
    DEFAULT_ALLOWED_RANKS,
    PAPER_DEPTH_RANGES,
    RANK_PATTERNS,
    assign_ranks,
    bottom_heavy_counts,
    counts_from_depth_ranges,
    counts_from_ranges,
    expert_counts,
    uniform_counts,
)
from medmoe.adapters.moe_lora import ADAPTER_DTYPES
from medmoe.adapters.spec import AdapterConfig

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOCATIONS = ("eq2", "depth_ranges", "ranges", "uniform", "bottom_heavy")


@dataclass
class MoELoRAConfig(AdapterConfig):
    """Med-MoE-LoRA adapter configuration. The defaults are the paper's setup (Sec. 4.1).

    A plain validated dataclass. In YAML, ``class_path: medmoe.adapters.MoELoRAConfig`` selects
    Med-MoE-LoRA: :class:`~medmoe.model.MedMoEModule` turns the config into its method
    (:class:`~medmoe.adapters.med_moe_lora.MoELoRA`, which has the same fields) with
    :func:`~medmoe.adapters.med_moe_lora.adapter_spec`, as ``peft.get_peft_model`` picks the
    tuner of a ``LoraConfig``.

    Attributes:
        target_modules: names (last path component) of the linear layers adapted in every
            decoder layer. Default: all attention and MLP projections of Llama/Qwen2/Mistral.
        allocation: how many experts each decoder layer gets:
            ``"eq2"`` (eq 2 with ``n_min``, ``n_max``, ``gamma``), ``"depth_ranges"``
            (``depth_ranges``, fractions of depth, so it fits any depth; layers no range
            covers follow eq 2), ``"ranges"`` (explicit 1-based ``layer_ranges``; layers
            no range covers follow eq 2), ``"uniform"`` (``num_experts`` everywhere) or
            ``"bottom_heavy"`` (eq 2 mirrored). ``None`` (the default) resolves to ``"ranges"``
            when ``layer_ranges`` is given, else to ``"depth_ranges"``.
        n_min: fewest experts per layer (eq 2).
        n_max: most experts per layer (eq 2).
        gamma: curvature of eq 2, >= 1.
        depth_ranges: ranges of depth ``LOW < l/L <= HIGH`` -> expert count, for
            ``"depth_ranges"``. Default: the paper's experiment as fractions,
            ``{"0-10/32": 2, "19/32-1": 8}``, exactly layers 1-10 and 20-32 at L=32.
        layer_ranges: 1-based inclusive layer ranges -> expert count, for ``"ranges"``. The
            paper's experiment: ``{"1-10": 2, "20-32": 8}`` (layers 11-19, on which the paper
            is silent, follow eq 2). Table 3 writes the top block as 23-32; both readings are
            expressible.
        num_experts: experts per layer for ``"uniform"``.
        allowed_ranks: the discrete set of expert ranks (rank-wise decoupling, Sec. 3.5).
        rank_pattern: how a layer's experts get their ranks: ``"cycle"``, ``"spread"`` or
            ``"equal"`` (see :func:`medmoe.adapters.allocation.assign_ranks`).
        expert_rank: the rank for ``"equal"`` (must be in ``allowed_ranks``).
        num_base_experts: base (anchor) experts per layer, the first ones of each layer
            (default 1: the paper's "dedicated Base Expert"). Ignored when
            ``base_expert_fraction`` is set.
        base_expert_fraction: if set, each layer's base group is ``floor(fraction * N_l)``
            experts (at least 1, leaving at least 1 specialist); 0.5 splits every layer into
            halves as LoRAMoE does, which the knowledge-preservation loss needs to separate
            general from domain routing (docs/mechanisms.md).
        top_k: ``None`` for soft merging (the method); k for top-k routing (vanilla MoE-LoRA).
        alpha_over_r: ``alpha_i = alpha_over_r * r_i`` (paper: alpha = 2r, so every scale is 2).
        alpha: if set, a fixed alpha for every expert instead (scale alpha / r_i).
        tau_init: initial router temperature.
        learn_tau: learn tau (one per adapted layer) or keep it at ``tau_init``.
        tau_range: the interval tau stays in, through a differentiable soft bound at each end
            (:func:`~medmoe.adapters.moe_lora.soft_bounded_log_tau`, not a clamp), so it cannot
            run off to a uniform router.
        dropout: dropout on the expert path's input.
        adapter_dtype: ``"float32"`` (default, as peft): the experts' factors are float32 on a
            bf16/fp16 base, so small AdamW updates do not round away; ``"base"``: the base's
            dtype. The expert path computes in the activations' dtype either way.
    """

    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    allocation: Literal["eq2", "depth_ranges", "ranges", "uniform", "bottom_heavy"] | None = None
    n_min: int = 2
    n_max: int = 8
    gamma: float = 1.0
    depth_ranges: dict[str, int] | None = field(default_factory=lambda: dict(PAPER_DEPTH_RANGES))
    layer_ranges: dict[str, int] | None = None
    num_experts: int = 4
    allowed_ranks: list[int] = field(default_factory=lambda: list(DEFAULT_ALLOWED_RANKS))
    rank_pattern: Literal["cycle", "spread", "equal"] = "cycle"
    expert_rank: int | None = None
    num_base_experts: int = 1
    base_expert_fraction: float | None = None
    top_k: int | None = None
    alpha_over_r: float = 2.0
    alpha: float | None = None
    tau_init: float = 1.0
    learn_tau: bool = True
    tau_range: tuple[float, float] = (0.1, 10.0)
    dropout: float = 0.05
    adapter_dtype: Literal["float32", "base"] = "float32"

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.allowed_ranks = [int(r) for r in self.allowed_ranks]
        self.tau_range = (float(self.tau_range[0]), float(self.tau_range[1]))
        if self.allocation is None:
            self.allocation = "ranges" if self.layer_ranges else "depth_ranges"
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"unknown allocation {self.allocation!r}; accepted: {', '.join(ALLOCATIONS)}"
            )
        if self.n_min < 1 or self.n_min > self.n_max:
            raise ValueError(
                f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}"
            )
        if not self.gamma >= 1:
            raise ValueError(f"gamma must be >= 1 (eq 2), got {self.gamma}")
        if self.allocation == "depth_ranges" and not self.depth_ranges:
            raise ValueError(
                "allocation='depth_ranges' needs depth_ranges, e.g. {'0-10/32': 2, '19/32-1': 8}"
            )
        if self.depth_ranges:
            counts_from_depth_ranges(32, self.depth_ranges, fill=1)  # checks every spec
        if self.allocation == "ranges" and not self.layer_ranges:
            raise ValueError("allocation='ranges' needs layer_ranges, e.g. {'1-10': 2, '20-32': 8}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.allowed_ranks or min(self.allowed_ranks) < 1:
            raise ValueError(f"allowed_ranks must be positive integers, got {self.allowed_ranks}")
        if self.rank_pattern not in RANK_PATTERNS:
            raise ValueError(
                f"unknown rank_pattern {self.rank_pattern!r}; accepted: {', '.join(RANK_PATTERNS)}"
            )
        if self.expert_rank is not None and self.expert_rank not in self.allowed_ranks:
            raise ValueError(
                f"expert_rank {self.expert_rank} is not in allowed_ranks {self.allowed_ranks}"
            )
        if self.num_base_experts < 0:
            raise ValueError(f"num_base_experts must be >= 0, got {self.num_base_experts}")
        if self.base_expert_fraction is not None and not 0 < self.base_expert_fraction < 1:
            raise ValueError(
                f"base_expert_fraction must be None or lie in (0, 1), got "
                f"{self.base_expert_fraction}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None (soft merging) or >= 1, got {self.top_k}")
        low, high = self.tau_range
        if not 0 < low <= self.tau_init <= high:
            raise ValueError(
                f"need 0 < tau_range[0] <= tau_init <= tau_range[1], got tau_init="
                f"{self.tau_init}, tau_range={self.tau_range}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got "
                f"{self.adapter_dtype!r}"
            )

    def layer_expert_counts(self, num_layers: int) -> list[int]:
        """N_l for l = 1..num_layers under this config's allocation."""
        if self.allocation == "eq2":
            counts = expert_counts(num_layers, self.n_min, self.n_max, self.gamma)
        elif self.allocation == "bottom_heavy":
            counts = bottom_heavy_counts(num_layers, self.n_min, self.n_max, self.gamma)
        elif self.allocation == "uniform":
            counts = uniform_counts(num_layers, self.num_experts)
        elif self.allocation == "depth_ranges":
            fill = expert_counts(num_layers, self.n_min, self.n_max, self.gamma)
            counts = counts_from_depth_ranges(num_layers, self.depth_ranges or {}, fill=fill)
        else:
            fill = expert_counts(num_layers, self.n_min, self.n_max, self.gamma)
            counts = counts_from_ranges(num_layers, self.layer_ranges or {}, fill=fill)
        for layer, n in enumerate(counts, start=1):
            if n <= self.base_experts_for(n):
                raise ValueError(
                    f"layer {layer} gets {n} expert(s), which leaves no specialist beside "
                    f"num_base_experts={self.base_experts_for(n)}"
                )
        return counts

    def base_experts_for(self, num_experts: int) -> int:
        """The size of the base group of a layer with ``num_experts`` experts."""
        if self.base_expert_fraction is None:
            return self.num_base_experts
        return min(max(1, math.floor(self.base_expert_fraction * num_experts)), num_experts - 1)

    def layer_ranks(self, num_layers: int) -> list[list[int]]:
        """The ranks of every expert of every decoder layer."""
        return [
            assign_ranks(n, self.allowed_ranks, self.rank_pattern, self.expert_rank)
            for n in self.layer_expert_counts(num_layers)
        ]

    def layer_kwargs(self, num_experts: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`MoELoRALinear` for a layer of ``num_experts`` experts
        (needed when ``base_expert_fraction`` sizes the base group per layer)."""
        if num_experts is None and self.base_expert_fraction is not None:
            raise ValueError("layer_kwargs needs num_experts when base_expert_fraction is set")
        return {
            "num_base_experts": self.base_experts_for(num_experts or 0),
            "top_k": self.top_k,
            "alpha_over_r": self.alpha_over_r,
            "alpha": self.alpha,
            "tau_init": self.tau_init,
            "learn_tau": self.learn_tau,
            "tau_range": self.tau_range,
            "dropout": self.dropout,
            "adapter_dtype": self.adapter_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoELoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MoELoRAConfig key(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)
