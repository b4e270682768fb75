"""Saves that cannot destroy what they replace: a temporary file beside the target, fsync, rename.

A file written in place is left truncated by a kill or a full disk part-way through the write.
:func:`atomic_write_bytes` and :func:`atomic_write_text` write a temporary file in the target's
own directory (the same file system, so the rename is atomic), flush it to disk, and
``os.replace`` it over the target: the target is always either the previous whole file or the
new whole one. A failed write removes the temporary file and raises :class:`AtomicWriteError`,
one line naming the path (and, for a full disk, the bytes it tried to write).

:func:`atomic_write_stream` does the same for a writer that streams into a file object
(``torch.save``: ``last.ckpt``); :func:`atomic_directory` for a directory of files (an adapter
export): they are written into a hidden staging folder beside the target, flushed, and the
folder is exchanged with the target in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so the
target's name always holds either the whole previous directory or the whole new one. Where the
exchange is not available the previous directory is renamed aside first (``.<name>.old``) and
restored by the next save if a kill fell between the two renames.

A kill -9 mid-save leaves its temporary file or staging folder behind. Their names carry the
writer's process id (``.<name>.<pid>.<random>.tmp`` / ``.staging``), and the next save of the
same target removes those of writers no longer running (:func:`remove_orphans`), so a resumed run
does not pile up dead checkpoints.

A leaf module (standard library only): the experiment runner's results and reports, the fit's
checkpoint and its adapter export use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "AtomicWriteError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_stream",
    "atomic_write_text",
    "remove_orphans",
    "write_file_bytes",
]

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


def _describe(path: Path, size: int | str, error: OSError, what: str = "file") -> str:
    kept = f"the previous {what} is unchanged" if path.exists() else f"no {what} was written"
    if error.errno == errno.ENOSPC:
        return f"cannot save {path}: no space left on device for its {size} bytes; {kept}"
    reason = " ".join((error.strerror or str(error)).split())
    return f"cannot save {path}: {reason} ({size} bytes); {kept}"


def _as_os_error(error: BaseException) -> OSError | None:
    """``error`` as an OSError: itself, or a library's wrapping of a full disk (safetensors'
    Rust writer raises ``SafetensorError('... (os error 28)')``)."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, Exception) and "os error 28" in str(error):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


class _Sink:
    """A binary file object over a descriptor whose writes all go through ``_write``."""

    def __init__(self, fd: int) -> None:
        self.fd, self.written = fd, 0
        self.error: OSError | None = None  # what a write raised (a C++ caller may rewrap it)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                view = view[_write(self.fd, view) :]
        except OSError as error:
            self.error = error
            raise
        self.written += size
        return size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class _Counter:
    """A binary file object that only counts what is written (the size a failed save needed)."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.written += size
        return size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def _needed(produce: Callable[[IO[bytes]], None], written: int) -> int | str:
    """The bytes ``produce`` writes (run again into a counter), else at least ``written``."""
    counter = _Counter()
    try:
        produce(counter)  # type: ignore[arg-type]
    except Exception:
        return f"at least {written}"
    return counter.written


def _fsync_directory(directory: Path) -> None:
    """Flush the directory entry of the rename (where the platform lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_orphans(target: str | os.PathLike, suffix: str) -> list[Path]:
    """Remove the temporary files (``suffix`` ``.tmp``) or staging folders (``.staging``) that
    saves of ``target`` by processes no longer running left beside it; returns what went.

    Only names of this module's form whose process id is gone are touched: a live writer's
    temporary file stays, whoever it is.
    """
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            name = path.name
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            pid = name[len(prefix) :].split(".", 1)[0]
            if not pid.isdigit() or _running(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def atomic_write_stream(
    path: str | os.PathLike,
    produce: Callable[[IO[bytes]], None],
    mode: int | None = None,
    size: int | None = None,
) -> Path:
    """Replace ``path`` with what ``produce(file)`` writes into ``file``, whole, or leave it as
    it was and raise :class:`AtomicWriteError` (one line: the path and, on a full disk, the
    bytes the save needed; ``size`` gives them, else ``produce`` is run again into a counter).

    ``mode``: the new file's permission bits (default: the replaced file's, else 0o666 less
    the umask, as ``open`` would create it).
    """
    path = Path(path)

    def needed(written: int) -> int | str:
        return size if size is not None else _needed(produce, written)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_UMASK
        remove_orphans(path, ".tmp")
        fd, temporary = tempfile.mkstemp(
            prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent
        )
    except OSError as error:
        raise AtomicWriteError(error.errno, _describe(path, needed(0), error), path) from error
    sink = _Sink(fd)
    try:
        try:
            produce(sink)  # type: ignore[arg-type]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        failure = sink.error or _as_os_error(error)
        if failure is not None:
            message = _describe(path, needed(sink.written), failure)
            raise AtomicWriteError(failure.errno, message, path) from error
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` whole, or leave it as it was and raise AtomicWriteError.

    ``mode``: the new file's permission bits (default: the replaced file's, else 0o666 less
    the umask, as ``open`` would create it).
    """
    data = bytes(data)
    return atomic_write_stream(path, lambda file: file.write(data), mode=mode, size=len(data))


def write_file_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` into a new file at ``path`` (inside a staging folder: not atomic by
    itself) through the same raw write as the atomic saves, and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _Sink(fd).write(data)
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _retired(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _restore_retired(directory: Path) -> None:
    """A kill between the fallback's two renames left the previous directory aside: restore it."""
    retired = _retired(directory)
    if retired.is_dir() and not directory.exists():
        retired.rename(directory)
    shutil.rmtree(retired, ignore_errors=True)


def _swap_in(staging: Path, directory: Path) -> None:
    if not directory.exists():
        staging.rename(directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)  # the previous directory, now at staging
    else:
        retired = _retired(directory)
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_directory(directory.parent)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_directory(directory)


def _tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike, size: int | Callable[[], int] | None = None
) -> Iterator[Path]:
    """A staging folder to write ``directory``'s files into; on a clean exit it replaces
    ``directory`` whole (see the module notes), on a failure it is removed and ``directory``
    is left as it was. An OSError (or a library's full-disk error) becomes
    :class:`AtomicWriteError` naming ``directory`` and, for a full disk, ``size`` (the bytes
    the save needs; default: at least what was written before the disk filled).
    """
    directory = Path(directory)

    def needed(staging: Path | None) -> int | str:
        if size is not None:
            with contextlib.suppress(Exception):
                return size() if callable(size) else size
        written = _tree_size(staging) if staging is not None and staging.is_dir() else 0
        return f"at least {written}"

    staging: Path | None = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _restore_retired(directory)
        remove_orphans(directory, ".staging")
        staging = Path(
            tempfile.mkdtemp(
                prefix=_temporary_prefix(directory), suffix=".staging", dir=directory.parent
            )
        )
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp creates 0700; give the usual mode
        yield staging
        _fsync_tree(staging)
        _swap_in(staging, directory)
    except BaseException as error:
        written = needed(staging)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        failure = _as_os_error(error)
        if failure is not None and not isinstance(error, AtomicWriteError):
            message = _describe(directory, written, failure, what="directory")
            raise AtomicWriteError(failure.errno, message, directory) from error
        raise


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", mode: int | None = None
) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)
