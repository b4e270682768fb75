"""Peak memory of one training step through ``MedMoEModule``, side by side for seven variants.

For a Llama shape given on the command line (random weights, no download), one run measures:

1. ``no_ckpt``: Med-MoE-LoRA, no gradient checkpointing, the target-only chunked loss;
2. ``ckpt``: the same with (non-reentrant) gradient checkpointing of the decoder layers;
3. ``ckpt_full_vocab``: checkpointing with the old loss (logits at every position, one float32
   copy of them: ``medmoe.losses.full_vocabulary_token_losses``);
4. ``peft_lora``: peft LoRA on the same 7 projections at equal rank (``r`` = the mean summed
   expert rank of the MoE-LoRA layers, so the adapters are about the same size),
   checkpointing on, the target-only loss;
5. ``zero2``: ``ckpt`` trained by Lightning's ``Trainer.fit`` under medmoe's DeepSpeed ZeRO-2
   (``medmoe.strategies.DeepSpeedStrategy`` with med.yaml's settings: fp32 gradient
   accumulation and reduction, ``exclude_frozen_parameters``, clipping at 1, ``bf16-mixed``
   for ``--dtype bfloat16``), the optimizer state on the device, as
   ``configs/multi_gpu/deepspeed_zero2.yaml``;
6. ``zero2_offload``: the same with the optimizer offloaded to the CPU (DeepSpeed's CPU Adam),
   as ``configs/med.yaml``;
7. ``fsdp2``: ``ckpt`` under ``Trainer.fit`` with ``medmoe.strategies.FSDP2Strategy``, as
   ``configs/multi_gpu/fsdp2.yaml`` (one device here: the path's overhead; the sharding saves
   memory only across devices, docs/multi_gpu.md gives the arithmetic for 8).

Med-MoE-LoRA uses the paper's allocation scaled to the depth (layers ``1..round(10L/32)``: 2
experts, ``round(19L/32)+1..L``: 8, eq 2 between; ranks cycle 8/16/32; one base expert) and
med.yaml's loss (task + 0.01 balance + 0.01 knowledge preservation). A step is
``training_step`` + backward + AdamW step on a batch whose first ``--prompt-fraction`` of the
tokens are prompt (label ``-100``), measured after one warm-up step on a 16-token batch (code
paths loaded, AdamW state allocated: the figures are the step's activations, gradients and
loss, not one-time costs). Under the Trainer the two batches are the two optimizer steps of one
``fit`` (one micro-batch each) and a callback reads the meter around the second: its forward,
backward, ZeRO-2 gradient reduction and optimizer step.

Every variant runs in a fresh subprocess, so each high-water mark is its own:

* CPU: growth of the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` right before the step) over the resident set before it. glibc's
  mmap threshold is pinned low (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS.
* CUDA: ``max_memory_allocated()`` growth over ``memory_allocated()`` before the step.

Next to the growth, the step's peak itself (the high-water mark: weights, optimizer state,
DeepSpeed's buffers and all; on CPU the whole process's resident set) and its ratio to
``ckpt``'s: what the Trainer, ZeRO-2 and med.yaml's ``bf16-mixed`` autocast (the bare loop
runs none) add to the bare loop. The ratios are printed next to the targets of issue 10: checkpointing
<= 0.4x no checkpointing; the checkpointed step's growth <= 1.0x one float32 [B, T, vocab]
tensor.

Usage::

    python benchmarks/memory.py --hidden 256 --layers 8 --vocab 128256 --batch 4 --seq 1024
    python benchmarks/memory.py --shape llama3-8b --batch 4 --seq 2048 --device cuda \\
        --variants ckpt ckpt_full_vocab zero2_offload --json memory.json
    python benchmarks/memory.py --smoke   # every variant at a tiny shape on CPU, seconds each
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

VARIANTS = ("no_ckpt", "ckpt", "ckpt_full_vocab", "peft_lora", "zero2", "zero2_offload", "fsdp2")
TRAINER_VARIANTS = ("zero2", "zero2_offload", "fsdp2")
LABELS = {
    "no_ckpt": "Med-MoE-LoRA, no checkpointing",
    "ckpt": "Med-MoE-LoRA, checkpointing",
    "ckpt_full_vocab": "checkpointing, full-vocabulary loss (old)",
    "peft_lora": "peft LoRA r={rank}, checkpointing",
    "zero2": "checkpointing, Trainer + ZeRO-2",
    "zero2_offload": "checkpointing, Trainer + ZeRO-2, CPU-offloaded Adam",
    "fsdp2": "checkpointing, Trainer + FSDP2",
}
SHAPES = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8),
}
# --smoke: a shape that runs every variant on CPU in seconds
SMOKE = dict(hidden=64, layers=2, vocab=512, batch=2, seq=64, device="cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT = "RESULT "  # marks the worker's line of results on its stdout
warnings.filterwarnings("ignore", category=FutureWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a preset decoder shape")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None, help="default 3.5 x hidden")
    p.add_argument("--heads", type=int, default=None, help="default hidden / 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default heads / 4")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--prompt-fraction", type=float, default=7 / 8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help=f"a tiny run on CPU: {SMOKE}")
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    presets = {**(SHAPES[args.shape] if args.shape else {}), **(SMOKE if args.smoke else {})}
    for key, value in presets.items():
        setattr(args, key, value)
    args.intermediate = args.intermediate or int(3.5 * args.hidden)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    if not 0 <= args.prompt_fraction < 1:
        p.error(f"--prompt-fraction must lie in [0, 1), got {args.prompt_fraction}")
    return args


# --------------------------------------------------------------------------- the step
def moe_config(layers: int):
    from medmoe.adapters import MoELoRAConfig

    low = max(1, round(10 * layers / 32))
    high = min(layers, round(19 * layers / 32) + 1)
    ranges = {f"1-{low}": 2} if high > low + 1 else {}
    ranges[f"{max(high, low + 1)}-{layers}"] = 8
    return MoELoRAConfig(target_modules=list(TARGETS), layer_ranges=ranges, dropout=0.05)


def equal_rank(layers: int) -> int:
    ranks = moe_config(layers).layer_ranks(layers)
    return max(1, round(sum(sum(r) for r in ranks) / layers))


def build_module(args: argparse.Namespace, variant: str):
    from medmoe.adapters.lora import LoRA
    from medmoe.losses import full_vocabulary_token_losses
    from medmoe.model import MedMoEModule

    class FullVocabularyLoss(MedMoEModule):
        """The old loss path: logits at every position and their float32 copy."""

        def token_losses(self, batch):
            return full_vocabulary_token_losses(self.model, batch)

    cls = FullVocabularyLoss if variant == "ckpt_full_vocab" else MedMoEModule
    if variant == "peft_lora":
        rank = equal_rank(args.layers)
        adapter = LoRA(r=rank, lora_alpha=2.0 * rank, dropout=0.05, target_modules=list(TARGETS))
    else:
        adapter = moe_config(args.layers)
    module = cls(
        tiny_llama=dict(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab,
            max_position_embeddings=max(args.seq, 128),
        ),
        adapter=adapter,
        torch_dtype=args.dtype,
        gradient_checkpointing=variant != "no_ckpt",
        lambda_balance=0.01,
        lambda_kp=0.01 if variant != "peft_lora" else 0.0,
    )
    if args.device.startswith("cuda"):  # build (and initialise) the weights on the GPU
        with torch.device(args.device):
            module.configure_model()
    else:
        module.configure_model()
    return module.to(args.device).train()


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    from medmoe.losses import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : int(args.prompt_fraction * args.seq)] = IGNORE_INDEX  # [B, T]
    targets = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "task_id": torch.zeros(args.batch, dtype=torch.long),
        "is_general": torch.arange(args.batch) % 2 == 0,
        "target_index": targets.flatten().nonzero().squeeze(1),  # as the collate does
        "step_target_tokens": targets.sum(),
    }
    return {k: v.to(args.device) for k, v in batch.items()}


class PeakMeter:
    """High-water growth of one process's memory: CUDA allocator or CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.base = self._status("VmRSS")

    def peak(self) -> int:
        """The high-water mark since ``start`` itself: allocated (CUDA) or resident (CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")

    def growth(self) -> int:
        return self.peak() - self.base


def warm_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The warm-up step's batch: one 16-token sequence."""
    return make_batch(argparse.Namespace(**{**vars(args), "batch": 1, "seq": 16}))


def measure(args: argparse.Namespace, variant: str) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant in TRAINER_VARIANTS:
        return measure_trainer(args, variant)
    device = torch.device(args.device)
    module = build_module(args, variant)
    batch = make_batch(args)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    # warm-up on a 16-token batch: code paths loaded, AdamW state allocated, so the measured
    # step's growth is activations, gradients and the loss, not one-time costs
    warm = warm_batch(args)
    module.training_step(warm, 0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del warm
    meter = PeakMeter(device)
    meter.start()
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "variant": variant,
        "peak_growth_bytes": meter.growth(),
        "peak_bytes": meter.peak(),
        "loss": float(loss),
        "trainable_params": sum(p.numel() for p in trainable),
    }


def measure_trainer(args: argparse.Namespace, variant: str) -> dict:
    """The warm-up and the measured step as the two optimizer steps of one ``Trainer.fit``."""
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.utils.data import DataLoader

    from medmoe.strategies import DeepSpeedStrategy, FSDP2Strategy

    device = torch.device(args.device)
    meter = PeakMeter(device)
    batches = [warm_batch(args), make_batch(args)]
    measured_idx = len(batches) - 1
    result: dict = {"variant": variant}

    class MeasuredStep(Callback):
        """The meter around the last batch: forward, backward, reduction, optimizer step."""

        def on_train_batch_start(
            self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
        ) -> None:
            if batch_idx == measured_idx:
                meter.start()

        def on_train_batch_end(
            self,
            trainer: Trainer,
            pl_module: LightningModule,
            outputs: dict,
            batch: dict,
            batch_idx: int,
        ) -> None:
            if batch_idx == measured_idx:
                result.update(peak_growth_bytes=meter.growth(), peak_bytes=meter.peak())
                result["loss"] = float(outputs["loss"])

    module = build_module(args, variant)
    result["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if variant == "fsdp2":
        strategy = FSDP2Strategy()
    else:
        strategy = DeepSpeedStrategy(
            stage=2,
            offload_optimizer=variant == "zero2_offload",
            exclude_frozen_parameters=True,
            logging_batch_size_per_gpu=args.batch,
        )
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.index is not None else 1,
        strategy=strategy,
        precision="bf16-mixed" if args.dtype == "bfloat16" else "32-true",
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MeasuredStep()],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))  # batches as they are
    return result


# --------------------------------------------------------------------------- the table
def run_variant(args: argparse.Namespace, argv: list[str], variant: str) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # big tensors mmap'd: freed -> RSS drops
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :])  # DeepSpeed also logs to stdout


def table(args: argparse.Namespace, results: dict[str, dict]) -> tuple[str, dict]:
    element = torch.tensor([], dtype=torch.float32).element_size()
    logits_fp32 = args.batch * args.seq * args.vocab * element
    reference = results.get("no_ckpt", {}).get("peak_growth_bytes")
    bare_peak = results.get("ckpt", {}).get("peak_bytes")
    mib = 2**20
    lines = [
        f"shape: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
        f"heads {args.heads}/{args.kv_heads}, vocab {args.vocab}; B={args.batch}, "
        f"T={args.seq}, prompt {args.prompt_fraction:.3f} of the tokens; {args.dtype} on "
        f"{args.device}",
        f"one float32 [B, T, vocab] tensor: {logits_fp32 / mib:.0f} MiB",
        "",
        "| variant | step peak growth (MiB) | / no checkpointing | / fp32 [B,T,V] "
        "| step peak (MiB) | peak / checkpointing |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for variant, result in results.items():
        growth, peak = result["peak_growth_bytes"], result["peak_bytes"]
        vs_ref = growth / reference if reference else float("nan")
        vs_logits = growth / logits_fp32
        vs_bare = peak / bare_peak if bare_peak else float("nan")
        ratios[variant] = {
            "vs_no_ckpt": vs_ref,
            "vs_fp32_logits": vs_logits,
            "peak_vs_ckpt": vs_bare,
        }
        label = LABELS[variant].format(rank=equal_rank(args.layers))
        lines.append(
            f"| {label} | {growth / mib:.0f} | {vs_ref:.2f} | {vs_logits:.2f} "
            f"| {peak / mib:.0f} | {vs_bare:.2f} |"
        )
    if "ckpt" in ratios:
        lines.append("")
        if reference:
            ok = ratios["ckpt"]["vs_no_ckpt"] <= 0.4
            lines.append(
                f"target checkpointing <= 0.4x no checkpointing: "
                f"{ratios['ckpt']['vs_no_ckpt']:.2f} {'PASS' if ok else 'FAIL'}"
            )
        ok = ratios["ckpt"]["vs_fp32_logits"] <= 1.0
        lines.append(
            f"target checkpointed step <= 1.0x fp32 [B,T,V]: "
            f"{ratios['ckpt']['vs_fp32_logits']:.2f} {'PASS' if ok else 'FAIL'}"
        )
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(measure(args, args.worker)))
        return 0
    results, failed = {}, {}
    for variant in args.variants:
        try:
            results[variant] = run_variant(args, argv, variant)
        except RuntimeError as error:  # one variant's failure must not end the table
            failed[variant] = str(error)
            print(error, file=sys.stderr, flush=True)
            continue
        growth = results[variant]["peak_growth_bytes"] / 2**20
        print(f"{variant}: {growth:.0f} MiB", file=sys.stderr, flush=True)
    text, ratios = table(args, results)
    if failed:
        text += f"\n\nfailed (stderr above): {', '.join(failed)}"
    print(text)
    if args.json:
        payload = {
            "args": vars(args),
            "results": results,
            "failed": failed,
            "ratios": ratios,
            "table": text,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
