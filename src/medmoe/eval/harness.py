"""Score an (adapted) model with lm-evaluation-harness itself, for final numbers.

medmoe's own scorers reproduce the harness's prompts and metrics on fixed subsets during
training; the published numbers of a trained adapter come from the harness on the full
benchmarks. ``HFLM`` accepts an instantiated model, so the adapted model is handed over as is
(no merge, no export): see docs/evaluation.md.

    from medmoe.eval.harness import harness_lm, load_adapted_for_harness
    model, tokenizer = load_adapted_for_harness("meta-llama/Meta-Llama-3-8B", "runs/x/adapter")
    lm = harness_lm(model, tokenizer, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["mmlu", "gsm8k"], num_fewshot=5)

``lm-eval`` is an optional dependency (``pip install lm-eval``, in the ``dev`` extra).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerBase

__all__ = ["harness_lm", "load_adapted_for_harness"]


def _hflm() -> type[HFLM]:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:  # pragma: no cover - exercised only without lm-eval
        raise ImportError(
            "scoring with the harness needs lm-eval: pip install 'lm-eval==0.4.13'"
        ) from err
    return HFLM


def _pause_routing_recording(model: nn.Module) -> None:
    """The harness's forwards need no routing statistics (they are a training-time record)."""
    from medmoe.adapters.capabilities import routed_layers

    for _, layer in routed_layers(model):
        layer.record_routing = False


def harness_lm(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int | str = 8,
    add_bos_token: bool | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> HFLM:
    """lm-eval's ``HFLM`` around the in-memory ``model`` (put in eval mode).

    ``add_bos_token`` is passed through (``None``: the tokenizer's default, as medmoe's
    ``MultiTaskDataModule.add_bos_token``), so the harness and medmoe's scorers see the same
    tokens. Other keyword arguments go to ``HFLM`` (e.g. ``max_batch_size``).
    """
    model.eval()
    _pause_routing_recording(model)
    return _hflm()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        add_bos_token=add_bos_token,
        max_length=max_length,
        **kwargs,
    )


def load_adapted_for_harness(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    torch_dtype: Any = "auto",
    device: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model with a saved adapter of any method loaded (``AdapterExport``'s folder;
    the method the directory records, :func:`medmoe.adapters.load_adapted`), and the base's
    tokenizer: ready for :func:`harness_lm`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medmoe.adapters.registry import load_adapted, saved_method

    method = saved_method(adapter_dir)  # the description first: a bad one loads no base
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    model = load_adapted(model, adapter_dir, method)
    if device is not None:
        model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(base)
