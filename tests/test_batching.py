"""Batched query embeddings (webui/batching.py): concurrent requests share one run of the network, each gets its own
row, in arrival order, with bounded waits; and the server gives the same answers batched or not."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from webui.batching import Batcher, Busy


class Recorder:
    """A batch function that takes `seconds` per batch and returns each item's own row: [item (a text: its length),
    batch size]."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds, self.sizes, self.order = seconds, [], []

    def __call__(self, batch) -> np.ndarray:
        time.sleep(self.seconds)
        items = [float(len(x)) if isinstance(x, str) else float(np.asarray(x).ravel()[0]) for x in batch]
        self.sizes.append(len(items))
        self.order.extend(items)
        return np.array([[x, len(items)] for x in items], np.float32)


def _together(n: int, fn) -> list:
    start = threading.Barrier(n)

    def one(i: int):
        start.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_jobs_share_batches_and_each_gets_its_own_row() -> None:
    run = Recorder()
    batcher = Batcher(max_batch=4, max_wait=0.002)
    rows = _together(10, lambda i: batcher.embed("k", np.full((2, 2, 3), i, np.uint8), run))
    assert [int(r[0]) for r in rows] == list(range(10))  # each request its own row
    assert sum(run.sizes) == 10 and max(run.sizes) <= 4  # bounded batch
    assert len(run.sizes) < 10  # some ran together
    assert batcher.jobs == 10 and batcher.batches == len(run.sizes)


def test_max_batch_one_is_one_at_a_time_in_arrival_order() -> None:
    run = Recorder(seconds=0.01)
    batcher = Batcher(max_batch=1)
    for i in range(3):  # one after another: arrival order is known
        threading.Thread(target=batcher.embed, args=("k", np.full((1,), i, np.uint8), run)).start()
        time.sleep(0.002)
    deadline = time.monotonic() + 5
    while len(run.sizes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.sizes == [1, 1, 1] and run.order == [0, 1, 2]


def test_other_keys_are_not_mixed_and_wait_one_batch_at_most() -> None:
    """Pictures and texts (or two encoders) never share a batch; the oldest job's key goes first."""
    slow = Recorder(seconds=0.2)
    batcher = Batcher(max_batch=8)
    first = threading.Thread(target=batcher.embed, args=("a", np.zeros(1, np.uint8), slow))
    first.start()
    time.sleep(0.05)  # "a" runs now; "b" and more "a" queue behind it, "b" first
    texts = Recorder(seconds=0.0)
    got: dict = {}
    tb = threading.Thread(target=lambda: got.setdefault("b", batcher.embed("b", "a red bicycle", texts)))
    tb.start()
    time.sleep(0.02)
    later = [threading.Thread(target=batcher.embed, args=("a", np.ones(1, np.uint8), slow)) for _ in range(3)]
    for t in later:
        t.start()
    for t in [first, tb, *later]:
        t.join(5)
    assert texts.sizes == [1] and slow.sizes == [1, 3]  # b ran between the two batches of a, alone
    assert list(got["b"]) == [len("a red bicycle"), 1]


def test_a_job_waiting_too_long_is_dropped_and_errors_reach_every_request_of_their_batch() -> None:
    batcher = Batcher(max_batch=2, timeout=0.1)
    slow = Recorder(seconds=0.5)
    blocker = threading.Thread(target=batcher.embed, args=("k", np.zeros(1, np.uint8), slow))
    blocker.start()
    time.sleep(0.05)
    with pytest.raises(Busy):
        batcher.embed("other", np.zeros(1, np.uint8), slow)  # queued behind a 0.5 s batch, waits 0.1 s
    blocker.join(5)
    assert slow.sizes == [1]  # the dropped job never ran

    def broken(batch):
        raise ValueError(f"bad batch of {len(batch)}")

    errors = _together(2, lambda i: _error(lambda: batcher.embed("k", np.zeros(1, np.uint8), broken)))
    assert all(isinstance(e, ValueError) for e in errors)
    assert batcher.embed("k", np.full(1, 7, np.uint8), Recorder(0.0))[0] == 7  # the worker goes on


def _error(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def test_one_client_alone_does_not_wait_for_others() -> None:
    run = Recorder(seconds=0.0)
    batcher = Batcher(max_batch=16, max_wait=5.0)  # a long gathering wait, never used by a lone request
    for i in range(5):
        with batcher.coming():
            item = np.full(1, i, np.uint8)
        assert batcher.embed("k", item, run)[0] == i
    assert run.sizes == [1] * 5 and batcher.waits == 0


def _late_joiner(decoding: float, max_wait: float) -> tuple[Recorder, Batcher]:
    """A request submits while another is still decoding for `decoding` seconds."""
    run = Recorder(seconds=0.0)
    batcher = Batcher(max_batch=16, max_wait=max_wait)

    def late() -> None:
        with batcher.coming():
            time.sleep(decoding)
        batcher.embed("k", np.full(1, 2, np.uint8), run)

    with batcher.coming():
        t = threading.Thread(target=late)
        t.start()
        time.sleep(0.01)
    batcher.embed("k", np.full(1, 1, np.uint8), run)
    t.join(10)
    return run, batcher


def test_a_request_still_decoding_joins_the_batch_but_only_within_the_bounded_wait() -> None:
    run, batcher = _late_joiner(decoding=0.05, max_wait=2.0)
    assert run.sizes == [2] and batcher.waits == 1  # waited for it, ran both at once
    run, batcher = _late_joiner(decoding=1.0, max_wait=0.05)
    assert run.sizes == [1, 1] and batcher.waits == 1  # waited the bound, then went alone


def test_served_answers_are_the_same_batched_and_one_by_one(sample_index, start_server, samples: Path) -> None:
    """8 concurrent uploads and region searches, batched (up to 8) and unbatched: the same neighbours and scores."""
    directory = sample_index.directory
    batched = start_server([directory], BATCH_MAX=8, BATCH_WAIT_MS=20.0)
    single = start_server([directory], BATCH_MAX=1)
    photos = sorted(samples.rglob("*.jpg"))[:8]

    def ask(base: str, i: int) -> list:
        box = {"box": "10,10,200,150"} if i % 2 else {}
        r = requests.post(f"{base}/api/search", params={"k": 5, **box}, data=photos[i].read_bytes(),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    warmed = requests.get(f"{single}/api/health", timeout=10).json()["batching"]["batches"]  # the warm-up's
    want = [ask(single, i) for i in range(8)]
    before = requests.get(f"{batched}/api/health", timeout=10).json()["batching"]  # the warm-up's searches too
    for _ in range(3):  # requests arrive together: batches form
        for got, expected in zip(_together(8, lambda i: ask(batched, i)), want, strict=True):
            assert [x["path"] for x in got] == [x["path"] for x in expected]
            np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in expected], atol=1e-5)
    stats = requests.get(f"{batched}/api/health", timeout=10).json()["batching"]
    assert stats["jobs"] - before["jobs"] == 24 and stats["batches"] - before["batches"] < 24
    assert stats["max_batch"] == 8
    assert requests.get(f"{single}/api/health", timeout=10).json()["batching"]["batches"] - warmed == 8
