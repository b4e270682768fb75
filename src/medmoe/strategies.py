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
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.plugins.precision import DeepSpeedPrecision as LightningDeepSpeedPrecision
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import Tensor


class DeepSpeedPrecision(LightningDeepSpeedPrecision):
    """Lightning's DeepSpeed precision plugin, passing ``scale_wrt_gas=False`` to the engine.

    The loss reaching the backward has already been divided by ``accumulate_grad_batches`` by
    Lightning, so DeepSpeed must not divide it again.
    """

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

    Both are written into the DeepSpeed config unless a given ``config`` already sets them.
    The trainer's precision (``bf16-mixed`` ...) becomes :class:`DeepSpeedPrecision` of that
    precision; any other precision plugin is kept.
    """

    def __init__(
        self,
        *args: Any,
        grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = "fp32",
        communication_data_type: Literal["fp32", "bf16", "fp16"] | None = "fp32",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
            plugin = DeepSpeedPrecision(plugin.precision)
        self._precision_plugin = plugin
