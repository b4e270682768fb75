"""One writer per run directory: a lock file that holds the writer's process id.

:class:`RunDirectoryLock` takes an exclusive ``fcntl.flock`` on ``<run dir>/.medmoe.lock`` and
writes its process id into it. A second writer is refused at once with
:class:`RunDirectoryBusy`, one line naming the holder's process id. The kernel drops the lock
when its holder ends, however it ends (kill -9 included), so a lock whose process is gone is
simply taken; a process id still in the file then is that of a holder that died without
releasing it, and is reported as taken over (:attr:`RunDirectoryLock.took_over`). A clean
release empties the file.

The lock belongs to the open file, not the process: a child given the descriptor
(``subprocess.Popen(pass_fds=...)``) holds it too, until both have closed it; the parent names
the child as the holder meanwhile (:meth:`RunDirectoryLock.set_holder`).

A leaf module (standard library only). Without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunDirectoryBusy", "RunDirectoryLock"]

LOCK_FILE = ".medmoe.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class RunDirectoryLock:
    """An exclusive lock on a run directory (a context manager; re-entrant it is not).

    Attributes:
        directory: the run directory.
        path: the lock file, ``<directory>/.medmoe.lock``.
        took_over: the process id of a holder that died without releasing the lock, when
            :meth:`acquire` found one; else ``None``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None
        self.took_over: int | None = None

    def acquire(self) -> RunDirectoryLock:
        """Take the lock or raise :class:`RunDirectoryBusy` naming the process that holds it."""
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lock")
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder is not None else "another process"
            raise RunDirectoryBusy(
                f"run directory {self.directory} is in use by {who} (lock file {self.path}): "
                "one writer per run; wait for it to end or stop it, then run again"
            ) from None
        previous = _holder(fd)
        self.took_over = previous if previous not in (None, os.getpid()) else None
        self.fd = fd
        self.set_holder(os.getpid())
        return self

    def set_holder(self, pid: int) -> None:
        """Name ``pid`` as the holder (a child that was given the descriptor writes meanwhile)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        """Empty the lock file (nothing stale left behind) and drop the lock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire() if self.fd is None else self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
