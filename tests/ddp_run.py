"""A short fit of a tiny float64 Llama under Lightning's DDP (gloo, CPU); tests/test_ddp.py runs it.

    python tests/ddp_run.py OUT --devices 2 [--ortho] [--max-steps N] [--accumulate A]
                            [--dropout P] [--checkpoint-every K] [--resume CKPT]

Lightning starts the second process itself (it re-runs this command with its rank set). Each
rank writes into OUT: ``rank{r}.pt`` with its micro-batches, the gradients of the first
optimizer step (after DDP's reduction and any Ortho-LoRA projection) and the loss of every
training step; rank zero also writes ``init.pt``, the trainable tensors before training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from medmoe.adapters import MoELoRAConfig
from medmoe.callbacks import AdapterExport
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.model import MedMoEModule

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


def make_module(data: MultiTaskDataModule, ortho: bool, dropout: float) -> MedMoEModule:
    return MedMoEModule(
        tiny_llama=TINY,
        adapter=MoELoRAConfig(
            allocation="uniform", num_experts=2, allowed_ranks=[2, 4], dropout=dropout
        ),
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


class Record(Callback):
    def __init__(self, out: Path, reseed: bool) -> None:
        self.out = out
        self.reseed = reseed
        self.batches: list[dict] = []
        self.grads: dict[str, torch.Tensor] | None = None
        self.losses: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.reseed:  # distinct dropout streams per rank (the module restores on resume)
            torch.manual_seed(1000 + trainer.global_rank)
        if trainer.global_rank == 0 and trainer.global_step == 0:
            state = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
            torch.save(
                {n: state[n] for n, p in pl_module.model.named_parameters() if p.requires_grad},
                self.out / "init.pt",
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.grads is None and trainer.global_step == 1:
            # after the first optimizer step: DDP's mean, the projection, then the step (the
            # gradients are zeroed only when the next step begins)
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.model.named_parameters()
                if p.grad is not None
            }

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"batches": self.batches, "grads": self.grads, "losses": self.losses}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--ortho", action="store_true")
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", type=str, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    seed_everything(0)
    data = make_data()
    module = make_module(data, args.ortho, args.dropout)
    module.configure_model()
    perturb_b(module)
    callbacks: list[Callback] = [
        Record(args.out, reseed=args.dropout > 0),
        AdapterExport(str(args.out / "adapter")),  # ends the fit on every rank (no hang)
    ]
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
        strategy=DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto",
        precision="64-true",
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=bool(args.checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
