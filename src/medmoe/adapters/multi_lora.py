"""Multi-LoRA baseline: one LoRA per domain task, each sample routed by its task id.

``h = W0 x + (alpha / r) B_t A_t x`` with ``t`` the task of the sample ``x`` belongs to, at
training and at evaluation. The T adapters of a layer are stacked (``A``: [T, r, d_in], ``B``:
[T, d_out, r]) and gathered per sample, so the forward has no loop over tasks. Task id ``-1``
means no adapter (the base model) for that sample.

Only the domain tasks (task ids ``0..T-1``, the data's ``tasks``) have an adapter, as in the
paper's "Multi-LoRA (3 tasks)". General replay samples (ids ``>= T``, ``is_general``) have no
task of their own: ``replay_routing`` decides what they train (see :class:`MultiLoRA`). A
general benchmark is scored as a deployed multi-LoRA would answer a general question: under
each domain adapter in turn (:mod:`medmoe.callbacks.scoring` reports the mean and the worst).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from medmoe.adapters.capabilities import TaskRoutedAdapter
from medmoe.adapters.config import LLAMA_TARGETS
from medmoe.adapters.format import ADAPTER_WEIGHTS, AdapterDescription
from medmoe.adapters.inject import inject_adapter_layers
from medmoe.adapters.layer import AdapterLayer, layer_adapter_tensors
from medmoe.adapters.lora import check_lora_fields
from medmoe.adapters.moe_lora import ADAPTER_DTYPES, adapter_parameter_dtype
from medmoe.adapters.registry import register_method
from medmoe.adapters.spec import AdapterSpec
from medmoe.adapters.state import (
    adapters_disabled,
    copy_matching_tensors,
    read_safetensors,
    safetensors_size,
    write_safetensors,
)

METHOD = "MultiLoRA"
ROUTING_ATTRIBUTE = "medmoe_task_routing"


class MultiLoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus T task-specific LoRAs, the sample's task picking one.

    Args:
        base: the frozen linear layer ``W0``.
        num_tasks: T, the number of task adapters.
        r: rank of every task adapter.
        lora_alpha: every adapter's update is scaled by ``lora_alpha / r``.
        dropout: dropout on the LoRA path's input.
        adapter_dtype: ``"float32"`` keeps the factors in float32 on a half-precision base
            (:func:`~medmoe.adapters.moe_lora.adapter_parameter_dtype`), ``"base"`` in its dtype;
            the forward computes in the input's dtype.

    Set the batch's task ids ([B] integers, or a 0-dim tensor: one task for every sample) with
    :meth:`set_task_ids` before the forward; the input's first dimension must be the batch.
    """

    # the adapter-layer contract (medmoe.adapters.layer.AdapterLayer)
    adapter_tensor_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        adapter_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if num_tasks < 1 or r < 1:
            raise ValueError(f"need num_tasks >= 1 and r >= 1, got num_tasks={num_tasks}, r={r}")
        self.base = base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.num_tasks = num_tasks
        self.r = r
        self.scaling = lora_alpha / r
        self.adapter_enabled = True
        self.task_ids: Tensor | None = None
        factory = {
            "device": base.weight.device,
            "dtype": adapter_parameter_dtype(base.weight.dtype, adapter_dtype),
        }
        self.lora_A = nn.Parameter(torch.empty(num_tasks, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_tasks, self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Every A as ``nn.Linear``'s Kaiming-uniform (bound 1/sqrt(d_in)), every B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def set_task_ids(self, task_ids: Tensor | None) -> None:
        self.task_ids = task_ids

    def active_parameter_count(self) -> int:
        """Parameters one token uses (Table 4): one task's adapter, not all T."""
        return self.r * (self.in_features + self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.adapter_enabled:
            return out
        task_ids = self.task_ids
        if task_ids is None:
            raise RuntimeError(
                "MultiLoRALinear has no task ids: every sample needs its task's adapter, at "
                "training and evaluation; call MultiLoRA.prepare_batch(model, batch) before "
                "the forward, or run it inside MultiLoRA.task_context(model, task)"
            )
        batch = x.shape[0]
        if task_ids.dim() == 0:  # one task for the whole batch
            task_ids = task_ids.expand(batch)
        if batch != task_ids.shape[0]:
            raise ValueError(
                f"input batch dimension {batch} does not match {task_ids.shape[0]} task ids"
            )
        hidden = self.dropout(x).reshape(batch, -1, self.in_features)  # [B, L, d_in]
        # factors in the activations' dtype (float32 factors on a bf16 base compute in bf16)
        gather = task_ids.clamp_min(0)  # id -1 (no adapter) gathers adapter 0, masked below
        a = self.lora_A.index_select(0, gather).to(hidden.dtype)  # [B, r, d_in]
        b = self.lora_B.index_select(0, gather).to(hidden.dtype)  # [B, d_out, r]
        low = torch.bmm(hidden, a.transpose(1, 2))  # [B, L, r]
        delta = torch.bmm(low, b.transpose(1, 2))  # [B, L, d_out]
        scale = (task_ids >= 0).to(delta.dtype)[:, None, None] * self.scaling  # [B, 1, 1]
        return out + (delta * scale).reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_tasks={self.num_tasks}, r={self.r}, scaling={self.scaling:g}"
        )


def multi_lora_layers(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    """``(qualified name, layer)`` for every multi-LoRA layer, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


class TaskRouting:
    """The task ids of one model's multi-LoRA layers, kept from going stale.

    Ids set for an evaluation forward (grad disabled) serve one top-level forward and are then
    cleared. Ids set in training (grad enabled) stay until the next batch, since gradient
    checkpointing re-runs the layers in the backward; a no-grad forward that finds such
    training ids raises instead of silently reusing them. Ids set with ``pinned=True``
    (:meth:`MultiLoRA.task_context`, e.g. around ``generate``) stay until unpinned.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [layer for _, layer in multi_lora_layers(model)]
        self.set_with_grad = False
        self.pinned = False
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    @property
    def task_ids(self) -> Tensor | None:
        return self.layers[0].task_ids

    def set(self, task_ids: Tensor | None, *, pinned: bool = False) -> None:
        for layer in self.layers:
            layer.set_task_ids(task_ids)
        self.set_with_grad = torch.is_grad_enabled()
        self.pinned = pinned and task_ids is not None

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        stale = self.set_with_grad and not self.pinned and self.task_ids is not None
        if stale and not torch.is_grad_enabled():
            raise RuntimeError(
                "multi-LoRA task ids left from a training batch would route this no-grad "
                "(evaluation) forward: call MultiLoRA.prepare_batch(model, batch) with this "
                "batch's task ids, or wrap it in MultiLoRA.task_context(model, task)"
            )

    def _after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self.pinned and not torch.is_grad_enabled():
            self.set(None)


REPLAY_ROUTINGS = ("spread", "base")


@register_method(METHOD)
@dataclass
class MultiLoRA(TaskRoutedAdapter, AdapterSpec):
    """One LoRA per domain task; the batch's task ids pick each sample's adapter (train, eval).

    Attributes:
        num_tasks: number of domain-task adapters (the data's domain tasks come first, ids
            ``0..num_tasks-1``); may be left out when ``task_names`` is given.
        task_names: optional domain task names, in task-id order (``task_names[i]`` has id
            ``i``).
        replay_routing: what a general replay sample (task id ``>= num_tasks``, flagged
            ``is_general``) trains: ``"spread"`` (the default) deals the batch's replay samples
            out to the domain adapters in turn, so every adapter sees general data as the other
            methods' adapters do; ``"base"`` runs them through the base model alone (they train
            nothing).
        r: rank of every task adapter.
        lora_alpha: every adapter's update is scaled by ``lora_alpha / r``.
        dropout: dropout on the LoRA path's input, in [0, 1).
        target_modules: names of the adapted linear layers of every decoder layer.
        task_key: the batch key holding the task ids (a LongTensor [B]).
        adapter_dtype: ``"float32"`` (default, as peft): float32 factors on a bf16/fp16 base;
            ``"base"``: the base's dtype.
    """

    num_tasks: int | None = None
    task_names: list[str] | None = None
    r: int = 16
    lora_alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    task_key: str = "task_id"
    adapter_dtype: Literal["float32", "base"] = "float32"
    replay_routing: str = "spread"

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        if self.replay_routing not in REPLAY_ROUTINGS:
            raise ValueError(
                f"unknown replay_routing {self.replay_routing!r}; accepted: "
                f"{', '.join(REPLAY_ROUTINGS)}"
            )
        if self.task_names is not None:
            self.task_names = [str(name) for name in self.task_names]
            if not self.task_names or len(set(self.task_names)) != len(self.task_names):
                raise ValueError(
                    f"task_names must be a non-empty list of distinct names, got {self.task_names}"
                )
            if self.num_tasks is not None and self.num_tasks != len(self.task_names):
                raise ValueError(
                    f"num_tasks={self.num_tasks} disagrees with the {len(self.task_names)} "
                    f"task_names; give one of them or make them agree"
                )
            self.num_tasks = len(self.task_names)
        if self.num_tasks is None:
            raise ValueError("num_tasks is required (or give task_names): got neither")
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {self.num_tasks!r}")
        check_lora_fields(self.r, self.lora_alpha, self.dropout, self.target_modules)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got "
                f"{self.adapter_dtype!r}"
            )

    def task_index(self, name: str) -> int:
        """The task id of ``name`` (needs ``task_names``)."""
        if self.task_names is None or name not in self.task_names:
            raise KeyError(f"unknown task {name!r}; known: {self.task_names}")
        return self.task_names.index(name)

    # ----------------------------------------------------------------- AdapterSpec
    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the target linears of every decoder layer by :class:`MultiLoRALinear`."""
        if multi_lora_layers(model):
            raise ValueError("the model already carries multi-LoRA layers; apply works once")
        inject_adapter_layers(
            model,
            self.target_modules,
            lambda linear, index: MultiLoRALinear(
                linear,
                self.num_tasks,
                self.r,
                self.lora_alpha,
                self.dropout,
                adapter_dtype=self.adapter_dtype,
            ),
        )
        object.__setattr__(model, ROUTING_ATTRIBUTE, TaskRouting(model))
        return model

    def prepare_batch(self, model: nn.Module, batch: Mapping[str, Tensor]) -> None:
        """Give every layer the batch's adapter ids (checked: present, 1-D integers, in range).

        Domain samples get their task's adapter; general replay samples are routed by
        ``replay_routing``.
        """
        if self.task_key not in batch:
            raise KeyError(
                f"the batch has no {self.task_key!r}: MultiLoRA picks each sample's adapter by "
                f"its task id at training and evaluation (keys: {sorted(batch)})"
            )
        self.set_task_ids(model, self.adapter_ids(batch[self.task_key], batch.get("is_general")))

    def adapter_ids(self, task_ids: Tensor, is_general: Tensor | None = None) -> Tensor:
        """[B] task ids -> [B] adapter ids: domain ids unchanged, replay samples (ids beyond the
        domain adapters) dealt to adapters ``0, 1, ..`` in turn (``"spread"``) or -1
        (``"base"``: no adapter). A sample beyond the adapters that is not general is an error.
        """
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1:
            return task_ids
        replay = task_ids >= self.num_tasks  # [B]
        if not bool(replay.any()):
            return task_ids
        if is_general is None:
            raise ValueError(
                f"task ids {sorted(set(task_ids[replay].tolist()))} lie beyond the adapters "
                f"0..{self.num_tasks - 1} and the batch has no 'is_general' flags to mark them "
                "as general replay"
            )
        if bool((replay & ~is_general.to(replay.device).bool()).any()):
            raise ValueError(
                f"domain samples with task ids {sorted(set(task_ids[replay].tolist()))} but "
                f"MultiLoRA has adapters for task ids 0..{self.num_tasks - 1} only: set num_tasks "
                "to the number of domain tasks (the data's tasks, not its replay)"
            )
        if self.replay_routing == "base":
            dealt = torch.full_like(task_ids, -1)
        else:  # the k-th replay sample of the batch -> adapter k mod num_tasks
            dealt = (replay.long().cumsum(0) - 1) % self.num_tasks
        return torch.where(replay, dealt, task_ids)

    def set_task_ids(
        self, model: nn.Module, task_ids: Tensor | int | None, *, pinned: bool = False
    ) -> None:
        """Set (or, with ``None``, clear) the task ids every multi-LoRA layer uses.

        ``task_ids``: [B] integers, or one int / 0-dim tensor for every sample of the batch.
        Checked: integers in ``0..num_tasks-1``, or -1 for no adapter (one host
        synchronisation per batch).
        """
        routing: TaskRouting | None = getattr(model, ROUTING_ATTRIBUTE, None)
        if routing is None:
            raise ValueError("the model carries no multi-LoRA layers: call MultiLoRA.apply first")
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids)
            if task_ids.dim() > 1 or task_ids.is_floating_point() or task_ids.is_complex():
                raise ValueError(
                    f"task ids must be a 1-D integer tensor [B] or one integer, got dtype "
                    f"{task_ids.dtype} and shape {tuple(task_ids.shape)}"
                )
            task_ids = task_ids.to(device=routing.layers[0].lora_A.device, dtype=torch.long)
            if bool(((task_ids < -1) | (task_ids >= self.num_tasks)).any()):
                raise ValueError(
                    f"task ids must lie in 0..{self.num_tasks - 1} (or -1: no adapter), got "
                    f"{task_ids.tolist()}; MultiLoRA has one adapter per domain task"
                )
        routing.set(task_ids, pinned=pinned)

    @contextmanager
    def task_context(self, model: nn.Module, task: Tensor | int | str) -> Iterator[nn.Module]:
        """Route every forward inside the block by ``task`` (a task id, a task name, or [B] ids),
        e.g. around ``model.generate`` or a scoring loop that has no batch dict."""
        if isinstance(task, str):
            task = self.task_index(task)
        self.set_task_ids(model, task, pinned=True)
        try:
            yield model
        finally:
            self.set_task_ids(model, None)

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        with adapters_disabled(model):
            yield model

    def check_saveable(self, model: nn.Module) -> None:
        if not multi_lora_layers(model):
            raise ValueError("the model carries no multi-LoRA layers: call MultiLoRA.apply first")

    def save_size(self, model: nn.Module, description_bytes: int) -> int:
        return safetensors_size(layer_adapter_tensors(model)) + description_bytes

    def write_files(self, model: nn.Module, staging: Path) -> None:
        """``adapter_model.safetensors``: every layer's stacked A and B."""
        tensors = {
            k: v.detach().contiguous().cpu() for k, v in layer_adapter_tensors(model).items()
        }
        write_safetensors(staging / ADAPTER_WEIGHTS, tensors)

    def read_files(
        self, model: nn.Module, directory: Path, description: AdapterDescription
    ) -> nn.Module:
        """Load the saved adapters (adapting ``model`` first if it has no multi-LoRA layers);
        the file's ``num_tasks``, ``r`` and ``target_modules`` must be this method's."""
        weights_path = directory / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise FileNotFoundError(f"no adapter weights at {weights_path}")
        saved_config = MultiLoRA(**description.config)
        for key in ("num_tasks", "r", "target_modules"):
            if getattr(saved_config, key) != getattr(self, key):
                raise ValueError(
                    f"{description.path}: {key}={getattr(saved_config, key)!r} but this "
                    f"MultiLoRA has {key}={getattr(self, key)!r}"
                )
        saved = read_safetensors(weights_path)  # before touching the model
        if not multi_lora_layers(model):
            self.apply(model)
        copy_matching_tensors(layer_adapter_tensors(model), saved, weights_path)
        return model
