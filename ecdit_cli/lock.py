"""An exclusive lock on a run directory that a crashed process cannot leave stuck.

`fcntl.flock` locks belong to the open file description: the kernel drops them when the
holder exits for any reason (including kill -9), so a stale `.lock` file never blocks a
resume. The file holds the holder's host and pid for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ecdit_cli.errors import EcditError
from ecdit_cli.files import io_error


class LockHeld(EcditError):
    """The run directory is being trained by another live process."""


class RunLock:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise io_error(self.path, err, "create lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise LockHeld(
                f"{self.path.parent} is already being trained by another process"
                + (f" ({holder})" if holder else "")
                + "; wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def is_held(self) -> bool:
        """Whether some process (possibly this one) holds the lock right now."""
        if self._fd is not None:
            return True
        if not self.path.exists():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
