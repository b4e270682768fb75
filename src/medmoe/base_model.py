"""Load the base causal LM a method adapts: a hub id, a local directory, the toy base, or a
random tiny Llama (tests). No Lightning, no adapters, no data code."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from medmoe.assets import toy_base_path
from medmoe.errors import local_or_hub, short_reason

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_BASE = "toy"  # the name that selects the shipped toy base


def load_base_model(
    model_name_or_path: str | None = TOY_BASE,
    tiny_llama: dict[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
    torch_dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    allow_vocab_mismatch: bool = False,
) -> nn.Module:
    """The base model in ``torch_dtype``.

    Args:
        model_name_or_path: a hub id, a local model directory, or ``"toy"`` for the shipped toy
            base. Ignored when ``tiny_llama`` is given.
        tiny_llama: ``LlamaConfig`` keyword arguments of a random tiny Llama; its
            ``vocab_size`` defaults to ``vocab_size``.
        vocab_size: the tokenizer's vocabulary size; a loaded model that embeds fewer tokens is
            an error.
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        attn_implementation: transformers attention backend; ``None`` lets transformers choose.
        allow_vocab_mismatch: accept a tokenizer whose size differs from the model's embedding
            rows (refused by default: a tokenizer that is not the model's goes unnoticed otherwise).
    """
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[torch_dtype]
    if tiny_llama is not None:
        values = dict(tiny_llama)
        if vocab_size is not None:
            values.setdefault("vocab_size", vocab_size)
        config = LlamaConfig(**values)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        return LlamaForCausalLM(config).to(dtype)
    if model_name_or_path is None:
        raise ValueError("give model_name_or_path (hub id, local dir or 'toy') or tiny_llama")
    if model_name_or_path == TOY_BASE:
        path = str(toy_base_path())
    else:
        path = local_or_hub(model_name_or_path, "model_name_or_path")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"model_name_or_path {path!r} could not be loaded ({short_reason(err)})"
        ) from err
    embedded = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > embedded:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but {path} embeds only {embedded}: pair the "
            "model with its tokenizer"
        )
    if vocab_size is not None and vocab_size != embedded and not allow_vocab_mismatch:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but {path} embeds {embedded}: pair the model "
            "with its own tokenizer, or set model.init_args.allow_vocab_mismatch: true"
        )
    return model
