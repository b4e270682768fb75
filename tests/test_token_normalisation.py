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


def fit_one_float64_step(
    module, data, tmp_path, accumulate: int, callback, generator: torch.Generator | None = None
) -> None:
    """One optimizer step in float64 on CPU, every LoRA B factor drawn non-zero (so every
    factor has a gradient), ``callback`` watching."""
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        accumulate_grad_batches=accumulate,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback],
    )
    module.configure_model()
    for name, param in module.model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, std=0.1, generator=generator)
    trainer.fit(module, datamodule=data)


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
    fit_one_float64_step(module, data, tmp_path, accumulate=2, callback=check)

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


# ----------------------------------------------------------------- task_mean
def test_every_batch_carries_the_target_tokens_of_each_task_in_its_whole_step():
    data = _data()
    accumulate, world, tasks = 3, 2, len(data.task_names)
    streams = [
        TrainStream(data._train, data.mixture(), 2, 6, 0, rank=r, world_size=world, accumulate=3)
        for r in range(world)
    ]
    batches = [list(stream) for stream in streams]  # [rank][batch]
    for step in range(2):
        window = range(step * accumulate, (step + 1) * accumulate)
        expected = torch.zeros(tasks, dtype=torch.long)
        for r in range(world):
            for b in window:
                batch = batches[r][b]
                targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
                expected.index_add_(0, batch["task_id"], targets)
        assert (expected > 0).sum() >= 2  # the check below covers several tasks
        for r in range(world):
            for b in window:
                got = batches[r][b]["step_task_tokens"]
                assert got.dtype == torch.long and torch.equal(got, expected)
                assert int(got.sum()) == int(batches[r][b]["step_target_tokens"])


class StepRecorder(Callback):
    """Keeps the first step's micro-batches and, at its optimizer step (before the parameters
    move), the gradient the step accumulated and the references computed from its batches."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.grads: dict | None = None
        self.reference: dict | None = None
        self.token_mean: dict | None = None
        self.counts: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.grads is None:
            self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is not None:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.grads = {n: p.grad.clone() for n, p in params.items()}
        self.reference, self.counts = _reference_task_mean_grads(pl_module, self.batches)
        with torch.enable_grad():
            parts = [target_token_losses(pl_module.model, b) for b in self.batches]
            loss = sum(t.sum() for t, _ in parts) / sum(int(m.sum()) for _, m in parts)
            grads = torch.autograd.grad(loss, list(params.values()))
        self.token_mean = dict(zip(params, grads, strict=True))


def _task_mean_step(tmp_path, batch_size: int, accumulate: int) -> StepRecorder:
    seed_everything(0)
    data = _data(batch_size=batch_size)
    module = MedMoEModule(
        tiny_llama=TINY,
        adapter=MoELoRAConfig(
            allocation="uniform", num_experts=2, allowed_ranks=[2, 4], dropout=0.0
        ),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.0,
        lambda_kp=0.0,
        loss_normalization="task_mean",
    )
    recorder = StepRecorder()
    fit_one_float64_step(
        module, data, tmp_path, accumulate, recorder, generator=torch.Generator().manual_seed(1)
    )
    return recorder


def _reference_task_mean_grads(module, batches: list[dict]) -> dict:
    """A hand-written float64 loop over the whole step: per task, summed token loss / its
    target tokens; the mean over the tasks present."""
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    with torch.enable_grad():
        for batch in batches:
            token_loss, mask = target_token_losses(module.model, batch)
            for row, task in enumerate(batch["task_id"].tolist()):
                sums[task] = sums.get(task, 0.0) + token_loss[row].sum()
                counts[task] = counts.get(task, 0) + int(mask[row].sum())
        present = [t for t in sorted(sums) if counts[t] > 0]
        loss = sum(sums[t] / counts[t] for t in present) / len(present)
        grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True)), counts


def test_task_mean_gradient_is_the_per_task_reference_and_independent_of_the_split(tmp_path):
    whole = _task_mean_step(tmp_path / "one", batch_size=4, accumulate=1)
    split = _task_mean_step(tmp_path / "four", batch_size=1, accumulate=4)
    assert len(whole.batches) == 1 and len(split.batches) == 4
    # the same four samples of the stream, one micro-batch or four
    assert torch.equal(
        whole.batches[0]["task_id"], torch.cat([b["task_id"] for b in split.batches])
    )
    reference, counts = split.reference, split.counts
    assert len([t for t in counts if counts[t] > 0]) >= 2  # several tasks weigh equally
    assert len(set(counts.values())) >= 2  # of different target lengths
    assert next(iter(reference.values())).dtype == torch.float64
    for name, grad in reference.items():
        # tau is computed in float32 (MoELoRALinear.tau): its gradient is float32-exact
        rtol = 1e-6 if name.endswith("log_tau") else 1e-9
        torch.testing.assert_close(split.grads[name], grad, rtol=rtol, atol=1e-12, msg=name)
        torch.testing.assert_close(whole.grads[name], grad, rtol=rtol, atol=1e-12, msg=name)
        torch.testing.assert_close(whole.grads[name], split.grads[name], rtol=1e-6, atol=1e-12)
    # and it is not the token mean (step_tokens) of the same step
    assert any(not torch.allclose(split.token_mean[n], g, rtol=1e-3) for n, g in reference.items())
