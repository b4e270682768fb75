"""The DeepSpeed precision plugin scales the loss for accumulation once (Lightning's division).

A stand-in engine does what ``DeepSpeedEngine.backward`` does with the loss (divide by
``gradient_accumulation_steps`` when ``scale_wrt_gas``) and records the arguments; the real
engine's signature is checked so the stand-in cannot drift from it.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.plugins.precision import DeepSpeedPrecision as LightningDeepSpeedPrecision

from medmoe.strategies import DeepSpeedPrecision, DeepSpeedStrategy

ACCUMULATE = 4


class StandInEngine:
    """``engine.backward``'s loss scaling (deepspeed/runtime/engine.py), recording each call."""

    def __init__(self, gradient_accumulation_steps: int) -> None:
        self.steps = gradient_accumulation_steps
        self.calls: list[dict] = []

    def gradient_accumulation_steps(self) -> int:
        return self.steps

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        self.calls.append({"retain_graph": retain_graph, "scale_wrt_gas": scale_wrt_gas})
        loss = loss / self.steps if scale_wrt_gas else loss
        loss.backward(retain_graph=retain_graph)
        return loss


def _undecorated(function):
    """The function inside DeepSpeed's ``instrument_w_nvtx`` wrapper (it keeps no __wrapped__)."""
    for cell in function.__closure__ or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner.__name__ == "backward":
            return inner
    return function


def test_stand_in_matches_the_real_engine_backward_signature():
    engine = pytest.importorskip("deepspeed.runtime.engine")
    backward = _undecorated(engine.DeepSpeedEngine.backward)
    real = inspect.signature(backward).parameters
    stand_in = inspect.signature(StandInEngine.backward).parameters
    assert list(real) == list(stand_in)
    assert real["scale_wrt_gas"].default is True  # why the plugin must pass False
    source = inspect.getsource(backward)
    assert "loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss" in source


def _accumulated_gradient(plugin, micro_batches, weight):
    engine = StandInEngine(ACCUMULATE)
    module = LightningModule()
    module._trainer = SimpleNamespace(model=engine)
    weight.grad = None
    for x in micro_batches:
        loss = (x @ weight).square().mean()  # a micro-batch mean
        # Lightning's automatic optimisation: the closure loss is loss / accumulate_grad_batches
        closure_loss = ClosureResult.from_training_step_output(loss, ACCUMULATE).closure_loss
        plugin.backward(closure_loss, module, None)
    return weight.grad.clone(), engine.calls


def test_plugin_gives_the_mean_gradient_over_micro_batches_where_lightnings_quarters_it():
    torch.manual_seed(0)
    weight = torch.randn(3, requires_grad=True, dtype=torch.float64)
    micro_batches = [torch.randn(5, 3, dtype=torch.float64) for _ in range(ACCUMULATE)]
    expected = torch.autograd.grad(
        torch.stack([(x @ weight).square().mean() for x in micro_batches]).mean(), weight
    )[0]

    grad, calls = _accumulated_gradient(DeepSpeedPrecision("bf16-mixed"), micro_batches, weight)
    assert calls == [{"retain_graph": False, "scale_wrt_gas": False}] * ACCUMULATE
    torch.testing.assert_close(grad, expected)

    # Lightning's own plugin divides twice: the fault this module fixes
    grad, calls = _accumulated_gradient(
        LightningDeepSpeedPrecision("bf16-mixed"), micro_batches, weight
    )
    assert calls == [{"retain_graph": False, "scale_wrt_gas": True}] * ACCUMULATE
    torch.testing.assert_close(grad, expected / ACCUMULATE)


def test_strategy_installs_the_plugin_for_the_trainers_precision():
    pytest.importorskip("deepspeed")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DeepSpeedStrategy(stage=2),
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    plugin = trainer.strategy.precision_plugin
    assert type(plugin) is DeepSpeedPrecision and plugin.precision == "bf16-mixed"
