"""Lightning callbacks that make routing, forgetting and domain performance visible.

Each is usable alone; presets live in the top-level ``callbacks/`` folder
(``medmoe fit --config configs/demo.yaml --config callbacks/all.yaml``).

- :class:`RoutingStats` (``routing/``): router entropy, expert utilisation, load-balance CV,
  base-expert share of general vs domain samples, heatmaps.
- :class:`TemperatureMonitor` (``temperature/``): tau of every adapted layer.
- :class:`ForgettingMonitor` (``forgetting/``): MMLU/GSM8K against the base model.
- :class:`DomainEval` (``domain/``): PubMedQA/MedQA accuracy, Clinical-Sum ROUGE-L.
- :class:`PaperTables`: the paper's two tables at ``medmoe test``.
- :class:`ExpertUpdateNorms` (``experts/``): each expert's update norm, per decoder layer.
- :class:`AdapterExport`: the trained adapter's files beside the logs.
- :class:`ResumableCheckpoint`: one rolling, atomic ``last.ckpt``, also written on SIGTERM/SIGINT.
- :class:`LoadAdapterWeights`: a new run starting from a checkpoint's adapter weights only.
"""

from medmoe.callbacks.checkpoint import AtomicCheckpointIO, ResumableCheckpoint
from medmoe.callbacks.domain import DomainEval
from medmoe.callbacks.experts import ExpertUpdateNorms, expert_update_norms
from medmoe.callbacks.export import AdapterExport
from medmoe.callbacks.forgetting import ForgettingMonitor
from medmoe.callbacks.init_weights import LoadAdapterWeights
from medmoe.callbacks.routing import RoutingStats
from medmoe.callbacks.stats import (
    coefficient_of_variation,
    expert_utilisation,
    group_base_share,
    router_entropy,
    routing_mask,
    task_gate_sums,
)
from medmoe.callbacks.tables import PaperTables
from medmoe.callbacks.temperature import TemperatureMonitor

__all__ = [
    "AdapterExport",
    "AtomicCheckpointIO",
    "DomainEval",
    "ExpertUpdateNorms",
    "ForgettingMonitor",
    "LoadAdapterWeights",
    "PaperTables",
    "ResumableCheckpoint",
    "RoutingStats",
    "TemperatureMonitor",
    "coefficient_of_variation",
    "expert_update_norms",
    "expert_utilisation",
    "group_base_share",
    "router_entropy",
    "routing_mask",
    "task_gate_sums",
]
