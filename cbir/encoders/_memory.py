"""Out of GPU memory: halve the batch and go on, instead of a crash.

A batch that does not fit a small card (64 images of a ViT-L, say) raises torch.cuda.OutOfMemoryError. Every
embedding goes through `in_parts` (the indexer's embed stage, the server's batches, Ray's actors, text queries),
which then frees what the failed attempt held, embeds the same rows in halves, and keeps the smaller size for the
rest of the run, saying so once. The rows are the same rows in the same order, so the vectors equal an unbroken run's
(up to the float rounding of another batch size). Only one image that does not fit is an error, with what to do.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cbir.errors import CbirError

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's own out-of-memory error, or an older RuntimeError that says the same (cuDNN, cuBLAS)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device | None) -> None:
    """Give the failed attempt's blocks back to the card (and so to other processes), not just to torch's cache."""
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def in_parts(run: Callable[[Any], np.ndarray], batch: Any, owner: Any) -> np.ndarray:
    """`run(batch)`, split into parts of at most `owner.max_batch` rows, halving on out-of-memory.

    `owner` (the encoder) keeps the size that fits in `max_batch` (None: any); its `name` and `device` are read.
    """
    n = len(batch)
    limit = owner.max_batch or n
    if n > limit:
        return np.concatenate([in_parts(run, batch[i:i + limit], owner) for i in range(0, n, limit)])
    try:
        return run(batch)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if n == 1:
            free_memory(getattr(owner, "device", None))
            raise CbirError(f"{owner.name}: the GPU ran out of memory for a single image; close what else uses it "
                            "(nvidia-smi shows it), choose another card with --device cuda:N, or use --device cpu"
                            ) from None
    # outside the except block, so that the traceback (and the tensors its frames hold) is gone
    free_memory(getattr(owner, "device", None))
    owner.max_batch = (n + 1) // 2
    log.warning(f"{owner.name}: out of GPU memory at a batch of {n}; going on with batches of {owner.max_batch} "
                "(the same vectors)")
    return in_parts(run, batch, owner)
