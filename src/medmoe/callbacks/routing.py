"""RoutingStats: router entropy, expert utilisation, load balance and base-expert share.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medmoe.callbacks.figures import heatmap_image
from medmoe.callbacks.naming import AdaptedLayer, adapted_layers
from medmoe.callbacks.stats import (
    TokenSelection,
    coefficient_of_variation,
    expert_utilisation,
    group_base_share,
    router_entropy,
    routing_mask,
    task_gate_sums,
)
from medmoe.callbacks.writers import StepCadence, add_image, log_to_loggers

__all__ = ["RoutingStats"]


class RoutingStats(Callback):
    """Logs how the MoE-LoRA routers route, from the routing the training forward recorded.

    On logging steps only, at ``on_train_batch_end``, it reads every MoE-LoRA layer's
    ``last_gates`` (the gates the forward used, after any top-k) with the batch's masks and
    ids: no second forward, nothing kept on the autograd graph, one host transfer. Statistics
    are over the masked tokens of the micro-batch that ended the optimizer step (per rank).

    Scalars, written to the Trainer's loggers at the optimizer step (see
    :func:`~medmoe.callbacks.writers.log_to_loggers`), with layers named ``L03.q_proj``
    (0-based decoder index) and decoder layers ``L03`` (the mean over their adapted modules):

    - ``routing/entropy/{layer|block|mean}``: mean of ``-sum g log g``, in [0, ln N];
    - ``routing/utilisation/{layer|block}/e{i}``: mean gate of expert i (sums to 1 over i);
    - ``routing/cv/{layer|block|mean}``: std / mean of the utilisation (0 = balanced);
    - ``routing/base_share/{general|domain}[/{block}]`` and ``routing/base_share/gap``: the
      mean gate mass on the base experts for general-replay vs domain samples, and their
      difference (the knowledge-preservation loss widens it).

    Images (TensorBoard only; averaged over the batches measured since the last image):

    - ``routing/utilisation_heatmap``: decoder layer x expert utilisation; layers with fewer
      experts are padded with grey cells; a dashed line separates the base experts;
    - ``routing/task_affinity``: task x expert mean gate in one decoder layer
      (``affinity_layer``, the last by default, where eq 2 puts the most experts), averaged over
      that layer's adapted modules (they share their expert count).

    Args:
        log_every_n_steps: scalar interval in optimizer steps.
        image_every_n_steps: image interval in optimizer steps; ``None`` or 0 turns images off.
        tokens: ``"all"`` non-padding tokens, or ``"target"`` (target-predicting) tokens only.
        per_module: log per-layer scalars too (``False`` keeps the decoder-layer means only,
            lighter for 32-layer models).
        affinity_layer: the decoder layer of the task-affinity image (Python index).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        image_every_n_steps: int | None = 200,
        tokens: TokenSelection = "all",
        per_module: bool = True,
        affinity_layer: int = -1,
    ) -> None:
        if tokens not in ("all", "target"):
            raise ValueError(f"tokens must be 'all' or 'target', got {tokens!r}")
        self.tokens = tokens
        self.per_module = per_module
        self.affinity_layer = affinity_layer
        self._scalars = StepCadence(log_every_n_steps, "RoutingStats")
        self._images = (
            StepCadence(image_every_n_steps, "RoutingStats images") if image_every_n_steps else None
        )
        self._layers: list[AdaptedLayer] | None = None
        self._task_names: list[str] = []
        self._affinity_block: str | None = None
        self._warned: set[str] = set()
        self._reset_images()

    # ----------------------------------------------------------------- hooks
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Tensor],
        batch_idx: int,
    ) -> None:
        scalars_due = self._scalars.due(trainer)
        images_due = self._images is not None and self._images.due(trainer)
        if not (scalars_due or images_due):
            return
        layers = self._adapted(pl_module)
        if not layers:
            self._warn_once("no-layers", "RoutingStats: the model has no MoE-LoRA layers")
            return
        self._task_names = _task_names(trainer, pl_module)
        with torch.no_grad():
            values = self._measure(layers, batch)
        if scalars_due:
            log_to_loggers(trainer, values, trainer.global_step)
        if images_due:
            self._write_images(trainer)

    # ----------------------------------------------------------------- measurement
    def _adapted(self, pl_module: LightningModule) -> list[AdaptedLayer]:
        if self._layers is None:
            model = getattr(pl_module, "model", None)
            self._layers = adapted_layers(model) if model is not None else []
        return self._layers

    def _measure(self, layers: list[AdaptedLayer], batch: Mapping[str, Tensor]) -> dict[str, float]:
        mask = routing_mask(batch, self.tokens)
        is_general = batch.get("is_general")
        task_id = batch.get("task_id")
        blocks = list(dict.fromkeys(a.block for a in layers))
        in_range = -len(blocks) <= self.affinity_layer < len(blocks)
        affinity_block = (
            blocks[self.affinity_layer] if in_range and self._images is not None else None
        )
        self._affinity_block = affinity_block
        num_tasks = len(self._task_names)
        out: dict[str, Tensor] = {}
        entropy, cv, util = defaultdict(list), defaultdict(list), defaultdict(list)
        general, domain = defaultdict(list), defaultdict(list)
        for adapted in layers:
            gates = adapted.layer.last_gates
            if gates is None:
                continue
            if gates.shape[:-1] != mask.shape:
                self._warn_once(
                    "shape",
                    f"RoutingStats: {adapted.name} routed {tuple(gates.shape[:-1])} tokens but the "
                    f"batch mask is {tuple(mask.shape)}; such layers are skipped",
                )
                continue
            gates = gates.detach()
            u = expert_utilisation(gates, mask)
            e = router_entropy(gates, mask)
            c = coefficient_of_variation(u)
            block = adapted.block
            entropy[block].append(e)
            cv[block].append(c)
            if not util[block] or util[block][0].numel() == u.numel():
                util[block].append(u)
            if self.per_module:
                out[f"routing/entropy/{adapted.name}"] = e
                out[f"routing/cv/{adapted.name}"] = c
                for i in range(u.numel()):
                    out[f"routing/utilisation/{adapted.name}/e{i}"] = u[i]
            nb = adapted.layer.num_base_experts
            if is_general is not None and nb > 0:
                g, d = group_base_share(gates, mask, is_general, nb)
                general[block].append(g)
                domain[block].append(d)
            if block == affinity_block and task_id is not None and num_tasks > 0:
                self._add_affinity(*task_gate_sums(gates, mask, task_id, num_tasks))
        for block in entropy:
            out[f"routing/entropy/{block}"] = torch.stack(entropy[block]).mean()
            out[f"routing/cv/{block}"] = torch.stack(cv[block]).mean()
            mean_util = torch.stack(util[block]).mean(0)
            if self._images is not None:
                self._add_block_utilisation(block, mean_util)
            for i in range(mean_util.numel()):
                out[f"routing/utilisation/{block}/e{i}"] = mean_util[i]
        if entropy:
            out["routing/entropy/mean"] = torch.stack(
                [v for vs in entropy.values() for v in vs]
            ).mean()
            out["routing/cv/mean"] = torch.stack([v for vs in cv.values() for v in vs]).mean()
        if general:
            for group, name in ((general, "general"), (domain, "domain")):
                for block, shares in group.items():
                    out[f"routing/base_share/{name}/{block}"] = torch.stack(shares).mean()
                out[f"routing/base_share/{name}"] = torch.stack(
                    [v for vs in group.values() for v in vs]
                ).mean()
            out["routing/base_share/gap"] = (
                out["routing/base_share/general"] - out["routing/base_share/domain"]
            )
        if not out:
            return {}
        numbers = torch.stack([v.float() for v in out.values()]).cpu().tolist()  # one transfer
        return {k: v for k, v in zip(out, numbers, strict=True) if np.isfinite(v)}

    # ----------------------------------------------------------------- images
    def _reset_images(self) -> None:
        self._block_util: dict[str, Tensor] = {}
        self._block_util_n: dict[str, int] = defaultdict(int)
        self._affinity: tuple[Tensor, Tensor] | None = None

    def _add_block_utilisation(self, block: str, utilisation: Tensor) -> None:
        previous = self._block_util.get(block)
        self._block_util[block] = utilisation if previous is None else previous + utilisation
        self._block_util_n[block] += 1

    def _add_affinity(self, sums: Tensor, counts: Tensor) -> None:
        if self._affinity is None:
            self._affinity = (sums, counts)
        else:
            self._affinity = (self._affinity[0] + sums, self._affinity[1] + counts)

    def _write_images(self, trainer: Trainer) -> None:
        step = trainer.global_step
        layers = self._layers or []
        base = layers[0].layer.num_base_experts if layers else 0
        if self._block_util:
            blocks = list(self._block_util)
            means = [(self._block_util[b] / self._block_util_n[b]).cpu().numpy() for b in blocks]
            width = max(len(m) for m in means)
            grid = np.full((len(blocks), width), np.nan)
            for row, m in enumerate(means):
                grid[row, : len(m)] = m
            image = heatmap_image(
                grid,
                blocks,
                [f"e{i}" for i in range(width)],
                f"expert utilisation (step {step})",
                ylabel="decoder layer",
                base_columns=base,
            )
            add_image(trainer, "routing/utilisation_heatmap", image, step)
        if self._affinity is not None:
            sums, counts = self._affinity
            # Sums and counts both run over the block's modules: the ratio is their mean.
            grid = (sums / counts.clamp_min(1e-12).unsqueeze(-1)).cpu().numpy()
            grid[counts.cpu().numpy() == 0] = np.nan
            image = heatmap_image(
                grid,
                self._task_names,
                [f"e{i}" for i in range(grid.shape[1])],
                f"task x expert mean gate, {self._affinity_block} (step {step})",
                ylabel="task",
                base_columns=base,
            )
            add_image(trainer, "routing/task_affinity", image, step)
        self._reset_images()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _task_names(trainer: Trainer, pl_module: LightningModule) -> list[str]:
    """Task names by task id: the module's, else the trainer's datamodule's."""
    names = list(getattr(pl_module, "task_names", None) or [])
    if not names:
        names = list(getattr(trainer.datamodule, "task_names", None) or [])
    return names
