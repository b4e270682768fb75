"""StepProgressBar and the end-of-fit summary: what a ``medmoe fit`` shows on the terminal."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from medmoe.callbacks.writers import last_logged

__all__ = ["StepProgressBar", "fit_summary"]


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps against ``max_steps``.

    Lightning's bar counts batches and names an epoch: on medmoe's endless training stream
    (an iterable of unknown epochs) it read ``Epoch 0/-2 ... 96/24``, micro-batches against
    optimizer steps. This one reads ``Step ... 24/24``.
    """

    @property
    def total_train_batches(self) -> int | float:
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        description = "Step" if self.trainer.max_steps and self.trainer.max_steps > 0 else "Epoch"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        done = trainer.global_step if trainer.max_steps and trainer.max_steps > 0 else batch_idx + 1
        self._update(self.train_progress_bar_id, done)
        self._update_metrics(trainer, pl_module)
        self.refresh()


_BLOCK = re.compile(r"^routing/base_share/(general|domain)/(.+)$")


def fit_summary(
    trainer: Trainer, log_dir: str | None, adapter_dir: Path | None, checkpoint: str | None
) -> str:
    """A few lines for the end of a fit: final scores, forgetting, tau, base-share gaps, paths.

    Only what was measured is shown (the scores come from the callbacks that ran: DomainEval,
    ForgettingMonitor, TemperatureMonitor, RoutingStats).
    """
    logged = {**last_logged(trainer)}
    for key, value in trainer.callback_metrics.items():
        if value.numel() == 1:
            logged.setdefault(key, float(value))
    lines = [f"medmoe fit finished at step {trainer.global_step}"]
    if "train/loss" in logged:
        lines[0] += f" (train/loss {logged['train/loss']:.4f})"
    scores = {k.split("/")[1]: v for k, v in logged.items() if _is_domain_score(k)}
    if scores:
        parts = [f"{task} {value:.3f}" for task, value in sorted(scores.items())]
        if "domain/average" in logged:
            parts.append(f"average {logged['domain/average']:.3f}")
        lines.append("  domain scores:  " + ", ".join(parts))
    forgetting = {
        k.split("/")[1]: v
        for k, v in logged.items()
        if k.startswith("forgetting/") and k.endswith("/delta")
    }
    if forgetting:
        parts = [f"{task} {value:+.3f}" for task, value in sorted(forgetting.items())]
        lines.append("  forgetting vs base (delta):  " + ", ".join(parts))
    if "temperature/min" in logged and "temperature/max" in logged:
        lines.append(
            f"  tau:  {logged['temperature/min']:.3g} to {logged['temperature/max']:.3g} "
            f"(mean {logged.get('temperature/mean', math.nan):.3g})"
        )
    shares: dict[str, dict[str, float]] = {}
    for key, value in logged.items():
        match = _BLOCK.match(key)
        if match:
            shares.setdefault(match.group(2), {})[match.group(1)] = value
    gaps = {b: s["general"] - s["domain"] for b, s in shares.items() if len(s) == 2}
    if gaps:
        parts = [f"{block} {gap:+.3f}" for block, gap in sorted(gaps.items())]
        lines.append("  base-share gap (general - domain) per layer group:  " + ", ".join(parts))
    elif "routing/base_share/gap" in logged:
        lines.append(
            f"  base-share gap (general - domain):  {logged['routing/base_share/gap']:+.3f}"
        )
    if adapter_dir is not None:
        lines.append(f"  adapter:     {adapter_dir}")
    if checkpoint:
        lines.append(f"  checkpoint:  {checkpoint}")
    if log_dir:
        lines.append(f"  logs:        {log_dir}")
        lines.append(f"  tensorboard --logdir {Path(log_dir).parent}")
    return "\n".join(lines)


def _is_domain_score(key: str) -> bool:
    parts = key.split("/")
    return (
        len(parts) == 3
        and parts[0] == "domain"
        and parts[2] in ("accuracy", "rouge_l", "exact_match_strict")
    )
