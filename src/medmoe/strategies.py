"""DeepSpeed under Lightning with the gradient scaled once for accumulation, not twice.

Lightning's automatic optimisation divides every training-step loss by
``accumulate_grad_batches`` before the backward. Lightning's ``DeepSpeedStrategy`` also sets
DeepSpeed's ``gradient_accumulation_steps`` to the same number, and ``engine.backward(loss)``
divides the loss by it again (``scale_wrt_gas=True`` by default). The gradients are then
``1 / accumulate_grad_batches`` of the mean, so gradient clipping acts at an effective norm
``accumulate_grad_batches`` times larger and logged gradient norms are that much too small.

:class:`DeepSpeedPrecision` calls ``engine.backward(loss, scale_wrt_gas=False)``;
:class:`DeepSpeedStrategy` is Lightning's strategy with that plugin, whatever ``precision`` the
trainer is given, so configs only change the strategy's ``class_path``. It also sets DeepSpeed's
gradient accumulation and gradient reduction to float32 by default (``data_types.grad_accum_dtype``
and ``communication_data_type``): under bf16 the routers' and ``log_tau``'s gradients would
otherwise be summed over micro-batches and averaged over ranks in bf16 (8 mantissa bits).

Under ``bf16-mixed`` the default ``mixed_precision="autocast"`` keeps every parameter in the
dtype it has (the frozen base as loaded, bf16 in med.yaml; the adapter's factors, routers and
``log_tau`` in float32) and runs the forward under ``torch.autocast(bfloat16)``, DeepSpeed
itself in its fp32 mode: the optimizer updates the float32 adapter directly (no separate master
copy), and routers and tau enter the forward in float32. DeepSpeed's own bf16
(``mixed_precision="deepspeed"``) casts every parameter to bf16 when the engine is built, so
the router's float32 path multiplies a bf16 weight and tau moves in ~1% steps.

On ``accelerator: cpu`` the strategy is a *rehearsal*, not a way to train fast: DeepSpeed's CPU
accelerator (``DS_ACCELERATOR=cpu``, chosen automatically where no GPU is visible) with gloo, the
CPU devices given indices (``cpu:0``, ``cpu:1``) as DeepSpeed's engine needs a device rank.
Lightning's own strategy refuses any accelerator but CUDA (docs/multi_gpu.md, "Rehearse before
you rent").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import DeepSpeedPrecision as LightningDeepSpeedPrecision
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import Tensor

MIXED_PRECISION = ("autocast", "deepspeed")


class DeepSpeedPrecision(LightningDeepSpeedPrecision):
    """Lightning's DeepSpeed precision plugin, passing ``scale_wrt_gas=False`` to the engine.

    The loss reaching the backward has already been divided by ``accumulate_grad_batches`` by
    Lightning, so DeepSpeed must not divide it again.

    Args:
        precision: Lightning's precision string.
        mixed_precision: for ``"bf16-mixed"``: ``"autocast"`` runs the forward under
            ``torch.autocast(bfloat16)`` with the parameters' own dtypes kept (DeepSpeed gets no
            ``bf16`` section); ``"deepspeed"`` is Lightning's behaviour (DeepSpeed's bf16 mode,
            which casts every parameter and the batch's float tensors). ``"16-mixed"`` always
            uses DeepSpeed's fp16 (it needs DeepSpeed's loss scaling).
        device: the device type autocast runs on (the strategy sets ``"cpu"`` on CPU).
    """

    def __init__(
        self, precision: Any, mixed_precision: str = "autocast", device: str = "cuda"
    ) -> None:
        super().__init__(precision)
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
            )
        self.mixed_precision = mixed_precision
        self.device = device  # autocast's device type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward, or ``None`` when DeepSpeed handles precision."""
        if self.mixed_precision == "autocast" and self.precision == "bf16-mixed":
            return torch.bfloat16
        return None

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(self.device, dtype=dtype):
            yield

    def convert_input(self, data: Any) -> Any:
        # under autocast the batch keeps its dtypes (ids, masks and counts are not activations)
        return data if self.autocast_dtype is not None else super().convert_input(data)

    def backward(  # type: ignore[override]
        self, tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any
    ) -> None:
        kwargs.setdefault("scale_wrt_gas", False)
        super().backward(tensor, model, optimizer, *args, **kwargs)


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose backward scales for accumulation once.

    Takes Lightning's arguments, plus:

    Args:
        grad_accum_dtype: DeepSpeed's ``data_types.grad_accum_dtype``, the dtype gradients are
            accumulated in over micro-batches (``"fp32"``, ``"bf16"``, ``"fp16"``; ``None``
            leaves DeepSpeed's default, the model's dtype).
        communication_data_type: DeepSpeed's ``communication_data_type``, the dtype gradients
            are reduced across ranks in (same choices; ``None``: DeepSpeed's default).
        mixed_precision: ``"autocast"`` (default) or ``"deepspeed"``, how ``bf16-mixed`` is
            done (:class:`DeepSpeedPrecision`; the module docstring says why).
        throughput_timers: DeepSpeed's throughput timer (``timers.throughput``), which
            synchronises the device twice per micro-batch; off by default (Lightning's own
            logging and ``benchmarks/`` measure speed).

    The dtypes and the timer setting are written into the DeepSpeed config unless a given
    ``config`` already sets them.
    The trainer's precision (``bf16-mixed`` ...) becomes :class:`DeepSpeedPrecision` of that
    precision; any other precision plugin is kept.
    """

    def __init__(
        self,
        *args: Any,
        grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = "fp32",
        communication_data_type: Literal["fp32", "bf16", "fp16"] | None = "fp32",
        mixed_precision: Literal["autocast", "deepspeed"] = "autocast",
        throughput_timers: bool = False,
        **kwargs: Any,
    ) -> None:
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"DeepSpeedStrategy: mixed_precision must be one of {MIXED_PRECISION}, got "
                f"{mixed_precision!r}"
            )
        self.mixed_precision = mixed_precision
        super().__init__(*args, **kwargs)
        timers = self.config.setdefault("timers", {}).setdefault("throughput", {})
        timers.setdefault("enabled", throughput_timers)
        if grad_accum_dtype is not None:
            self.config.setdefault("data_types", {}).setdefault(
                "grad_accum_dtype", grad_accum_dtype
            )
        if communication_data_type is not None:
            self.config.setdefault("communication_data_type", communication_data_type)

    @property
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if type(plugin) is LightningDeepSpeedPrecision:
            plugin = DeepSpeedPrecision(plugin.precision, self.mixed_precision)
        self._precision_plugin = plugin

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()  # Lightning's: CUDA only
            return
        _check_deepspeed_accelerator_is_cpu()
        # DeepSpeed's engine takes the device index as its rank: cpu:0, cpu:1, ...
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        if isinstance(self.precision_plugin, DeepSpeedPrecision):
            self.precision_plugin.device = "cpu"
        DDPStrategy.setup_environment(self)  # skips only Lightning's CUDA-only guard

    def _format_config(self) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, DeepSpeedPrecision) and plugin.autocast_dtype is not None:
            # autocast keeps DeepSpeed in its fp32 mode: no parameter is cast
            self.config.setdefault("bf16", {"enabled": False})
        super()._format_config()

    def save_checkpoint(
        self, checkpoint: dict, filepath: Any, storage_options: Any | None = None
    ) -> None:
        """DeepSpeed's ``engine.save_checkpoint`` (every rank writes its shards), published whole.

        Lightning's DeepSpeed strategy writes straight into ``filepath`` and bypasses any
        CheckpointIO, so a kill or a full disk during the save of a rolling ``last.ckpt`` left
        no complete checkpoint. Here every rank writes into a staging directory beside it; once
        all are done, rank zero renames it to a fresh name and points ``filepath`` (a symlink)
        at it with one atomic ``rename``: ``filepath`` always names a whole checkpoint.
        """
        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.saving")  # the same path on every rank
        if self.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier("medmoe_checkpoint_staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("medmoe_checkpoint_written")
        if self.is_global_zero:
            publish_directory(staging, target)
        self.barrier("medmoe_checkpoint_published")


def publish_directory(staging: Path, target: Path) -> None:
    """Make ``target`` name the complete directory ``staging`` in one atomic step.

    ``staging`` is renamed to ``.<target name>.<n>`` (n counting up) and a symlink to it
    replaces ``target`` with ``os.replace``; the directory ``target`` named before is removed
    afterwards. A ``target`` that is a real directory (written before this existed) is moved
    aside first, so the previous checkpoint survives until the new one is in place.
    """
    previous = target.resolve() if target.is_symlink() else None
    if target.exists() and not target.is_symlink():
        previous = target.with_name(f".{target.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    n = 0
    while (final := target.with_name(f".{target.name}.{n}")).exists():
        n += 1
    staging.rename(final)
    link = target.with_name(f".{target.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    os.replace(link, target)
    if previous is not None and previous != final.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def _check_deepspeed_accelerator_is_cpu() -> None:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cpu":
        raise RuntimeError(
            f"trainer.accelerator is cpu but DeepSpeed chose its {name!r} accelerator: set "
            "DS_ACCELERATOR=cpu in the environment (before Python starts) to rehearse the "
            "DeepSpeed strategy on CPU"
        )
