"""A training step of medmoe's reads nothing back to the host except on the steps that log.

Every tensor-to-Python conversion (``bool(t)`` in an ``if``, ``.item()``, ``.tolist()``, ...)
waits for the GPU. A torch-function mode counts those made by medmoe's own code inside
``training_step``. (transformers' sdpa mask creation makes one per forward of a padded batch,
``fast_all(padding_mask)`` in ``masking_utils``; that one is not medmoe's.)
"""

from __future__ import annotations

import sys

import pytest
from lightning.pytorch import Trainer, seed_everything
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint  # noqa: F401  (imported by medmoe.losses)

from medmoe.adapters import MoELoRAConfig
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.model import MedMoEModule

SYNCS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu"}


def _package(frame) -> str:
    """The top-level package of the module the frame's code belongs to."""
    return str(frame.f_globals.get("__name__", "")).partition(".")[0]


def _called_from_medmoe() -> bool:
    """Whether the first frame outside torch that made the call is medmoe's source.

    Frames are told apart by their module's name, not their file's path: a checkout in a
    folder named ``medmoe`` (``git clone .../medmoe``) puts ``/medmoe/`` in the path of every
    file of its virtual environment, and transformers' mask creation was then counted as
    medmoe's ("step 0 synchronised: ['__bool__', '__bool__']").
    """
    frame = sys._getframe(2)
    while frame is not None and _package(frame) == "torch":
        frame = frame.f_back
    return frame is not None and _package(frame) == "medmoe"


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCS and _called_from_medmoe():
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_training_steps_that_do_not_log_do_not_synchronise(tmp_path):
    seed_everything(0)
    data = MultiTaskDataModule(
        tasks=[
            TaskConfig("medqa", source="toy", max_train=16, max_eval=4),
            TaskConfig("pubmedqa", source="toy", max_train=16, max_eval=4),
        ],
        batch_size=2,
        max_length=64,
    )
    module = MedMoEModule(
        tiny_llama=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        adapter=MoELoRAConfig(allocation="uniform", num_experts=2, allowed_ranks=[2]),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.1,
        gradient_checkpointing=True,
    )
    syncs: dict[int, list[str]] = {}
    step = module.training_step

    def counted(batch, batch_idx):
        with CountSyncs() as mode:
            out = step(batch, batch_idx)
        syncs[module.global_step] = mode.calls
        return out

    module.training_step = counted
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        log_every_n_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    logging_steps = {2, 5}  # (step + 1) % log_every_n_steps == 0
    assert sorted(syncs) == list(range(6))
    for global_step, calls in syncs.items():
        if global_step in logging_steps:
            assert calls, "the NaN check and per-task losses read back on logging steps"
        else:
            assert calls == [], f"step {global_step} synchronised: {calls}"


def test_a_nan_loss_on_a_step_that_does_not_log_stops_at_the_next_logging_step():
    import torch

    from medmoe.losses import NonFiniteLossWatch

    watch = NonFiniteLossWatch()
    ok = torch.tensor(1.0)
    watch.record(0, ok, ok, ok)
    watch.raise_if_seen()
    watch.record(1, torch.tensor(float("inf")), ok, torch.tensor(2.0))
    watch.record(2, torch.tensor(float("nan")), ok, ok)  # a later bad step keeps the first
    with pytest.raises(FloatingPointError, match=r"loss is inf at global step 1 \(task loss 2.0\)"):
        watch.raise_if_seen()
