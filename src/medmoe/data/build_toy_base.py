"""Train the toy base: a tiny Llama that knows the toy clinic's general tasks.

    python -m medmoe.data.build_toy_base --out src/medmoe/data/toy_base [--steps N] [--seed S]

It trains a ``LlamaForCausalLM`` (hidden 128, 4 layers) with the toy tokenizer on the general
toy tasks (the MMLU-format fact quiz and GSM8K-format addition) and a reading exercise that
copies random word sequences over the whole vocabulary (``Repeat : w1 .. wk`` -> ``w1 .. wk``),
with a next-token loss on the target tokens and a plain AdamW loop, deterministic given the
seed. The exercise gives every word, medical ones included, a trained embedding, as a real
base model has read its domain's words, without teaching any medical task: no symptom,
disease or drug is ever tied to another. The output is a
Hugging Face directory (config, safetensors weights, tokenizer) plus ``toy_base.json`` with
the accuracies measured on the held-out toy test split.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from medmoe.data.collate import IGNORE_INDEX, Sample, collate, encode_pairs
from medmoe.data.tasks import get_task
from medmoe.data.tokenizers import toy_tokenizer
from medmoe.data.toy_clinic import COPY_WORD, toy_records, toy_vocabulary

GENERAL_TASKS: tuple[str, ...] = ("mmlu", "gsm8k")
COPY_LENGTHS = (3, 8)  # words per reading exercise, inclusive
METRICS_FILE = "toy_base.json"


def toy_llama_config(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The toy base architecture: about 0.7M parameters."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _samples(
    task: str, split: str, n: int | None, tokenizer: PreTrainedTokenizerBase
) -> list[Sample]:
    pairs = [get_task(task).styled("toy").format(r) for r in toy_records(task, split, n)]
    return [Sample(ids, labels) for ids, labels in encode_pairs(tokenizer, pairs, 64, task)]


@torch.no_grad()
def score_general(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, n: int = 200, split: str = "test"
) -> dict[str, float]:
    """Accuracy on the first ``n`` toy records of each general task.

    ``mmlu``: the answer letter has the highest logit among the option letters (what the
    log-likelihood scorer does). ``gsm8k``: greedy decoding reproduces the whole target
    (checked under teacher forcing: every target token, eos included, is the argmax).
    """
    model.eval()
    letters = [tokenizer.convert_tokens_to_ids(k) for k in ("A", "B", "C", "D")]
    scores = {}
    for task in GENERAL_TASKS:
        batch = collate(_samples(task, split, n, tokenizer), tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]  # [B, T-1]
        mask = gold != IGNORE_INDEX
        if task == "mmlu":
            first = mask.int().argmax(-1)  # position predicting the answer letter
            rows = torch.arange(len(first))
            letter_logits = logits[rows, first][:, letters]  # [B, 4]
            right = torch.tensor(letters)[letter_logits.argmax(-1)] == gold[rows, first]
        else:
            right = ((pred == gold) | ~mask).all(-1)
        scores[task] = right.float().mean().item()
    return scores


def _copy_sample(
    rng: random.Random, tokenizer: PreTrainedTokenizerBase, words: list[str]
) -> Sample:
    """One reading exercise: ``Repeat :`` and k random ``words``, then those words."""
    chosen = rng.choices(words, k=rng.randint(*COPY_LENGTHS))
    pair = (f"{COPY_WORD} : {' '.join(chosen)}", " " + " ".join(chosen))
    ids, labels = encode_pairs(tokenizer, [pair], 64, "copy")[0]
    return Sample(ids, labels)


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def build(
    out: Path,
    steps: int = 2500,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    quiz_fraction: float = 0.4,
    copy_fraction: float = 0.2,
    log_every: int = 100,
) -> dict[str, float]:
    """Train the toy base and save it to ``out``; returns the measured figures."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.time()
    tokenizer = toy_tokenizer()
    quiz = _samples("mmlu", "train", None, tokenizer)
    math_ = _samples("gsm8k", "train", None, tokenizer)
    words = [w for w in toy_vocabulary() if w not in (COPY_WORD, ":")]
    model = LlamaForCausalLM(toy_llama_config(len(tokenizer), tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    for step in range(steps):
        model.train()
        picks = []
        for _ in range(batch_size):
            draw = rng.random()
            if draw < copy_fraction:
                picks.append(_copy_sample(rng, tokenizer, words))
            else:
                picks.append(rng.choice(quiz if draw < copy_fraction + quiz_fraction else math_))
        batch = collate(picks, tokenizer.pad_token_id)
        for group in optim.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            acc = score_general(model, tokenizer, 200, "validation")
            print(
                f"step {step + 1:5d}  loss {loss.item():.3f}  val {acc}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    figures = {f"test_{k}": v for k, v in score_general(model, tokenizer, 200, "test").items()}
    figures.update(
        params=sum(p.numel() for p in model.parameters()),
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        build_seconds=round(time.time() - start, 1),
        torch_threads=torch.get_num_threads(),
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / METRICS_FILE).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed (weights and batches)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = build(args.out, args.steps, args.seed, args.batch_size, args.lr)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
