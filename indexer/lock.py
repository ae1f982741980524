"""One writer per index folder: a lock held by the run's main process alone, released when it dies.

POSIX record locks (fcntl) belong to a process: a forked decoding worker does not hold its parent's lock
(as it would an inherited flock), and the kernel drops the lock the moment the holder exits, SIGKILL included.
So a crashed run never leaves its index locked, whatever its children do.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from cbir.errors import CbirError
from cbir.layout import LOCK


class IndexLock:
    """Exclusive lock on an index folder for the length of a writing run."""

    def __init__(self, directory: Path, wait: float = 0.0) -> None:
        """`wait`: seconds to wait for another writer to finish (a web upload waits; a command fails at once)."""
        self.path = Path(directory) / LOCK
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> IndexLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not _lock(fd, self.wait):
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise CbirError(f"another cbir process (pid {holder}) is writing {self.path.parent}; wait for it to "
                            "finish, then run this again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None


def _lock(fd: int, wait: float) -> bool:
    """Take the record lock, trying for up to `wait` seconds; False if another process holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
