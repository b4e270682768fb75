"""Standard LoRA baseline (Hu et al. 2021, ``h = W0 x + (alpha / r) B A x``) through ``peft``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from torch import Tensor, nn

from medmoe.adapters.config import LLAMA_TARGETS
from medmoe.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DESCRIPTION_BESIDE,
    AdapterDescription,
)
from medmoe.adapters.registry import register_method
from medmoe.adapters.spec import AdapterSpec
from medmoe.adapters.state import read_safetensors
from medmoe.errors import read_json_file

BIASES = ("none", "all", "lora_only")


def check_lora_fields(r: int, lora_alpha: float, dropout: float, target_modules: list[str]) -> None:
    """ValueError naming the field, its value and what is accepted, for LoRA hyper-parameters."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    if not target_modules:
        raise ValueError("target_modules must name at least one linear layer, got []")


def _peft_model(model: nn.Module, action: str) -> nn.Module:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"LoRA.{action} needs the PeftModel that LoRA.apply returned, got {type(model).__name__}"
        )
    return model


@register_method("LoRA")
@dataclass
class LoRA(AdapterSpec):
    """One LoRA shared by all tasks, built by ``peft`` (the paper's "standard LoRA", r=16).

    Attributes:
        r: LoRA rank (>= 1).
        lora_alpha: LoRA alpha; the update is scaled by ``lora_alpha / r`` (default 32 / 16 = 2,
            the same scale as every Med-MoE-LoRA expert).
        dropout: dropout on the LoRA path's input, in [0, 1).
        target_modules: names of the adapted linear layers (default: the 7 Llama projections).
        bias: ``peft``'s bias mode: ``"none"``, ``"all"`` or ``"lora_only"``.
    """

    r: int = 16
    lora_alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        check_lora_fields(self.r, self.lora_alpha, self.dropout, self.target_modules)
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {', '.join(BIASES)}, got {self.bias!r}")

    def peft_config(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias=self.bias,
            task_type=TaskType.CAUSAL_LM,
        )

    # ----------------------------------------------------------------- AdapterSpec
    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` with ``peft.get_peft_model``; only LoRA (and bias) parameters train."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """peft's declared LoRA tensors (``adapter_layer_names`` of every tuner layer) and the
        biases ``bias`` makes trainable (``"all"``: every bias; ``"lora_only"``: the adapted
        layers' biases), keyed by their ``state_dict`` names."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        modules = list(_peft_model(model, "adapter_tensors").named_modules())
        tuners = [(n, m) for n, m in modules if isinstance(m, BaseTunerLayer)]
        tensors: dict[str, Tensor] = {}
        for name, module in tuners:
            for attribute in module.adapter_layer_names:
                for key, param in getattr(module, attribute).named_parameters():
                    tensors[f"{name}.{attribute}.{key}"] = param
        if self.bias != "none":
            bias_owners = (
                modules
                if self.bias == "all"
                else [(f"{n}.base_layer", m.get_base_layer()) for n, m in tuners]
            )
            for name, module in bias_owners:
                bias = dict(module.named_parameters(recurse=False)).get("bias")
                if bias is not None:
                    tensors[f"{name}.bias"] = bias
        return tensors

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        with _peft_model(model, "disabled").disable_adapter():
            yield model

    # the description goes beside peft's own adapter_config.json, which peft alone still loads
    description_file: ClassVar[str] = DESCRIPTION_BESIDE

    def check_saveable(self, model: nn.Module) -> None:
        _peft_model(model, "save")

    def write_files(self, model: nn.Module, staging: Path) -> None:
        """``peft``'s ``save_pretrained``: ``adapter_model.safetensors`` + its
        ``adapter_config.json`` (peft's model card left out)."""
        _peft_model(model, "save").save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").unlink(missing_ok=True)

    def read_files(
        self, model: nn.Module, directory: Path, description: AdapterDescription
    ) -> nn.Module:
        """Load onto the PeftModel from :meth:`apply`, or wrap a bare base model with the file's
        adapter (``PeftModel.from_pretrained``). Missing or unexpected LoRA tensors raise."""
        from peft import PeftModel, set_peft_model_state_dict

        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"no peft adapter weights at {weights}")
        saved = read_safetensors(weights)  # both files checked before the model is touched
        config_path = directory / ADAPTER_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"no peft adapter config at {config_path}")
        if not isinstance(read_json_file(config_path, "adapter config"), dict):
            raise ValueError(f"adapter config {config_path} holds no JSON object")
        if not isinstance(model, PeftModel):
            return PeftModel.from_pretrained(model, directory, is_trainable=True)
        result = set_peft_model_state_dict(model, saved)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model
