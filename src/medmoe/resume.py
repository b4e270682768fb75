"""Honest resume: a checkpoint restores the run the user configured, or it is refused.

``--ckpt_path`` restores the adapter tensors, the optimizer and scheduler state, the step
counters and the data stream position. The model's arguments come from the user's config,
never from the checkpoint; :func:`check_resume` compares the two:

- the adapter (class and every init argument), the base model (``model_name_or_path`` /
  ``tiny_llama``) and ``vocab_size`` must equal the checkpoint's, for every command (a
  different adapter cannot receive the checkpoint's tensors);
- when fitting, the optimizer and data hyper-parameters the restored state fixes
  (:data:`REFUSED_ON_RESUME`: the learning rate, weight decay, betas restored with the
  optimizer state; the task list the stream and task ids depend on, ...) must equal too;
- the loss weights and switches read at every step (:data:`HONOURED_ON_RESUME`) may change:
  the resumed run uses the new values.

To start a *new* run from a checkpoint's weights only (fresh optimizer, fresh schedule, any
learning rate), do not pass ``--ckpt_path``; add the
:class:`~medmoe.callbacks.LoadAdapterWeights` callback with the checkpoint or adapter directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

STRUCTURAL = ("model_name_or_path", "tiny_llama", "vocab_size")
REFUSED_ON_RESUME = (
    "learning_rate",
    "router_learning_rate",
    "weight_decay",
    "betas",
    "torch_dtype",
    "task_names",
    "gradient_projection",
    "projection_order",
    "ortho_tasks",
)
HONOURED_ON_RESUME = (
    "lambda_balance",
    "balance_form",
    "lambda_kp",
    "kp_delta",
    "routing_tokens",
    "attn_implementation",
    "gradient_checkpointing",
    "warmup_ratio",
    "loss_normalization",
    "allow_vocab_mismatch",
)
# adapter arguments that change no tensor: may differ when only evaluating a checkpoint
ADAPTER_EVAL_FREE = ("dropout",)
NEW_RUN_HINT = (
    "to start a new run from the checkpoint's weights only (new optimizer and schedule), drop "
    "--ckpt_path and add the medmoe.callbacks.LoadAdapterWeights callback (docs/resume.md)"
)


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts: YAML and checkpoints round-trip them differently."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _adapter_parts(value: Any) -> tuple[str | None, dict[str, Any]]:
    value = _plain(value) if isinstance(value, Mapping) else {}
    return value.get("class_path"), dict(value.get("init_args") or {})


def check_resume(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    fitting: bool,
    where: str = "the checkpoint",
) -> None:
    """Raise ValueError naming the key if ``current`` hyper-parameters cannot resume ``saved``."""
    if not saved:
        return
    saved_class, saved_args = _adapter_parts(saved.get("adapter"))
    current_class, current_args = _adapter_parts(current.get("adapter"))
    if saved_class and current_class and saved_class != current_class:
        raise ValueError(
            f"{where} holds a {saved_class} adapter but this run configures {current_class}: "
            "give the config the checkpoint was trained with"
        )
    for key in sorted(set(saved_args) & set(current_args)):
        if not fitting and key in ADAPTER_EVAL_FREE:
            continue
        if saved_args[key] != current_args[key]:
            raise ValueError(
                f"adapter key {key} is {saved_args[key]!r} in {where} but {current_args[key]!r} "
                f"in this run ({current_class}): the checkpoint's tensors fit only its own adapter"
            )
    keys = STRUCTURAL + (REFUSED_ON_RESUME if fitting else ())
    for key in keys:
        if key not in saved or key not in current:
            continue
        if _plain(saved[key]) != _plain(current[key]):
            raise ValueError(
                f"{key} is {saved[key]!r} in {where} but {current[key]!r} in this run; resume "
                "restores the state that depends on it and cannot honour the change: give "
                f"{saved[key]!r}, or {NEW_RUN_HINT}"
            )


def continue_schedule(trainer: Any) -> None:
    """Set each optimizer group's lr to what its restored ``LambdaLR`` gives at the current step.

    The restored optimizer carries the lr of the step the checkpoint was written at, computed
    with the *old* ``max_steps``; the scheduler was rebuilt with the new one. Without this,
    the first resumed step ran at the old lr (0.0 when the old run had finished its cosine
    decay). For an unchanged ``max_steps`` the value is the same number as restored.
    """
    for config in getattr(trainer, "lr_scheduler_configs", []):
        scheduler = config.scheduler
        if not isinstance(scheduler, LambdaLR):
            continue
        step = scheduler.last_epoch
        values = [
            base * fn(step)
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
            group["lr"] = value
        scheduler._last_lr = list(values)
