"""Read-and-decode stage: files -> `Decoded` records, in worker processes that never outlive the run.

Workers ship uint8 pixels of the crop box (a quarter of float32's bytes); the embed stage normalises a
whole batch at once. A file that cannot be used costs that file, never the run: its record carries the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from cbir import local_features, metadata
from cbir.errors import CbirError, ImageError
from cbir.files import sha256_bytes
from cbir.images import decode_image
from cbir.local_features import Features
from cbir.preprocess import Preprocess
from indexer.source import Source

DECODE_NICE = 19
PR_SET_PDEATHSIG = 1
AHEAD = 512  # files decoded ahead of the model at most (~75 MB of 224-px pixels)
GROUP = 8  # files per task handed to a worker: one at a time cost 30% more than torch's DataLoader


@dataclass(kw_only=True)
class Decoded:
    """One file after decoding: its pixels, or the reason it was skipped."""

    file: str  # path relative to the collection root
    pixels: np.ndarray | None = None
    reason: str = ""
    mtime_ns: int = 0
    size: int = 0
    sha256: str = ""
    meta: metadata.Meta | None = None  # read here, where the file is open anyway
    features: Features | None = None  # its local features, when the index keeps them (cbir/local_features.py)

    @property
    def ok(self) -> bool:
        return self.pixels is not None


def decode(source: Source, file: str, preprocess: Preprocess, features: bool = False) -> Decoded:
    """One file's pixels for the encoder (and its local features, from the same decoded picture, if asked)."""
    try:
        data, size, mtime_ns = source.read(file)
        if not data:
            return Decoded(file=file, pixels=None, reason="empty file (0 bytes)")
        picture = decode_image(io.BytesIO(data), draft=preprocess.draft_size, name=file)
        meta = metadata.read(picture.exif, picture.xmp, picture.size, mtime_ns, source.sidecar(file))
        kept = local_features.to_keep(picture.image) if features else None
        return Decoded(file=file, pixels=preprocess.pixels(picture.image), mtime_ns=mtime_ns, size=size,
                       sha256=sha256_bytes(data), meta=meta, features=kept)
    except ImageError as exc:
        reason = str(exc)
    except FileNotFoundError:
        reason = "file not found (deleted or moved)"
    except OSError as exc:
        reason = f"file not readable: {exc.strerror or exc}"
    except Exception as exc:  # a decoder bug must cost one file, never the run
        reason = f"cannot decode: {exc.__class__.__name__}: {exc}"
    return Decoded(file=file, pixels=None, reason=reason)


def die_with_parent(parent: int) -> None:
    """Make this (worker) process end when `parent` does, even when the parent is SIGKILLed.

    The kernel sends SIGKILL on the parent's death (Linux PR_SET_PDEATHSIG); if the parent died before this
    ran, the process was already re-parented and exits now.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _worker_init(parent: int) -> None:
    """Decoding workers die with the run and run at low priority: they take the cores only while the model waits.

    The model's threads move in lockstep, so a decoder pre-empting one of them stalls them all: on 2 cores a busy
    decoder at normal priority cut efficientnet_lite0 bf16 from 113 to 35 img/s; at nice 19 the model kept its
    speed and the decoder still ran in the gaps (benchmarks/decode_priority.py).
    """
    die_with_parent(parent)
    with contextlib.suppress(OSError):
        os.nice(DECODE_NICE)
    # OpenCV's thread count (local features) is left as it is: cv2.setNumThreads in a process forked after its
    # parent ran OpenCV's threads hung for good (tests/test_local_features.py forks after the parent extracted)


def default_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0  # starting processes costs more than it saves
    return max(1, min(4, os.cpu_count() or 1))


def decode_group(source: Source, files: list[str], preprocess: Preprocess, features: bool) -> list[Decoded]:
    return [decode(source, f, preprocess, features) for f in files]


class Decoder:
    """`Decoded` records of `files` in order, decoded up to AHEAD files in advance by worker processes (none for a
    small job: then in this process) that run at nice 19 and die with the run.

    It is started as soon as the files and the preprocessing are known. For a new index of an encoder prepared on
    this machine before, that is before torch is imported (indexer/run.py): the workers, forked from a process
    without torch, decode the first few hundred pictures on the cores that the ~1 s import leaves idle, and stay
    small (no copy of torch in them). The embed stage takes what it needs with `batches`.
    """

    def __init__(self, source: Source, files: list[str], preprocess: Preprocess, workers: int | None = None,
                 batch_size: int = 16, *, features: bool = False) -> None:
        """`features`: also extract each picture's local features (what the index keeps for verified copies)."""
        self.source, self.preprocess, self.features = source, preprocess, features
        self._position = {f: i for i, f in enumerate(files)}
        self._todo: deque[str] = deque(files)  # not handed to a worker yet
        self._ahead: deque[tuple[list[str], Future | None]] = deque()  # groups handed out, in order
        self._ready: deque[Decoded] = deque()  # records of the group being given out
        self._next = 0  # position of the first file not given out or passed over
        n = default_workers(len(files), batch_size) if workers is None else workers
        self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init,
                                         initargs=(os.getpid(),)) if n else None
        self._fill()

    def covers(self, files: list[str], preprocess: Preprocess) -> bool:
        """True if `files` can be taken from here: the same preprocessing, and files still ahead, in this order."""
        if preprocess != self.preprocess:
            return False
        last = self._next
        for f in files:
            i = self._position.get(f, -1)
            if i < last:
                return False
            last = i + 1
        return True

    def batches(self, files: list[str], batch_size: int) -> Iterator[list[Decoded]]:
        """The records of `files` (see `covers`) in batches; the decoder's other files are dropped, undecoded if
        not begun (the files a resumed run or the calibration sample has already)."""
        wanted = set(files)
        for group, future in self._ahead:
            if future is not None and not wanted.intersection(group):
                future.cancel()
        self._ahead = deque((g, fut) for g, fut in self._ahead if wanted.intersection(g))
        self._todo = deque(f for f in self._todo if f in wanted)
        batch: list[Decoded] = []
        for f in files:
            batch.append(self._get(f))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _get(self, file: str) -> Decoded:
        while True:
            if not self._ready:
                self._ready.extend(self._group())
            record = self._ready.popleft()
            if record.file == file:
                self._next = self._position[file] + 1
                return record

    def _group(self) -> list[Decoded]:
        """The next group's records (decoded here when there are no workers)."""
        if not self._ahead:
            self._fill()
        group, future = self._ahead.popleft()
        self._fill()
        if future is None:
            return decode_group(self.source, group, self.preprocess, self.features)
        try:
            return future.result()
        except BrokenProcessPool:
            raise CbirError(f"a decoding worker died while reading {group[0]} or the next {len(group) - 1} files "
                            "(killed, or out of memory); run the same command again: it resumes from the batches "
                            "already saved") from None

    def _fill(self) -> None:
        while self._todo and len(self._ahead) * GROUP < (AHEAD if self._pool is not None else 1):
            group = [self._todo.popleft() for _ in range(min(GROUP, len(self._todo)))]
            pool = self._pool
            future = pool.submit(decode_group, self.source, group, self.preprocess, self.features) \
                if pool is not None else None
            self._ahead.append((group, future))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
