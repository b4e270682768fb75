"""StepTimer: per-step wall and CPU time inside the loop; steps that waited for a core apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import medmoe.callbacks.timing as timing
from medmoe.callbacks.timing import MIN_UNCONTENDED_STEPS, StepTimer


class Clocks:
    """A wall clock and a CPU clock the test advances (the machine's load cannot move them)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def compute(self, seconds: float) -> None:
        self.wall += seconds
        self.cpu += seconds

    def wait(self, seconds: float) -> None:  # preempted: wall time passes, no CPU time
        self.wall += seconds


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    clocks = Clocks()
    monkeypatch.setattr(timing, "perf_counter", lambda: clocks.wall)
    monkeypatch.setattr(timing, "process_time", lambda: clocks.cpu)
    return clocks


def run_steps(timer: StepTimer, steps) -> None:
    trainer = SimpleNamespace(global_step=0)
    for step, micro_batches in enumerate(steps):
        for part in micro_batches:
            timer.on_train_batch_start(trainer, None, None, 0)
            part()
            timer.on_train_batch_end(trainer, None, None, None, 0)
        trainer.global_step = step + 1  # the optimizer stepped after the last micro-batch


def test_micro_batches_add_up_per_step_and_waiting_steps_are_left_out(clocks: Clocks) -> None:
    timer = StepTimer()
    computing = [[lambda: clocks.compute(0.004), lambda: clocks.compute(0.005)]] * 11
    slowed = [[lambda: clocks.compute(0.004), lambda: clocks.wait(0.001)]]  # 20% over its CPU
    barely = [[lambda: clocks.compute(0.010), lambda: clocks.wait(0.0009)]]  # 9%: not contended
    run_steps(timer, computing + slowed + barely)
    assert timer.steps[0] == pytest.approx([0.009, 0.009])
    assert timer.steps[11] == pytest.approx([0.005, 0.004])
    assert timer.summary() == {
        "train_step_seconds": pytest.approx(0.009),  # the median of the 12 uncontended steps
        "train_steps_timed": 13,
        "train_steps_uncontended": 12,
    }


def test_too_few_uncontended_steps_report_no_step_time(clocks: Clocks) -> None:
    timer = StepTimer()
    computing = [[lambda: clocks.compute(0.01)]] * (MIN_UNCONTENDED_STEPS - 1)
    run_steps(timer, computing + [[lambda: clocks.wait(0.01)]] * 5)
    assert timer.summary() == {
        "train_step_seconds": None,
        "train_steps_timed": MIN_UNCONTENDED_STEPS + 4,
        "train_steps_uncontended": MIN_UNCONTENDED_STEPS - 1,
    }
