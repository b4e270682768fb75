"""The multi-task training stream: sample ``k`` is a pure function of ``(seed, k)``.

Sample ``k`` first picks domain vs general replay (``replay_ratio``), then a task by the
mixture weights, then a record uniformly (with replacement). So any position of the stream is
reachable without replaying it, which makes resuming exact: a run restarted at optimizer step
``s`` starts its per-rank stream at position ``s * accumulate_grad_batches * batch_size``, and
rank ``r`` of ``W`` reads global samples ``p * W + r`` for its positions ``p``.

Because the stream is a pure function, every batch also carries the number of target tokens of
the whole optimizer step it belongs to (all ``accumulate`` micro-batches of all ``W`` ranks),
``step_target_tokens``: the loss can be normalised by it without any communication, as
transformers does with ``num_items_in_batch``. ``step_task_tokens`` [num_tasks] splits that
count by task id (it sums to ``step_target_tokens``), for the per-task mean
(``loss_normalization: task_mean``, :func:`medmoe.losses.task_mean_objective`).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medmoe.data.collate import IGNORE_INDEX, Sample, collate

Sampling = Literal["size", "fixed", "temperature"]


def mixture_weights(
    sizes: Sequence[int],
    weights: Sequence[float],
    sampling: Sampling,
    temperature: float = 1.0,
) -> list[float]:
    """Normalised task probabilities within one group.

    ``size``: p_t ∝ w_t n_t; ``fixed``: p_t ∝ w_t; ``temperature``: p_t ∝ w_t n_t^(1/T).
    """
    if sampling == "size":
        raw = [w * n for w, n in zip(weights, sizes, strict=True)]
    elif sampling == "fixed":
        raw = list(weights)
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"sampling_temperature must be > 0, got {temperature}")
        raw = [w * n ** (1.0 / temperature) for w, n in zip(weights, sizes, strict=True)]
    else:
        raise ValueError(f"unknown sampling {sampling!r}; known: size, fixed, temperature")
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"mixture weights must have a positive sum, got {raw}")
    return [r / total for r in raw]


@dataclass(frozen=True)
class Mixture:
    """Which (task, record) global sample ``k`` is.

    ``domain`` and ``replay`` hold ``(task_id, n_records, probability within the group)``.
    """

    domain: tuple[tuple[int, int, float], ...]
    replay: tuple[tuple[int, int, float], ...]
    replay_ratio: float
    seed: int

    @property
    def probabilities(self) -> dict[int, float]:
        """Overall probability of each task id."""
        ratio = self.effective_replay_ratio
        out = {t: (1 - ratio) * p for t, _, p in self.domain}
        out.update({t: ratio * p for t, _, p in self.replay})
        return out

    @property
    def effective_replay_ratio(self) -> float:
        if not self.replay:
            return 0.0
        return 1.0 if not self.domain else self.replay_ratio

    def __call__(self, k: int) -> tuple[int, int, bool]:
        """``(task_id, record index, is_general)`` of global sample ``k``."""
        rng = random.Random((self.seed % 2**32) << 64 | k)  # one distinct int seed per (seed, k)
        general = rng.random() < self.effective_replay_ratio
        group = self.replay if general else self.domain
        cumulative = list(accumulate(p for _, _, p in group))
        pick = min(bisect_right(cumulative, rng.random() * cumulative[-1]), len(group) - 1)
        task_id, n, _ = group[pick]
        return task_id, rng.randrange(n), general


class TrainStream(IterableDataset):
    """Batches of positions ``[start, end)`` of one rank's stream, already collated.

    Worker ``w`` of ``n`` builds batches ``w, w + n, ...``; the DataLoader interleaves them back
    in order. ``start`` is set by :class:`StreamLoader` each time iteration begins.
    """

    def __init__(
        self,
        samples: Sequence[Sequence[tuple[list[int], list[int]]]],
        mixture: Mixture,
        batch_size: int,
        epoch_batches: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        if epoch_batches % accumulate:
            raise ValueError(
                f"epoch_batches={epoch_batches} must be a multiple of accumulate={accumulate} "
                "(whole optimizer steps per epoch)"
            )
        self.samples = samples
        self.mixture = mixture
        self.batch_size = batch_size
        self.epoch_batches = epoch_batches
        self.pad_id = pad_id
        self.rank, self.world_size = rank, world_size
        self.accumulate = accumulate
        self.start = 0
        # next-token targets of every record: labels[1:] that are not IGNORE_INDEX
        self._targets = [
            [sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in records]
            for records in samples
        ]

    def __len__(self) -> int:
        """Batches per epoch (also on resume: Lightning counts the batches already seen)."""
        return self.epoch_batches

    def sample(self, position: int) -> Sample:
        """This rank's sample at stream ``position`` (global index ``position * W + rank``)."""
        task_id, index, general = self.mixture(position * self.world_size + self.rank)
        ids, labels = self.samples[task_id][index]
        return Sample(ids, labels, task_id, general)

    def step_target_tokens(self, position: int) -> int:
        """Target tokens of the optimizer step holding this rank's stream ``position``.

        The step's micro-batches are the ``accumulate`` consecutive batches (counted from the
        start of the epoch) that contain ``position``, on every one of the ``W`` ranks.
        """
        return sum(self.step_task_tokens(position))

    def step_task_tokens(self, position: int) -> list[int]:
        """:meth:`step_target_tokens` per task id: ``[num_tasks]`` counts that sum to it."""
        window = self.accumulate * self.batch_size
        first = position - position % window  # epochs hold whole steps, so windows align
        totals = [0] * len(self.samples)
        for global_index in range(first * self.world_size, (first + window) * self.world_size):
            task_id, index, _ = self.mixture(global_index)
            totals[task_id] += self._targets[task_id][index]
        return totals

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch_len = self.epoch_batches * self.batch_size
        end = (self.start // epoch_len + 1) * epoch_len  # the end of the current epoch
        n_batches = math.ceil((end - self.start) / self.batch_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # (window start, its target tokens per task), a cache: one computation per step
        step_tokens: tuple[int, list[int]] = (-1, [])
        window = self.accumulate * self.batch_size
        for b in range(worker, n_batches, workers):
            lo = self.start + b * self.batch_size
            batch = collate(
                [self.sample(p) for p in range(lo, min(lo + self.batch_size, end))], self.pad_id
            )
            if step_tokens[0] != lo - lo % window:
                step_tokens = (lo - lo % window, self.step_task_tokens(lo))
            batch["step_target_tokens"] = torch.tensor(sum(step_tokens[1]), dtype=torch.long)
            batch["step_task_tokens"] = torch.tensor(step_tokens[1], dtype=torch.long)  # [K]
            yield batch


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`TrainStream` that sets the stream's start on every ``iter``.

    ``position`` returns the start (read from the trainer's ``global_step`` on resume). The
    loader reports itself resumable to Lightning (``state_dict``/``load_state_dict``): its
    position is recomputed from the restored ``global_step``, so loading is a no-op.
    """

    def __init__(self, stream: TrainStream, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self._position = position

    def __iter__(self) -> Any:
        self.dataset.start = self._position()
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"start": self.dataset.start, "seed": self.dataset.mixture.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Nothing to load: the position follows the restored ``global_step``."""
