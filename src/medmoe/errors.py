"""Errors that name the fault: one line for a bad input, and safe checkpoint reading.

:func:`describe_user_error` finds, in an exception's chain, the error medmoe raised about the
user's input (jsonargparse wraps a dataclass's ``ValueError`` in several pages of union-type
errors and Namespace dumps) and returns it as one sentence for the CLI's last stderr line.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

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
        if current.__cause__ is not None:
            current = current.__cause__
        else:  # ``raise ... from None`` hides the context on purpose
            current = None if current.__suppress_context__ else current.__context__
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


def describe_user_error(err: BaseException) -> tuple[str, int] | None:
    """``(one line naming the fault behind err, exit status)``, or ``None`` for other errors.

    Exit status 2 for a bad input, 1 for a fault while running (a non-finite loss).

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
        return text, 1 if isinstance(candidate, FloatingPointError) else 2
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
    _check_zip_records(path)
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


def _check_zip_records(path: Path) -> None:
    """A PyTorch zip checkpoint's records against their CRC-32 (``torch.load`` does not check
    them: a flipped byte in a tensor would load as a wrong weight). Reads the whole file once."""
    if not zipfile.is_zipfile(path):
        return  # a truncated zip has no central directory: torch.load names it below
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated or corrupted ({short_reason(err)})"
        ) from None
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} is corrupted: its record {bad!r} fails the CRC-32 check (the "
            "file was damaged after it was written); use an earlier checkpoint"
        )


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in ``path``; ValueError naming ``what`` and ``path`` for a truncated or
    malformed file (``json``'s own error names neither)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        cut = err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string")
        problem = "is truncated (cut off mid-file)" if cut else "is not valid JSON"
        raise ValueError(
            f"{what} {path} {problem}: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def local_or_hub(name: str, key: str) -> str:
    """``name`` as a local path if it exists, else as a hub id if it looks like one.

    A string that looks like a path and does not exist raises FileNotFoundError at once,
    naming ``key``: no hub retries (and no "couldn't connect" text) for a mistyped path. A path
    is ``./x``, ``/x``, ``~/x``, anything with more than one ``/``, and an ``a/b`` whose ``a``
    is an existing directory here (``models/no_such_model`` beside a ``models/`` folder).
    """
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or (
        "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()
    )
    if looks_like_path or not HUB_ID.match(name) or name.endswith((".", "-")):
        parent = next((p for p in path.parents if p.is_dir()), None)
        where = f" (its nearest existing parent is {parent})" if parent is not None else ""
        raise FileNotFoundError(
            f"{key} {name!r} is no existing local directory{where}, and no hub id (which looks "
            "like 'org/name')"
        )
    return name


def short_reason(err: BaseException, width: int = 160) -> str:
    """The first line of ``err``'s message, at most ``width`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:width]


_BOILERPLATE = re.compile(
    r"^(Parser key \"|Does not validate against any of the Union subtypes|Subtypes: |Errors:|"
    r"- Expected a <class 'NoneType'>|Given value|- Problem with given class_path|tip: )"
)
# a union member the class_path is not: a reason only when no member gives a better one
_OTHER_UNION_MEMBER = re.compile(r"^Import path \S+ does not correspond to a subclass of")


UNION_FAILURE = "Does not validate against any of the Union subtypes"


def describe_union_error(err: BaseException) -> str | None:
    """One line for jsonargparse's failure to build a ``Union`` typed argument (an adapter whose
    config class rejected a value): the innermost reason, prefixed by the class that gave it."""
    text = str(err)
    if UNION_FAILURE not in text:
        return None
    message = describe_parser_error(text)
    given = [
        (len(line) - len(line.lstrip()), match.group(1))
        for line in text.splitlines()
        if (match := re.search(r"Given value: Namespace\(class_path='([\w.]+)'", line))
    ]
    if given:
        owner = max(given)[1].rpartition(".")[2]
        if not message.startswith(owner):
            message = f"{owner}: {message}"
    return message


def describe_parser_error(text: str) -> str:
    """One line from jsonargparse's nested error tree: the config key path and the innermost
    message (``model.adapter.allocation: Expected a typing.Literal[...]. Got value: eq3``)."""
    lines = [line for line in text.splitlines() if line.strip()]
    stack: list[tuple[int, str]] = []
    best: tuple[tuple[bool, int], str, list[str], int] | None = None
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = re.match(r'Parser key "([^"]+)"', body)
        if key:
            stack.append((indent, key.group(1)))
            continue
        if _BOILERPLATE.match(body.lstrip("- ").strip()) or _BOILERPLATE.match(body):
            continue
        message = body.lstrip("- ")
        # rank: depth first; a real reason beats "not a subclass of another union member"
        rank = (not _OTHER_UNION_MEMBER.match(message), indent)
        if best is None or rank > best[0]:
            best = (rank, message, [k for _, k in stack], index)
    if best is None:
        return " ".join(text.split())[:300]
    _, message, keys, index = best
    # an Optional's failure lists the value once below its members: name it in the message
    given = next((line.strip() for line in lines[index:] if "Given value: " in line), None)
    value = given.partition("Given value: ")[2] if given else ""
    if value and value not in message and not re.match(r"(Namespace|NestedArg)\(", value):
        message = f"{message}. Got value: {value}"
    path = ".".join(keys)
    return f"config key {path}: {message}" if path else message
