"""The training system end to end on CPU: losses, checkpoints, exact resume, NaN stop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODULE_TINY_LLAMA
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from medmoe.adapters import MoELoRAConfig
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.model import MedMoEModule

TINY = MODULE_TINY_LLAMA


def _data(**overrides) -> MultiTaskDataModule:
    values = dict(
        tasks=[
            TaskConfig("medqa", source="toy", max_train=64, max_eval=8),
            TaskConfig("pubmedqa", source="toy", max_train=64, max_eval=8),
        ],
        replay=[TaskConfig("gsm8k", source="toy", max_train=64, max_eval=8)],
        replay_ratio=0.25,
        batch_size=4,
        max_length=64,
    )
    values.update(overrides)
    return MultiTaskDataModule(**values)


def _module(data: MultiTaskDataModule, **overrides) -> MedMoEModule:
    adapter = MoELoRAConfig(
        allocation="eq2", n_min=2, n_max=4, allowed_ranks=[2, 4], num_base_experts=1, dropout=0.1
    )
    values = dict(
        tiny_llama=TINY,
        adapter=adapter,
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.1,
        lambda_kp=0.1,
        learning_rate=1e-2,
        warmup_ratio=0.2,
    )
    values.update(overrides)
    return MedMoEModule(**values)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _trainer(tmp_path, max_steps: int, callbacks, **overrides) -> Trainer:
    values = dict(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    values.update(overrides)
    return Trainer(**values)


def test_fit_logs_finite_losses_and_checkpoints_leave_the_base_out(tmp_path):
    seed_everything(0)
    data = _data()
    module = _module(data)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    recorder = LossRecorder()
    trainer = _trainer(tmp_path, 4, [recorder, checkpoint], limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    assert len(recorder.losses) == 4 and all(math.isfinite(v) for v in recorder.losses.values())
    for key in ("train/task_loss", "train/balance_loss", "train/kp_loss", "val/loss"):
        assert key in trainer.logged_metrics, key
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert not any("embed_tokens" in k or k.endswith("base.weight") for k in state)


def test_resume_continues_exactly(tmp_path):
    def run(stop: int | None, ckpt_path=None, name: str = "run") -> dict[int, float]:
        seed_everything(0)
        data = _data()
        recorder = LossRecorder()
        callbacks = [recorder, ModelCheckpoint(dirpath=tmp_path / name, save_last=True)]
        if stop is not None:
            callbacks.append(StopAt(stop))
        _trainer(tmp_path, 6, callbacks).fit(_module(data), datamodule=data, ckpt_path=ckpt_path)
        return recorder.losses

    uninterrupted = run(None, name="uninterrupted")
    first = run(3, name="first")
    assert sorted(first) == [1, 2, 3]
    resumed = run(None, ckpt_path=tmp_path / "first" / "last.ckpt", name="resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in range(1, 7):
        got = first[step] if step <= 3 else resumed[step]
        assert got == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    seed_everything(0)
    data = _data()
    module = _module(data)
    original = module.compute_losses

    def poisoned(batch):
        losses = original(batch)
        if module.global_step == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    module.compute_losses = poisoned
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(FloatingPointError, match="training loss is nan at global step 2"):
        _trainer(tmp_path, 5, [checkpoint]).fit(module, datamodule=data)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    state = torch.load(tmp_path / "ckpt" / saved[-1], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_weight_decay_skips_routers_temperatures_and_biases(tmp_path):
    data = _data()
    module = _module(data, weight_decay=0.1)
    trainer = _trainer(tmp_path, 1, [])
    trainer.fit(module, datamodule=data)
    optimizer = trainer.optimizers[0]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in module.model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = "router" in name or "log_tau" in name or name.endswith("bias")
        assert (id(param) in decayed) != exempt, name


def test_configure_model_is_idempotent():
    data = _data()
    module = _module(data)
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model


def test_ortho_projection_runs_inside_the_training_loop(tmp_path):
    seed_everything(0)
    data = _data()
    module = _module(data, gradient_projection="ortho", projection_order="fixed")
    trainer = _trainer(tmp_path, 3, [], logger=True, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    fraction = trainer.logged_metrics["ortho/conflict_fraction"]
    assert 0.0 <= float(fraction) <= 1.0
    assert not module.ortho.task_gradients.captured  # projected and cleared every step
