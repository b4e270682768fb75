"""Table 4's parameter counts for Llama-3-8B shapes, on the meta device (nothing allocated).

    python benchmarks/table4_counts.py

Prints medmoe's trainable and active (per token) adapter parameters, in millions, for several
readings of the paper's settings, next to the paper's 12.5M (LoRA r=16), 37.5M / 12.5M
(multi-LoRA, 3 tasks) and 88.4M / 22.4M (Med-MoE-LoRA).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.adapters import MoELoRAConfig, apply_moe_lora, parameter_counts

SHAPES = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _meta_llama(**overrides) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**{**SHAPES, **overrides}))


def _lora(targets: list[str], r: int, gqa: bool = True) -> float:
    """LoRA trainable parameters r (d_in + d_out) summed over the targets of every layer."""
    model = _meta_llama(**({} if gqa else {"num_key_value_heads": 32}))
    total = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += r * (module.in_features + module.out_features)
    return total / 1e6


def _moe(config: MoELoRAConfig) -> tuple[float, float]:
    model = _meta_llama()
    apply_moe_lora(model, config)
    counts = parameter_counts(model)
    return counts.trainable / 1e6, counts.active / 1e6


def main() -> None:
    rows = [
        ("LoRA r=16, all 7 projections (GQA)", _lora(ALL7, 16), None, "12.5 / 12.5"),
        ("LoRA r=16, q,k,v,o (GQA)", _lora(QKVO, 16), None, "12.5 / 12.5"),
        ("LoRA r=16, q,v (GQA)", _lora(["q_proj", "v_proj"], 16), None, "12.5 / 12.5"),
        (
            "LoRA r=16, q,k,v without GQA (3 x 4096x4096)",
            _lora(["q_proj", "k_proj", "v_proj"], 16, gqa=False),
            None,
            "12.5 / 12.5",
        ),
        ("Multi-LoRA 3 x r=16, q,k,v,o (GQA)", 3 * _lora(QKVO, 16), _lora(QKVO, 16), "37.5 / 12.5"),
    ]
    for label, config in [
        ("Med-MoE-LoRA default, all 7", MoELoRAConfig()),
        ("Med-MoE-LoRA default, q,k,v,o", MoELoRAConfig(target_modules=QKVO)),
        ("Med-MoE-LoRA default, q,v", MoELoRAConfig(target_modules=["q_proj", "v_proj"])),
        ("Med-MoE-LoRA default, q,k,v,o, top-2", MoELoRAConfig(target_modules=QKVO, top_k=2)),
        ("Med-MoE-LoRA q,v, top-2", MoELoRAConfig(target_modules=["q_proj", "v_proj"], top_k=2)),
        (
            "Med-MoE-LoRA q,k,v,o, ranks {8}, top-2",
            MoELoRAConfig(target_modules=QKVO, allowed_ranks=[8], top_k=2),
        ),
        (
            "Med-MoE-LoRA q,v, ranks {8,16}, top-2",
            MoELoRAConfig(target_modules=["q_proj", "v_proj"], allowed_ranks=[8, 16], top_k=2),
        ),
    ]:
        trainable, active = _moe(config)
        rows.append((label, trainable, active, "88.4 / 22.4"))
    print("| reading | trainable (M) | active per token (M) | paper trainable / active (M) |")
    print("|---|---|---|---|")
    for label, trainable, active, paper in rows:
        active_text = f"{trainable:.1f}" if active is None else f"{active:.1f}"
        print(f"| {label} | {trainable:.1f} | {active_text} | {paper} |")


if __name__ == "__main__":
    main()
