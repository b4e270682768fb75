"""TemperatureMonitor: the learnable router temperature tau of every MoE-LoRA layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medmoe.adapters import TemperatureLayer
from medmoe.callbacks.naming import AdaptedLayer, adapted_layers
from medmoe.callbacks.writers import StepCadence, log_to_loggers
from medmoe.strategies import unsharded

__all__ = ["TemperatureMonitor", "at_clamp_bound"]


def at_clamp_bound(tau: Tensor, low: float, high: float, rtol: float = 1e-4) -> Tensor:
    """True where ``tau`` sits at (or beyond) ``low`` or ``high`` within relative ``rtol``."""
    return (tau <= low * (1 + rtol)) | (tau >= high * (1 - rtol))


class TemperatureMonitor(Callback):
    """Logs ``temperature/<layer>`` (tau of every adapted layer) and its min, mean and max.

    Written to the Trainer's loggers at the optimizer step, every ``log_every_n_steps``.

    Also ``temperature/at_bound``: how many layers sit at a bound of their clamp range
    (``tau_range``). The first time any does, a warning (rank zero, once) names them: a tau at
    its upper bound makes routing near uniform, one big LoRA in disguise.

    Args:
        log_every_n_steps: interval in optimizer steps.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        self._cadence = StepCadence(log_every_n_steps, "TemperatureMonitor")
        self._layers: list[AdaptedLayer] | None = None
        self._warned = False

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
            model = getattr(pl_module, "model", None)
            layers = adapted_layers(model) if model is not None else []
            # the routed layers that declare a temperature
            self._layers = [a for a in layers if isinstance(a.layer, TemperatureLayer)]
        if not self._layers:
            return
        with torch.no_grad(), unsharded(pl_module.model):  # FSDP2: whole log tau per rank
            device = self._layers[0].layer.tau.device
            # one host transfer for all layers
            taus = torch.stack([a.layer.tau.detach().float().to(device) for a in self._layers])
            taus = taus.cpu()
        lows = torch.tensor([a.layer.tau_range[0] for a in self._layers])
        highs = torch.tensor([a.layer.tau_range[1] for a in self._layers])
        bounded = at_clamp_bound(taus, lows, highs)
        values = {
            f"temperature/{a.name}": float(t) for a, t in zip(self._layers, taus, strict=True)
        }
        values["temperature/min"] = float(taus.min())
        values["temperature/mean"] = float(taus.mean())
        values["temperature/max"] = float(taus.max())
        values["temperature/at_bound"] = float(bounded.sum())
        log_to_loggers(trainer, values, trainer.global_step)
        if bool(bounded.any()) and not self._warned:
            self._warned = True
            names = [
                f"{a.name} (tau={float(t):.3g}, range {a.layer.tau_range})"
                for a, t, b in zip(self._layers, taus, bounded, strict=True)
                if b
            ]
            rank_zero_warn(
                f"router temperature at its clamp bound in {len(names)} layer(s) at step "
                f"{trainer.global_step}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}. "
                "At the upper bound routing tends to uniform; at the lower, to one expert."
            )
