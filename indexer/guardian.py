"""A watcher that ends a run's helper processes when the run dies, even by SIGKILL.

Ray's local cluster (started by `cbir index --engine ray` when no cluster is given) spawns agents and workers that
are not the run's children and can outlive it. Every process of the run inherits the environment variable
CBIR_RUN=<tag>; this watcher, started first, polls its parent and, once the parent is gone, SIGKILLs every
process that carries the tag and every process those started (for SWEEP_S seconds: some may still be starting).
It is stopped normally at the end of the run.
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
REMEMBER_S = (30.0, 2.0)  # the tree is noted every poll for the first 30 s (Ray starts its agents then), later
# every 2 s: a look at the tree reads every /proc/PID/stat (2.7 ms with 118 processes), a core's 1.4% at every poll
SWEEP_S = 5.0  # after the run dies, tagged processes are killed for this long: Ray's raylet may still be starting
# its agents (DashboardAgent, RuntimeEnvAgent), which otherwise lived on for about 90 s


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


def doomed(tag: str) -> set[int]:
    """The run's processes: the tagged ones and every process they started. Ray's raylet starts its agents
    (DashboardAgent, RuntimeEnvAgent) with an environment of its own, without the tag: they are its children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = tagged(tag)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def watch(tag: str, parent: int) -> None:
    """Remember the run's tree while it lives (a raylet that exits on its own as the driver dies leaves its untagged
    agents re-parented, out of reach of `doomed`: a test killed mid-start saw them live on), then kill it all."""
    seen: dict[int, str] = {}
    began = last = time.monotonic()
    while os.getppid() == parent and _alive(parent):
        now = time.monotonic()
        if now - began < REMEMBER_S[0] or now - last >= REMEMBER_S[1]:
            seen.update((pid, start) for pid in doomed(tag) if (start := _started(pid)))
            last = now
        time.sleep(POLL_S)
    for _ in range(int(SWEEP_S / POLL_S)):  # processes may still be starting
        now = doomed(tag) | {pid for pid, start in seen.items() if _started(pid) == start}  # not a reused pid
        for pid in now:  # the whole tree at once, before a killed parent's children are re-parented
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL_S)


def _started(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, names one process even after pids wrap."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


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
