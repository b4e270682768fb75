"""A short fit of a tiny Llama on 2 CPU processes: Lightning's DDP (gloo), DeepSpeed or FSDP2.

    python tests/distributed_run.py OUT --devices 2 [--strategy ddp|deepspeed|fsdp2]
        [--precision 64-true|32-true|bf16-mixed] [--offload] [--method moe|multi_lora|full]
        [--ortho] [--max-steps N] [--accumulate A] [--clip C] [--dropout P]
        [--checkpoint-every K] [--resume CKPT] [--nan-at RANK:STEP] [--fail-at RANK:STEP]

tests/test_ddp.py and tests/test_deepspeed_engine.py run it. Lightning starts the second
process itself (it re-runs this command with its rank set). Each rank writes into OUT:
``rank{r}.pt`` with its micro-batches, the gradients of the first optimizer step (after DDP's
reduction and any Ortho-LoRA projection; DeepSpeed keeps them in its own buffers), the loss of
every micro-batch as ``(step, loss)`` and the final trainable tensors; rank zero also writes
``init.pt`` (the trainable tensors before training), ``logits.pt`` (the trained model's logits
on a fixed batch) and the CSV log (``train/grad_norm`` of every step).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from medmoe.adapters import MoELoRAConfig  # noqa: E402
from medmoe.adapters.baselines import FullFineTune, MultiLoRA  # noqa: E402
from medmoe.callbacks import AdapterExport  # noqa: E402
from medmoe.data import MultiTaskDataModule, TaskConfig  # noqa: E402
from medmoe.model import MedMoEModule  # noqa: E402

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
BATCH_SIZE = 2


def make_data() -> MultiTaskDataModule:
    return MultiTaskDataModule(
        tasks=[
            TaskConfig("medqa", source="toy", max_train=32, max_eval=4),
            TaskConfig("pubmedqa", source="toy", max_train=32, max_eval=4),
            TaskConfig("clinical_sum", source="toy", max_train=32, max_eval=4),
        ],
        batch_size=BATCH_SIZE,
        max_length=96,
    )


def make_adapter(method: str, dropout: float):
    if method == "multi_lora":
        return MultiLoRA(num_tasks=3, r=2, lora_alpha=4.0)
    if method == "full":
        return FullFineTune()
    return MoELoRAConfig(allocation="uniform", num_experts=2, allowed_ranks=[2, 4], dropout=dropout)


def make_module(
    data: MultiTaskDataModule, ortho: bool, dropout: float, method: str = "moe"
) -> MedMoEModule:
    return MedMoEModule(
        tiny_llama=TINY,
        adapter=make_adapter(method, dropout),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.0,
        lambda_kp=0.0,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        gradient_projection="ortho" if ortho else "none",
        projection_order="fixed",
    )


def perturb_b(module: MedMoEModule) -> None:
    """B != 0 (seeded), so every factor has a gradient at the first step."""
    generator = torch.Generator().manual_seed(7)
    for name, param in module.model.named_parameters():
        if name.endswith("lora_B"):
            with torch.no_grad():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, whole (FSDP2's shards gathered)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


class Record(Callback):
    def __init__(self, out: Path, reseed: bool) -> None:
        self.out = out
        self.reseed = reseed
        self.batches: list[dict] = []
        self.grads: dict[str, torch.Tensor] | None = None
        self.losses: list[tuple[int, float]] = []  # (optimizer step, micro-batch loss)
        self._step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.reseed:  # distinct dropout streams per rank (the module restores on resume)
            torch.manual_seed(1000 + trainer.global_rank)
        if trainer.global_step == 0:
            trainable = trainable_tensors(pl_module.model)  # a collective under FSDP2
            if trainer.global_rank == 0:
                torch.save(trainable, self.out / "init.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})
        self._step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((self._step, float(outputs["loss"])))
        if self.grads is None and trainer.global_step == 1:
            # after the first optimizer step: DDP's mean, the projection, then the step (the
            # gradients are zeroed only when the next step begins)
            self.grads = {
                n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for n, p in pl_module.model.named_parameters()
                if p.grad is not None
            }

    def on_train_end(self, trainer, pl_module) -> None:
        final = {n: t.float() for n, t in trainable_tensors(pl_module.model).items()}
        dtypes = {n: p.dtype for n, p in pl_module.model.named_parameters() if p.requires_grad}
        record = {
            "batches": self.batches,
            "grads": self.grads,
            "losses": self.losses,
            "final": final,
            "dtypes": dtypes,
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
        batch = self.batches[0]
        pl_module.model.eval()
        with torch.no_grad():  # on every rank: under FSDP2 the forward is a collective
            pl_module.adapter.prepare_batch(pl_module.model, batch)  # multi-LoRA: task ids
            logits = pl_module.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        if trainer.global_rank == 0:
            torch.save(logits.float(), self.out / "logits.pt")


def _rank_and_step(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    rank, step = text.split(":")
    return int(rank), int(step)


class Fault(Callback):
    """On one rank at one step: a NaN loss (``--nan-at``) or a failing record (``--fail-at``)."""

    def __init__(self, nan_at: tuple[int, int] | None, fail_at: tuple[int, int] | None) -> None:
        self.nan_at, self.fail_at = nan_at, fail_at

    def setup(self, trainer, pl_module, stage) -> None:
        if self.nan_at is None or trainer.global_rank != self.nan_at[0]:
            return
        compute_losses = pl_module.compute_losses

        def poisoned(batch):
            losses = compute_losses(batch)
            if pl_module.training and pl_module.global_step + 1 == self.nan_at[1]:
                losses["token_loss"] = losses["token_loss"] * float("nan")
                losses["loss"] = losses["loss"] * float("nan")
            return losses

        pl_module.compute_losses = poisoned

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fail_at == (trainer.global_rank, trainer.global_step + 1):
            raise ValueError(
                f"record {batch_idx} of rank {trainer.global_rank} is malformed (planted fault)"
            )


def kill_during_save(count: int) -> None:
    """SIGKILL this process half-way through its ``count``-th DeepSpeed checkpoint save (after
    the module states, before the optimizer shards)."""
    import signal

    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._save_zero_checkpoint
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    DeepSpeedEngine._save_zero_checkpoint = dying


def make_strategy(args: argparse.Namespace):
    if args.strategy == "deepspeed":
        from medmoe.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            stage=2,
            offload_optimizer=args.offload,
            exclude_frozen_parameters=True,
            logging_batch_size_per_gpu=BATCH_SIZE,
        )
    if args.strategy == "fsdp2":
        from medmoe.strategies import FSDP2Strategy

        return FSDP2Strategy()
    if args.devices > 1:
        return DDPStrategy(process_group_backend="gloo")
    return "auto"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "deepspeed", "fsdp2"], default="ddp")
    parser.add_argument("--precision", default="64-true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--method", choices=["moe", "multi_lora", "full"], default="moe")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--nan-at", default=None)
    parser.add_argument("--fail-at", default=None)
    parser.add_argument("--ortho", action="store_true")
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", type=str, default=None)
    parser.add_argument("--rolling-every", type=int, default=0)
    parser.add_argument("--kill-during-save", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    seed_everything(0)
    data = make_data()
    module = make_module(data, args.ortho, args.dropout, args.method)
    module.configure_model()
    if args.method == "moe":
        perturb_b(module)
    callbacks: list[Callback] = [
        Record(args.out, reseed=args.dropout > 0),
        Fault(_rank_and_step(args.nan_at), _rank_and_step(args.fail_at)),
        AdapterExport(str(args.out / "adapter")),  # ends the fit on every rank (no hang)
    ]
    if args.kill_during_save:
        kill_during_save(args.kill_during_save)
    if args.rolling_every:
        from medmoe.callbacks import ResumableCheckpoint

        callbacks.append(
            ResumableCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.rolling_every)
        )
    if args.checkpoint_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.out / "ckpt",
                every_n_train_steps=args.checkpoint_every,
                save_top_k=-1,
            )
        )
    trainer = Trainer(
        default_root_dir=args.out,
        accelerator="cpu",
        devices=args.devices,
        strategy=make_strategy(args),
        precision=args.precision,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        logger=CSVLogger(args.out, name="log", version=0),
        log_every_n_steps=1,
        enable_checkpointing=bool(args.checkpoint_every or args.rolling_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
