"""The multi-task DataModule: domain tasks plus general replay, as tokenised batches.

The DataModule tokenises and batches; the records themselves (by task and split, the overlap
check, scorer examples) are its :attr:`MultiTaskDataModule.eval_records`
(:class:`~medmoe.data.records.TaskRecords`), and each task's config is a
:class:`~medmoe.data.task_config.TaskConfig`.

Batches are dicts of ``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` [B, T]
(``-100`` on prompt and padding; the target and its eos are learned), ``task_id`` [B] (an index
into :attr:`MultiTaskDataModule.task_names`) and ``is_general`` [B] (the sample is general
replay). Training reads a deterministic stream (:mod:`medmoe.data.stream`) that resumes
exactly from a checkpoint; validation is one loader over every task's fixed validation
subset, so per-task losses can be split by ``task_id``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from medmoe.data.collate import Sample, collate, encode_pairs
from medmoe.data.records import TaskRecords, fixed_subset
from medmoe.data.sources import Record, carved_sizes, load_records
from medmoe.data.stream import Mixture, Sampling, StreamLoader, TrainStream, mixture_weights
from medmoe.data.task_config import TaskConfig
from medmoe.data.tasks import get_task
from medmoe.data.tokenizers import load_tokenizer
from medmoe.data.toy_clinic import TOY_TASKS

__all__ = ["MultiTaskDataModule", "TaskConfig"]


def _as_config(entry: TaskConfig | dict[str, Any] | str) -> TaskConfig:
    if isinstance(entry, TaskConfig):
        return replace(entry)  # a copy: defaults are shared module constants
    if isinstance(entry, str):
        return TaskConfig(name=entry)
    return TaskConfig(**entry)


UNK_WARN_RATE = 0.01  # warn when more than 1% of a task's tokens are the tokenizer's <unk>


def _warn_unknown_tokens(
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name: str,
    task: str,
    encoded: list[tuple[list[int], list[int]]],
) -> None:
    unk = tokenizer.unk_token_id
    if unk is None or unk == tokenizer.pad_token_id or not encoded:
        return
    total = sum(len(ids) for ids, _ in encoded)
    unknown = sum(ids.count(unk) for ids, _ in encoded)
    rate = unknown / max(total, 1)
    if rate > UNK_WARN_RATE:
        warnings.warn(
            f"tokenizer {tokenizer_name!r} maps {rate:.0%} of task {task!r}'s tokens to "
            f"{tokenizer.unk_token} (warned above {UNK_WARN_RATE:.0%}): the model cannot read "
            "that text; use a tokenizer that covers it (the toy tokenizer knows only the toy "
            "clinic's words)",
            stacklevel=3,
        )


TOY_DOMAIN = [
    TaskConfig(n, source="toy", prompt_style="toy")
    for n in TOY_TASKS
    if get_task(n).group == "domain"
]
TOY_REPLAY = [TaskConfig(n, source="toy", prompt_style="toy") for n in ("mmlu", "gsm8k")]


class MultiTaskDataModule(L.LightningDataModule):
    """Domain tasks and general replay tasks mixed into one training stream.

    Args:
        tasks: the domain tasks; ``None`` = the toy clinic's medqa, pubmedqa and clinical_sum.
        replay: the general replay tasks (``is_general`` is true for their samples);
            ``None`` = the toy clinic's mmlu and gsm8k; ``[]`` = no replay.
        replay_ratio: fraction of training samples drawn from the replay tasks.
        sampling: how tasks are weighted within a group: ``size`` (p ∝ n), ``fixed``
            (p ∝ weight) or ``temperature`` (p ∝ n^(1/T)); weights multiply in every mode.
        sampling_temperature: T of ``temperature`` sampling.
        tokenizer: ``toy``, ``byte``, a local directory or a hub id.
        max_length: longest sample in tokens; longer prompts lose tokens from the left.
        batch_size: training batch size per device.
        eval_batch_size: validation batch size; ``None`` = ``batch_size``.
        num_workers: DataLoader workers.
        seed: seed of the training stream (sample k is a function of seed and k).
        epoch_samples: training samples per epoch per device; ``None`` = all of
            ``trainer.max_steps`` in one epoch, or one pass over the domain records
            (scaled up by the replay share) when ``max_steps`` is unset.
        add_bos_token: the BOS switch of every scorer (evaluation prompts only), with lm-eval
            ``HFLM``'s meaning: ``None`` = the tokenizer's default special tokens (its BOS for
            Llama tokenizers; ``HFLM``'s default in lm-eval 0.4.13), ``true`` = ask for them,
            ``false`` = none (older harness versions' default).
        apply_chat_template: render evaluation prompts with the tokenizer's chat template (the
            harness's ``--apply_chat_template``, for instruction-tuned bases); off by default.
    """

    def __init__(
        self,
        tasks: list[TaskConfig] | None = None,
        replay: list[TaskConfig] | None = None,
        replay_ratio: float = 0.2,
        sampling: Sampling = "size",
        sampling_temperature: float = 2.0,
        tokenizer: str = "toy",
        max_length: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        epoch_samples: int | None = None,
        add_bos_token: bool | None = None,
        apply_chat_template: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = [_as_config(t) for t in (TOY_DOMAIN if tasks is None else tasks)]
        self.replay = [_as_config(t) for t in (TOY_REPLAY if replay is None else replay)]
        names = [t.name for t in self.tasks + self.replay]
        if not names:
            raise ValueError("no tasks: give at least one domain or replay task")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"task(s) {duplicates} appear more than once across tasks and replay ({names}); "
                "each task may appear once"
            )
        if not 0.0 <= replay_ratio <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio}")
        mixture_weights([1], [1.0], sampling, sampling_temperature)  # validates the mode
        for key, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(
                f"eval_batch_size must be >= 1 or null (= batch_size), got {eval_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.replay_ratio = replay_ratio
        self.sampling: Sampling = sampling
        self.sampling_temperature = sampling_temperature
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.epoch_samples = epoch_samples
        self.add_bos_token = add_bos_token
        self.apply_chat_template = apply_chat_template
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.eval_records = TaskRecords(self.configs, self._chat_tokenizer)
        """The tasks' records by split and the scorers' examples (:class:`TaskRecords`)."""
        self._train: list[list[tuple[list[int], list[int]]]] | None = None
        self._eval: dict[str, list[Sample]] = {}

    # --- names and tokenizer ------------------------------------------------------------------

    @property
    def configs(self) -> list[TaskConfig]:
        """Domain task configs, then replay task configs (the order of task ids)."""
        return self.tasks + self.replay

    @property
    def task_names(self) -> list[str]:
        """Task names indexed by ``task_id``: domain tasks first, then replay tasks."""
        return [c.name for c in self.configs]

    @property
    def task_groups(self) -> list[str]:
        """``"domain"`` or ``"general"`` (replay) per task id."""
        return ["domain"] * len(self.tasks) + ["general"] * len(self.replay)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``len(tokenizer)``, added tokens included)."""
        return len(self.tokenizer)

    def _chat_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer whose chat template renders evaluation prompts, if asked for."""
        return self.tokenizer if self.apply_chat_template else None

    def task_id(self, name: str) -> int:
        if name not in self.task_names:
            raise ValueError(f"task {name!r} is not in this DataModule; it has {self.task_names}")
        return self.task_names.index(name)

    def _encode(self, name: str, records: list[Record]) -> list[tuple[list[int], list[int]]]:
        task = self.configs[self.task_id(name)].task
        pairs = [task.format(r) for r in records]
        encoded = encode_pairs(self.tokenizer, pairs, self.max_length, name)
        _warn_unknown_tokens(self.tokenizer, self.tokenizer_name, name, encoded)
        return encoded

    def _eval_samples(self, test: bool = False) -> list[Sample]:
        key = "test" if test else "validation"
        if key not in self._eval:
            samples = []
            for task_id, cfg in enumerate(self.configs):
                split = cfg.test_split_name if test else cfg.eval_split_name
                records = fixed_subset(self.eval_records.records(cfg.name, split), cfg.max_eval)
                general = self.task_groups[task_id] == "general"
                for ids, labels in self._encode(cfg.name, records):
                    samples.append(Sample(ids, labels, task_id, general))
            self._eval[key] = samples
        return self._eval[key]

    # --- Lightning hooks ----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._train is None:
            self._train = []
            for cfg in self.configs:
                records = self.eval_records.records(cfg.name, cfg.train_split_name)
                if cfg.max_train is not None:
                    records = fixed_subset(records, cfg.max_train)
                if not records:
                    raise ValueError(self._no_records_message(cfg))
                self._train.append(self._encode(cfg.name, records))
        if stage in (None, "fit", "validate"):
            for cfg in self.configs:
                self.eval_records.check_disjoint(cfg.name, cfg.eval_split_name)
            self._eval_samples()
        if stage == "test":
            for cfg in self.configs:
                self.eval_records.check_disjoint(cfg.name, cfg.test_split_name)

    def _no_records_message(self, cfg: TaskConfig) -> str:
        split = cfg.train_split_name
        message = f"task {cfg.name!r} has no training records ({split} of source {cfg.source})"
        path = Path(str(cfg.source)).expanduser()
        if path.is_file():
            total = len(load_records(cfg.task, cfg.source, split, cfg.field_map, whole_file=True))
            sizes = ", ".join(f"{k} {v}" for k, v in carved_sizes(cfg.task, total).items())
            message += (
                f": the file holds {total} record(s), carved into {sizes}. Give more records, "
                "or give the splits explicitly: a directory with train.jsonl, validation.jsonl "
                "and test.jsonl as source, or source (training, used whole) plus eval_source "
                "(evaluation) as two files"
            )
        return message

    def mixture(self) -> Mixture:
        """The training mixture (needs :meth:`setup` for ``fit``)."""
        if self._train is None:
            self.setup("fit")
        assert self._train is not None
        sizes = [len(s) for s in self._train]

        def group(ids: range) -> tuple[tuple[int, int, float], ...]:
            if not ids:
                return ()
            weights = [
                1.0 if self.configs[i].weight is None else self.configs[i].weight for i in ids
            ]
            probs = mixture_weights(
                [sizes[i] for i in ids], weights, self.sampling, self.sampling_temperature
            )
            return tuple((i, sizes[i], p) for i, p in zip(ids, probs, strict=True))

        n = len(self.tasks)
        return Mixture(group(range(n)), group(range(n, len(sizes))), self.replay_ratio, self.seed)

    def _trainer_value(self, name: str, default: Any) -> Any:
        trainer = self.trainer
        return default if trainer is None else getattr(trainer, name)

    def stream_position(self) -> int:
        """This rank's next stream position: ``global_step * accumulate_grad_batches * B``."""
        step = self._trainer_value("global_step", 0)
        return step * self._trainer_value("accumulate_grad_batches", 1) * self.batch_size

    def _epoch_batches(self) -> int:
        accumulate = self._trainer_value("accumulate_grad_batches", 1)
        world = self._trainer_value("world_size", 1)
        max_steps = self._trainer_value("max_steps", -1)
        if self.epoch_samples is not None:
            samples = self.epoch_samples
        elif max_steps is not None and max_steps > 0:
            samples = max_steps * accumulate * self.batch_size
        else:
            assert self._train is not None
            domain = sum(len(s) for s in self._train[: len(self.tasks)])
            mix = self.mixture()
            share = 1 - mix.effective_replay_ratio
            total = domain / share if share > 0 else sum(len(s) for s in self._train)
            samples = -(-int(total) // world)
        batches = -(-samples // self.batch_size)
        return -(-batches // accumulate) * accumulate  # whole optimizer steps per epoch

    def train_dataloader(self) -> StreamLoader:
        """The training stream, starting where ``trainer.global_step`` says (resume-exact)."""
        mixture = self.mixture()
        assert self._train is not None
        stream = TrainStream(
            self._train,
            mixture,
            self.batch_size,
            self._epoch_batches(),
            self.tokenizer.pad_token_id,
            rank=self._trainer_value("global_rank", 0),
            world_size=self._trainer_value("world_size", 1),
            accumulate=self._trainer_value("accumulate_grad_batches", 1),
        )
        return StreamLoader(stream, self.stream_position, num_workers=self.num_workers)

    def _eval_loader(self, samples: list[Sample]) -> DataLoader:
        return DataLoader(
            samples,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """One loader over every task's fixed validation subset, in task-id order."""
        return self._eval_loader(self._eval_samples())

    def test_dataloader(self) -> DataLoader:
        """Like :meth:`val_dataloader` over every task's test split."""
        return self._eval_loader(self._eval_samples(test=True))

    def state_dict(self) -> dict[str, Any]:
        return {"task_names": self.task_names, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("task_names") != self.task_names or state_dict.get("seed") != self.seed:
            warnings.warn(
                f"resuming with tasks {self.task_names} / seed {self.seed}, but the checkpoint "
                f"was written with {state_dict.get('task_names')} / seed {state_dict.get('seed')}; "
                "the training stream will not continue the original one",
                stacklevel=2,
            )
