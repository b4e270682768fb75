"""ExpertUpdateNorms: how large each expert's update ``(alpha_i / r_i) B_i A_i`` has grown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from medmoe.adapters import ExpertFactorsLayer
from medmoe.callbacks.naming import AdaptedLayer, adapted_layers
from medmoe.callbacks.writers import StepCadence, log_to_loggers
from medmoe.strategies import unsharded

__all__ = ["ExpertUpdateNorms", "expert_update_norms"]


@torch.no_grad()
def expert_update_norms(layer: ExpertFactorsLayer) -> Tensor:
    """``||(alpha_i / r_i) B_i A_i||_F`` per expert: [N], without forming the d_out x d_in product.

    ``||B A||_F^2 = sum((B^T B) * (A A^T))`` needs only r_i x r_i matrices.
    """
    norms = []
    for i in range(layer.num_experts):
        a, b = layer.expert(i)
        a, b = a.float(), b.float()
        squared = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
        norms.append(layer.scales[i] * squared.sqrt())
    return torch.stack(norms)


class ExpertUpdateNorms(Callback):
    """Logs ``experts/update_norm/<block>/e<i>``: the mean over a decoder block's adapted
    modules of each expert's update norm, and ``experts/update_norm/<block>/base_share``, the
    base experts' share of the block's total.

    With mixed ranks the scaling rule decides how large each expert's step is
    (``alpha_i = 2 r_i`` gives every expert scale 2; a fixed alpha gives a rank-8 expert 4x the
    scale of a rank-32 one), so this makes the rule's effect visible.

    Args:
        log_every_n_steps: interval in optimizer steps.
    """

    def __init__(self, log_every_n_steps: int = 100) -> None:
        self._cadence = StepCadence(log_every_n_steps, "ExpertUpdateNorms")
        self._layers: list[AdaptedLayer] | None = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Tensor],
        batch_idx: int,
    ) -> None:
        if not self._cadence.due(trainer):
            return
        if self._layers is None:
            self._layers = adapted_layers(pl_module.model)
        per_block: dict[str, list[Tensor]] = {}
        with unsharded(pl_module.model):  # FSDP2: whole factors on every rank
            for adapted in self._layers:
                if not isinstance(adapted.layer, ExpertFactorsLayer):
                    continue  # a routed layer whose experts are no LoRA factors
                per_block.setdefault(adapted.block, []).append(expert_update_norms(adapted.layer))
        values: dict[str, float] = {}
        for block, norms in per_block.items():
            if len({n.numel() for n in norms}) != 1:
                continue  # modules of one block share its expert count by construction
            mean = torch.stack(norms).mean(0).cpu()  # [N]
            for i, value in enumerate(mean.tolist()):
                values[f"experts/update_norm/{block}/e{i}"] = value
            num_base = next(a.layer.num_base_experts for a in self._layers if a.block == block)
            total = float(mean.sum())
            if num_base and total > 0:
                values[f"experts/update_norm/{block}/base_share"] = (
                    float(mean[:num_base].sum()) / total
                )
        log_to_loggers(trainer, values, trainer.global_step)
