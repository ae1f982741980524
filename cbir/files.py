"""Files written whole or not at all, content hashes, and write failures in words: what every writer of cbir needs.

A write that fails for want of room or rights (disk full, quota, read-only file system, permission, a file-size
limit) is one `WriteError`: a `CbirError` whose message names the file, the reason, the space needed and free, and
what the caller adds (an indexing run: that nothing was lost and the same command resumes). `atomic_path` and the
vectors file's writer translate through `writing`, so every file of an index is covered wherever it is written.
Also the crash points where the tests kill a writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from cbir.errors import CbirError

WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file would grow past the largest size this process may write (ulimit -f) or the file "
                 "system allows",
}
Needed = int | Callable[[], int | None] | None  # bytes, or how to estimate them once a write has failed


class WriteError(CbirError, OSError):
    """A file that could not be written for want of space or rights; still an OSError (errno set) for callers that
    treat any OSError as "not kept" (caches)."""

    def __init__(self, *, path: Path, code: int, needed: int | None = None, advice: str = "") -> None:
        super().__init__(code, os.strerror(code))
        self.path, self.code, self.needed, self.advice = path, code, needed, advice

    def fill(self, needed: Needed, advice: str) -> None:
        """What an outer writer knows better: the whole job's space (not one file's), what to do now."""
        self.needed = _evaluate(needed) or self.needed
        self.advice = self.advice or advice

    def __str__(self) -> str:
        free = free_bytes(self.path)  # when shown: after the partial file is gone, what the user has to work with
        space = f"{_size(free)} free there" if free is not None else "free space unknown"
        if self.needed:
            space = f"about {_size(self.needed)} needed, {space}"
        text = f"cannot write {final_name(self.path)}: {WRITE_FAILURES[self.code]} ({space})."
        return f"{text} {self.advice}" if self.advice else text


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write if it is one of WRITE_FAILURES: from an OSError, or from the text of a library's
    error (h5py puts "errno = 28" in it, FAISS the C library's message)."""
    code = getattr(exc, "errno", None)
    if code in WRITE_FAILURES:
        return code
    text = str(exc)
    found = re.search(r"errno = (\d+)", text)
    if found and int(found.group(1)) in WRITE_FAILURES:
        return int(found.group(1))
    return next((c for c in WRITE_FAILURES if os.strerror(c) in text), None)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], needed: Needed = None, advice: str = "") -> Iterator[None]:
    """Turn a failed write to `path` (or anything under it) into a WriteError; `needed` is the space the writing
    takes, `advice` what to tell the user. Other errors pass as they are."""
    try:
        yield
    except WriteError as exc:
        exc.fill(needed, advice)
        raise
    except (OSError, RuntimeError) as exc:
        code = write_errno(exc)
        if code is None:
            raise
        raise WriteError(path=Path(path), code=code, needed=_evaluate(needed), advice=advice) from None


def _evaluate(needed: Needed) -> int | None:
    return needed() if callable(needed) else needed


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or its nearest existing folder)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return None


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def final_name(path: Path) -> Path:
    """The file a temporary path of `atomic_path` stands for (people know vectors.h5, not vectors.h5.tmp-4242)."""
    return path.with_name(re.sub(r"\.tmp-\d+.*$", "", path.name))


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "", *, needed: Needed = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, on any error delete it.

    A reader (or a run killed at any moment) sees the old file or the new one, never half of one. Nested
    uses rename in reverse order of entry, so the outermost file is the last to change (a commit point).
    `suffix` keeps an extension that a writer insists on (numpy adds .npz, ONNX tools look at .onnx). A write
    that fails for want of space or rights raises a WriteError naming `final` (`needed`: the bytes it takes).
    """
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}{suffix}")
    try:
        with writing(final, needed):
            yield tmp
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


FALLOC_FL_KEEP_SIZE = 1


def _fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """Linux fallocate(2) on `path`; returns the errno (0: done)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_WRONLY)
    try:
        if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


def reserve(path: Path, size: int) -> None:
    """Make sure `size` bytes can be written to `path` before a library writes any: the disk blocks are allocated
    now (the file's size unchanged) and the process's file-size limit is checked, so a full disk or a quota fails
    here, as an OSError. HDF5 hitting a failed write midway left its caches so that closing the file crashed the
    process (SIGSEGV). Where the file system cannot allocate ahead, nothing is checked."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and size > soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    code = _fallocate(path, FALLOC_FL_KEEP_SIZE, 0, size)
    if code not in (0, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(code, os.strerror(code), str(path))


def release_reserved(path: Path) -> None:
    """Give back the blocks `reserve` allocated past the file's end (the estimate was generous): a truncation to its
    own size frees them (ext4 ignores a hole punched past the end)."""
    with contextlib.suppress(OSError):
        os.truncate(path, path.stat().st_size)


def write_in_one_go(path: Path, save: Callable[[io.BytesIO], object]) -> None:
    """Run `save` (torch.save, torch.jit.save) into memory, then write the bytes with Python's own I/O.

    torch's zip writer ends the whole process (std::terminate, SIGABRT) when a write fails, say on a full disk or
    over a file-size limit; Python's write raises an OSError that can be caught and reported.
    """
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getbuffer())


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
