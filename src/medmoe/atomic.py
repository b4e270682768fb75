"""Saves that cannot destroy what they replace: a temporary file beside the target, fsync, rename.

A file written in place is left truncated by a kill or a full disk part-way through the write.
:func:`atomic_write_bytes` and :func:`atomic_write_text` write a temporary file in the target's
own directory (the same file system, so the rename is atomic), flush it to disk, and
``os.replace`` it over the target: the target is always either the previous whole file or the
new whole one. A failed write removes the temporary file and raises :class:`AtomicWriteError`,
one line naming the path (and, for a full disk, the bytes it tried to write).

A leaf module (standard library only): the experiment runner's results and reports use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["AtomicWriteError", "atomic_write_bytes", "atomic_write_text"]

# The one raw write of the temporary file (a test replaces it to simulate a full disk).
_write = os.write


def _read_umask() -> int:
    """The process's umask, read once (setting and restoring it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


class AtomicWriteError(OSError):
    """A save that failed; the file it was to replace is unchanged. ``str()`` is one line."""

    def __init__(self, code: int | None, message: str, path: Path) -> None:
        super().__init__(code, message)
        self.message, self.path = message, path

    def __str__(self) -> str:
        return self.message


def _describe(path: Path, size: int, error: OSError) -> str:
    kept = "the previous file is unchanged" if path.exists() else "no file was written"
    if error.errno == errno.ENOSPC:
        return f"cannot save {path}: no space left on device for its {size} bytes; {kept}"
    reason = error.strerror or str(error)
    return f"cannot save {path}: {reason} ({size} bytes); {kept}"


def _fsync_directory(directory: Path) -> None:
    """Flush the directory entry of the rename (where the platform lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` whole, or leave it as it was and raise AtomicWriteError.

    ``mode``: the new file's permission bits (default: the replaced file's, else 0o666 less
    the umask, as ``open`` would create it).
    """
    path = Path(path)
    data = bytes(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_UMASK
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise AtomicWriteError(error.errno, _describe(path, len(data), error), path) from error
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise AtomicWriteError(error.errno, _describe(path, len(data), error), path) from error
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", mode: int | None = None
) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)
