"""medmoe's distributed strategies: DeepSpeed ZeRO-2 (:class:`DeepSpeedStrategy`) and FSDP2
(:class:`FSDP2Strategy`), each with checkpoints published whole (:func:`publish_directory`).

DeepSpeed under Lightning, with the gradient scaled once for accumulation, not twice:

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
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import Tensor, nn

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
        save_published(
            self,
            filepath,
            lambda path: super(DeepSpeedStrategy, self).save_checkpoint(
                checkpoint, path, storage_options
            ),
        )


def save_published(strategy: Any, filepath: Any, write: Any) -> Path:
    """``write(staging)`` on every rank into one staging directory beside ``filepath``, then
    :func:`publish_directory` on rank zero, with barriers between; returns the target."""
    target = Path(strategy.broadcast(str(filepath)))
    staging = target.with_name(f".{target.name}.saving")  # the same path on every rank
    if strategy.is_global_zero:
        shutil.rmtree(staging, ignore_errors=True)
    strategy.barrier("medmoe_checkpoint_staging")
    write(staging)
    strategy.barrier("medmoe_checkpoint_written")
    if strategy.is_global_zero:
        publish_directory(staging, target)
    strategy.barrier("medmoe_checkpoint_published")
    return target


def publish_directory(staging: Path, target: Path) -> None:
    """Make ``target`` name the complete directory ``staging`` in one atomic step.

    ``staging`` is renamed to ``.<target name>.<n>`` (n counting up) and a symlink to it
    replaces ``target`` with ``os.replace``; the directory ``target`` named before is removed
    afterwards. A ``target`` that is a real directory (written before this existed) is moved
    aside first, so the previous checkpoint survives until the new one is in place. Numbered
    directories no symlink names (a kill fell between the rename and the swap) are removed.
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
    for stale in target.parent.glob(f".{target.name}.*"):  # a kill before a symlink swap
        if stale.name[len(target.name) + 2 :].isdigit() and stale != final:
            shutil.rmtree(stale, ignore_errors=True)


def _check_deepspeed_accelerator_is_cpu() -> None:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cpu":
        raise RuntimeError(
            f"trainer.accelerator is cpu but DeepSpeed chose its {name!r} accelerator: set "
            "DS_ACCELERATOR=cpu in the environment (before Python starts) to rehearse the "
            "DeepSpeed strategy on CPU"
        )


class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
    ``ModelParallelStrategy``: every decoder layer sharded on its own, and the decoder
    (embeddings, final norm) and the LM head as units of their own (:func:`shard_decoder_layers`).

    The parameters keep their own dtypes (``MixedPrecisionPolicy(param_dtype=None)``): the frozen
    base as loaded (bf16 in med.yaml), the adapter's factors, routers and ``log_tau`` in fp32;
    ``precision: bf16-mixed`` runs the forward under ``torch.autocast(bfloat16)``, and gradients
    are reduced in ``reduce_dtype``. FSDP2 needs one dtype per sharded group only among its
    *trainable* parameters, which are all the adapter's. Checkpoints are Lightning's distributed
    (sharded) checkpoints holding the adapter and the optimizer state only, published whole
    (:func:`publish_directory`); ``python -m medmoe.zero_to_adapter`` converts them.

    On ``accelerator: cpu`` it runs with gloo: a rehearsal and test mode, not for speed.

    Args:
        reduce_dtype: the dtype gradients are reduced across ranks in (``"fp32"``, ``"bf16"``).
        save_distributed_checkpoint: as Lightning's (``True``: one shard file per rank).
        process_group_backend: ``None`` picks NCCL on GPUs, gloo on CPU.
    """

    def __init__(
        self,
        reduce_dtype: Literal["fp32", "bf16"] = "fp32",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(
                f"FSDP2Strategy: reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, got "
                f"{reduce_dtype!r}"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.reduce_dtype = REDUCE_DTYPES[reduce_dtype]

    def setup_environment(self) -> None:
        # data parallel over every process (Lightning's "auto" is one group per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        shard_decoder_layers(
            self.lightning_module.model, self.device_mesh["data_parallel"], self.reduce_dtype
        )
        super().setup(trainer)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        save_published(
            self,
            filepath,
            lambda path: super(FSDP2Strategy, self).save_checkpoint(
                checkpoint, path, storage_options
            ),
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """The adapter tensors and optimizer state of a sharded checkpoint (the frozen base is
        not in it: Lightning's loader would ask the checkpoint for every key of the model)."""
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / _FSDP2_METADATA).is_file():
            raise ValueError(
                f"checkpoint {path} is not a sharded FSDP2 checkpoint directory (no "
                f"{_FSDP2_METADATA} in it): resume an FSDP2 run from the last.ckpt it wrote"
            )
        keep = self.lightning_module.trainable_state_keys()
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if k in keep}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key])
        return torch.load(path / _FSDP2_METADATA, weights_only=weights_only)


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_FSDP2_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


@contextmanager
def unsharded(model: nn.Module) -> Generator[nn.Module, None, None]:
    """Inside the block every FSDP2 unit of ``model`` holds its whole parameters (a collective:
    every rank must enter); a model that is not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def shard_decoder_layers(model: nn.Module, mesh: Any, reduce_dtype: torch.dtype) -> None:
    """``fully_shard`` every decoder layer (the classes in the model's ``_no_split_modules``, as
    transformers' and accelerate's FSDP wrapping), the decoder (embeddings, final norm) and the
    LM head.

    The decoder and the head are units of their own, and the model is none, because medmoe's
    loss calls them directly (:func:`medmoe.losses.target_token_losses`) while generation calls
    the model: FSDP2 makes whichever unit runs first a root, and a model-level unit first
    initialised under the decoder would be refused. A head tied to the input embeddings shares
    the decoder's unit, which then stays unsharded from its forward to its backward. No
    parameter is cast (``param_dtype=None``): each keeps its dtype;
    gradients are reduced in ``reduce_dtype``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules: "
            "FSDP2Strategy shards one decoder layer at a time"
        )
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    decoder_params = {id(p) for p in decoder.parameters()}
    tied = head is not None and any(id(p) in decoder_params for p in head.parameters())
    fully_shard(decoder, mesh=mesh, mp_policy=policy, reshard_after_forward=not tied)
    if head is not None and not tied:
        fully_shard(head, mesh=mesh, mp_policy=policy)
