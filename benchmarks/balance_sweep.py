"""Expert utilisation with and without the balance term on the toy clinic, over a lambda sweep.

    python benchmarks/balance_sweep.py [--steps 60]

Each run is the demo (configs/demo.yaml: toy base, Med-MoE-LoRA, eq-2 allocation 3/5/6/8 experts,
lr 2e-3) for ``--steps`` optimizer steps with knowledge preservation off (so only the balance
term acts on the load), then one validation pass of 4 batches: printed per run, the
utilisation CV (population std / mean of each layer's mean gate per expert, averaged over the
adapted layers; 0 = balanced, sqrt(N-1) = collapsed) and the router entropy over log N
(1 = uniform), both mean and worst layer.
"""

from __future__ import annotations

import argparse
import math

import torch
from lightning.pytorch import Trainer, seed_everything

from medmoe.adapters import MoELoRAConfig
from medmoe.callbacks.stats import coefficient_of_variation, expert_utilisation, router_entropy
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.model import MedMoEModule


def _data() -> MultiTaskDataModule:
    tasks = [
        TaskConfig(n, source="toy", max_eval=64) for n in ("medqa", "pubmedqa", "clinical_sum")
    ]
    replay = [TaskConfig(n, source="toy", max_eval=64) for n in ("mmlu", "gsm8k")]
    return MultiTaskDataModule(
        tokenizer="toy",
        tasks=tasks,
        replay=replay,
        replay_ratio=0.2,
        max_length=64,
        batch_size=32,
        eval_batch_size=32,
        seed=0,
    )


def run(form: str, lam: float, steps: int) -> dict[str, float]:
    seed_everything(0)
    data = _data()
    adapter = MoELoRAConfig(
        allocation="eq2",
        n_min=2,
        n_max=8,
        allowed_ranks=[2, 4, 8],
        dropout=0.05,
        base_expert_fraction=0.5,
    )
    module = MedMoEModule(
        model_name_or_path="toy",
        adapter=adapter,
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=lam,
        balance_form=form,
        lambda_kp=0.0,
        learning_rate=2e-3,
        router_learning_rate=2e-3,
        warmup_ratio=0.03,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=data)
    data.setup("validate")
    cvs, entropies = [], []
    module.eval()
    with torch.no_grad():
        for index, batch in enumerate(data.val_dataloader()):
            if index == 4:
                break
            module(batch["input_ids"], batch["attention_mask"])
            mask = batch["attention_mask"].bool()
            for layer in module.moe_layers:
                gates = layer.last_gates
                n = gates.shape[-1]
                cvs.append(float(coefficient_of_variation(expert_utilisation(gates, mask))))
                entropies.append(float(router_entropy(gates, mask)) / math.log(n))
    return {
        "cv_mean": sum(cvs) / len(cvs),
        "cv_max": max(cvs),
        "entropy_mean": sum(entropies) / len(entropies),
        "entropy_min": min(entropies),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    runs = [
        ("none", 0.0),
        ("variance", 0.01),
        ("normalized", 0.01),
        ("normalized", 0.1),
        ("normalized", 1.0),
    ]
    print(f"steps {args.steps}")
    print("form | lambda | CV mean | CV worst | entropy/logN mean | entropy/logN worst")
    print("---|---|---|---|---|---")
    for form, lam in runs:
        r = run("variance" if form == "none" else form, lam, args.steps)
        print(
            f"{form} | {lam:g} | {r['cv_mean']:.3f} | {r['cv_max']:.3f} | "
            f"{r['entropy_mean']:.3f} | {r['entropy_min']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
