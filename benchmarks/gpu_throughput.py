"""Training throughput and MFU of Med-MoE-LoRA next to a frozen base, peft LoRA and Ortho-LoRA.

One run builds a Llama-shaped model with random weights (``LlamaConfig``, no download) once
per variant and gradient-checkpointing mode, and times a full training step of:

1. ``frozen``: the base without adapters; ``enable_input_require_grads`` makes the backward
   run down to the input embeddings (activation gradients only, no weight gradients, no
   optimizer step). The floor every adapter method pays.
2. ``lora``: peft LoRA of rank R (``--rank``, default 16, the paper's baseline) on q, k, v, o,
   gate, up and down, ``lora_alpha = 2R``, AdamW.
3. ``moe_lora``: medmoe's Med-MoE-LoRA with the paper's allocation (``MoELoRAConfig``
   defaults: layers 1-10 get 2 experts, layers 20-32 get 8, layers 11-19 follow eq 2; ranks
   cycle 8/16/32; one base expert; soft merging), and the loss of ``MedMoEModule``: task loss
   + 0.01 x load balance (variance) + 0.01 x knowledge preservation (delta 0.5, med.yaml's).
   For a shape with L != 32 layers the two ranges are scaled to its depth
   (``1-round(10L/32)`` and ``round(19L/32)+1 - L``).
4. ``ortho_lora``: peft LoRA of rank R with medmoe's Ortho-LoRA: the forward inside
   ``OrthoLoRA.capture(task_ids)`` (``--tasks`` tasks, default 3, sample b belongs to task
   b mod K), one backward that also yields every factor's per-task gradients, then
   ``OrthoLoRA.project()`` before the AdamW step.

Adapters are kept as ``configs/med.yaml`` trains them: on the bf16 base every adapter's
factors are float32 (MoE-LoRA's ``adapter_dtype: float32``; peft's ``autocast_adapter_dtype``,
its default, for LoRA and Ortho-LoRA), with dropout ``--dropout`` (default 0.05, the paper's).

The task loss of every variant is medmoe's, the one ``MedMoEModule`` trains with
(``medmoe.losses.target_token_losses``): the decoder's last hidden states, then the LM head on
the positions whose next token is a target only, in chunks of rows, each under activation
checkpointing (its float32 logits recomputed in backward), never transformers' loss over a
[B, T, vocab] float32 copy of the logits. Here every next token is a target: M = B (T-1) rows.

A step is forward + loss + backward (+ projection) + AdamW step on the trainable parameters;
``--warmup`` untimed steps, then the median of ``--steps`` timed steps (device synchronised
around each). Peak memory is ``torch.cuda.max_memory_allocated()`` over the timed steps
(weights included; reset after warm-up); on CPU it is not measured.

FLOP model (what "model FLOPs" means in the table; T = batch x seq tokens, s = seq, d = hidden,
L = decoder layers, B = batch)::

    N_base    = matmul parameters of the base: N_layers (per layer q, k, v, o, gate, up,
                down) + N_head (lm_head; the embedding lookup is no matmul)
    M         = B (s-1), the rows the LM head runs on (the target positions)
    base fwd  = 2 N_layers T + 2 N_head M + 4 L s^2 d B
                                                 (attention QK^T and PV over the full s x s
                                                  square: the causal half that kernels may
                                                  skip is counted as used)
    base bwd  = 2 N_layers T + 2 N_head M + 8 L s^2 d B
                                                 (frozen weights: input gradients only, no
                                                  weight gradients; attention has no weights,
                                                  its backward is 2x its forward)
    adapter fwd = sum over adapted linears 2 T (sum_i r_i)(d_in + d_out)
                + sum over MoE-LoRA layers 2 T d_in N            (router)
    adapter bwd = 2 x adapter fwd                                (input + weight gradients)
    ortho     = + sum over LoRA factors 2 T r (d_in + d_out)     (per-task gradient products,
                                                  the weight-gradient products once more);
                  Gram matrices and projection are O(F K^2 n) and not counted
    recompute = 2 N_head M: the LM head's chunks again (the loss checkpoints them)
                + with gradient checkpointing: base fwd + adapter fwd of the decoder
                layers again

    MFU = (base fwd + base bwd + adapter fwd + adapter bwd + ortho) / step time / peak
    HFU = MFU's FLOPs + recompute, over the same time and peak

MFU does not count the recomputes (so checkpointing lowers MFU by the time it costs); HFU
does. The float32 adapter matmuls count against the same bf16 peak. Peak: ``--peak-tflops``
(default 989, the dense bf16 Tensor-Core peak of an H100 SXM; H200 has the same). On CPU, MFU
and HFU are shown as n/a.

Usage::

    python benchmarks/gpu_throughput.py --shape llama3-8b --seq 2048 --batch 1
    python benchmarks/gpu_throughput.py --shape small --checkpointing on --json small.json
    python benchmarks/gpu_throughput.py --device cpu --shape tiny --dtype float32   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

VARIANTS = ("frozen", "lora", "moe_lora", "ortho_lora")
LABELS = {
    "frozen": "frozen base (backward to inputs)",
    "lora": "peft LoRA r={rank}",
    "moe_lora": "Med-MoE-LoRA (paper allocation)",
    "ortho_lora": "Ortho-LoRA (LoRA r={rank}, {tasks} tasks)",
}
SHAPES: dict[str, dict[str, int]] = {
    # Meta-Llama-3-8B's decoder shape.
    "llama3-8b": dict(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        vocab=128256,
        seq=2048,
        batch=1,
    ),
    # A quick run with the same proportions (GQA 4:1, MLP 3.5x).
    "small": dict(
        hidden=1024,
        intermediate=3584,
        layers=8,
        heads=16,
        kv_heads=4,
        vocab=32000,
        seq=2048,
        batch=4,
    ),
    # The CPU smoke test.
    "tiny": dict(
        hidden=64,
        intermediate=160,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=256,
        seq=64,
        batch=3,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAMBDA_BALANCE = 0.01  # configs/med.yaml
LAMBDA_KP = 0.01
KP_DELTA = 0.5
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (shape default)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (shape default)")
    p.add_argument("--rank", type=int, default=16, help="peft LoRA / Ortho-LoRA rank R")
    p.add_argument("--tasks", type=int, default=3, help="Ortho-LoRA tasks K")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (all methods)")
    p.add_argument(
        "--checkpointing",
        choices=("off", "on", "both"),
        default="both",
        help="gradient checkpointing (non-reentrant) of the decoder layers",
    )
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run"
    )
    p.add_argument("--device", default="cuda", help="cuda[:i] or cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the device"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.seq = args.seq or shape["seq"]
    args.batch = args.batch or shape["batch"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs CUDA (torch.cuda.is_available() is False); use --device cpu")
    if args.tasks < 2:
        p.error("--tasks must be >= 2")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


# --------------------------------------------------------------------------- models
def scaled_ranges(num_layers: int) -> dict[str, int]:
    """The paper's ``{"1-10": 2, "20-32": 8}`` scaled from 32 layers to ``num_layers``."""
    low_end = max(1, round(10 * num_layers / 32))
    high_start = min(num_layers, max(low_end + 1, round(19 * num_layers / 32) + 1))
    if high_start <= low_end:
        raise ValueError(f"cannot scale the paper's layer ranges to {num_layers} layer(s)")
    return {f"1-{low_end}": 2, f"{high_start}-{num_layers}": 8}


def moe_config(num_layers: int, dropout: float):
    from medmoe.adapters import MoELoRAConfig

    defaults = MoELoRAConfig()
    ranges = defaults.layer_ranges if num_layers == 32 else scaled_ranges(num_layers)
    return MoELoRAConfig(layer_ranges=ranges, dropout=dropout, adapter_dtype="float32")


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    shape = SHAPES[args.shape]
    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(args.seq, 128),
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        attn_implementation=args.attn,
    )


def build_base(args: argparse.Namespace) -> nn.Module:
    """The random-weight base, created directly on the device in the benchmark dtype."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(llama_config(args))
    finally:
        torch.set_default_dtype(previous)  # adapters' fp32 routers must not inherit it
    return model


def peft_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=args.dropout,
        target_modules=list(TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)  # fp32 factors


@dataclass
class FlopCount:
    """Model FLOPs of one training step, by term (see the module docstring)."""

    base_fwd: float = 0.0
    base_bwd: float = 0.0
    adapter_fwd: float = 0.0
    adapter_bwd: float = 0.0
    ortho: float = 0.0
    recompute: float = 0.0

    @property
    def model(self) -> float:
        return self.base_fwd + self.base_bwd + self.adapter_fwd + self.adapter_bwd + self.ortho

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def base_matmul_params(config) -> tuple[int, int]:
    """(matmul parameters of the decoder layers, of lm_head)."""
    d, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * inter  # q, k, v, o, gate, up, down
    return per_layer * config.num_hidden_layers, d * config.vocab_size


def adapter_sites(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """(total rank, d_in, d_out, router experts) of every adapted linear layer."""
    from medmoe.adapters.moe_lora import MoELoRALinear

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()  # noqa: N806
    sites = []
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            sites.append(
                (sum(module.ranks), module.in_features, module.out_features, module.num_experts)
            )
        elif LoraLayer and isinstance(module, LoraLayer) and "default" in module.lora_A:
            rank, d_in = module.lora_A["default"].weight.shape
            d_out = module.lora_B["default"].weight.shape[0]
            sites.append((rank, d_in, d_out, 0))
    return sites


def count_flops(
    name: str, config, sites: list[tuple[int, int, int, int]], batch: int, seq: int, ckpt: bool
) -> FlopCount:
    tokens = batch * seq
    rows = batch * (seq - 1)  # the LM head's: every next token is a target
    layers_params, head_params = base_matmul_params(config)
    attention_fwd = 4 * config.num_hidden_layers * seq**2 * config.hidden_size * batch
    head_fwd = 2 * head_params * rows
    flops = FlopCount()
    flops.base_fwd = 2 * layers_params * tokens + head_fwd + attention_fwd
    flops.base_bwd = 2 * layers_params * tokens + head_fwd + 2 * attention_fwd
    low_rank = sum(2 * tokens * r * (d_in + d_out) for r, d_in, d_out, _ in sites)
    router = sum(2 * tokens * d_in * n for _, d_in, _, n in sites)
    flops.adapter_fwd = low_rank + router
    flops.adapter_bwd = 2 * flops.adapter_fwd
    if name == "ortho_lora":
        flops.ortho = low_rank
    flops.recompute = head_fwd  # medmoe's loss checkpoints every chunk of the LM head
    if ckpt:
        flops.recompute += 2 * layers_params * tokens + attention_fwd + flops.adapter_fwd
    return flops


# --------------------------------------------------------------------------- one variant
class Runner:
    """A variant's model, batch, optimizer and training step."""

    def __init__(self, name: str, args: argparse.Namespace, ckpt: bool) -> None:
        from medmoe.adapters import apply_moe_lora, enable_gradient_checkpointing

        self.name = name
        self.args = args
        self.cuda = args.device.startswith("cuda")
        model = build_base(args)
        if ckpt:
            enable_gradient_checkpointing(model)
        self.moe_layers: list[nn.Module] = []
        self.ortho = None
        if name == "frozen":
            model.requires_grad_(False)
            model.enable_input_require_grads()
        elif name in ("lora", "ortho_lora"):
            model = peft_lora(model, args)
            if name == "ortho_lora":
                from medmoe.objectives.projection import OrthoLoRA

                self.ortho = OrthoLoRA(model, args.tasks, seed=args.seed)
        elif name == "moe_lora":
            self.moe_layers = apply_moe_lora(model, moe_config(len(_layers(model)), args.dropout))
        else:  # pragma: no cover - argparse restricts the names
            raise ValueError(name)
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5) if self.params else None
        generator = torch.Generator().manual_seed(args.seed + 1)
        vocab = SHAPES[args.shape]["vocab"]
        input_ids = torch.randint(1, vocab, (args.batch, args.seq), generator=generator)
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids,  # every next token a target
            # the flat [B, T-1] indices of the targets, on the host as the collate computes them
            "target_index": torch.arange(args.batch * (args.seq - 1)),
        }
        self.batch = {k: v.to(args.device) for k, v in batch.items()}
        self.task_ids = (torch.arange(args.batch) % args.tasks).to(args.device)
        self.is_general = (torch.arange(args.batch) % 5 == 0).to(args.device)  # ~20% replay
        self.sites = adapter_sites(model)

    def loss(self) -> Tensor:
        from medmoe.losses import target_token_losses

        token_loss, target_mask = target_token_losses(self.model, self.batch)
        loss = token_loss.sum() / target_mask.sum().clamp_min(1)  # MedMoEModule's task loss
        if self.moe_layers:
            from medmoe.objectives import (
                knowledge_preservation_loss,
                load_balance_loss,
                recorded_router_probs,
            )

            probs = recorded_router_probs(self.moe_layers)
            mask = self.batch["attention_mask"].bool()
            loss = loss + LAMBDA_BALANCE * load_balance_loss(probs, mask, "variance")
            loss = loss + LAMBDA_KP * knowledge_preservation_loss(
                probs,
                self.is_general,
                [layer.num_base_experts for layer in self.moe_layers],
                mask,
                KP_DELTA,
            )
        return loss

    def step(self) -> None:
        if self.ortho is not None:
            with self.ortho.capture(self.task_ids):
                loss = self.loss()
            loss.backward()
            self.ortho.project()
        else:
            self.loss().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.args.device)


def _layers(model: nn.Module) -> nn.ModuleList:
    from medmoe.adapters import decoder_layers

    return decoder_layers(model)


@dataclass
class Result:
    variant: str
    label: str
    checkpointing: bool
    trainable: int = 0
    step_ms: float | None = None
    step_ms_min: float | None = None
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    flops: dict[str, float] = field(default_factory=dict)
    model_tflop: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    error: str | None = None


def run_variant(name: str, args: argparse.Namespace, ckpt: bool, config) -> Result:
    label = LABELS[name].format(rank=args.rank, tasks=args.tasks)
    result = Result(name, label, ckpt)
    runner = None
    try:
        runner = Runner(name, args, ckpt)
        result.trainable = runner.trainable
        for _ in range(args.warmup):
            runner.step()
        runner.sync()
        if runner.cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        times = []
        for _ in range(args.steps):
            runner.sync()
            start = time.perf_counter()
            runner.step()
            runner.sync()
            times.append(time.perf_counter() - start)
        if runner.cuda:
            result.peak_bytes = torch.cuda.max_memory_allocated(args.device)
        seconds = statistics.median(times)
        result.step_ms = seconds * 1e3
        result.step_ms_min = min(times) * 1e3
        result.tokens_per_s = args.batch * args.seq / seconds
        flops = count_flops(name, config, runner.sites, args.batch, args.seq, ckpt)
        result.flops = {**asdict(flops), "model": flops.model, "hardware": flops.hardware}
        result.model_tflop = flops.model / 1e12
        if runner.cuda:
            peak = args.peak_tflops * 1e12
            result.mfu = flops.model / seconds / peak
            result.hfu = flops.hardware / seconds / peak
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
    except Exception as error:  # noqa: BLE001 - one variant's failure must not end the table
        result.error = f"{type(error).__name__}: {error}"[:200]
    finally:
        del runner
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- report
def environment(args: argparse.Namespace, config) -> list[str]:
    import peft
    import transformers

    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    layers_params, head_params = base_matmul_params(config)
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}",
        f"device {device}, dtype {args.dtype}, attention {args.attn}, torch threads "
        f"{torch.get_num_threads()}",
        f"shape {args.shape}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, heads {config.num_attention_heads} "
        f"(kv {config.num_key_value_heads}), vocab {config.vocab_size}, random weights; "
        f"N_base = {layers_params + head_params:,} matmul parameters "
        f"({head_params:,} in lm_head)",
        f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step; "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant (median)",
        f"adapter factors in float32 on the {args.dtype} base (med.yaml's adapter_dtype, peft's "
        f"autocast_adapter_dtype), dropout {args.dropout}",
        "task loss medmoe.losses.target_token_losses (LM head on the B (s-1) target rows, in "
        f"checkpointed chunks); MoE-LoRA adds {LAMBDA_BALANCE} x balance + {LAMBDA_KP} x "
        "knowledge preservation",
    ]
    if "moe_lora" in args.variants:
        cfg = moe_config(config.num_hidden_layers, args.dropout)
        counts = cfg.layer_expert_counts(config.num_hidden_layers)
        lines.append(
            f"MoE-LoRA allocation: ranges {cfg.layer_ranges} (eq 2 elsewhere), experts per "
            f"layer {counts}, ranks cycling {cfg.allowed_ranks}"
        )
    if "ortho_lora" in args.variants and args.batch < args.tasks:
        lines.append(
            f"note: batch {args.batch} < {args.tasks} tasks, so some tasks have no sample "
            "and Ortho-LoRA projects fewer pairs than in training"
        )
    if not args.device.startswith("cuda"):
        lines.append("CPU run: peak memory, MFU and HFU are not measured (n/a)")
    else:
        lines.append(f"peak {args.peak_tflops:g} TFLOP/s (--peak-tflops) for MFU and HFU")
    return lines


FORMULA = [
    "model FLOPs = base fwd + base bwd + adapter fwd + adapter bwd (+ Ortho-LoRA products)",
    "  base fwd = 2 N_layers T + 2 N_head M + 4 L s^2 d B; base bwd = 2 N_layers T + "
    "2 N_head M + 8 L s^2 d B (input gradients only; M = B (s-1) LM-head rows)",
    "  adapter fwd = sum 2 T (sum r_i)(d_in + d_out) + routers 2 T d_in N; adapter bwd = 2x",
    "  Ortho-LoRA adds sum 2 T r (d_in + d_out) for the per-task gradient products",
    "  attention counts the full s x s square (the causal half is counted as used)",
    "MFU excludes the recomputes; HFU includes them: the LM head's checkpointed chunks "
    "(2 N_head M) and, with gradient checkpointing, base fwd of the decoder layers + adapter fwd",
]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(results: list[Result]) -> list[str]:
    rows = [
        "| variant | grad ckpt | trainable params | step ms | tokens/s | time vs LoRA "
        "| peak memory | memory vs LoRA | model TFLOP/step | MFU | HFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {r.checkpointing: r for r in results if r.variant == "lora" and not r.error}
    for r in results:
        ckpt = "on" if r.checkpointing else "off"
        if r.error:
            rows.append(f"| {r.label} | {ckpt} | {r.trainable:,} | {r.error} |" + " |" * 7)
            continue
        ref = reference.get(r.checkpointing)
        time_ratio = f"{r.step_ms / ref.step_ms:.2f}x" if ref else "n/a"
        mem_ratio = "n/a"
        if ref and r.peak_bytes and ref.peak_bytes:
            mem_ratio = f"{r.peak_bytes / ref.peak_bytes:.2f}x"
        memory = None if r.peak_bytes is None else r.peak_bytes / 2**30
        rows.append(
            f"| {r.label} | {ckpt} | {r.trainable:,} | {r.step_ms:.1f} "
            f"| {r.tokens_per_s:,.0f} | {time_ratio} | {_fmt(memory, '.2f', ' GiB')} "
            f"| {mem_ratio} | {r.model_tflop:.3g} | {_fmt(r.mfu and 100 * r.mfu, '.1f', '%')} "
            f"| {_fmt(r.hfu and 100 * r.hfu, '.1f', '%')} |"
        )
    return rows


def flop_table(results: list[Result]) -> list[str]:
    rows = [
        "| variant | grad ckpt | base fwd | base bwd | adapter fwd | adapter bwd | Ortho "
        "| recompute (HFU only) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.flops:
            continue
        f = {k: v / 1e12 for k, v in r.flops.items()}
        rows.append(
            f"| {r.label} | {'on' if r.checkpointing else 'off'} | {f['base_fwd']:.4g} "
            f"| {f['base_bwd']:.4g} | {f['adapter_fwd']:.4g} | {f['adapter_bwd']:.4g} "
            f"| {f['ortho']:.4g} | {f['recompute']:.4g} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = llama_config(args)
    started = time.perf_counter()
    print("## Environment")
    for line in environment(args, config):
        print(f"- {line}")
    print()
    print("## FLOP model (TFLOP per step in the tables)")
    for line in FORMULA:
        print(f"    {line}")
    sys.stdout.flush()

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for ckpt in modes:
        for name in args.variants:
            results.append(run_variant(name, args, ckpt, config))
            r = results[-1]
            status = r.error or f"{r.step_ms:.1f} ms/step"
            print(f"- {r.label}, checkpointing {'on' if ckpt else 'off'}: {status}", flush=True)

    print()
    print("## Training step")
    print()
    print("\n".join(table(results)))
    print()
    print(
        "time/memory vs LoRA: ratio to peft LoRA r="
        f"{args.rank} with the same checkpointing; MFU = model FLOPs / step time / peak "
        "(recomputes not counted), HFU counts the recomputes"
    )
    print()
    print("## Model FLOPs per step (TFLOP)")
    print()
    print("\n".join(flop_table(results)))
    print()
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {
            "args": vars(args),
            "environment": environment(args, config),
            "formula": FORMULA,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
