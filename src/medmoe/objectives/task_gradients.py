"""Per-task gradients of every LoRA factor from one backward pass (the first half of Ortho-LoRA).

Sequences of a batch do not interact, so the gradient of a linear factor ``W`` (``y = W v``) is a
sum over samples and tokens, ``dW = sum_b sum_t g[b, t] v[b, t]^T`` with ``g = dL/dy``. Hooks
keep ``v`` from the forward and receive ``g`` in the backward; a task one-hot ``onehot`` [K, B]
then sums the per-sample gradients into per-task ones, with no loop over tasks::

    dW_k = sum_b onehot[k, b] sum_t g[b, t] v[b, t]^T                                 [K, out, in]

* peft LoRA (``h = W0 x + s B A u``, ``u = dropout(x)``): ``A``'s output ``a = A u`` and ``B``'s
  output ``B a`` are hooked, so ``dA_k`` comes from (``dL/da``, ``u``) and ``dB_k`` from
  (``dL/d(B a)``, ``a``); the scale ``s`` is already inside ``dL/d(B a)``.
* :class:`MoELoRALinear` (``h = W0 x + B (w * A u)``, ``w = gates[..., slot_expert] * slot_scale``):
  the layer's output gradient ``g`` is hooked and, with ``A u`` and ``w`` recomputed in the hook,
  ``dB_k = sum g (w * A u)^T`` and ``dA_k = sum (w * B^T g) u^T``.

Routers, tau and every other parameter keep their ordinary gradient. The per-task gradients are
the contributions of each task's samples to the gradient of whatever loss is back-propagated, so
they sum to the ordinary gradient; tokens that carry no loss and that no loss-carrying token
attends to (padding) contribute exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmoe.adapters.moe_lora import MoELoRALinear


def _peft_lora_layer_type() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return LoraLayer


def _factor_sites(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``("moe", layer)`` and ``("peft", lora_layer)`` for every LoRA site of ``model``."""
    lora_layer = _peft_lora_layer_type()
    sites = []
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            sites.append(("moe", module))
        elif lora_layer is not None and isinstance(module, lora_layer):
            if adapter_name not in module.lora_A:
                continue
            if adapter_name in getattr(module, "lora_variant", {}):
                raise NotImplementedError(
                    f"{type(module).__name__} uses a LoRA variant (e.g. DoRA) for adapter "
                    f"{adapter_name!r}; per-task gradients support plain LoRA only"
                )
            factor_a, factor_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
            if not (isinstance(factor_a, nn.Linear) and isinstance(factor_b, nn.Linear)):
                raise NotImplementedError(
                    f"{type(module).__name__}: per-task gradients support LoRA factors that are "
                    f"nn.Linear, got {type(factor_a).__name__}"
                )
            sites.append(("peft", module))
    return sites


def _site_factors(kind: str, module: nn.Module, adapter_name: str) -> tuple[Tensor, Tensor]:
    if kind == "moe":
        return module.lora_A, module.lora_B
    return module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight


def lora_factors(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every trainable LoRA factor (A and B), in model order."""
    names = {id(p): n for n, p in model.named_parameters()}
    factors = []
    for kind, module in _factor_sites(model, adapter_name):
        for param in _site_factors(kind, module, adapter_name):
            if param.requires_grad:
                factors.append((names[id(param)], param))
    return factors


def task_one_hot(task_ids: Tensor, num_tasks: int) -> Tensor:
    """[B] task ids -> [K, B] boolean one-hot (no host synchronisation)."""
    tasks = torch.arange(num_tasks, device=task_ids.device)
    return task_ids[None, :] == tasks[:, None]


def per_task_linear_grad(grad_out: Tensor, inputs: Tensor, one_hot: Tensor) -> Tensor:
    """``dW_k = sum_b onehot[k, b] sum_t g[b, t] v[b, t]^T`` for ``y = W v``: [K, out, in].

    ``grad_out`` [B, ..., out] and ``inputs`` [B, ..., in] share their leading dimensions; the
    products run in ``grad_out``'s dtype (what autograd uses for the weight gradient).
    """
    batch = one_hot.shape[1]
    g = grad_out.reshape(batch, -1, grad_out.shape[-1])  # [B, L, out]
    v = inputs.reshape(batch, -1, inputs.shape[-1]).to(g.dtype)  # [B, L, in]
    per_sample = torch.bmm(g.transpose(1, 2), v)  # [B, out, in]
    per_task = one_hot.to(g.dtype) @ per_sample.reshape(batch, -1)  # [K, out * in]
    return per_task.reshape(-1, g.shape[-1], v.shape[-1])  # [K, out, in]


def _autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    return (
        device_type,
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_enabled(device_type),
    )


class TaskGradientGroup:
    """Factors of one shape, dtype and device, with a per-task gradient buffer [F, K, n]."""

    def __init__(self, names: list[str], params: list[nn.Parameter], num_tasks: int) -> None:
        self.names = names
        self.params = params
        first = params[0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        self.buffer = torch.zeros(
            len(params), num_tasks, first.numel(), dtype=dtype, device=first.device
        )  # [F, K, n]

    def view(self, index: int) -> Tensor:
        """Factor ``index``'s slice of the buffer, shaped [K, *param.shape]."""
        return self.buffer[index].view(-1, *self.params[index].shape)


class TaskGradientCapture:
    """Accumulates per-task gradients of every LoRA factor of ``model`` during backward.

    Hooks are registered once, on construction, and do nothing outside :meth:`capture` (or
    between ``set_task_ids(ids)`` and ``set_task_ids(None)``). Run the *forward* inside the
    capture; the backward may come after it (the hooks travel with the autograd graph). Gradients
    accumulate over backward passes until :meth:`reset`.

    Args:
        model: a model with peft LoRA layers or :class:`MoELoRALinear` layers.
        num_tasks: K; task ids must lie in ``0..K-1``.
        adapter_name: the peft adapter whose factors are tracked.
    """

    def __init__(self, model: nn.Module, num_tasks: int, *, adapter_name: str = "default") -> None:
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self._one_hot: Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._slots: dict[int, Tensor] = {}  # id(param) -> [K, *shape] view of a group buffer
        self.captured = False  # whether any gradient arrived since the last reset

        factors = lora_factors(model, adapter_name)
        if not factors:
            raise ValueError(
                f"{type(model).__name__} has no trainable LoRA factors (peft LoRA adapter "
                f"{adapter_name!r} or MoELoRALinear)"
            )
        by_kind: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        for name, param in factors:
            by_kind.setdefault((tuple(param.shape), param.dtype, param.device), []).append(
                (name, param)
            )
        self.groups = [
            TaskGradientGroup([n for n, _ in members], [p for _, p in members], num_tasks)
            for members in by_kind.values()
        ]
        for group in self.groups:
            for index, param in enumerate(group.params):
                self._slots[id(param)] = group.view(index)

        for kind, module in _factor_sites(model, adapter_name):
            if kind == "moe":
                self._hook_moe(module)
            else:
                self._hook_linear(module.lora_A[adapter_name])
                self._hook_linear(module.lora_B[adapter_name])

    # ----------------------------------------------------------------- public API
    @property
    def factor_names(self) -> list[str]:
        return [name for group in self.groups for name in group.names]

    def set_task_ids(self, task_ids: Tensor | None) -> None:
        """Start capturing with the batch's task ids ([B] integers), or stop with ``None``.

        Checks the ids' range (one host synchronisation per batch, not per layer).
        """
        if task_ids is None:
            self._one_hot = None
            return
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1 or task_ids.is_floating_point() or task_ids.is_complex():
            raise ValueError(
                f"task ids must be a 1-D integer tensor [B], got dtype {task_ids.dtype} and "
                f"shape {tuple(task_ids.shape)}"
            )
        if bool(((task_ids < 0) | (task_ids >= self.num_tasks)).any()):
            raise ValueError(
                f"task ids must lie in 0..{self.num_tasks - 1}, got {task_ids.tolist()}"
            )
        device = self.groups[0].buffer.device
        self._one_hot = task_one_hot(task_ids.to(device), self.num_tasks)

    @contextmanager
    def capture(self, task_ids: Tensor) -> Iterator[TaskGradientCapture]:
        """Capture the forwards run inside the block (their backward may come later)."""
        self.set_task_ids(task_ids)
        try:
            yield self
        finally:
            self.set_task_ids(None)

    def gradients(self) -> dict[str, Tensor]:
        """Per-task gradient of every factor since the last :meth:`reset`: name -> [K, *shape]."""
        return {
            name: group.view(index).clone()
            for group in self.groups
            for index, name in enumerate(group.names)
        }

    def reset(self) -> None:
        for group in self.groups:
            group.buffer.zero_()
        self.captured = False

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._one_hot = None

    # ----------------------------------------------------------------- hooks
    def _check_batch(self, inputs: Tensor, one_hot: Tensor) -> None:
        if inputs.shape[0] != one_hot.shape[1]:
            raise ValueError(
                f"a LoRA layer's input has batch dimension {inputs.shape[0]} but the capture "
                f"has {one_hot.shape[1]} task ids; inputs must be [B, ..., d]"
            )

    def _accumulate(self, param: Tensor, per_task: Tensor) -> None:
        slot = self._slots[id(param)]
        slot.add_(per_task.to(slot.dtype))
        self.captured = True

    def _hook_linear(self, linear: nn.Linear) -> None:
        """A peft LoRA factor: keep its input, receive its output's gradient."""
        param = linear.weight
        if not param.requires_grad:
            return

        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            one_hot = self._one_hot
            if one_hot is None or not output.requires_grad:
                return
            v = inputs[0].detach()
            self._check_batch(v, one_hot)
            output.register_hook(partial(self._linear_backward, param, v, one_hot))

        self._handles.append(linear.register_forward_hook(forward_hook))

    def _linear_backward(self, param: Tensor, v: Tensor, one_hot: Tensor, grad: Tensor) -> None:
        with torch.no_grad():
            self._accumulate(param, per_task_linear_grad(grad, v, one_hot))

    def _hook_moe(self, layer: MoELoRALinear) -> None:
        """A MoE-LoRA layer: keep ``x`` and ``u = dropout(x)``, receive the output gradient."""
        dropped: dict[str, Tensor] = {}

        def dropout_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._one_hot is not None:
                dropped["u"] = output.detach()

        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            one_hot = self._one_hot
            u = dropped.pop("u", None)
            if one_hot is None or u is None or not output.requires_grad:
                return
            if not (layer.lora_A.requires_grad or layer.lora_B.requires_grad):
                return
            x = inputs[0].detach()
            self._check_batch(x, one_hot)
            autocast = _autocast_state(x.device.type)
            output.register_hook(partial(self._moe_backward, layer, x, u, one_hot, autocast))

        self._handles.append(layer.dropout.register_forward_hook(dropout_hook))
        self._handles.append(layer.register_forward_hook(forward_hook))

    def _moe_backward(
        self,
        layer: MoELoRALinear,
        x: Tensor,
        u: Tensor,
        one_hot: Tensor,
        autocast: tuple[str, torch.dtype, bool],
        grad: Tensor,
    ) -> None:
        device_type, autocast_dtype, enabled = autocast
        with torch.no_grad():
            # Recompute the expert path as the forward did (same autocast state).
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
                gates = layer.gates(x)  # [..., N]
                slots = gates.index_select(-1, layer.slot_expert) * layer.slot_scale  # [..., R]
                hidden = F.linear(u, layer.lora_A)  # [..., R]
            weights = slots.to(grad.dtype)
            if layer.lora_B.requires_grad:
                expert_in = hidden.to(grad.dtype) * weights  # input of B: [..., R]
                self._accumulate(layer.lora_B, per_task_linear_grad(grad, expert_in, one_hot))
            if layer.lora_A.requires_grad:
                grad_hidden = (grad @ layer.lora_B.to(grad.dtype)) * weights  # [..., R]
                self._accumulate(layer.lora_A, per_task_linear_grad(grad_hidden, u, one_hot))


def per_task_gradients_reference(
    model: nn.Module,
    loss_fn_per_task: Callable[[int], Tensor],
    num_tasks: int,
    *,
    adapter_name: str = "default",
) -> dict[str, Tensor]:
    """Per-task LoRA-factor gradients by one forward and backward per task (K times the cost).

    ``loss_fn_per_task(k)`` runs the model and returns the part of the batch loss that comes
    from task ``k``'s samples (same normalisation as the full loss, e.g. the other tasks' labels
    masked but the batch's token count as denominator). ``.grad`` is left untouched.
    Returns name -> [K, *shape], keyed like :meth:`TaskGradientCapture.gradients`.
    """
    factors = lora_factors(model, adapter_name)
    params = [p for _, p in factors]
    per_task: list[list[Tensor]] = []
    for task in range(num_tasks):
        grads = torch.autograd.grad(loss_fn_per_task(task), params, allow_unused=True)
        per_task.append(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
    return {
        name: torch.stack([per_task[task][index] for task in range(num_tasks)])
        for index, (name, _) in enumerate(factors)
    }
