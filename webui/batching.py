"""Query embeddings of concurrent requests run as one batch: a network is 2-3x faster per image in batches of 8-16.

Each request decodes its own picture (or takes its text) in its own thread, then hands the encoder's input to one
worker thread and waits. The worker takes the oldest waiting job and every waiting job of the same kind (same
encoder, pictures or texts), in arrival order, up to `max_batch`; it runs them as one batch and hands each request
its row. While a batch runs, the next requests queue, so under load batches form by themselves. It waits for more
only while other requests are still decoding (announced with `coming()`), and at most `max_wait` after the oldest
job arrived: one client alone never waits, and no job waits for gathering longer than that (bounded wait). Jobs of
another kind wait one batch at most behind the oldest (fair). A job still waiting after `timeout` is dropped and its
request told (Busy, a 503). `max_batch=1` is the unbatched server: one embedding at a time, in arrival order.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Busy(Exception):
    """The encoder stayed busy longer than the configured wait."""


@dataclass(kw_only=True, eq=False)
class Job:
    key: Hashable  # jobs of one key run together: same encoder, same kind of input
    item: Any  # one row of the batch function's input (uint8 pixels [H, W, 3], or a text)
    run: Callable[[Any], np.ndarray]  # a batch (a stacked array, or a list of texts) -> [B, D] rows
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None
    started: bool = False


class Batcher:
    """One worker thread that embeds the queued jobs of concurrent requests in batches."""

    def __init__(self, *, max_batch: int = 16, max_wait: float = 0.004, timeout: float = 15.0) -> None:
        self.max_batch, self.max_wait, self.timeout = max(1, max_batch), max_wait, timeout
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._coming = 0  # requests decoding their query, about to submit
        self.batches = 0  # counted for /api/health: jobs / batches is the mean batch size
        self.jobs = 0
        self.waits = 0  # batches that waited for a decoding request to join
        self._worker = threading.Thread(target=self._loop, name="cbir-batcher", daemon=True)
        self._worker.start()

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Around a request's decoding: the worker may wait (up to max_wait) for its job to join a batch."""
        with self._cond:
            self._coming += 1
        try:
            yield
        finally:
            with self._cond:
                self._coming -= 1
                self._cond.notify_all()

    def embed(self, key: Hashable, item: Any, run: Callable[[Any], np.ndarray]) -> np.ndarray:
        """`item`'s row of `run` over a batch of waiting jobs of the same key (raises what `run` raised)."""
        job = Job(key=key, item=item, run=run)
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        if not job.done.wait(self.timeout):
            with self._cond:
                if not job.started:  # still queued: drop it; a job already running is waited for
                    self._queue.remove(job)
                    raise Busy()
            job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            try:
                items = [j.item for j in batch]
                out = batch[0].run(items if isinstance(items[0], str) else np.stack(items))
                for job, row in zip(batch, out, strict=True):
                    job.result = row
            except BaseException as exc:  # every request of the batch gets the error; the worker goes on
                for job in batch:
                    job.error = exc
            for job in batch:
                job.done.set()

    def _gather(self) -> list[Job]:
        """The next batch: the oldest job and the waiting jobs of its key, after a bounded wait for more."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            first = self._queue[0]
            deadline = first.arrived + self.max_wait
            waited = False
            while self._coming > 0 and self._count(first.key) < self.max_batch and \
                    (left := deadline - time.monotonic()) > 0:
                waited = True
                self._cond.wait(left)
            self.waits += waited
            batch = [j for j in self._queue if j.key == first.key][: self.max_batch]
            for job in batch:
                self._queue.remove(job)
                job.started = True
            self.batches += 1
            self.jobs += len(batch)
            return batch

    def stats(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "jobs": self.jobs, "batches": self.batches, "waits": self.waits}

    def _count(self, key: Hashable) -> int:
        return sum(1 for j in self._queue if j.key == key)
