"""Errors that name the fault: one line for a bad input, and safe checkpoint reading.

:func:`describe_user_error` finds, in an exception's chain, the error medmoe raised about the
user's input (jsonargparse wraps a dataclass's ``ValueError`` in several pages of union-type
errors and Namespace dumps) and returns it as one sentence for the CLI's last stderr line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import medmoe

PACKAGE_DIR = Path(medmoe.__file__).resolve().parent

# Exception types medmoe raises for a bad input (a config value, a file, a checkpoint).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    FloatingPointError,
)
# Keys a Lightning checkpoint of a MedMoEModule always has.
CHECKPOINT_KEYS = ("state_dict", "hyper_parameters", "global_step")


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        out.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return out


def _raised_in_medmoe(err: BaseException) -> tuple[bool, str | None]:
    """Whether the innermost frame of ``err``'s traceback is medmoe code, and its class."""
    tb = err.__traceback__
    if tb is None:
        return False, None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    inside = PACKAGE_DIR in filename.parents
    owner = tb.tb_frame.f_locals.get("self")
    return inside, None if owner is None else type(owner).__name__


def describe_user_error(err: BaseException) -> str | None:
    """One line naming the bad input behind ``err``, or ``None`` if it is no input error.

    The deepest error of the chain that medmoe raised (a dataclass's ``__post_init__`` counts:
    its frame is ``<string>``-generated ``__init__`` calling medmoe code) and whose type is one
    of :data:`USER_ERROR_TYPES` wins; a class raising it prefixes its name.
    """
    for candidate in reversed(_chain(err)):
        if not isinstance(candidate, USER_ERROR_TYPES):
            continue
        inside, owner = _raised_in_medmoe(candidate)
        if not inside:
            continue
        text = candidate.args[0] if candidate.args else type(candidate).__name__
        text = " ".join(str(text).split())
        if owner and not text.startswith(owner):
            text = f"{owner}: {text}"
        return text
    return None


def _checkpoint_reason(err: BaseException) -> str:
    """A short reason for a failed ``torch.load`` (torch's own advice to set
    ``weights_only=False`` is dropped: loading an untrusted file that way runs its code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "eights" not in line and "weights_only" not in line]
    reason = useful[0] if useful else type(err).__name__
    return reason[:160]


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Load the Lightning checkpoint at ``path`` (tensors and plain types only).

    Raises FileNotFoundError for a missing path and ValueError naming the path for a truncated,
    foreign or non-Lightning file. A directory (a DeepSpeed checkpoint) is returned as ``{}``.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (ckpt_path)")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a write was cut off")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint "
            f"({_checkpoint_reason(err)})"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"checkpoint {path} is not a medmoe training checkpoint: it lacks {missing} "
            "(give the last.ckpt a medmoe fit wrote)"
        )
    return checkpoint
