"""``medmoe predict`` and :func:`load_adapted`: use a trained adapter outside training.

::

    medmoe predict --config configs/demo.yaml --ckpt_path runs/demo/version_0/checkpoints/last.ckpt \
        --task medqa --split test --limit 16 --output predictions.jsonl
    medmoe predict --config configs/demo.yaml --adapter_dir runs/demo/version_0/adapter \
        --prompts prompts.jsonl --max_new_tokens 32

The model and data come from the config as for ``fit`` (the adapter must match the
checkpoint's: the same check as on resume). Records come from the data's tasks (``--task``,
default all; ``--split``, default ``test``; ``--limit`` per task, a fixed subset) or from a
JSONL file of ``{"prompt": ..., "task": optional, "choices": optional list}`` lines.

``--mode generate`` (default) continues each prompt greedily (``--max_new_tokens``, cut at
``--stop``); ``--mode score`` ranks a multiple-choice record's choices by log-likelihood. One
JSONL line per record: ``prompt``, ``output``, ``task``, ``index`` (record number), for
records with a known answer ``reference``, in score mode ``scores`` (per choice), and for
routed adapters (MoE-LoRA) ``gates``: per decoder layer, the mean gate probability of each expert over the
prompt's tokens (averaged over the layer's adapted modules).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from medmoe.adapters.capabilities import routed_layers
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample
from medmoe.eval.generation import generate_greedy
from medmoe.eval.multiple_choice import encode_contexts, eval_mode, score_multiple_choice

__all__ = ["gate_summary", "load_adapted", "predict_main", "read_prompts"]

LAYER = re.compile(r"layers\.(\d+)\.")


def load_adapted(
    base: str | os.PathLike | nn.Module, adapter_dir: str | os.PathLike, **from_pretrained: Any
) -> nn.Module:
    """A base model with a trained adapter directory loaded, in eval mode, for inference.

    Args:
        base: a model, ``"toy"`` (the shipped toy base), a local model directory or a hub id.
        adapter_dir: an adapter directory of any method and format (what
            :class:`~medmoe.callbacks.AdapterExport`, ``AdaptedModel.save_pretrained`` or
            ``python -m medmoe.zero_to_adapter`` wrote: MoE-LoRA, multi-LoRA, peft LoRA, full
            fine-tuning); the method is the one the directory records
            (:func:`medmoe.adapters.load_adapted`). A multi-LoRA model needs its task ids: run
            it inside ``MultiLoRA.task_context(model, task)``.
        from_pretrained: keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

    The adapter's description is read and checked before the model is touched, and its files
    before any tensor is copied: a missing, truncated or mismatching file raises an error
    naming it.
    """
    from medmoe.adapters.registry import load_adapted as load_adapter_dir
    from medmoe.adapters.registry import saved_method

    method = saved_method(adapter_dir)  # the description first: a bad one loads no base
    model = _load_base(base, **from_pretrained)
    return load_adapter_dir(model, adapter_dir, method).eval()


def _load_base(base: str | os.PathLike | nn.Module, **kwargs: Any) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from transformers import AutoModelForCausalLM

    from medmoe.errors import local_or_hub

    name = str(base)
    if name == "toy":
        from medmoe.data import toy_base_path

        name = str(toy_base_path())
    return AutoModelForCausalLM.from_pretrained(local_or_hub(name, "base model"), **kwargs)


def gate_summary(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> list[dict[str, list[float]]]:
    """Per prompt: ``{"layer_<l>": mean gate probability per expert}`` over its tokens."""
    layers = routed_layers(model)
    if not layers:
        return [{} for _ in prompts]
    out = []
    with eval_mode(model), torch.no_grad():
        for ids in encode_contexts(tokenizer, prompts, True):
            device = next(model.parameters()).device
            model(input_ids=torch.tensor([ids], device=device))
            per_layer: dict[str, list[torch.Tensor]] = {}
            for name, layer in layers:
                probs = layer.last_gates
                if probs is None:
                    continue
                match = LAYER.search(name)
                key = f"layer_{int(match.group(1)) if match else 0}"
                per_layer.setdefault(key, []).append(probs.reshape(-1, probs.shape[-1]).mean(0))
            out.append(
                {
                    key: [round(float(v), 6) for v in torch.stack(values).mean(0)]
                    for key, values in sorted(per_layer.items(), key=lambda kv: int(kv[0][6:]))
                }
            )
    return out


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a prompts file: JSON objects with a non-empty ``prompt`` string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}, line {i}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{path}, line {i}: expected an object with a non-empty 'prompt'")
        if "choices" in row and not (isinstance(row["choices"], list) and len(row["choices"]) >= 2):
            raise ValueError(f"{path}, line {i}: 'choices' must be a list of >= 2 strings")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompts file {path} is empty")
    return rows


def _examples(cli: Any, config: Any) -> list[dict[str, Any]]:
    """Rows of ``{"task", "index", "example"}`` from the prompts file or the data's tasks."""
    if config.prompts:
        rows = []
        for i, row in enumerate(read_prompts(config.prompts)):
            if "choices" in row:
                example: Any = MultipleChoiceExample(
                    row["prompt"], tuple(row["choices"]), int(row.get("answer", 0))
                )
            else:
                example = GenerationExample(row["prompt"], row.get("reference", ""))
            rows.append({"task": row.get("task"), "index": i, "example": example})
        return rows
    data = cli.datamodule
    names = [config.task] if config.task else data.task_names
    rows = []
    for name in names:
        for i, example in enumerate(
            data.eval_records.eval_examples(name, config.split, config.limit)
        ):
            rows.append({"task": name, "index": i, "example": example})
    return rows


def _load_weights(cli: Any, config: Any) -> None:
    from medmoe.errors import read_checkpoint
    from medmoe.resume import check_resume

    module = cli.model
    module.configure_model()
    if config.adapter_dir:
        module.adapter.load(module.model, config.adapter_dir)
        return
    checkpoint = read_checkpoint(config.ckpt_path)
    check_resume(
        checkpoint.get("hyper_parameters"),
        module.hparams,
        fitting=False,
        where=f"checkpoint {config.ckpt_path}",
    )
    from medmoe.adapters.state import copy_matching_tensors

    keys = module.trainable_state_keys()
    current = {k: v for k, v in module.state_dict().items() if k in keys}
    copy_matching_tensors(current, dict(checkpoint["state_dict"]), config.ckpt_path)


def _predictions(cli: Any, config: Any) -> list[dict[str, Any]]:
    module = cli.model
    tokenizer = cli.datamodule.tokenizer
    model = module.model
    rows = _examples(cli, config)
    prompts = [row["example"].prompt for row in rows]
    gates = gate_summary(model, tokenizer, prompts)
    if config.mode == "score":
        bad = [r for r in rows if not isinstance(r["example"], MultipleChoiceExample)]
        if bad:
            raise ValueError(
                f"--mode score needs multiple-choice records; task {bad[0]['task']!r} record "
                f"{bad[0]['index']} has no choices (use --mode generate)"
            )
        result = score_multiple_choice(
            model, tokenizer, [r["example"] for r in rows], config.batch_size
        )
        outputs = [
            r["example"].choices[int(p)] for r, p in zip(rows, result.predictions, strict=True)
        ]
        scores = result.loglikelihoods.tolist()
    else:
        outputs = generate_greedy(
            model,
            tokenizer,
            prompts,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            stop=tuple(config.stop),
        )
        scores = None
    lines = []
    for k, row in enumerate(rows):
        example = row["example"]
        line: dict[str, Any] = {
            "task": row["task"],
            "index": row["index"],
            "prompt": example.prompt,
            "output": outputs[k],
        }
        if isinstance(example, MultipleChoiceExample):
            line["choices"] = list(example.choices)
            line["reference"] = example.choices[example.answer]
        elif example.reference:
            line["reference"] = example.reference
        if scores is not None:
            line["scores"] = [s for s in scores[k] if s != float("-inf")]
        if gates[k]:
            line["gates"] = gates[k]
        lines.append(line)
    return lines


def _write_jsonl(lines: list[dict[str, Any]], path: Path) -> None:
    """Write whole or not at all: a temporary file beside ``path``, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def predict_main(cli: Any) -> Path:
    """``medmoe predict``: write the predictions JSONL for a parsed
    :class:`medmoe.cli.PredictCLI` and return its path."""
    config = cli.config
    if bool(config.ckpt_path) == bool(config.adapter_dir):
        raise ValueError("medmoe predict needs exactly one of --ckpt_path or --adapter_dir")
    if config.max_new_tokens < 1 or config.batch_size < 1:
        raise ValueError(
            f"--max_new_tokens and --batch_size must be >= 1, got {config.max_new_tokens} and "
            f"{config.batch_size}"
        )
    if config.task and config.task not in cli.datamodule.task_names:
        raise ValueError(
            f"--task {config.task!r} is not a task of the config; its tasks: "
            f"{cli.datamodule.task_names}"
        )
    _load_weights(cli, config)
    lines = _predictions(cli, config)
    output = Path(config.output)
    _write_jsonl(lines, output)
    import sys

    sys.stderr.write(f"medmoe predict: {len(lines)} predictions written to {output}\n")
    return output
