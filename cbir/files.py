"""Files written whole or not at all, and content hashes: the two things every writer of cbir needs (and the crash
points where the tests kill a writer)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, on any error delete it.

    A reader (or a run killed at any moment) sees the old file or the new one, never half of one. Nested
    uses rename in reverse order of entry, so the outermost file is the last to change (a commit point).
    `suffix` keeps an extension that a writer insists on (numpy adds .npz, ONNX tools look at .onnx).
    """
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB blocks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crash_point(name: str) -> None:
    """A named step of a write. With CBIR_CRASH_AT=<name> in the environment the process kills itself here with
    SIGKILL, as the kernel's out-of-memory killer would: the crash tests stop writers at exact steps this way."""
    if os.environ.get("CBIR_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
