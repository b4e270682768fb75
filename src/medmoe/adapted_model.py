"""A PEFT-style model around any Hugging Face causal LM, for the trainers people already use.

::

    import medmoe
    from medmoe.adapters import MoELoRAConfig

    model = medmoe.get_adapted_model(base, MoELoRAConfig(allowed_ranks=[8, 16]))
    model.print_trainable_parameters()        # trainable and active parameters (Table 4)
    out = model(input_ids, attention_mask=mask, labels=labels, is_general=flags)
    out.loss                                  # task loss + lambda_bal * L_bal + lambda_kp * L_kp
    out.task_loss, out.balance_loss, out.kp_loss, out.aux_loss
    model.save_pretrained("adapter/")         # the adapter directory only
    model = medmoe.AdaptedModel.from_pretrained(base, "adapter/")
    with model.disable_adapter():             # the base model, exactly
        ...

The method is chosen by the config, as in ``medmoe fit``
(:func:`~medmoe.adapters.med_moe_lora.adapter_spec`): a :class:`~medmoe.adapters.MoELoRAConfig`
is Med-MoE-LoRA; :class:`~medmoe.adapters.baselines.LoRA`, ``MultiLoRA`` (one adapter per task,
``task_ids`` per sample) and ``FullFineTune`` are the baselines.

``transformers.Trainer`` and TRL's ``SFTTrainer`` train it as they train a ``PeftModel``: the
forward's ``loss`` already holds the routing terms of eq 5 (the way transformers' MoE models add
their router loss), checkpoints hold the adapter only, and TRL's fused LM head (``fused_lm_head=True``
calls) gets the routing terms too, as ``aux_loss``. See :class:`AdaptedModel`.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from medmoe.adapters.capabilities import routed_layers, task_routing
from medmoe.adapters.registry import adapter_spec, saved_method
from medmoe.adapters.spec import AdapterConfig, AdapterSpec
from medmoe.adapters.state import ParameterCounts, parameter_counts
from medmoe.objectives.balance import BALANCE_FORMS
from medmoe.objectives.routing import ROUTING_TOKENS, routing_token_mask

__all__ = ["AdaptedCausalLMOutput", "AdaptedModel", "get_adapted_model", "saved_adapter"]

# transformers' label of a position without a target
IGNORE_INDEX = -100


@dataclass
class AdaptedCausalLMOutput(ModelOutput):
    """The wrapped model's output plus the terms of the loss, apart.

    Attributes:
        loss: ``task_loss + share * aux_loss`` when labels were given (``share`` is 1 unless a
            trainer passes ``num_items_in_batch``, see :meth:`AdaptedModel.forward`).
        logits: the causal LM's logits. The wrapped model's other outputs follow, by their names
            (``cache`` or ``past_key_values``, ``hidden_states``, ``attentions``).
        task_loss: the causal LM's own next-token loss (what the wrapped model returns).
        aux_loss: ``lambda_balance * balance_loss + lambda_kp * kp_loss``; ``None`` when the method
            has no routing (LoRA, multi-LoRA, full fine-tuning) or its adapter is off.
        balance_loss: the load-balancing loss (eq 5), unweighted.
        kp_loss: the knowledge-preservation loss, unweighted (needs ``is_general``).
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    task_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    balance_loss: Tensor | None = None
    kp_loss: Tensor | None = None


class AdaptedModel(PreTrainedModel):
    """A causal LM with a medmoe adapter: build it with :func:`get_adapted_model` or
    :meth:`from_pretrained`.

    Args:
        model: the adapted model (what ``adapter.apply`` returned).
        adapter: its method, an :class:`~medmoe.adapters.spec.AdapterSpec`.
        lambda_balance: weight of the load-balancing loss (eq 5; configs/med.yaml: 0.01).
        lambda_kp: weight of the knowledge-preservation loss (configs/med.yaml: 0.01); it needs
            the per-sample ``is_general`` flags, and is left out (with a warning, once) without.
        kp_delta: LoRAMoE's degree of imbalance delta in [0, 1) (configs/med.yaml: 0.5).
        balance_form: ``"variance"`` (the paper's), ``"normalized"``, ``"cv2"`` or ``"switch"``.
        routing_tokens: the routing losses average over ``"all"`` non-padding tokens or the
            ``"target"``-predicting ones.

    It is a ``PreTrainedModel`` in type only (``PreTrainedModel.__init__`` does not run), so that
    ``transformers.Trainer`` saves it through :meth:`save_pretrained`, as it saves a
    ``PeftModel``; attributes it lacks come from the wrapped model (``config``,
    ``generation_config``, ...), as a ``PeftModel``'s do. ``base_model`` is transformers' decoder
    backbone, :meth:`get_base_model` peft's adapted causal LM.

    Under a trainer: ``transformers.Trainer`` passes ``num_items_in_batch`` (the target tokens of
    the optimizer step) with gradient accumulation, and then no longer divides the loss by the
    accumulation steps; the forward weighs each micro-batch's routing terms by its share of those
    tokens, so they sum to one routing term per step. TRL's ``SFTTrainer`` computes the task loss
    itself, through a fused LM head it patches onto the model (``fused_lm_head=True`` calls):
    those calls go through TRL's head and come back with the routing terms as ``aux_loss``, which
    ``SFTTrainer`` adds averaged over the accumulation steps, as for transformers' MoE models
    (the config is marked for it: ``output_router_logits``, ``router_aux_loss_coef=1.0``).
    ``SFTTrainer``'s collator drops columns other than the text's, so the knowledge-preservation
    term needs a ``data_collator`` that keeps ``is_general``.
    """

    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(
        self,
        model: nn.Module,
        adapter: AdapterSpec,
        *,
        lambda_balance: float = 0.01,
        lambda_kp: float = 0.01,
        kp_delta: float = 0.5,
        balance_form: Literal["variance", "normalized", "cv2", "switch"] = "variance",
        routing_tokens: Literal["all", "target"] = "all",
    ) -> None:
        nn.Module.__init__(self)  # not PreTrainedModel's: the wrapped model is already built
        if lambda_balance < 0 or lambda_kp < 0:
            raise ValueError(
                f"lambda_balance and lambda_kp must be >= 0, got {lambda_balance} and {lambda_kp}"
            )
        if not 0.0 <= kp_delta < 1.0:
            raise ValueError(f"kp_delta must lie in [0, 1), got {kp_delta}")
        if balance_form not in BALANCE_FORMS:
            raise ValueError(
                f"unknown balance_form {balance_form!r}; accepted: {', '.join(BALANCE_FORMS)}"
            )
        if routing_tokens not in ROUTING_TOKENS:
            raise ValueError(
                f"unknown routing_tokens {routing_tokens!r}; accepted: {', '.join(ROUTING_TOKENS)}"
            )
        self.model = model
        self.adapter = adapter
        self.config = model.config
        self.lambda_balance = float(lambda_balance)
        self.lambda_kp = float(lambda_kp)
        self.kp_delta = float(kp_delta)
        self.balance_form = balance_form
        self.routing_tokens = routing_tokens
        # the routed layers (MoE-LoRA's), whose routing the auxiliary losses read
        self.moe_layers = [layer for _, layer in routed_layers(model)]
        self._adapter_off = 0  # depth of disable_adapter() blocks
        self._warned_no_kp = False
        if self.has_routing_losses:
            # What TRL's SFTTrainer reads to add a model's ``aux_loss`` (transformers' MoE
            # convention); a base with its own router config keeps it.
            text_config = self.config.get_text_config()
            if not hasattr(text_config, "output_router_logits"):
                text_config.output_router_logits = False
                text_config.router_aux_loss_coef = 1.0

    # ----------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's ``add_fused_lm_head`` replaces ``model.forward`` with its fused head. It is kept
        # aside instead, and ``fused_lm_head=True`` calls go through it from :meth:`forward`, so
        # they also get the routing terms (TRL would add none: it computes the loss itself).
        if name == "forward" and _is_fused_lm_head(value, self):
            self.__dict__["_fused_lm_head"] = value
            return
        super().__setattr__(name, value)

    def get_base_model(self) -> nn.Module:
        """The adapted causal LM (for LoRA the transformers model inside the ``PeftModel``)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if callable(get) else self.model

    @property
    def base_model(self) -> nn.Module:
        """transformers' meaning: the decoder backbone (last hidden states) of the causal LM."""
        return self.get_base_model().base_model

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.get_base_model(), "supports_gradient_checkpointing", False))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.get_base_model().get_decoder()

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.model.resize_token_embeddings(*args, **kwargs)

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.model.disable_input_require_grads()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        self.get_base_model().tie_weights(*args, **kwargs)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Checkpoint the decoder layers, non-reentrant unless asked otherwise (what
        ``Trainer(args=TrainingArguments(gradient_checkpointing=True))`` calls).

        Reentrant checkpointing runs the forward under ``no_grad``: the router probabilities the
        routing losses differentiate would carry no gradient, so it is refused for a method that
        has routing losses.
        """
        kwargs = dict(activation_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        if kwargs["use_reentrant"] and self.has_routing_losses:
            raise ValueError(
                "reentrant gradient checkpointing runs the forward under no_grad, so the routing "
                "losses would give the routers no gradient; use use_reentrant=False (the default "
                "here), or lambda_balance=0 and lambda_kp=0"
            )
        model = self.get_base_model()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        model = self.get_base_model()
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # ----------------------------------------------------------------- the adapter
    @property
    def has_routing_losses(self) -> bool:
        """Whether the forward adds routing terms: routed layers and a positive weight."""
        return bool(self.moe_layers) and (self.lambda_balance > 0 or self.lambda_kp > 0)

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors (what trains and what :meth:`save_pretrained` keeps), keyed by
        their names in the wrapped model."""
        return self.adapter.adapter_tensors(self.model)

    def parameter_counts(self) -> ParameterCounts:
        """Total, trainable and active-per-token parameters (Table 4 of the paper)."""
        return parameter_counts(self.model)

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameters, the ones a token actually uses (Table 4: with top-k
        routing the k experts' share, with soft merging all of them) and the total."""
        counts = self.parameter_counts()
        share = 100 * counts.trainable / max(counts.total, 1)
        print(
            f"trainable params: {counts.trainable:,} || active params per token: "
            f"{round(counts.active):,} || all params: {counts.total:,} || trainable%: {share:.4f}"
        )

    def parameter_groups(
        self,
        weight_decay: float = 0.0,
        learning_rate: float | None = None,
        router_learning_rate: float | None = 2e-3,
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups as ``medmoe fit`` uses them
        (:func:`medmoe.optimization.parameter_groups`): the routers and temperatures in their own
        group at ``router_learning_rate``, never decayed. ``Trainer`` puts every trainable
        parameter at one learning rate, at which tau cannot move; pass
        ``optimizers=(torch.optim.AdamW(model.parameter_groups(...), lr=...), None)``."""
        from medmoe.optimization import parameter_groups

        return parameter_groups(
            self.adapter,
            self.model,
            weight_decay,
            learning_rate=learning_rate,
            router_learning_rate=router_learning_rate,
        )

    @contextmanager
    def disable_adapter(self) -> Iterator[AdaptedModel]:
        """Run the base model inside the block (exactly: the adapter layers return ``W0 x``)."""
        with self.adapter.disabled(self.model):
            self._adapter_off += 1
            try:
                yield self
            finally:
                self._adapter_off -= 1

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        is_general: Tensor | None = None,
        task_ids: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs: Any,
    ) -> AdaptedCausalLMOutput | ModelOutput:
        """The wrapped model's forward; with ``labels``, its loss plus the routing terms.

        Args:
            input_ids, attention_mask, labels: as for the causal LM (labels ``-100`` off target).
            is_general: [B] flags, general replay (true) or domain sample: the
                knowledge-preservation loss pushes the former to the base experts.
            task_ids: [B] task ids, for multi-LoRA (each sample's adapter); ignored otherwise.
            num_items_in_batch: the target tokens of the whole optimizer step (what
                ``transformers.Trainer`` passes): the task loss is then summed over this batch's
                tokens and divided by it, and the routing terms are weighted by this batch's share
                of it, ``target tokens here / num_items_in_batch``.
            kwargs: for the causal LM (``position_ids``, ``use_cache``, ...); ``fused_lm_head``
                for TRL's fused head.
        """
        fused = kwargs.pop("fused_lm_head", False)
        kwargs.pop("output_router_logits", None)  # the routing terms come with every loss
        self._prepare(input_ids, attention_mask, labels, is_general, task_ids)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is not None:  # pre-shifted: position t's own label is its next token
            target_mask = shift_labels != IGNORE_INDEX  # [B, T]
        elif labels is not None:
            target_mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
        else:
            target_mask = None
        if fused:
            outputs = self._fused_forward(
                input_ids, attention_mask, labels, num_items_in_batch, kwargs
            )
        else:
            if labels is not None:
                kwargs.setdefault("use_cache", False)  # a loss forward never generates
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            inner = self.model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
            outputs = AdaptedCausalLMOutput(loss=inner.loss, logits=inner.logits)
            outputs["task_loss"] = inner.loss
            # the cache, hidden states, ... as the model names them
            for key, value in inner.items():
                if key not in ("loss", "logits"):
                    outputs[key] = value
        if target_mask is None or not self.has_routing_losses or self._adapter_off:
            return outputs
        if shift_labels is not None:
            mask = target_mask if self.routing_tokens == "target" else attention_mask
            token_mask = None if mask is None else mask.bool()
        else:
            token_mask = routing_token_mask(self.routing_tokens, attention_mask, target_mask)
        terms = self._routing_terms(token_mask, is_general)
        share = 1.0
        if num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=target_mask.device)
            share = target_mask.sum() / total.clamp_min(1)
        aux = terms["routing_loss"]
        outputs["aux_loss"] = aux
        for key in ("balance_loss", "kp_loss"):
            if key in terms:
                outputs[key] = terms[key]
        outputs["loss"] = outputs["loss"] + share * aux.to(outputs["loss"].dtype)
        return outputs

    def _prepare(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        labels: Tensor | None,
        is_general: Tensor | None,
        task_ids: Tensor | None,
    ) -> None:
        """The method's per-batch hook (:meth:`AdapterSpec.prepare_batch`): multi-LoRA's task ids."""
        routed_by_task = task_routing(self.adapter)
        if routed_by_task is not None:
            if self._adapter_off:
                return
            if task_ids is None:
                raise ValueError(
                    "multi-LoRA picks each sample's adapter by its task: pass task_ids (a [B] "
                    "tensor; a dataset column 'task_ids' reaches the forward through Trainer), "
                    "or generate(..., task_ids=...)"
                )
            batch = {routed_by_task.task_key: task_ids}
        else:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            if task_ids is not None:
                batch["task_id"] = task_ids
        if is_general is not None:
            batch["is_general"] = is_general
        self.adapter.prepare_batch(self.model, {k: v for k, v in batch.items() if v is not None})

    def _routing_terms(self, token_mask: Tensor | None, is_general: Tensor | None) -> dict:
        use_kp = self.lambda_kp > 0 and any(layer.num_base_experts for layer in self.moe_layers)
        if use_kp and is_general is None and not self._warned_no_kp:
            self._warned_no_kp = True
            warnings.warn(
                "the knowledge-preservation loss needs each sample's general/domain flag: pass "
                "is_general=[B] bools (a dataset column 'is_general') or set lambda_kp=0; it is "
                "left out of the loss of batches without it",
                stacklevel=3,
            )
        return self.adapter.auxiliary_losses(
            self.model,
            token_mask,
            lambda_balance=self.lambda_balance,
            lambda_kp=self.lambda_kp,
            balance_form=self.balance_form,
            kp_delta=self.kp_delta,
            is_general=is_general,
        )

    def _fused_forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        labels: Tensor | None,
        num_items_in_batch: Tensor | int | None,
        kwargs: dict[str, Any],
    ) -> ModelOutput:
        """A ``fused_lm_head=True`` call through the fused head TRL patched onto the model."""
        head = self.__dict__.get("_fused_lm_head")
        if head is None:
            raise TypeError(
                "fused_lm_head=True needs a fused LM head on the model (trl.add_fused_lm_head, "
                "which TRL's trainers apply)"
            )
        # output_router_logits=False: TRL's head would add Mixtral's load-balancing loss over
        # router logits instead (one N for every layer); the routing terms come from forward
        return head(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            fused_lm_head=True,
            output_router_logits=False,
            **kwargs,
        )

    # ----------------------------------------------------------------- generation
    def generate(self, *args: Any, task_ids: Tensor | int | str | None = None, **kwargs: Any):
        """The wrapped model's ``generate``; ``task_ids`` (a task id, a task name or [B] ids)
        picks multi-LoRA's adapters."""
        routed_by_task = task_routing(self.adapter)
        if task_ids is not None and routed_by_task is None:
            raise TypeError(
                f"task_ids select multi-LoRA adapters; {type(self.adapter).__name__} has none"
            )
        context = (
            nullcontext()
            if task_ids is None or self._adapter_off
            else routed_by_task.task_context(self.model, task_ids)
        )
        with context:
            return self.model.generate(*args, **kwargs)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Path | None:
        """Write the adapter directory (the method's own files: for the adapters
        ``adapter_model.safetensors`` + ``adapter_config.json``, for full fine-tuning the model).

        Written whole: the method saves into a temporary folder beside ``save_directory``, which
        then replaces it; a directory that holds other things (a Trainer's ``output_dir`` with
        its checkpoints) keeps them, and only the method's files are replaced, one by one (each
        whole). Only the main process writes. ``state_dict`` (which trainers pass under ZeRO and
        FSDP) is not used: the tensors come from the model, and a sharded (empty) adapter
        tensor is an error rather than an empty file.
        """
        if not is_main_process:
            return None
        empty = [name for name, t in self.adapter_tensors().items() if t.numel() == 0]
        if empty:
            raise RuntimeError(
                f"adapter tensors {empty[:3]} are empty here (sharded, as under ZeRO-3): they "
                "must be gathered before saving"
            )
        directory = Path(save_directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            written = Path(self.adapter.save(self.model, staging / "adapter"))
            _publish(written, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | nn.Module,
        adapter_dir: str | os.PathLike,
        *,
        adapter: AdapterSpec | AdapterConfig | None = None,
        is_trainable: bool = False,
        lambda_balance: float = 0.01,
        lambda_kp: float = 0.01,
        kp_delta: float = 0.5,
        balance_form: Literal["variance", "normalized", "cv2", "switch"] = "variance",
        routing_tokens: Literal["all", "target"] = "all",
        **base_kwargs: Any,
    ) -> AdaptedModel:
        """Load an adapter directory (:meth:`save_pretrained`'s, ``medmoe fit``'s ``adapter/``,
        a Trainer checkpoint) onto ``base``, in eval mode.

        Args:
            base: a model, ``"toy"``, a local model directory or a hub id (``base_kwargs`` go to
                ``AutoModelForCausalLM.from_pretrained``).
            adapter: the method; by default read from the directory (:func:`saved_adapter`).
                Give it to load with a subclass (e.g. a ``MoELoRA`` with another ``layer_cls``).
            is_trainable: keep the adapter trainable (default: frozen, for inference, as peft).
        """
        spec = adapter_spec(adapter) if adapter is not None else saved_adapter(adapter_dir)
        if isinstance(base, nn.Module):
            model = base
        else:
            from medmoe.predict import _load_base

            model = _load_base(base, **base_kwargs)
        model = spec.load(model, adapter_dir)
        wrapped = cls(
            model,
            spec,
            lambda_balance=lambda_balance,
            lambda_kp=lambda_kp,
            kp_delta=kp_delta,
            balance_form=balance_form,
            routing_tokens=routing_tokens,
        )
        if not is_trainable:
            wrapped.requires_grad_(False)
        return wrapped.eval()


def get_adapted_model(
    model: nn.Module,
    adapter: AdapterSpec | AdapterConfig | None = None,
    *,
    lambda_balance: float = 0.01,
    lambda_kp: float = 0.01,
    kp_delta: float = 0.5,
    balance_form: Literal["variance", "normalized", "cv2", "switch"] = "variance",
    routing_tokens: Literal["all", "target"] = "all",
) -> AdaptedModel:
    """Adapt a Hugging Face causal LM with ``adapter`` (default: Med-MoE-LoRA with the paper's
    config) and wrap it in an :class:`AdaptedModel`, as ``peft.get_peft_model`` does.

    ``adapter``: a :class:`~medmoe.adapters.MoELoRAConfig` (Med-MoE-LoRA) or any
    :class:`~medmoe.adapters.spec.AdapterSpec` (``medmoe.adapters.baselines.LoRA``,
    ``MultiLoRA``, ``FullFineTune``, ``vanilla_moe_lora()``). The loss weights default to
    configs/med.yaml's. ``model`` is adapted in place (the baselines' LoRA wraps it in a
    ``PeftModel``).
    """
    if adapter is None:
        from medmoe.adapters.config import MoELoRAConfig

        adapter = MoELoRAConfig()
    spec = adapter_spec(adapter)
    adapted = spec.apply(model)
    return AdaptedModel(
        adapted,
        spec,
        lambda_balance=lambda_balance,
        lambda_kp=lambda_kp,
        kp_delta=kp_delta,
        balance_form=balance_form,
        routing_tokens=routing_tokens,
    )


def saved_adapter(directory: str | os.PathLike) -> AdapterSpec:
    """The method that wrote an adapter directory, with its saved config: the one the
    directory's description records (:func:`medmoe.adapters.saved_method`; any method, any
    format, format-0 directories included)."""
    return saved_method(directory)


def _is_fused_lm_head(value: Any, model: nn.Module) -> bool:
    """Whether ``value`` is a forward that TRL's ``add_fused_lm_head`` binds to ``model``: a
    method of it whose own signature takes ``fused_lm_head``."""
    function = getattr(value, "__func__", None)
    if function is None or getattr(value, "__self__", None) is not model:
        return False
    try:
        parameters = inspect.signature(function, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return False
    return "fused_lm_head" in parameters


# A method's weight files: shards of a former save must not stay beside the new ones.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _publish(written: Path, directory: Path) -> None:
    """Move the freshly written folder ``written`` to ``directory``.

    A missing ``directory``, or one holding no more than the files just written, is replaced
    whole (renamed away, then the new folder renamed in). A directory holding other things keeps
    them: the new files replace their namesakes one by one (``os.replace``, each whole; weights
    first, configs last), then weight files of an earlier save that the new one lacks (shards)
    are removed.
    """
    names = {p.name for p in written.iterdir()}
    if not directory.exists():
        written.rename(directory)
        return
    existing = {p.name for p in directory.iterdir()}
    if existing <= names:
        retired = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
        written.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
        return
    for name in sorted(names, key=lambda n: n.endswith(".json")):
        os.replace(written / name, directory / name)
    for name in sorted(existing - names):
        if name.endswith(_WEIGHT_SUFFIXES) and (directory / name).is_file():
            (directory / name).unlink()
