"""Ortho-LoRA: per-task gradient projection inside each LoRA factor (PCGrad-style).

For every LoRA factor ``W`` (each ``A`` and each ``B`` separately) and tasks ``i != j`` with
per-task gradients ``g_i``, ``g_j`` of ``W``:

**Rule** (PCGrad's sequential projection, Yu et al. 2020, applied per factor). Each task ``i``
starts from ``g'_i = g_i`` and visits the other tasks ``j`` in an order ``order_i``; whenever
``<g'_i, g_j> < 0`` it removes the conflicting component against ``j``'s *original* gradient::

    g'_i <- g'_i - (<g'_i, g_j> / ||g_j||^2) g_j

The factor's gradient becomes ``sum_i g'_i``. A pair that does not conflict (inner product
>= 0, zero gradients included) changes nothing, so a factor without conflicts keeps its
ordinary gradient bit for bit. With two tasks both conflicting gradients end orthogonal to the
other's original gradient; with more, ``g'_i`` is orthogonal to the last ``g_j`` it was
projected against. ``order_i`` is either ascending task id (``order="fixed"``) or, as in PCGrad,
a random permutation drawn per task and per :meth:`OrthoLoRA.project` call from a generator
seeded once (``order="shuffle"``): deterministic for a given seed, shared by all factors.

``g_i`` is task ``i``'s share of the back-propagated loss's gradient
(:mod:`medmoe.objectives.task_gradients`): with a token-mean loss (``loss_normalization:
step_tokens``), each task weighs by its target tokens; with ``task_mean``
(:func:`medmoe.losses.task_mean_objective`) every task present in the step weighs the same.

**Projected tasks.** By default every task id is projected against every other. With
``projected_tasks`` (``MedMoEModule(ortho_tasks="domain")``: the domain tasks, as in the
Ortho-LoRA paper, which has no replay) the rule runs among those tasks only; any other task
``r`` (general replay) keeps ``g'_r = g_r``, is never projected against, and is added as it is.

**Conflict statistics** (:meth:`ProjectionReport.task_conflicts`, logged per optimizer step as
``ortho/conflict_rate`` and ``ortho/mean_cosine``): over the whole adapter (all factors
concatenated, so ``<g_i, g_j> = sum_f gram[f, i, j]``), the share of pairs ``i < j`` of projected
tasks, both with a non-zero gradient in the step, whose cosine is negative, and their mean
cosine. ``ortho/conflict_fraction`` keeps the per-factor count over all task pairs.

Every ``g'_i`` is a combination of the original gradients, ``g'_i = sum_j C_ij g_j``, so the
sequence runs on the K x K Gram matrices of all factors at once (vectorised over factors and
tasks); only the final ``sum_i g'_i = sum_j (sum_i C_ij) g_j`` touches the full gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medmoe.objectives.task_gradients import TaskGradientCapture

ORDERS = ("shuffle", "fixed")
ORTHO_TASKS = ("all", "domain")  # MedMoEModule's ortho_tasks: every task, or domain tasks only


def projection_orders(
    num_tasks: int, order: str = "fixed", generator: torch.Generator | None = None
) -> Tensor:
    """The order each task visits the others in: [K, K-1], row ``i`` lists every ``j != i``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    tasks = torch.arange(num_tasks).expand(num_tasks, num_tasks)  # [K, K]
    others = tasks[~torch.eye(num_tasks, dtype=torch.bool)].view(num_tasks, num_tasks - 1)
    if order == "shuffle":
        keys = torch.rand(num_tasks, num_tasks - 1, generator=generator)  # [K, K-1]
        others = others.gather(1, keys.argsort(dim=1))
    return others


def pcgrad_coefficients(gram: Tensor, orders: Tensor) -> Tensor:
    """``C`` with ``g'_i = sum_j C[f, i, j] g_j`` under the module's rule: [F, K, K] -> [F, K, K].

    Args:
        gram: inner products of the original per-task gradients, ``gram[f, i, j] = <g_i, g_j>``.
        orders: [K, K-1] from :func:`projection_orders`.
    """
    factors, num_tasks, _ = gram.shape
    coeff = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device).repeat(factors, 1, 1)
    sq_norm = gram.diagonal(dim1=1, dim2=2)  # [F, K]
    rows = torch.arange(num_tasks, device=gram.device)
    orders = orders.to(gram.device)
    tiny = torch.finfo(gram.dtype).tiny
    for step in range(num_tasks - 1):  # sequential by definition; each step covers all i and f
        j = orders[:, step]  # [K]: the task each task i is projected against now
        against = gram[:, :, j].transpose(1, 2)  # [F, K(i), K(l)] = <g_l, g_{j_i}>
        dots = (coeff * against).sum(-1)  # [F, K] = <g'_i, g_{j_i}>
        norms = sq_norm[:, j]  # [F, K] = ||g_{j_i}||^2
        shift = torch.where(dots < 0, dots / norms.clamp_min(tiny), torch.zeros_like(dots))
        coeff[:, rows, j] = coeff[:, rows, j] - shift
    return coeff


def subset_coefficients(gram: Tensor, orders: Tensor, tasks: Sequence[int] | None) -> Tensor:
    """:func:`pcgrad_coefficients` among ``tasks`` only (``None``: all): [F, K, K] -> [F, K, K].

    ``orders`` is [S, S-1] over positions in ``tasks``. Every other task ``r`` keeps row and
    column ``r`` of the identity: ``g'_r = g_r``, and no task is projected against ``g_r``.
    """
    if tasks is None:
        return pcgrad_coefficients(gram, orders)
    index = torch.as_tensor(list(tasks), dtype=torch.long, device=gram.device)
    sub_gram = gram.index_select(1, index).index_select(2, index)  # [F, S, S]
    factors, num_tasks, _ = gram.shape
    coeff = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device).repeat(factors, 1, 1)
    coeff[:, index[:, None], index[None, :]] = pcgrad_coefficients(sub_gram, orders)
    return coeff


def project_task_gradients(
    task_grads: Tensor,
    order: str = "fixed",
    generator: torch.Generator | None = None,
    tasks: Sequence[int] | None = None,
) -> Tensor:
    """The projected per-task gradients ``g'_i`` of one factor: [K, ...] -> [K, ...].

    ``tasks``: the task ids projected among (the others are returned unchanged); ``None``: all.
    """
    num_tasks = task_grads.shape[0]
    flat = task_grads.reshape(1, num_tasks, -1)  # [1, K, n]
    gram = flat @ flat.transpose(1, 2)  # [1, K, K]
    projected = num_tasks if tasks is None else len(tasks)
    coeff = subset_coefficients(gram, projection_orders(projected, order, generator), tasks)
    return (coeff @ flat).reshape(task_grads.shape)


@dataclass
class ProjectionReport:
    """What one :meth:`OrthoLoRA.project` did, per factor (tensors, no host sync).

    Attributes:
        factor_names: the factors, in the order of the first dimension below.
        gram: ``<g_i, g_j>`` of the original per-task gradients: [F, K, K].
        coefficients: ``C`` with ``g'_i = sum_j C_ij g_j``: [F, K, K].
    """

    factor_names: list[str]
    gram: Tensor
    coefficients: Tensor

    @property
    def cosine(self) -> Tensor:
        """Cosine similarity of the original per-task gradients: [F, K, K]."""
        norms = self.gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [F, K]
        denom = (norms[:, :, None] * norms[:, None, :]).clamp_min(torch.finfo(norms.dtype).tiny)
        return self.gram / denom

    @property
    def conflicts(self) -> Tensor:
        """Pairs ``(i, j)``, ``i != j``, whose gradients conflict: bool [F, K, K]."""
        return self.gram < 0

    def conflict_fraction(self) -> Tensor:
        """Share of (factor, task pair) combinations in conflict: a scalar tensor."""
        num_tasks = self.gram.shape[-1]
        pairs = max(num_tasks * (num_tasks - 1), 1)
        return self.conflicts.sum() / (pairs * self.gram.shape[0])

    def task_conflicts(self, tasks: Sequence[int] | None = None) -> dict[str, Tensor]:
        """How often whole-adapter task gradients conflict this step (scalar tensors, no sync).

        With ``G = sum_f gram[f]`` (the Gram matrix of each task's gradient of all factors
        concatenated) and the pairs ``i < j`` of ``tasks`` (default: all) whose gradients are
        both non-zero:

        - ``conflict_rate``: the share of those pairs with ``G_ij < 0`` (negative cosine);
        - ``mean_cosine``: their mean ``G_ij / sqrt(G_ii G_jj)``;
        - ``task_pairs``: how many pairs there are (0, and both above 0, when fewer than two
          of the tasks have a gradient this step).
        """
        gram = self.gram.sum(0)  # [K, K]
        if tasks is not None:
            index = torch.as_tensor(list(tasks), dtype=torch.long, device=gram.device)
            gram = gram.index_select(0, index).index_select(1, index)
        sq_norm = gram.diagonal()  # [T]
        live = sq_norm > 0
        upper = torch.ones_like(gram, dtype=torch.bool).triu(1)
        pairs = upper & live[:, None] & live[None, :]  # [T, T]
        norms = sq_norm.clamp_min(0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
        count = pairs.sum()
        denominator = count.clamp_min(1).to(gram.dtype)
        return {
            "conflict_rate": (pairs & (gram < 0)).sum().to(gram.dtype) / denominator,
            "mean_cosine": torch.where(pairs, cosine, torch.zeros_like(cosine)).sum() / denominator,
            "task_pairs": count.to(gram.dtype),
        }


class OrthoLoRA:
    """Ortho-LoRA for the LoRA factors of ``model`` (peft LoRA or :class:`MoELoRALinear`).

    Training-loop contract (per optimizer step)::

        ortho = OrthoLoRA(model, num_tasks=K)         # once; registers hooks
        for micro_batch in step:                      # gradient accumulation allowed
            with ortho.capture(micro_batch["task_id"]):   # LongTensor [B], ids in 0..K-1
                loss = loss_fn(model(**micro_batch))      # the forward must be inside
            loss.backward()                               # inside or after the block
        ortho.project()        # after the last backward, before clipping and optimizer.step()
        optimizer.step(); optimizer.zero_grad()

    :meth:`project` rewrites the ``.grad`` of every LoRA factor (``.grad += sum_i g'_i - sum_i
    g_i``) and clears the per-task buffers; routers, tau and other parameters are untouched. If a
    step's gradients are dropped without projecting, call :meth:`reset`. With a fp16 GradScaler,
    pass ``loss_scale`` (the per-task buffers carry the scale; ``.grad`` is unscaled by then).
    Under torch.distributed the per-task buffers are averaged over ranks before projecting,
    matching DDP's averaged ``.grad``.

    Args:
        model: the adapted model.
        num_tasks: K (>= 2); task ids lie in ``0..K-1``.
        order: ``"shuffle"`` (PCGrad's random order, seeded) or ``"fixed"`` (ascending ids).
        seed: seed of the shuffle generator.
        projected_tasks: the task ids the rule runs among (at least two); the others' gradients
            are added unprojected. ``None``: all ``num_tasks``. Settable later through
            :attr:`projected_tasks`.
        adapter_name: the peft adapter to project.
        sync_distributed: all-reduce the per-task buffers when torch.distributed is initialised.
    """

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int,
        *,
        order: Literal["shuffle", "fixed"] = "shuffle",
        seed: int = 0,
        projected_tasks: Sequence[int] | None = None,
        adapter_name: str = "default",
        sync_distributed: bool = True,
    ) -> None:
        if not isinstance(num_tasks, int) or num_tasks < 2:
            raise ValueError(f"num_tasks must be an integer >= 2, got {num_tasks!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.num_tasks = num_tasks
        self.order = order
        self.sync_distributed = sync_distributed
        self.projected_tasks = projected_tasks
        self.task_gradients = TaskGradientCapture(model, num_tasks, adapter_name=adapter_name)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def projected_tasks(self) -> list[int] | None:
        """Task ids the rule runs among, ascending; ``None`` = all tasks."""
        return self._projected_tasks

    @projected_tasks.setter
    def projected_tasks(self, tasks: Sequence[int] | None) -> None:
        if tasks is None:
            self._projected_tasks = None
            return
        ids = sorted(set(int(t) for t in tasks))
        if len(ids) < 2 or ids[0] < 0 or ids[-1] >= self.num_tasks:
            raise ValueError(
                f"projected_tasks must hold at least two distinct task ids in 0..{self.num_tasks - 1}"
                f", got {list(tasks)!r}"
            )
        self._projected_tasks = None if len(ids) == self.num_tasks else ids

    def state_dict(self) -> dict[str, Tensor]:
        """The shuffle generator's state, so a resumed run projects in the same task orders."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._generator.set_state(state["generator"])

    def capture(self, task_ids: Tensor) -> AbstractContextManager[TaskGradientCapture]:
        """Context manager: capture per-task gradients of the forwards run inside it."""
        return self.task_gradients.capture(task_ids)

    def set_task_ids(self, task_ids: Tensor | None) -> None:
        """Start (ids) or stop (``None``) capturing, for loops that cannot use a block."""
        self.task_gradients.set_task_ids(task_ids)

    def per_task_gradients(self) -> dict[str, Tensor]:
        """Accumulated per-task gradients: factor name -> [K, *shape]."""
        return self.task_gradients.gradients()

    def reset(self) -> None:
        self.task_gradients.reset()

    def remove(self) -> None:
        self.task_gradients.remove()

    @torch.no_grad()
    def project(self, loss_scale: float = 1.0) -> ProjectionReport:
        """Project conflicting per-task gradients and write ``sum_i g'_i`` into ``.grad``."""
        if not self.task_gradients.captured:
            raise RuntimeError(
                "OrthoLoRA.project: no per-task gradients were captured since the last project; "
                "run the forward inside ortho.capture(task_ids) and backward before project()"
            )
        subset = self._projected_tasks
        num_projected = self.num_tasks if subset is None else len(subset)
        orders = projection_orders(num_projected, self.order, self._generator)
        names, grams, coefficients = [], [], []
        for group in self.task_gradients.groups:
            task_grads = group.buffer  # [F, K, n]
            if self.sync_distributed and dist.is_available() and dist.is_initialized():
                dist.all_reduce(task_grads)
                task_grads /= dist.get_world_size()
            gram = torch.bmm(task_grads, task_grads.transpose(1, 2))  # [F, K, K]
            coeff = subset_coefficients(gram, orders, subset)  # [F, K, K]
            column_sums = coeff.sum(dim=1)  # [F, K]: sum_i C_ij
            # .grad already holds sum_i g_i: add sum_j (sum_i C_ij - 1) g_j, exactly 0 without
            # conflicts, so a factor whose tasks agree keeps its gradient bit for bit.
            weights = (column_sums - 1)[:, None, :]  # [F, 1, K]
            delta = torch.bmm(weights, task_grads).squeeze(1) / loss_scale  # [F, n]
            for index, param in enumerate(group.params):
                if param.grad is None:  # no ordinary gradient (e.g. set to None by a hook)
                    total = column_sums[index] @ task_grads[index] / loss_scale  # [n]
                    param.grad = total.view_as(param).to(param.dtype)
                else:
                    param.grad.add_(delta[index].view_as(param).to(param.grad.dtype))
            names += group.names
            grams.append(gram)
            coefficients.append(coeff)
        self.task_gradients.reset()
        device, dtype = grams[0].device, grams[0].dtype
        return ProjectionReport(
            names,
            torch.cat([g.to(device, dtype) for g in grams]),
            torch.cat([c.to(device, dtype) for c in coefficients]),
        )
