"""Read-and-decode stage: files -> `Decoded` records, in worker processes that never outlive the run.

Workers ship uint8 pixels of the crop box (a quarter of float32's bytes); the embed stage normalises a
whole batch at once. A file that cannot be used costs that file, never the run: its record carries the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cbir.files import sha256_bytes
from cbir.images import ImageError, load_image
from cbir.preprocess import Preprocess
from indexer.source import Source

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

DECODE_NICE = 19
PR_SET_PDEATHSIG = 1


@dataclass
class Decoded:
    """One file after decoding: its pixels, or the reason it was skipped."""

    file: str  # path relative to the collection root
    pixels: np.ndarray | None
    reason: str = ""
    mtime_ns: int = 0
    size: int = 0
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.pixels is not None


def decode(source: Source, file: str, preprocess: Preprocess) -> Decoded:
    try:
        data, size, mtime_ns = source.read(file)
        if not data:
            return Decoded(file, None, "empty file (0 bytes)")
        im = load_image(io.BytesIO(data), draft=preprocess.draft_size)
        return Decoded(file, preprocess.pixels(im), "", mtime_ns, size, sha256_bytes(data))
    except ImageError as exc:
        return Decoded(file, None, str(exc))
    except FileNotFoundError:
        return Decoded(file, None, "file not found (deleted or moved)")
    except OSError as exc:
        return Decoded(file, None, f"file not readable: {exc.strerror or exc}")
    except Exception as exc:  # a decoder bug must cost one file, never the run
        return Decoded(file, None, f"cannot decode: {exc.__class__.__name__}: {exc}")


class DecodedFiles:
    """Item i: `decode` of files[i]. Runs in worker processes (a map-style dataset for torch's DataLoader)."""

    def __init__(self, source: Source, files: list[str], preprocess: Preprocess) -> None:
        self.source, self.files, self.preprocess = source, files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        return decode(self.source, self.files[i], self.preprocess)


def die_with_parent(parent: int) -> None:
    """Make this (worker) process end when `parent` does, even when the parent is SIGKILLed.

    The kernel sends SIGKILL on the parent's death (Linux PR_SET_PDEATHSIG); if the parent died before this
    ran, the process was already re-parented and exits now.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _worker_init(parent: int, _worker_id: int) -> None:
    """Decoding workers die with the run and run at low priority: they take the cores only while the model waits.

    The model's threads move in lockstep, so a decoder pre-empting one of them stalls them all: on 2 cores a busy
    decoder at normal priority cut efficientnet_lite0 bf16 from 113 to 35 img/s; at nice 19 the model kept its
    speed and the decoder still ran in the gaps (benchmarks/decode_priority.py).
    """
    die_with_parent(parent)
    with contextlib.suppress(OSError):
        os.nice(DECODE_NICE)


def worker_init_fn() -> functools.partial:
    """The worker initialiser for a DataLoader started by this process."""
    return functools.partial(_worker_init, os.getpid())


def default_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0  # starting processes costs more than it saves
    return max(1, min(4, os.cpu_count() or 1))


def _as_list(items: list[Decoded]) -> list[Decoded]:
    return items


def batches(source: Source, files: list[str], preprocess: Preprocess, batch_size: int,
            workers: int | None) -> DataLoader:
    """Batches (lists) of `Decoded`, in file order, decoded by `workers` processes (None: by size and cores)."""
    from torch.utils.data import DataLoader  # here, not above: Ray's decoding tasks use this module without torch

    n = default_workers(len(files), batch_size) if workers is None else workers
    return DataLoader(DecodedFiles(source, files, preprocess), batch_size=batch_size, shuffle=False, num_workers=n,
                      collate_fn=_as_list, prefetch_factor=4 if n else None,
                      worker_init_fn=worker_init_fn() if n else None)
