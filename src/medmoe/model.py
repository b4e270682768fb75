"""The LightningModule: a Hugging Face causal LM with an adapter, trained on eq 5's objective.

Paper: Yang, Zeng & Yang, "Towards Specialized Generalists: A Multi-Task MoE-LoRA Framework for
Domain-Specific LLM Adaptation" (Med-MoE-LoRA; see the README's "The paper").
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from medmoe.adapters import MoELoRAConfig, enable_gradient_checkpointing
from medmoe.adapters.capabilities import RoutedLayer, routed_layers, task_routing
from medmoe.adapters.med_moe_lora import adapter_spec
from medmoe.adapters.spec import AdapterConfig, AdapterSpec
from medmoe.adapters.state import (
    TAU_PARAMETRISATION,
    TAU_PARAMETRISATION_KEY,
    convert_legacy_log_tau,
)
from medmoe.base_model import DTYPES, load_base_model
from medmoe.losses import (
    NonFiniteLossWatch,
    step_token_objective,
    target_token_losses,
    task_mean_objective,
)
from medmoe.objectives.projection import ORTHO_TASKS, OrthoLoRA
from medmoe.optimization import (
    is_deepspeed,
    optimizer_class,
    parameter_groups,
    warmup_cosine_schedule,
)
from medmoe.resume import check_resume
from medmoe.rng import gather_rng_states, rank_rng_state, set_rng_states

LOSS_NORMALIZATIONS = ("step_tokens", "task_mean", "micro_batch")


class MedMoEModule(LightningModule):
    """Fine-tunes a causal LM with any :class:`~medmoe.adapters.spec.AdapterSpec`.

    Loss (eq 5): masked next-token cross-entropy on the target tokens
    ``+ lambda_balance * L_balance + lambda_kp * L_kp`` (the routing terms only for MoE-LoRA).

    Args:
        model_name_or_path: a hub id, a local model directory, or ``"toy"`` for the toy
            clinic's shipped base. Ignored when ``tiny_llama`` is given.
        tiny_llama: ``LlamaConfig`` keyword arguments to build a random tiny Llama (tests);
            its ``vocab_size`` defaults to the data's.
        adapter: the fine-tuning method (``class_path`` in YAML): an
            :class:`~medmoe.adapters.spec.AdapterSpec`, or a registered data-only
            ``AdapterConfig`` (:class:`~medmoe.adapters.MoELoRAConfig` or a subclass), which
            selects its method (:func:`~medmoe.adapters.med_moe_lora.adapter_spec`). Default:
            Med-MoE-LoRA.
        vocab_size: the tokenizer's vocabulary size (linked from the data by the CLI).
        task_names: task names by task id (linked from the data), for per-task logging.
        torch_dtype: dtype the base model is loaded in.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``); ``None`` lets transformers choose.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        lambda_balance: weight of the load-balancing loss (eq 5).
        balance_form: ``"variance"`` (the paper's form), ``"normalized"`` (the variance over
            its collapsed-router value ``(N-1)/N^2``: 1 at collapse for every N), ``"cv2"`` or
            ``"switch"``.
        lambda_kp: weight of the knowledge-preservation loss (general samples to base experts,
            domain samples to specialists); 0 turns it off.
        kp_delta: LoRAMoE's degree of imbalance delta in [0, 1).
        routing_tokens: tokens the routing losses average over: ``"all"`` non-padding tokens or
            ``"target"`` tokens only (prompt tokens masked).
        learning_rate: AdamW peak learning rate of the adapters (paper: 5e-5).
        router_learning_rate: peak learning rate of the routers and temperatures (their own
            parameter group, same schedule, no weight decay). The default 2e-3 lets ``log tau``
            cross its whole range (a factor 10 either way) within ~1200 steps of the paper's
            3000-step cosine schedule (docs/mechanisms.md); at 5e-5 it could move tau by < 8%.
        weight_decay: AdamW weight decay; never applied to routers, temperatures or biases.
        warmup_ratio: fraction of the optimizer steps spent in linear warm-up before the cosine
            decay (paper: 0.03).
        betas: AdamW betas.
        gradient_projection: ``"ortho"`` projects conflicting per-task gradients of every LoRA
            factor (Ortho-LoRA, PCGrad-style, per factor) before each optimizer step; works
            with peft LoRA and MoE-LoRA adapters. ``"none"`` trains on the summed gradient.
        projection_order: Ortho-LoRA's task order, ``"shuffle"`` (seeded) or ``"fixed"``.
        ortho_tasks: the tasks Ortho-LoRA projects among. ``"all"`` (default): every task id,
            replay included. ``"domain"``: the domain (medical) tasks only, as in the Ortho-LoRA
            paper, which has no replay; the replay tasks' gradients are neither projected nor
            projected against, and are added as they are. The domain task ids are the data's
            (``MultiTaskDataModule.task_groups``: domain tasks first, then replay), read when
            the fit starts; at least two domain tasks are needed.
        loss_normalization: what the task loss of a training step is divided by.
            ``"step_tokens"`` (default): the target tokens of the whole optimizer step, all
            accumulated micro-batches on all ranks (the batch's ``step_target_tokens``, which
            :class:`~medmoe.data.MultiTaskDataModule` attaches), so every target token weighs
            the same, as transformers' ``num_items_in_batch``. ``"task_mean"``: the mean over
            the tasks present in the step of each task's token mean over the step (the batch's
            ``step_task_tokens``), so every task present weighs the same whatever its target
            length, replay tasks included (:func:`~medmoe.losses.task_mean_objective`).
            ``"micro_batch"``: each micro-batch's own token mean, averaged over micro-batches
            and ranks. ``step_tokens`` and ``task_mean`` do not depend on how the step's samples
            are split over micro-batches and ranks.
        allow_vocab_mismatch: train although the tokenizer's size differs from the model's
            embedding rows (by default refused: ids the tokenizer never emits, or a tokenizer
            that is not the model's, go unnoticed otherwise).
    """

    def __init__(
        self,
        model_name_or_path: str | None = "toy",
        tiny_llama: dict[str, Any] | None = None,
        adapter: AdapterSpec | AdapterConfig | None = None,
        vocab_size: int | None = None,
        task_names: list[str] | None = None,
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = "sdpa",
        gradient_checkpointing: bool = False,
        lambda_balance: float = 0.01,
        balance_form: Literal["variance", "normalized", "cv2", "switch"] = "variance",
        lambda_kp: float = 0.0,
        kp_delta: float = 0.1,
        routing_tokens: Literal["all", "target"] = "all",
        learning_rate: float = 5e-5,
        router_learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        gradient_projection: Literal["none", "ortho"] = "none",
        projection_order: Literal["shuffle", "fixed"] = "shuffle",
        ortho_tasks: Literal["all", "domain"] = "all",
        loss_normalization: Literal["step_tokens", "task_mean", "micro_batch"] = "step_tokens",
        allow_vocab_mismatch: bool = False,
    ) -> None:
        super().__init__()
        if model_name_or_path is None and tiny_llama is None:
            raise ValueError("give model_name_or_path (hub id, local dir or 'toy') or tiny_llama")
        if lambda_balance < 0 or lambda_kp < 0:
            raise ValueError(
                f"lambda_balance and lambda_kp must be >= 0, got {lambda_balance}, {lambda_kp}"
            )
        if not learning_rate > 0 or not router_learning_rate >= 0:
            raise ValueError(
                f"need learning_rate > 0 and router_learning_rate >= 0, got {learning_rate}, "
                f"{router_learning_rate}"
            )
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        if gradient_projection not in ("none", "ortho"):
            raise ValueError(
                f"gradient_projection must be 'none' or 'ortho', got {gradient_projection!r}"
            )
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got "
                f"{loss_normalization!r}"
            )
        if ortho_tasks not in ORTHO_TASKS:
            raise ValueError(
                f"ortho_tasks must be one of {', '.join(ORTHO_TASKS)}, got {ortho_tasks!r}"
            )
        if torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {torch_dtype!r} is not one of {sorted(DTYPES)}")
        if adapter is None:
            adapter = MoELoRAConfig()
        elif isinstance(adapter, Mapping):  # a checkpoint's hparams: {"class_path": ..., ...}
            adapter = _instantiate(adapter)
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["adapter"] = {"class_path": _class_path(adapter), "init_args": vars(adapter)}
        self.adapter: AdapterSpec = adapter_spec(adapter)
        self.task_names = list(task_names or [])
        self.model: nn.Module | None = None
        self.moe_layers: list[RoutedLayer] = []  # the routed layers (none for LoRA, FFT)
        self.ortho: OrthoLoRA | None = None
        self._ortho_task_ids: list[int] | None = None  # ortho_tasks="domain": set in setup
        self.strict_loading = False  # checkpoints leave the frozen base out
        self._val_sums: Tensor | None = None
        self._resumed_rng_states: dict[str, Any] | None = None
        self._nonfinite = NonFiniteLossWatch()
        self._engine_steps = 0  # DeepSpeed optimizer steps seen (train/grad_norm)

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Build the base model and apply the adapter; a no-op once built (DeepSpeed-safe)."""
        if self.model is not None:
            return
        base = load_base_model(
            self.hparams.model_name_or_path,
            self.hparams.tiny_llama,
            vocab_size=self.hparams.vocab_size,
            torch_dtype=self.hparams.torch_dtype,
            attn_implementation=self.hparams.attn_implementation,
            allow_vocab_mismatch=self.hparams.allow_vocab_mismatch,
        )
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        per_task = task_routing(self.adapter)
        if per_task is not None and self.task_names and per_task.num_tasks > len(self.task_names):
            raise ValueError(
                f"{type(self.adapter).__name__}.num_tasks={per_task.num_tasks} but the data has "
                f"only {len(self.task_names)} tasks {self.task_names}: one adapter per domain "
                "task (the data's tasks come first in task-id order, then its replay)"
            )
        self.model = self.adapter.apply(base)
        self.model.train(self.training)  # from_pretrained returns eval mode: follow the module
        self.moe_layers = [layer for _, layer in routed_layers(self.model)]
        # a configured loss must act: L_kp (LoRAMoE's) needs a base group to route general data to
        has_base = any(layer.num_base_experts for layer in self.moe_layers)
        if self.hparams.lambda_kp > 0 and self.moe_layers and not has_base:
            raise ValueError(
                f"lambda_kp={self.hparams.lambda_kp} but no routed layer has base experts "
                "(num_base_experts 0 everywhere): set model.init_args.lambda_kp: 0.0 or give "
                "the adapter a base group (base_expert_fraction or num_base_experts)"
            )
        if self.hparams.gradient_projection == "ortho":
            if len(self.task_names) < 2:
                raise ValueError(
                    f"gradient_projection='ortho' needs at least 2 tasks, got task_names="
                    f"{self.task_names}"
                )
            self.ortho = OrthoLoRA(
                self.model,
                len(self.task_names),
                order=self.hparams.projection_order,
                projected_tasks=self._ortho_task_ids,
            )

    def setup(self, stage: str) -> None:
        # here, not in configure_model: a model built before the Trainer existed skips that
        if self.hparams.gradient_projection == "ortho" and is_deepspeed(self.trainer.strategy):
            raise ValueError(
                "gradient_projection='ortho' does not work under the DeepSpeed strategy: "
                "ZeRO moves gradients into its own buffers during backward, so the "
                "projection would never reach the optimizer. Use DDP "
                "(configs/multi_gpu/ddp.yaml) or one device for Ortho-LoRA"
            )
        if self.hparams.gradient_projection == "ortho" and stage == "fit":
            self._ortho_task_ids = self._ortho_projected_tasks()
            if self.ortho is not None:  # built before the Trainer existed
                self.ortho.projected_tasks = self._ortho_task_ids

    def _ortho_projected_tasks(self) -> list[int] | None:
        """The task ids Ortho-LoRA projects among (``ortho_tasks``); ``None`` = all."""
        if self.hparams.get("ortho_tasks", "all") == "all":
            return None
        groups = getattr(self.trainer.datamodule, "task_groups", None)
        if groups is None or len(groups) != len(self.task_names):
            raise ValueError(
                "ortho_tasks='domain' needs the data's task groups, one per task id "
                f"(medmoe.data.MultiTaskDataModule.task_groups), got {groups!r} for the tasks "
                f"{self.task_names}; train with that DataModule or set ortho_tasks: all"
            )
        domain = [i for i, group in enumerate(groups) if group == "domain"]
        if len(domain) < 2:
            raise ValueError(
                f"ortho_tasks='domain' needs at least 2 domain tasks to project among, got "
                f"{[self.task_names[i] for i in domain]} (task groups {groups}); set ortho_tasks: "
                "all to project over the replay tasks too"
            )
        return domain

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    # ----------------------------------------------------------------- loss
    def compute_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Task loss, routing losses, their weighted sum, and per-token losses for logging."""
        self.adapter.prepare_batch(self.model, batch)
        # predict token t+1 from positions <= t: [B, T-1] losses, logits only where t+1 is a target
        token_loss, target_mask = self.token_losses(batch)
        task_loss = token_loss.sum() / target_mask.sum().clamp_min(1)
        losses = {"task_loss": task_loss, "token_loss": token_loss, "target_mask": target_mask}
        if self.hparams.routing_tokens == "target":
            # a label at t+1 makes position t a target-predicting token
            routing_mask = F.pad(target_mask, (0, 1), value=False)
        else:
            routing_mask = batch["attention_mask"].bool()
        # the method's auxiliary terms (MoE-LoRA: eq 5's balance and KP losses), {} for others
        auxiliary = self.adapter.auxiliary_losses(
            self.model,
            routing_mask,
            lambda_balance=self.hparams.lambda_balance,
            lambda_kp=self.hparams.lambda_kp,
            balance_form=self.hparams.balance_form,
            kp_delta=self.hparams.kp_delta,
            is_general=batch.get("is_general"),
        )
        routing = auxiliary.pop("routing_loss", task_loss.new_zeros(()))
        losses.update(auxiliary)
        losses["routing_loss"] = routing
        losses["loss"] = task_loss + routing
        return losses

    def token_losses(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Next-token loss per position [B, T-1] (0 off target) and the target mask [B, T-1].

        Target positions only, the LM head in chunks (:func:`medmoe.losses.target_token_losses`).
        """
        return target_token_losses(self.model, batch)

    def _per_task_sums(self, losses: Mapping[str, Tensor], task_id: Tensor) -> Tensor:
        """[num_tasks, 2]: summed target-token loss and target-token count per task."""
        num_tasks = max(len(self.task_names), 1)
        per_sample = torch.stack(
            [losses["token_loss"].sum(1), losses["target_mask"].sum(1).to(torch.float32)], dim=1
        )  # [B, 2]
        sums = per_sample.new_zeros(num_tasks, 2)
        return sums.index_add_(0, task_id.clamp_max(num_tasks - 1), per_sample.float())

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if self.ortho is not None:
            self.ortho.set_task_ids(batch["task_id"])
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        objective = self._training_objective(losses, batch)
        self._nonfinite.record(self.global_step, loss, objective, losses["task_loss"])
        logs = self._should_log_step()
        if logs:
            self._raise_if_nonfinite()  # one host sync, on logging steps only
        batch_size = batch["input_ids"].shape[0]
        for key in ("loss", "task_loss", "balance_loss", "kp_loss"):
            if key in losses:
                self.log(f"train/{key}", losses[key], prog_bar=key == "loss", batch_size=batch_size)
        if self.task_names and logs:
            sums = self._per_task_sums(losses, batch["task_id"]).tolist()
            for name, (total, count) in zip(self.task_names, sums, strict=True):
                if count > 0:
                    self.log(f"train/loss_{name}", total / count, batch_size=batch_size)
        return objective

    def _training_objective(
        self, losses: Mapping[str, Tensor], batch: Mapping[str, Tensor]
    ) -> Tensor:
        """The loss to back-propagate (:func:`medmoe.losses.step_token_objective` or
        :func:`medmoe.losses.task_mean_objective`)."""
        if self.hparams.loss_normalization == "micro_batch":
            return losses["loss"]
        trainer = self._trainer
        objective = (
            task_mean_objective
            if self.hparams.loss_normalization == "task_mean"
            else step_token_objective
        )
        return objective(
            losses["token_loss"],
            losses["routing_loss"],
            batch,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def _raise_if_nonfinite(self) -> None:
        """Stop every rank when any rank saw a non-finite loss (a collective under DDP/ZeRO).

        Raising on the one rank alone would leave the others waiting in their next collective
        until the process-group timeout (30 min), with nothing saved.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            self._nonfinite.raise_if_seen()
            return
        device = self.device

        def any_rank(flag: Tensor) -> Tensor:
            return trainer.strategy.reduce(flag.to(device), reduce_op="max")

        self._nonfinite.raise_if_seen(any_rank)

    def _should_log_step(self) -> bool:
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 1
        # Lightning writes logs when (steps so far + 1) is a multiple of log_every_n_steps
        return (self.global_step + 1) % max(every, 1) == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.ortho is not None and self.ortho.task_gradients.captured:
            # Lightning calls this after unscaling fp16 gradients; the per-task buffers still
            # carry the loss scale.
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            report = self.ortho.project(loss_scale=float(scaler.get_scale()) if scaler else 1.0)
            self.log("ortho/conflict_fraction", report.conflict_fraction())
            # whole-adapter task gradients, over the projected tasks' pairs present this step
            for key, value in report.task_conflicts(self.ortho.projected_tasks).items():
                self.log(f"ortho/{key}", value)
        if not is_deepspeed(self.trainer.strategy):
            self._log_grad_norm()

    def _log_grad_norm(self) -> None:
        """``train/grad_norm``: the global 2-norm of the gradient the optimizer step uses, before
        clipping (after DDP's mean and any projection); on logging steps only."""
        if not self._should_log_step():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the sharded gradients
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeepSpeed keeps the gradients in its own buffers: its engine reports the global norm
        # (before clipping) of the step it just took.
        strategy = self.trainer.strategy
        if not is_deepspeed(strategy):
            return
        engine = strategy.deepspeed_engine
        if engine.global_steps != self._engine_steps:
            self._engine_steps = engine.global_steps
            norm = engine.get_global_grad_norm()
            # the step just taken is global_step - 1: log on the steps training_step logs
            if (
                norm is not None
                and (self.global_step % max(self.trainer.log_every_n_steps, 1)) == 0
            ):
                self.log("train/grad_norm", float(norm))

    def on_validation_epoch_start(self) -> None:
        if self.ortho is not None:
            self.ortho.set_task_ids(None)
        self._val_sums = None

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        sums = self._per_task_sums(losses, batch["task_id"])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        return losses["task_loss"]

    def on_validation_epoch_end(self) -> None:
        self._log_eval_losses("val")

    def _log_eval_losses(self, prefix: str) -> None:
        """Token-mean loss overall and per task, summed over ranks (exact, not mean of means)."""
        if self._val_sums is None:
            return
        sums = self.all_gather(self._val_sums)
        sums = sums.sum(0) if sums.dim() == 3 else sums  # [world, tasks, 2] -> [tasks, 2]
        total, count = sums.sum(0).tolist()
        self.log(f"{prefix}/loss", total / max(count, 1.0))
        for name, (task_total, task_count) in zip(self.task_names, sums.tolist(), strict=False):
            if task_count > 0:
                self.log(f"{prefix}/loss_{name}", task_total / task_count)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._log_eval_losses("test")

    def on_train_start(self) -> None:
        # Restore the random state of the interrupted run (dropout), so a resumed run draws
        # what the uninterrupted one would have.
        if self._resumed_rng_states is not None:
            set_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(
            self.adapter,
            self.model,
            self.hparams.weight_decay,
            learning_rate=self.hparams.learning_rate,
            router_learning_rate=self.hparams.get("router_learning_rate", 2e-3),
        )
        optimizer = optimizer_class(self._trainer.strategy if self._trainer else None)(
            groups,
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup_steps = math.ceil(self.hparams.warmup_ratio * total_steps)
        scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: the adapter's tensors (the adapter contract,
        :meth:`~medmoe.adapters.spec.AdapterSpec.adapter_tensors`), nothing of the frozen base."""
        return {f"model.{name}" for name in self.adapter.adapter_tensors(self.model)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._raise_if_nonfinite()  # never write a checkpoint after a NaN step
        keep = self.trainable_state_keys()
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}

        checkpoint["medmoe_rng_states"] = gather_rng_states()  # every rank's (a collective)
        checkpoint[TAU_PARAMETRISATION_KEY] = TAU_PARAMETRISATION
        if self.ortho is not None:
            checkpoint["medmoe_ortho_state"] = self.ortho.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        check_resume(
            checkpoint.get("hyper_parameters"),
            self.hparams,
            fitting=trainer is not None and trainer.state.fn == "fit",
            where=f"checkpoint {trainer.ckpt_path}" if trainer is not None else "the checkpoint",
        )
        self.configure_model()
        self._resumed_rng_states = rank_rng_state(
            checkpoint.get("medmoe_rng_states"),
            trainer.global_rank if trainer is not None else 0,
            trainer.world_size if trainer is not None else 1,
        )
        if self.ortho is not None and "medmoe_ortho_state" in checkpoint:
            self.ortho.load_state_dict(checkpoint["medmoe_ortho_state"])
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if checkpoint.get(TAU_PARAMETRISATION_KEY) is None:  # written under the hard tau clamp
            checkpoint["state_dict"] = state = convert_legacy_log_tau(state, self.model, "model.")
        missing = sorted(self.trainable_state_keys() - set(state))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trainable tensor(s) of this adapter, e.g. "
                f"{missing[:3]}: it was written for another adapter configuration"
            )


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _instantiate(description: Mapping[str, Any]) -> AdapterSpec:
    values = dict(description)
    module_name, _, class_name = str(values.pop("class_path", "")).rpartition(".")
    if not module_name:
        raise ValueError(f"adapter description {description!r} has no class_path")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**values.get("init_args", {}))
