"""Training-step time and peak memory of MoE-LoRA against peft LoRA at equal total rank.

One run builds a tiny Llama (random weights, no download) four times and times a full training
step (forward + backward + AdamW step on the trainable parameters) of:

1. ``frozen``: the base model without adapters. Nothing is trainable, so
   ``model.enable_input_require_grads()`` makes the embedding output require grad: the step is
   forward + backward through every decoder layer down to the input embeddings (activation
   gradients only, no weight gradients) and there is no optimizer step.
2. ``peft LoRA``: peft LoRA of rank R on q, k, v, o, gate, up and down projections
   (``lora_alpha = 2R``, i.e. scale 2, no dropout, adapters kept in the model dtype).
3. ``MoE-LoRA``: medmoe's :class:`MoELoRALinear`, 8 experts of rank R/8 (total rank R), soft
   merging, one base expert, same targets, no dropout (the vectorised layer).
4. ``MoE-LoRA loop``: a naive reference with exactly the same parameters (each expert its own
   ``A_i``/``B_i`` parameters) that computes the experts with a Python loop,
   ``out += g[..., i:i+1] * scale_i * B_i(A_i x)``.

Timings are interleaved (round-robin over the variants, starting variant rotated every round)
after warm-up rounds, and the median is reported, next to the process CPU time of the same
steps as a cross-check. Timing stops early once the run is ``--time-budget`` seconds old (with
at least 5 timed rounds). On a shared CPU, absolute times (CPU time included: cache and
hypervisor steal) swing with the other processes' load: compare ratios within one run.

Peak memory is measured per variant in a fresh subprocess that builds only that variant, runs
one warm-up step and then ``--mem-steps`` measured steps (the four probes run concurrently,
before the timing rounds):

- CPU: peak RSS growth. ``VmHWM`` (the process's resident high-water mark) is reset through
  ``/proc/self/clear_refs`` after the warm-up steps; the figure is that peak over the measured
  steps minus the RSS of the loaded model before its first step. It covers activations,
  gradients, optimizer state and allocator slack (falls back to ``ru_maxrss`` growth where the
  reset is not allowed).
- CUDA: ``torch.cuda.max_memory_allocated()`` over the measured steps (weights included).

Usage::

    python benchmarks/adapter_speed.py
    python benchmarks/adapter_speed.py --device cuda --dtype bfloat16 --batch 16 --seq 512
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("frozen", "peft_lora", "moe_lora", "moe_loop")
LABELS = {
    "frozen": "frozen base (backward to input embeddings)",
    "peft_lora": "peft LoRA r={R}",
    "moe_lora": "medmoe MoE-LoRA {N}x r={r}",
    "moe_loop": "MoE-LoRA per-expert loop {N}x r={r}",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_MARKER = "ADAPTER_SPEED_MEMORY "
# transformers 5 deprecation noise from peft / enable_input_require_grads, not our concern here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# --------------------------------------------------------------------------- the loop reference
class LoopMoELoRALinear(nn.Module):
    """Naive MoE-LoRA: the parameters of a :class:`MoELoRALinear`, experts evaluated one by one.

    Each expert gets its own ``A_i`` [r_i, d_in] and ``B_i`` [d_out, r_i] parameter (as
    implementations with a ``ModuleList`` of LoRA experts have); the router, temperature,
    scales and frozen base are those of the layer it is built from. Soft merging only.
    """

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        if moe.top_k is not None:
            raise ValueError("the loop reference implements soft merging only")
        self.base = moe.base
        self.router = moe.router
        if isinstance(moe.log_tau, nn.Parameter):  # learned temperature
            self.log_tau = moe.log_tau
        else:
            self.register_buffer("log_tau", moe.log_tau)
        self.tau_range = moe.tau_range
        self.scales = moe.scales
        self.dropout = moe.dropout
        experts = [moe.expert(i) for i in range(moe.num_experts)]
        self.lora_A = nn.ParameterList(nn.Parameter(a.detach().clone()) for a, _ in experts)
        self.lora_B = nn.ParameterList(nn.Parameter(b.detach().clone()) for _, b in experts)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        tau = self.log_tau.float().exp().clamp(*self.tau_range).to(dtype)
        gates = torch.softmax(F.linear(x.to(dtype), self.router.weight.to(dtype)) / tau, dim=-1)
        gates = gates.to(x.dtype)
        h = self.dropout(x)
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            out = out + gates[..., i : i + 1] * self.scales[i] * F.linear(F.linear(h, a), b)
        return out


def to_loop_reference(model: nn.Module) -> int:
    """Replace every MoELoRALinear of ``model`` by its loop reference, in place."""
    from medmoe.adapters.inject import moe_lora_layers

    layers = moe_lora_layers(model)
    for name, moe in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoopMoELoRALinear(moe))
    return len(layers)


def check_loop_reference(rank: int, experts: int) -> float:
    """Max abs difference between MoELoRALinear and its loop reference (non-zero B)."""
    from medmoe.adapters.moe_lora import MoELoRALinear

    torch.manual_seed(0)
    moe = MoELoRALinear(nn.Linear(64, 48), [max(rank // experts, 1)] * experts, num_base_experts=1)
    with torch.no_grad():
        moe.lora_B.normal_()
        moe.router.weight.normal_()
    loop = LoopMoELoRALinear(moe)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        return (moe(x) - loop(x)).abs().max().item()


# --------------------------------------------------------------------------- building variants
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=32, help="total LoRA rank R")
    p.add_argument("--experts", type=int, default=8, help="MoE-LoRA experts (rank R/experts)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--reps", type=int, default=15, help="timed rounds (one step per variant)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="stop the timing rounds once the run is this many seconds old (>= 5 rounds timed)",
    )
    p.add_argument("--mem-steps", type=int, default=2, help="measured steps per memory probe")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--target", type=float, default=1.10, help="MoE-LoRA / peft LoRA step time")
    p.add_argument("--check", action="store_true", help="exit with status 1 if FAIL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.rank % args.experts:
        p.error(f"--rank {args.rank} must be divisible by --experts {args.experts}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
        pad_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).train()


def build_variant(name: str, args: argparse.Namespace) -> nn.Module:
    from medmoe.adapters.config import LLAMA_TARGETS, MoELoRAConfig
    from medmoe.adapters.inject import apply_moe_lora

    model = build_base(args)
    if name == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=list(LLAMA_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # Keep the adapters in the model dtype, as MoELoRALinear does (peft's default would
        # upcast them to float32 under bfloat16).
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    else:
        config = MoELoRAConfig(
            target_modules=list(LLAMA_TARGETS),
            allocation="uniform",
            num_experts=args.experts,
            allowed_ranks=[args.rank // args.experts],
            rank_pattern="equal",
            num_base_experts=1,
            dropout=0.0,
        )
        apply_moe_lora(model, config)
        if name == "moe_loop":
            to_loop_reference(model)
    return model.train()


class Runner:
    """One variant's model, batch and optimizer, and its training step."""

    def __init__(self, name: str, args: argparse.Namespace, batch: Tensor) -> None:
        self.name = name
        self.model = build_variant(name, args)
        self.batch = batch
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"

    def step(self) -> None:
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> tuple[float, float]:
        """Wall-clock and process CPU time (all threads) of one step, in ms."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def make_batch(args: argparse.Namespace) -> Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator)
    return ids.to(args.device)


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


def memory_child(args: argparse.Namespace) -> dict[str, object]:
    """Runs in a fresh process: the peak memory of ``args.memory_child``'s training steps."""
    runner = Runner(args.memory_child, args, make_batch(args))
    # One warm-up step allocates the gradients' and AdamW's state; the peak of the next
    # steps is the steady-state training peak.
    if runner.cuda:
        device = runner.device
        runner.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.mem_steps):
            runner.step()
        torch.cuda.synchronize(device)
        return {
            "bytes": torch.cuda.max_memory_allocated(device),
            "what": "torch.cuda.max_memory_allocated over the measured steps (weights included)",
        }
    gc.collect()
    before_kib = _status_kib("VmRSS")
    if before_kib is None:  # no /proc: ru_maxrss (KiB on Linux) over the whole process life
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.step()
    if _reset_rss_peak():
        for _ in range(args.mem_steps):
            runner.step()
        peak_kib, what = _status_kib("VmHWM"), "peak RSS growth (VmHWM, reset after warm-up)"
    else:
        for _ in range(args.mem_steps):
            runner.step()
        peak_kib, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss growth"
    return {"bytes": max(peak_kib - before_kib, 0) * 1024, "what": what}


def measure_memory(argv: list[str]) -> dict[str, dict[str, object]]:
    """Run one memory probe per variant, each in its own fresh process, all at once.

    The probes run concurrently (peak memory of a process does not depend on CPU contention)
    and before the timing rounds, so they never overlap them.
    """
    script = os.path.abspath(__file__)
    procs = {
        name: subprocess.Popen(
            [sys.executable, script, *argv, "--memory-child", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in VARIANTS
    }
    results: dict[str, dict[str, object]] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        for line in stdout.splitlines():
            if line.startswith(MEMORY_MARKER):
                results[name] = json.loads(line[len(MEMORY_MARKER) :])
        if name not in results:
            tail = (stderr or stdout)[-2000:]
            raise RuntimeError(f"memory probe of {name} failed (exit {proc.returncode}):\n{tail}")
    return results


# --------------------------------------------------------------------------- reporting
def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def load_average() -> str:
    """The 1-minute load average: above the core count, other processes skew the timings."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def environment(args: argparse.Namespace) -> list[str]:
    import peft
    import transformers

    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    tokens = args.batch * args.seq
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}",
        f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}), os.cpu_count {os.cpu_count()}, "
        f"load average (1 min) at start {load_average()}",
        f"tiny Llama: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, heads {args.heads} (kv {args.kv_heads}), vocab {args.vocab}, "
        f"sdpa attention, random weights",
        f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step; total rank R={args.rank}, "
        f"MoE-LoRA {args.experts} experts x rank {args.rank // args.experts}, soft merging, "
        f"7 targets (q,k,v,o,gate,up,down)",
        f"step = forward + loss + backward + AdamW step; {args.warmup} warm-up + {args.reps} "
        f"timed rounds, round-robin over variants (start rotated each round)",
    ]


def timing_rounds(
    runners: list[Runner], warmup: int, reps: int, deadline: float = math.inf
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin: every round runs one step of each variant, the first variant rotating.

    Stops after ``reps`` timed rounds, or earlier once ``time.perf_counter()`` passes
    ``deadline`` with at least 5 rounds timed. Returns wall and CPU milliseconds per variant.
    """
    wall: dict[str, list[float]] = {r.name: [] for r in runners}
    cpu: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_index in range(warmup + reps):
        timed = round_index - warmup
        if timed >= 5 and time.perf_counter() > deadline:
            break
        shift = round_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            wall_ms, cpu_ms = runner.timed_step()
            if timed >= 0:
                wall[runner.name].append(wall_ms)
                cpu[runner.name].append(cpu_ms)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(MEMORY_MARKER + json.dumps(memory_child(args)), flush=True)
        return 0

    started = time.perf_counter()
    print("## Environment")
    for line in environment(args):
        print(f"- {line}")
    diff = check_loop_reference(args.rank, args.experts)
    print(f"- loop reference vs MoELoRALinear, same parameters: max |diff| = {diff:.2e}")
    sys.stdout.flush()

    memory: dict[str, dict[str, object]] = {}
    if not args.no_memory:
        child_argv = [a for a in argv if a != "--check"]
        if args.threads is None:
            child_argv += ["--threads", str(torch.get_num_threads())]
        memory = measure_memory(child_argv)

    batch = make_batch(args)
    runners = [Runner(name, args, batch) for name in VARIANTS]
    trainable = {r.name: r.trainable for r in runners}
    deadline = started + args.time_budget
    wall, cpu = timing_rounds(runners, args.warmup, args.reps, deadline)
    rounds = len(wall["peft_lora"])
    del runners
    gc.collect()

    labels = {
        name: label.format(R=args.rank, N=args.experts, r=args.rank // args.experts)
        for name, label in LABELS.items()
    }
    median = {name: statistics.median(t) for name, t in wall.items()}
    cpu_median = {name: statistics.median(t) for name, t in cpu.items()}
    ref_ms, ref_cpu = median["peft_lora"], cpu_median["peft_lora"]
    ref_mem = memory["peft_lora"]["bytes"] if memory else 0

    print()
    print(f"## Training step ({rounds} timed rounds)")
    print()
    print(
        "| variant | trainable params | step ms (median) | ratio to peft LoRA | peak memory "
        "| ratio | step ms (min-max) | CPU ms (median) | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    on_cuda = torch.device(args.device).type == "cuda"
    for name in VARIANTS:
        mem, mem_ratio = "n/a", "n/a"
        if memory:
            mem = fmt_bytes(memory[name]["bytes"])
            mem_ratio = f"{memory[name]['bytes'] / ref_mem:.2f}x" if ref_mem else "n/a"
        cpu_cells = "n/a | n/a"  # host CPU time says little about a GPU step
        if not on_cuda:
            cpu_cells = f"{cpu_median[name]:.1f} | {cpu_median[name] / ref_cpu:.2f}x"
        print(
            f"| {labels[name]} | {trainable[name]:,} | {median[name]:.1f} "
            f"| {median[name] / ref_ms:.2f}x | {mem} | {mem_ratio} "
            f"| {min(wall[name]):.1f}-{max(wall[name]):.1f} | {cpu_cells} |"
        )
    print()
    print(
        "step ms = wall clock of forward + backward + AdamW step (median over rounds); "
        "CPU ms = process CPU time of the same step, all threads (a cross-check; it also "
        "counts spin-waiting worker threads)"
    )
    if memory:
        print(f"peak memory = {memory['peft_lora']['what']}, one fresh process per variant")
    paired = statistics.median(
        m / p for m, p in zip(wall["moe_lora"], wall["peft_lora"], strict=True)
    )
    ratio = median["moe_lora"] / ref_ms
    verdict = "PASS" if ratio <= args.target else "FAIL"
    cross_check = f"median of per-round ratios {paired:.2f}x"
    if not on_cuda:
        cross_check += f", CPU-time ratio {cpu_median['moe_lora'] / ref_cpu:.2f}x"
    print(
        f"{verdict}: MoE-LoRA step time is {ratio:.2f}x peft LoRA at equal total rank "
        f"(target <= {args.target:.2f}x; {cross_check})"
    )
    print(f"loop reference / MoE-LoRA: {median['moe_loop'] / median['moe_lora']:.2f}x")
    print(f"wall time {time.perf_counter() - started:.0f} s, load average (1 min) {load_average()}")
    return 1 if args.check and verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
