"""Random-number states of every rank, for checkpoints that resume exactly under DDP.

Each rank draws its own dropout masks (and Python ``random``) from its own generator state.
A checkpoint written by rank zero alone would carry rank zero's state only, and a resumed rank
one would continue rank zero's stream. :func:`gather_rng_states` collects every rank's state
(all ranks call it, as Lightning's checkpoint dump runs on all ranks); :func:`rank_rng_state`
picks this rank's state back out of a checkpoint.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA) and Python random states."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states() -> dict[str, Any]:
    """``{"per_rank": [states of rank 0, rank 1, ...]}``; a collective when distributed."""
    local = rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"per_rank": [local]}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {"per_rank": gathered}


def rank_rng_state(saved: Mapping[str, Any] | None, rank: int, world_size: int) -> Any:
    """This rank's state from a checkpoint's ``medmoe_rng_states`` (``None`` if there is none).

    Older checkpoints hold one state for all ranks. A checkpoint written with another number of
    ranks cannot continue every stream: each rank then takes its own state if the checkpoint
    has one, rank zero's otherwise, with a warning.
    """
    if saved is None:
        return None
    if "per_rank" not in saved:  # one state, written before per-rank states existed
        return saved
    per_rank = saved["per_rank"]
    if len(per_rank) != world_size:
        warnings.warn(
            f"the checkpoint holds random states of {len(per_rank)} rank(s), this run has "
            f"{world_size}: dropout will not continue the interrupted run's streams exactly",
            stacklevel=2,
        )
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]
