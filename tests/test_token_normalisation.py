"""The task loss is normalised by the target tokens of the whole optimizer step.

Every batch of the training stream carries ``step_target_tokens`` (all micro-batches of the
step on all ranks); the training step scales its summed token loss so that, after Lightning's
division by ``accumulate_grad_batches`` and DDP's mean over ranks, the gradient is the token
mean over the step. Checked against one big batch in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import MODULE_TINY_LLAMA
from lightning.pytorch import Callback, Trainer, seed_everything

from medmoe.adapters import MoELoRAConfig
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.data.stream import TrainStream
from medmoe.losses import IGNORE_INDEX, target_token_losses
from medmoe.model import MedMoEModule

TINY = MODULE_TINY_LLAMA


def _data(batch_size: int = 2) -> MultiTaskDataModule:
    data = MultiTaskDataModule(
        tasks=[
            TaskConfig("medqa", source="toy", max_train=32, max_eval=4),
            TaskConfig("pubmedqa", source="toy", max_train=32, max_eval=4),
            TaskConfig("clinical_sum", source="toy", max_train=32, max_eval=4),
        ],
        batch_size=batch_size,
        max_length=96,
    )
    data.setup("fit")
    return data


def _targets(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_every_batch_carries_the_target_tokens_of_its_whole_step_over_all_ranks():
    data = _data()
    accumulate, world = 3, 2
    streams = [
        TrainStream(data._train, data.mixture(), 2, 6, 0, rank=r, world_size=world, accumulate=3)
        for r in range(world)
    ]
    batches = [list(stream) for stream in streams]  # [rank][batch]
    assert len(batches[0]) == 6
    for step in range(2):
        window = range(step * accumulate, (step + 1) * accumulate)
        expected = sum(_targets(batches[r][b]) for r in range(world) for b in window)
        for r in range(world):
            for b in window:
                assert int(batches[r][b]["step_target_tokens"]) == expected
    # resuming at step 1 attaches the same counts
    streams[1].start = 1 * accumulate * 2
    resumed = list(streams[1])
    assert [int(b["step_target_tokens"]) for b in resumed] == [
        int(b["step_target_tokens"]) for b in batches[1][accumulate:]
    ]


class GradientCheck(Callback):
    """Keeps the micro-batches of the first step; at the optimizer step compares gradients."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.result: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.result is not None:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        accumulated = {n: p.grad.clone() for n, p in params.items()}
        big = _concatenate(self.batches)
        with torch.enable_grad():
            token_loss, mask = target_token_losses(pl_module.model, big)
            big_loss = token_loss.sum() / mask.sum()
            big_grads = torch.autograd.grad(big_loss, list(params.values()))
            micro_means = []
            for batch in self.batches:
                token_loss, mask = target_token_losses(pl_module.model, batch)
                micro_means.append(token_loss.sum() / mask.sum())
            mean_of_means = torch.stack(micro_means).mean()
            mean_grads = torch.autograd.grad(mean_of_means, list(params.values()))
        self.result = {
            "accumulated": accumulated,
            "big": dict(zip(params, big_grads, strict=True)),
            "mean_of_means": dict(zip(params, mean_grads, strict=True)),
            "dtype": next(iter(params.values())).dtype,
        }


def _concatenate(batches: list[dict]) -> dict:
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        out[key] = torch.cat(
            [F.pad(b[key], (0, width - b[key].shape[1]), value=pad) for b in batches]
        )
    return out


def test_two_accumulated_micro_batches_of_different_lengths_equal_one_big_batch(tmp_path):
    seed_everything(0)
    data = _data(batch_size=2)
    module = MedMoEModule(
        tiny_llama=TINY,
        adapter=MoELoRAConfig(
            allocation="uniform", num_experts=2, allowed_ranks=[2, 4], dropout=0.0
        ),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.0,
        lambda_kp=0.0,
    )
    check = GradientCheck()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        accumulate_grad_batches=2,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[check],
    )
    module.configure_model()
    for name, param in module.model.named_parameters():  # B != 0: every factor has a gradient
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, std=0.1)
    trainer.fit(module, datamodule=data)

    first, second = check.batches[:2]
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]  # different lengths
    assert _targets(first) != _targets(second)
    result = check.result
    assert result["dtype"] == torch.float64
    for name, grad in result["big"].items():
        # tau is computed in float32 (MoELoRALinear.tau), so log tau's gradient is float32-exact
        rtol = 1e-6 if name.endswith("log_tau") else 1e-9
        torch.testing.assert_close(
            result["accumulated"][name], grad, rtol=rtol, atol=1e-12, msg=name
        )
    # the old mean of micro-batch means is measurably different
    assert any(
        not torch.allclose(result["mean_of_means"][n], g, rtol=1e-3)
        for n, g in result["big"].items()
    )
