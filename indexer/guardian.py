"""A watcher that ends a run's helper processes when the run dies, even by SIGKILL.

Ray's local cluster (started by `cbir index --engine ray` when no cluster is given) spawns agents and workers that
are not the run's children and can outlive it. Every process of the run inherits the environment variable
CBIR_RUN=<tag>; this watcher, started first, polls its parent and, once the parent is gone, SIGKILLs every
process that carries the tag. It is stopped normally at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

VAR = "CBIR_RUN"
POLL_S = 0.2


def start() -> subprocess.Popen:
    """Tag this process (and so everything it starts from now on) and start the watcher."""
    tag = os.environ.setdefault(VAR, uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if k != VAR}  # the watcher itself is not tagged
    return subprocess.Popen([sys.executable, "-m", "indexer.guardian", tag, str(os.getpid())], env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(watcher: subprocess.Popen) -> None:
    watcher.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watcher.wait(timeout=5)


def tagged(tag: str) -> list[int]:
    """Processes whose environment holds CBIR_RUN=tag."""
    marker = f"{VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def watch(tag: str, parent: int) -> None:
    while os.getppid() == parent and _alive(parent):
        time.sleep(POLL_S)
    for _ in range(3):  # processes may still be starting
        for pid in tagged(tag):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    watch(sys.argv[1], int(sys.argv[2]))
