"""Full fine-tuning baseline: every parameter trains; the whole model is saved."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from medmoe.adapters.format import DESCRIPTION_BESIDE, AdapterDescription
from medmoe.adapters.registry import register_method
from medmoe.adapters.spec import AdapterSpec
from medmoe.adapters.state import read_safetensors

_SHARD_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


@register_method("FullFineTune")
@dataclass
class FullFineTune(AdapterSpec):
    """Full fine-tuning: no adapter, all weights train.

    Attributes:
        max_shard_size: the largest safetensors shard :meth:`save` writes (``save_pretrained``'s
            ``max_shard_size``): a size such as ``"5GB"`` or a positive number of bytes.
    """

    max_shard_size: str | int = "5GB"

    def __post_init__(self) -> None:
        size = self.max_shard_size
        valid_int = isinstance(size, int) and not isinstance(size, bool) and size > 0
        if not valid_int and not (isinstance(size, str) and _SHARD_SIZE.match(size)):
            raise ValueError(
                f"max_shard_size must be a size such as '5GB' or '500MB' or a positive number of "
                f"bytes, got {size!r}"
            )

    def apply(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(True)

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Every parameter: the whole model is the "adapter" (tied weights once)."""
        return dict(model.named_parameters())

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        raise NotImplementedError(
            "FullFineTune overwrites the base weights, so the base model cannot be switched back "
            "on after training; measure forgetting against a separately loaded copy of the base"
        )
        yield model  # pragma: no cover

    # the description goes beside save_pretrained's files, which from_pretrained alone loads
    description_file: ClassVar[str] = DESCRIPTION_BESIDE

    def check_saveable(self, model: nn.Module) -> None:
        if not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"FullFineTune.save needs a Hugging Face model, got {type(model).__name__}"
            )

    def save_size(self, model: nn.Module, description_bytes: int) -> int:
        return sum(t.nbytes for t in model.state_dict().values())

    def write_files(self, model: nn.Module, staging: Path) -> None:
        """The full model as safetensors (``save_pretrained``, sharded above
        ``max_shard_size``)."""
        model.save_pretrained(staging, max_shard_size=self.max_shard_size)

    def read_files(
        self, model: nn.Module, directory: Path, description: AdapterDescription
    ) -> nn.Module:
        """Copy every ``*.safetensors`` tensor of ``directory`` into ``model``.

        A parameter missing from the files is an error unless it shares storage with one that
        was loaded (tied embeddings, which ``save_pretrained`` writes once).
        """
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(read_safetensors(path))  # every file whole before any is copied
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{directory}: unexpected tensors {result.unexpected_keys[:5]}")
        current = model.state_dict()
        loaded = {current[k].data_ptr() for k in state}
        missing = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]
        if missing:
            raise ValueError(f"{directory}: missing tensors {missing[:5]}")
        return model
