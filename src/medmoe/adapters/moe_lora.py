"""The Med-MoE-LoRA layer: a frozen linear layer plus a soft-merged mixture of LoRA experts.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmoe.adapters.capabilities import ExpertFactorsLayer, RoutedLayer, TemperatureLayer

ADAPTER_DTYPES = ("float32", "base")


def adapter_parameter_dtype(base_dtype: torch.dtype, adapter_dtype: str) -> torch.dtype:
    """The dtype adapter factors are stored in on a base of ``base_dtype``.

    ``"float32"`` (default, as peft's ``autocast_adapter_dtype``): half-precision bases get
    float32 factors, which the optimizer then updates in float32; float32 and float64 bases keep
    their own dtype. ``"base"``: the base's dtype. The forward computes in the input's dtype.
    """
    if adapter_dtype == "float32":
        return torch.promote_types(base_dtype, torch.float32)
    if adapter_dtype == "base":
        return base_dtype
    raise ValueError(
        f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}"
    )


def in_backward_recomputation() -> bool:
    """True while autograd runs a backward pass: a forward executed now is a recomputation.

    Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not) re-runs a checkpointed
    forward from inside the backward's graph task; an ordinary forward runs outside any.
    """
    return torch._C._current_graph_task_id() != -1


def _in_dtype(weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` cast to the floating dtype of ``x`` (float32 factors on a bf16 activation)."""
    if not x.is_floating_point() or weight.dtype == x.dtype:
        return weight
    return weight.to(x.dtype)


def float32_output_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two half-precision matrices, accumulated and returned in float32.

    On CUDA one GEMM with a float32 output (``torch.mm(..., out_dtype=torch.float32)``), so no
    float32 copy of ``a`` or ``b`` is made. Elsewhere (no CPU kernel exists) the inputs are
    upcast first, with the same result.
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # a torch without mm's out_dtype (before 2.8)
            pass
    return a.float() @ b.float()


def _split_half(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float32 tensor as ``high + low`` in ``dtype``: the pair carries ~16 mantissa bits."""
    high = t.to(dtype)
    return high, (t - high.float()).to(dtype)


class _Float32Linear(torch.autograd.Function):
    """``F.linear(x, weight)`` of a half-precision ``x`` and a float32 router, in float32.

    No float32 copy of ``x`` (the 4096-wide activation of every adapted layer) is made in
    forward or backward on CUDA: the float32 weight [N, d_in] and the incoming float32 gradient
    [..., N], both narrow, are split into two half-precision parts (``high + low``) and every
    product is a half-precision GEMM with float32 accumulation and output
    (:func:`float32_output_mm`). ``x``'s own tensor is what backward keeps.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        flat = x.reshape(-1, x.shape[-1])  # [M, d_in]
        high, low = _split_half(weight.float(), x.dtype)  # [N, d_in] each
        logits = float32_output_mm(flat, high.T) + float32_output_mm(flat, low.T)  # [M, N]
        return logits.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        flat_x = x.reshape(-1, x.shape[-1])  # [M, d_in]
        flat_grad = grad.reshape(-1, grad.shape[-1]).float()  # [M, N]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dL/dx = grad @ W: [M, N] x [N, d_in], in x's dtype like the rest of x's gradient
            if x.is_cuda:  # one half-precision GEMM, no float32 [M, d_in] temporary
                grad_x = torch.mm(flat_grad.to(x.dtype), weight.to(x.dtype))
            else:
                grad_x = (flat_grad @ weight.float()).to(x.dtype)
            grad_x = grad_x.view_as(x)
        if ctx.needs_input_grad[1]:
            # dL/dW = grad^T @ x summed over all tokens: [N, M] x [M, d_in] -> [N, d_in]
            g_high, g_low = _split_half(flat_grad, x.dtype)
            grad_weight = float32_output_mm(g_high.T, flat_x) + float32_output_mm(g_low.T, flat_x)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight


# Width (in log-tau units) of the smooth bend at each bound of tau_range.
TAU_BOUND_SOFTNESS = 0.1


def soft_bounded_log_tau(raw: Tensor, tau_range: tuple[float, float]) -> Tensor:
    """``lo + s softplus((raw - lo) / s) - s softplus((raw - hi) / s)``, ``lo, hi = log tau_range``.

    A smooth, strictly increasing map of the real line onto ``(lo, hi)`` that is the identity
    (to ``s * exp(-d / s)`` at distance ``d`` from the nearer bound) inside the range; its
    derivative ``sigmoid((raw - lo) / s) - sigmoid((raw - hi) / s)`` is positive everywhere, so
    an optimiser can bring tau back from a bound.
    """
    low, high = math.log(tau_range[0]), math.log(tau_range[1])
    s = TAU_BOUND_SOFTNESS
    from_low = low + s * F.softplus((raw - low) / s) - s * F.softplus((raw - high) / s)
    # the same map written from the upper bound (softplus(z) = z + softplus(-z)), so neither
    # half loses the bound to cancellation
    from_high = high + s * F.softplus((low - raw) / s) - s * F.softplus((high - raw) / s)
    return torch.where(raw < 0.5 * (low + high), from_low, from_high)


def raw_log_tau_for(tau: float, tau_range: tuple[float, float]) -> float:
    """The inverse of :func:`soft_bounded_log_tau`: the raw parameter that gives ``tau``.

    ``tau`` at or beyond a bound (only reachable as a limit) maps to the raw value whose tau
    lies 0.005% inside it (0.76 past the bound in raw units), close enough for
    :func:`medmoe.callbacks.temperature.at_clamp_bound` to report it at the bound.
    Computed in float64.
    """
    low, high = math.log(tau_range[0]), math.log(tau_range[1])
    if high - low < 1e-9:
        return low
    s = TAU_BOUND_SOFTNESS
    target = min(max(math.log(tau), low + 5e-5), high - 5e-5)
    # y - lo = s log((1 + u) / (1 + k u)) with u = exp((raw - lo) / s), k = exp(-(hi - lo) / s)
    # solved for u; in log space so large ranges do not overflow.
    log_w = (target - low) / s
    log_k = -(high - low) / s
    log_u = log_w + math.log(-math.expm1(-log_w)) - math.log(-math.expm1(log_w + log_k))
    return low + s * log_u


def raw_log_tau_from_legacy(legacy: Tensor, tau_range: tuple[float, float]) -> Tensor:
    """Raw parameters that give the tau a pre-soft-bound file meant: ``clamp(exp(legacy))``.

    Adapter files and checkpoints written before the soft bound stored ``log tau`` under a hard
    clamp; this converts them so they load to the same tau (one at a bound: 0.005% inside it).
    """
    low, high = tau_range
    values = [
        raw_log_tau_for(min(max(math.exp(float(v)), low), high), tau_range)
        for v in legacy.detach().double().cpu().reshape(-1)
    ]
    return torch.tensor(values, dtype=legacy.dtype).reshape(legacy.shape).to(legacy.device)


def scalar_log_tau_as_vector(log_tau: Tensor) -> Tensor:
    """A ``log_tau`` of the layer's shape ``[1]``: older files hold it 0-dim."""
    return log_tau.reshape(1) if log_tau.dim() == 0 else log_tau


class MoELoRALinear(RoutedLayer, TemperatureLayer, ExpertFactorsLayer):
    """``h = W0 x + sum_i g_i(x) * (alpha_i / r_i) * B_i A_i x`` with ``g = softmax(W_g x / tau)``.

    Implements eq 1 and eq 4 (experts of different ranks ``r_i``) with the temperature-scaled
    router of eq 3. All experts are computed with two matrix products over the stacked factors
    ``A`` (sum r x d_in) and ``B`` (d_out x sum r); each expert's gate is expanded over its rank
    slots, so the forward has no Python loop over experts and no host synchronisation.

    Args:
        base: the frozen linear layer ``W0`` (its parameters are set to ``requires_grad=False``).
        ranks: the rank of every expert, e.g. ``(8, 16, 32)``.
        num_base_experts: the first ``num_base_experts`` experts form the base (anchor) group
            that the knowledge-preservation loss reserves for general samples.
        top_k: keep only the ``k`` largest gates per token and renormalise them (the vanilla
            MoE-LoRA baseline); ``None`` or ``k >= N`` is soft merging over all experts.
        alpha_over_r: ``alpha_i = alpha_over_r * r_i``, so every expert's scale is
            ``alpha_over_r`` (the paper's ``alpha = 2r``).
        alpha: if given, a fixed ``alpha_i = alpha`` for every expert instead, so a rank-8
            expert gets 4x the scale of a rank-32 one (classic LoRA scaling).
        tau_init: the initial router temperature.
        learn_tau: learn ``log tau`` (one scalar per layer) or keep it fixed.
        tau_range: ``tau`` stays inside this interval through a differentiable soft bound
            (:func:`soft_bounded_log_tau`), so a tau pushed to a bound can always come back.
        dropout: dropout on the input of the expert path (applied once, shared by all experts).
        adapter_dtype: ``"float32"`` keeps ``A`` and ``B`` in float32 on a half-precision base
            (see :func:`adapter_parameter_dtype`); ``"base"`` stores them in the base's dtype.
            The expert path computes in the input's dtype either way; the router in float32.
    """

    # the adapter-layer contract (medmoe.adapters.layer.AdapterLayer)
    adapter_tensor_names = ("lora_A", "lora_B", "router.weight", "log_tau")
    no_decay_tensor_names = ("router.weight", "log_tau")

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        *,
        num_base_experts: int = 0,
        top_k: int | None = None,
        alpha_over_r: float = 2.0,
        alpha: float | None = None,
        tau_init: float = 1.0,
        learn_tau: bool = True,
        tau_range: tuple[float, float] = (0.1, 10.0),
        dropout: float = 0.0,
        adapter_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear, got {type(base).__name__}")
        ranks = tuple(int(r) for r in ranks)
        if not ranks or min(ranks) < 1:
            raise ValueError(f"ranks must be a non-empty list of positive integers, got {ranks}")
        if not 0 <= num_base_experts < len(ranks):
            raise ValueError(
                f"num_base_experts={num_base_experts} must leave at least one specialist among "
                f"{len(ranks)} experts (accepted: 0..{len(ranks) - 1})"
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None (soft merging) or >= 1, got {top_k}")
        low, high = tau_range
        if not 0 < low <= tau_init <= high:
            raise ValueError(
                f"need 0 < tau_range[0] <= tau_init <= tau_range[1], got "
                f"tau_init={tau_init}, tau_range={tau_range}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")

        self.base = base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.ranks = ranks
        self.num_experts = len(ranks)
        self.num_base_experts = num_base_experts
        self.top_k = top_k if top_k is not None and top_k < self.num_experts else None
        self.tau_range = (float(low), float(high))
        self.adapter_enabled = True
        self.record_routing = True
        self._last_probs: Tensor | None = None

        factory = {
            "device": base.weight.device,
            "dtype": adapter_parameter_dtype(base.weight.dtype, adapter_dtype),
        }
        total_rank = sum(ranks)
        self.lora_A = nn.Parameter(torch.empty(total_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, total_rank, **factory))
        # The router always runs in float32, whatever the model dtype.
        self.router = nn.Linear(
            self.in_features, self.num_experts, bias=False, device=base.weight.device
        )
        # tau in float64 for float64 layers, float32 otherwise (the router's precision)
        tau_dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        raw = raw_log_tau_for(tau_init, self.tau_range)
        # shape [1], not a 0-dim scalar: DeepSpeed byte-views every parameter when it broadcasts
        # the model and FSDP2 refuses scalars (files with a 0-dim one load, _load_from_state_dict)
        log_tau = torch.tensor([raw], device=base.weight.device, dtype=tau_dtype)
        if learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # slot -> expert map and per-slot scale alpha_i / r_i: [sum r]
        # (output_size: no device-to-host sync, and it works on the meta device)
        device = base.weight.device
        slot_expert = torch.repeat_interleave(
            torch.arange(self.num_experts, device=device),
            torch.tensor(ranks, device=device),
            output_size=total_rank,
        )
        scales = [alpha / r if alpha is not None else alpha_over_r for r in ranks]
        self.register_buffer("slot_expert", slot_expert, persistent=False)
        self.register_buffer(
            "slot_scale", torch.tensor(scales, device=device)[slot_expert], persistent=False
        )
        self.scales = tuple(float(s) for s in scales)
        self.total_rank = total_rank
        self.reset_adapter_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = f"{prefix}log_tau"
        if key in state_dict:  # a 0-dim log_tau of a file written before it became [1]
            state_dict[key] = scalar_log_tau_as_vector(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_adapter_parameters(self) -> None:
        """A ~ Kaiming-uniform (each expert its own draw), B = 0, router as nn.Linear."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.router.reset_parameters()

    # ----------------------------------------------------------------- public accessors
    @property
    def tau(self) -> Tensor:
        """The router temperature ``exp(soft_bound(log_tau))``, strictly inside ``tau_range``.

        ``log_tau`` is the unconstrained parameter; away from the bounds (more than 1 in log
        units) ``tau == exp(log_tau)`` to 5e-6 relative, near them the soft bound bends smoothly, so its
        gradient is never zero (a hard clamp's is, outside its range). Computed in float32, or
        float64 for float64 layers.
        """
        log_tau = self.log_tau if self.log_tau.dtype == torch.float64 else self.log_tau.float()
        return soft_bounded_log_tau(log_tau, self.tau_range).exp().reshape(())  # [1] -> 0-dim

    def expert(self, i: int) -> tuple[Tensor, Tensor]:
        """Views ``(A_i, B_i)`` of expert ``i`` with shapes [r_i, d_in] and [d_out, r_i]."""
        if not 0 <= i < self.num_experts:
            raise IndexError(f"expert index {i} out of range for {self.num_experts} experts")
        start = sum(self.ranks[:i])
        stop = start + self.ranks[i]
        return self.lora_A[start:stop], self.lora_B[:, start:stop]

    def router_logits(self, x: Tensor) -> Tensor:
        """``W_g x``: [..., N], in float32 for half-precision models and under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            if x.dtype in (torch.float32, torch.float64):
                return F.linear(x, self.router.weight.to(x.dtype))
            return _Float32Linear.apply(x, self.router.weight)

    def probs_from_logits(self, logits: Tensor) -> Tensor:
        """``softmax(logits / tau)`` (eq 3). Override to try another gating function."""
        return torch.softmax(logits / self.tau.to(logits.dtype), dim=-1)

    def router_probs(self, x: Tensor) -> Tensor:
        """The router's distribution over experts before any top-k: [..., N]."""
        return self.probs_from_logits(self.router_logits(x))

    def gates_from_probs(self, probs: Tensor) -> Tensor:
        """Apply top-k (keep the k largest, renormalise) if configured: [..., N] -> [..., N]."""
        if self.top_k is None:
            return probs
        top_values, top_index = probs.topk(self.top_k, dim=-1)
        top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, top_index, top_values)

    def gates(self, x: Tensor) -> Tensor:
        """The routing weights the forward uses, shape [..., N] (float32 or wider)."""
        return self.gates_from_probs(self.router_probs(x))

    @property
    def last_probs(self) -> Tensor | None:
        """Router probabilities of the last forward ([..., N], float32, with autograd graph).

        This is what the routing losses differentiate. It is recorded by the forward the loss
        uses and never by a gradient-checkpointing recomputation during backward (which would
        keep the recomputed activations alive), and cleared by a forward with the adapter off.
        Readers that only look at routing use :attr:`last_probs_detached` or :attr:`last_gates`.
        """
        return self._last_probs

    @property
    def last_probs_detached(self) -> Tensor | None:
        """:attr:`last_probs` without its autograd graph (for callbacks and analysis)."""
        return None if self._last_probs is None else self._last_probs.detach()

    @property
    def last_gates(self) -> Tensor | None:
        """Gates the last forward used ([..., N], detached), derived from :attr:`last_probs`."""
        probs = self.last_probs_detached
        return None if probs is None else self.gates_from_probs(probs)

    @property
    def router_trains(self) -> bool:
        return self.router.weight.requires_grad

    def clear_routing(self) -> None:
        self._last_probs = None

    def active_parameter_count(self) -> float:
        """Adapter parameters one token uses (Table 4): router, tau and the experts it merges.

        Soft merging uses every expert. Top-k uses k experts; with mixed ranks which k varies
        per token, so this is k times the mean expert size (exact when ranks are equal).
        """
        expert_sizes = [r * (self.in_features + self.out_features) for r in self.ranks]
        experts = sum(expert_sizes)
        if self.top_k is not None:
            experts = self.top_k * experts / self.num_experts
        learned_tau = 1 if isinstance(self.log_tau, nn.Parameter) else 0
        return experts + self.router.weight.numel() + learned_tau

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        records = self.record_routing and not in_backward_recomputation()
        if not self.adapter_enabled:
            if records:
                self._last_probs = None  # no routing in this forward: nothing stale to read
            return out
        expert_input = self.dropout(x)
        if self._can_fuse_router(x, expert_input):
            # Router and A read the same float32 x: one matmul for both, [..., sum r + N]
            fused = F.linear(x, torch.cat([self.lora_A, self.router.weight]))
            hidden, logits = fused.split([self.total_rank, self.num_experts], dim=-1)
            probs = self.probs_from_logits(logits)
        else:
            hidden = F.linear(expert_input, _in_dtype(self.lora_A, x))  # [..., sum r]
            probs = self.router_probs(x)  # [..., N]
        if records:
            self._last_probs = probs
        gates = self.gates_from_probs(probs)
        # Expand each expert's gate over its rank slots, scaled by alpha_i / r_i: [..., sum r]
        slot_weights = gates.index_select(-1, self.slot_expert) * self.slot_scale
        delta = F.linear(hidden * slot_weights.to(hidden.dtype), _in_dtype(self.lora_B, hidden))
        return out + delta.to(out.dtype)

    def _can_fuse_router(self, x: Tensor, expert_input: Tensor) -> bool:
        overridden = type(self).router_logits is not MoELoRALinear.router_logits or (
            type(self).router_probs is not MoELoRALinear.router_probs
        )
        return (
            not overridden
            and expert_input is x  # no dropout on the expert path
            and x.dtype == torch.float32
            and self.lora_A.dtype == self.router.weight.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        routing = "soft" if self.top_k is None else f"top-{self.top_k}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ranks={self.ranks}, num_base_experts={self.num_base_experts}, routing={routing}"
        )
