"""Training-step time of Ortho-LoRA against plain peft LoRA, side by side in one run.

A tiny Llama (random weights, no download) is built three times, each with peft LoRA (rank R,
``lora_alpha = 2R``, no dropout; or, with ``--adapter moe``, medmoe's MoE-LoRA) on the 7
projections and its own AdamW, and one training step
(forward, masked LM loss, backward, optimizer step) is timed for:

1. ``lora``: the plain step, the loss's ordinary gradient.
2. ``ortho``: Ortho-LoRA as medmoe does it: the forward inside ``OrthoLoRA.capture(task_ids)``,
   one backward that also yields every factor's per-task gradients, then ``OrthoLoRA.project``.
3. ``reference``: the naive way: one forward and backward per task
   (``per_task_gradients_reference``), then the same projection factor by factor.

Each batch mixes ``--tasks`` tasks (sample ``b`` belongs to task ``b mod K``); the first quarter
of every sequence is prompt (no loss). Timings are interleaved round-robin after warm-up; the
median is reported with its ratio to ``lora``. Before timing, the one-backward per-task gradients
are checked against the reference (max abs difference printed).

Usage::

    python benchmarks/ortho_speed.py
    python benchmarks/ortho_speed.py --batch 24 --tasks 5 --threads 8
    python benchmarks/ortho_speed.py --adapter moe    # MoE-LoRA instead of peft LoRA
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("lora", "ortho", "reference")
LABELS = {
    "lora": "{adapter}, plain step",
    "ortho": "Ortho-LoRA, one backward + projection ({tasks} tasks)",
    "reference": "Ortho-LoRA, one backward per task + projection ({tasks} tasks)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--batch", type=int, default=12, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--tasks", type=int, default=3, help="tasks per batch (K)")
    p.add_argument(
        "--adapter",
        default="peft",
        choices=("peft", "moe"),
        help="peft LoRA, or medmoe MoE-LoRA (4 experts of ranks R/4, R/2, R, R/4, soft)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (one step per variant)")
    p.add_argument("--target", type=float, default=1.3, help="ortho / lora step time")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from medmoe.adapters.config import LLAMA_TARGETS

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        pad_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(config).to(args.device).train()
    if args.adapter == "moe":
        from medmoe.adapters import MoELoRAConfig, apply_moe_lora

        ranks = sorted({max(args.rank // 4, 1), max(args.rank // 2, 1), args.rank})
        moe = MoELoRAConfig(
            allocation="uniform", num_experts=4, allowed_ranks=ranks, layer_ranges=None, dropout=0.0
        )
        apply_moe_lora(base, moe)
        model = base
    else:
        lora = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=list(LLAMA_TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    with torch.no_grad():  # B != 0, so every factor has a gradient and tasks can conflict
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.normal_(std=0.02)
    return model


def make_batch(args: argparse.Namespace) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.seq // 4] = -100  # prompt
    task_ids = torch.arange(args.batch) % args.tasks
    batch = {"input_ids": input_ids, "labels": labels, "task_id": task_ids}
    return {k: v.to(args.device) for k, v in batch.items()}


def lm_loss(model: nn.Module, batch: dict[str, Tensor], task: int | None = None) -> Tensor:
    """Mean next-token loss over the batch's target tokens; with ``task``, that task's share."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # [B, T-1, V]
    labels = batch["labels"][:, 1:]  # [B, T-1]
    count = (labels != -100).sum()
    if task is not None:
        labels = labels.masked_fill((batch["task_id"] != task)[:, None], -100)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    return loss / count


def step_functions(args: argparse.Namespace, batch: dict[str, Tensor]) -> dict[str, Callable]:
    from medmoe.objectives.projection import OrthoLoRA, project_task_gradients
    from medmoe.objectives.task_gradients import lora_factors, per_task_gradients_reference

    steps = {}
    for name in VARIANTS:
        model = build(args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if name == "lora":

            def step(model=model, optimizer=optimizer) -> None:
                lm_loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        elif name == "ortho":
            ortho = OrthoLoRA(model, args.tasks, order="fixed")

            def step(model=model, optimizer=optimizer, ortho=ortho) -> None:
                with ortho.capture(batch["task_id"]):
                    loss = lm_loss(model, batch)
                loss.backward()
                ortho.project()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        else:
            factors = dict(lora_factors(model))

            def step(model=model, optimizer=optimizer, factors=factors) -> None:
                per_task = per_task_gradients_reference(
                    model, lambda task: lm_loss(model, batch, task), args.tasks
                )
                for key, grads in per_task.items():
                    factors[key].grad = project_task_gradients(grads, order="fixed").sum(0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def check_gradients(args: argparse.Namespace, batch: dict[str, Tensor]) -> float:
    """Max abs difference between one-backward and per-task-backward per-task gradients."""
    from medmoe.objectives.projection import OrthoLoRA
    from medmoe.objectives.task_gradients import per_task_gradients_reference

    model = build(args)
    ortho = OrthoLoRA(model, args.tasks)
    with ortho.capture(batch["task_id"]):
        loss = lm_loss(model, batch)
    loss.backward()
    got = ortho.per_task_gradients()
    expected = per_task_gradients_reference(
        model, lambda task: lm_loss(model, batch, task), args.tasks
    )
    return max((got[k] - v).abs().max().item() for k, v in expected.items())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    difference = check_gradients(args, batch)
    steps = step_functions(args, batch)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.warmup + args.reps):
        rotation = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
        for name in rotation:
            synchronize(args.device)
            start = time.perf_counter()
            steps[name]()
            synchronize(args.device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(
        f"tiny Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
        f"layers, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; {args.adapter} "
        f"adapter (rank {args.rank}) on 7 projections; {args.tasks} tasks per batch; {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor()}; "
        f"median of {args.reps} after {args.warmup} warm-up rounds\n"
    )
    print("| step | ms/step | ratio to the plain step |")
    print("| --- | ---: | ---: |")
    for name in VARIANTS:
        adapter = f"peft LoRA r={args.rank}" if args.adapter == "peft" else "MoE-LoRA"
        label = LABELS[name].format(adapter=adapter, tasks=args.tasks)
        print(f"| {label} | {medians[name]:.1f} | {medians[name] / medians['lora']:.2f}x |")
    ratio = medians["ortho"] / medians["lora"]
    verdict = "PASS" if ratio <= args.target else "FAIL"
    print(
        f"\nOrtho-LoRA / plain = {ratio:.2f}x (target <= {args.target}x): {verdict}; "
        f"per-task gradients vs reference: max abs difference {difference:.2e}"
    )


if __name__ == "__main__":
    main()
