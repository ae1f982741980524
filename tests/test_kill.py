"""A run killed with SIGKILL (the kernel's out-of-memory killer does exactly that) leaves nothing behind that
blocks the next run: no worker process outlives it, its lock dies with it, and the same command resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbir import Index
from tests.badfiles import jpeg_bytes, photo

N = 120


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: parent links)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("killdata")
    for i in range(N):
        (root / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(photo((480, 360), seed=i)))
    Index.build(root, out=root.parent / "old-index", device="cpu")
    return root


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cbir", "index", str(data), "--out", str(out), "--rebuild", "--batch-size", "4",
            "--workers", "2", "--device", "cpu", "-q"]


def _wait(moment: str, out: Path, proc: subprocess.Popen, seen: set[int]) -> bool:
    """Poll until the run reaches `moment`, collecting its child processes; False if it finished first."""
    deadline = time.monotonic() + 240
    seen_files = {f.name for f in out.glob("seg-*")}  # the old index's
    while time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        if proc.poll() is not None:
            return False
        lock = out / ".lock"
        if moment == "start-up" and lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return True
        if moment == "mid-embedding" and len(list((out / ".work").glob("chunk-*.npz"))) >= 3 and seen:
            return True
        if moment == "commit" and {f.name for f in out.glob("seg-*")} - seen_files:  # a new segment being written
            return True
        time.sleep(0.001 if moment == "commit" else 0.02)
    raise AssertionError(f"the run never reached {moment}")


@pytest.mark.parametrize("moment", ["start-up", "mid-embedding", "commit"])
def test_sigkill_leaves_no_process_no_lock_and_the_same_command_resumes(folder: Path, tmp_path: Path,
                                                                        moment: str) -> None:
    out = tmp_path / "idx"
    shutil.copytree(folder.parent / "old-index", out)  # the old index, which must stay searchable throughout
    probe = Index.open(out)
    query = probe.rows().vectors[7]
    for _attempt in range(5):  # the commit is short: try again if the run finished before it was caught
        proc = subprocess.Popen(_command(folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen: set[int] = set()
        caught = _wait(moment, out, proc, seen)
        if caught:
            seen |= descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        proc.wait()
    else:
        pytest.fail(f"could not catch the run at {moment}")
    deadline = time.monotonic() + 5
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in seen if alive(p)], f"processes of the killed run still alive after 5 s: {seen}"
    assert Index.open(out).search_vector(query, k=1)[0].path == "img0007.jpg"  # a whole generation answers
    saved = len(list((out / ".work").glob("chunk-*.npz"))) if (out / ".work").is_dir() else 0
    rerun = subprocess.run(_command(folder, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    if saved:
        assert "resumed: " in rerun.stdout, rerun.stdout
        assert int(rerun.stdout.split("resumed: ")[1].split()[0]) >= 4 * (saved - 1)
    assert len(Index.open(out)) == N
