"""Writes while the index is in use: a writer killed at each step of a write, readers searching while a thread adds and
deletes, the write API of `cbir serve --writable` and its token rules, and the watched folder. Real processes, real
SIGKILL, a real server on 127.0.0.1, real inotify."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from cbir import Index
from cbir.cli import main
from tests.badfiles import jpeg_bytes, photo
from tests.helpers import run_until_closed

ENCODER = "colour_histogram"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small folder and its index (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("live")
    data = root / "data"
    data.mkdir()
    for i in range(30):
        (data / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(photo((64, 48), seed=i)))
    Index.build(data, out=root / "idx", encoder=ENCODER, device="cpu")
    return root


def copy_of(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "idx", tmp_path / "idx")
    manifest = tmp_path / "idx" / "manifest.json"  # the root recorded is the original folder's: point it here
    text = manifest.read_text().replace(str((base / "data").resolve()), str((tmp_path / "data").resolve()))
    manifest.write_text(text)
    return tmp_path / "data", tmp_path / "idx"


UPDATE = [sys.executable, "-m", "cbir", "index", "{data}", "--out", "{out}", "--update", "-q", "--device", "cpu"]


def _update(data: Path, out: Path, crash_at: str = "") -> subprocess.CompletedProcess:
    cmd = [c.format(data=data, out=out) for c in UPDATE]
    return subprocess.run(cmd, env={**os.environ, "CBIR_CRASH_AT": crash_at}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("step", ["segment-written", "manifest-written", "manifest-replaced", "merge-written"])
def test_a_write_killed_at_any_step_leaves_a_whole_generation_and_the_next_run_completes(base: Path, tmp_path: Path,
                                                                                         step: str) -> None:
    from cbir.search import policy

    data, out = copy_of(base, tmp_path)
    before = Index.open(out)
    query = before.vector_of(4)
    merging = step == "merge-written"
    count = policy.PER_TIER - 1 if merging else 8  # a merge: the update that makes a full tier of small segments
    for i in range(count):
        (data / f"new{i}.jpg").write_bytes(jpeg_bytes(photo((64, 48), seed=100 + i)))
        if merging and i < count - 1:
            assert _update(data, out).returncode == 0
    killed = _update(data, out, crash_at=step)
    assert killed.returncode == -9, killed.stderr[-2000:]  # killed at the step
    after = Index.open(out)  # the last committed generation: whole, searchable
    assert after.search_vector(query, k=1)[0].id == 4
    committed = step in ("manifest-replaced", "merge-written")  # the rows were committed before the kill
    assert len(after) == len(before) + (count if committed else 0)
    rerun = _update(data, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = Index.open(out)
    assert len(final) == len(before) + count
    assert final.search(data / f"new{count - 1}.jpg", k=1)[0].path == f"new{count - 1}.jpg"
    if merging:
        assert len(final.manifest.segments) < policy.PER_TIER  # the merge was done by the next run
    named = {f for e in final.manifest.segments for f in e.files()}
    assert {f.name for f in out.glob("seg-*")} == named  # the killed write's files are gone


def test_readers_never_see_a_deleted_or_half_written_row_while_a_thread_writes(base: Path, tmp_path: Path) -> None:
    data, out = copy_of(base, tmp_path)
    index = Index.open(out)
    dim = index.generation.dim
    deleted: dict[int, float] = {}  # id -> when its removal was committed
    errors: list[str] = []
    stop = threading.Event()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            started = time.monotonic()
            q = rng.normal(size=dim).astype(np.float32)
            try:
                found = index.search_vector(q, k=10)
            except Exception as exc:  # noqa: BLE001 - any error is the failure this test looks for
                errors.append(repr(exc))
                return
            for r in found:
                when = deleted.get(r.id)
                if when is not None and when < started:
                    errors.append(f"deleted id {r.id} answered")
                if not r.path:
                    errors.append(f"row {r.id} without a path")

    readers = [threading.Thread(target=read, args=(s,)) for s in range(8)]
    for t in readers:
        t.start()
    rng = random.Random(0)
    try:
        for i in range(12):
            added = index.add([jpeg_bytes(photo((64, 48), seed=1000 + i))])
            victim = rng.choice([int(x) for x in np.asarray(index.ids())] + [added[0].id])
            index.remove([victim])
            deleted[victim] = time.monotonic()
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
    assert not errors, errors[:5]
    assert len(index) == 30 and not set(deleted) & set(np.asarray(index.ids()).tolist())


def test_write_api_adds_searchably_removes_and_needs_the_token(base: Path, tmp_path: Path, start_server) -> None:
    data, out = copy_of(base, tmp_path)
    url = start_server([out], WRITABLE=True, TOKEN="s3cret")
    upload = jpeg_bytes(photo((64, 48), seed=4242))
    no_token = requests.post(f"{url}/api/images", files={"image": ("a.jpg", upload)}, timeout=60)
    assert no_token.status_code == 401 and "token" in no_token.json()["error"]
    auth = {"Authorization": "Bearer s3cret"}
    got = requests.post(f"{url}/api/images", files={"image": ("a.jpg", upload)}, data={"folder": "Holidays"},
                        headers=auth, timeout=60)
    assert got.status_code == 201, got.text
    body = got.json()
    assert body["path"].startswith("cbir-uploads/Holidays/") and (data / body["path"]).is_file()
    found = requests.post(f"{url}/api/search?k=1", files={"image": ("a.jpg", upload)}, headers=auth, timeout=60)
    assert found.json()["results"][0]["id"] == body["id"]  # searchable when the answer came
    bad = requests.post(f"{url}/api/images", files={"image": ("a.jpg", b"not an image")}, headers=auth, timeout=60)
    assert bad.status_code == 400 and "not a usable image" in bad.json()["error"]
    traversal = requests.post(f"{url}/api/images", files={"image": ("a.jpg", upload)}, data={"folder": "../x"},
                              headers=auth, timeout=60)
    assert traversal.status_code == 400
    assert requests.delete(f"{url}/api/images/{body['id']}", timeout=60).status_code == 401
    gone = requests.delete(f"{url}/api/images/{body['id']}", headers=auth, timeout=60)
    assert gone.status_code == 200 and gone.json()["file_deleted"] and not (data / body["path"]).exists()
    assert requests.delete(f"{url}/api/images/{body['id']}", headers=auth, timeout=60).status_code == 404
    read_only = start_server([out])
    refused = requests.post(f"{read_only}/api/images", files={"image": ("a.jpg", upload)}, timeout=60)
    assert refused.status_code == 403 and "--writable" in refused.json()["error"]


def test_uploads_that_arrive_during_a_write_are_committed_together(base: Path, tmp_path: Path) -> None:
    """8 uploads at once while another write holds the index: one more write takes the 7 waiting (not 7 writes);
    each request gets its own id, a bad one among them fails alone, and every good one is searchable."""
    from indexer.live import _writer_lock
    from webui import create_app
    from webui.server import make_server

    _, out = copy_of(base, tmp_path)
    app = create_app({"INDEXES": [str(out)], "DEVICE": "cpu", "WRITABLE": True, "WARM_UP": False})
    srv = make_server(app, host="127.0.0.1", port=0, threads=10)
    threading.Thread(target=run_until_closed, args=(srv,), daemon=True).start()
    url = f"http://127.0.0.1:{srv.effective_port}"
    index = app.extensions["cbir"].get(None)
    first = index.manifest.generation
    uploads = [jpeg_bytes(photo((64, 48), seed=5000 + i)) for i in range(7)] + [b"GIF89a not really"]
    answers: dict[int, requests.Response] = {}

    def send(i: int) -> None:
        answers[i] = requests.post(f"{url}/api/images", files={"image": (f"{i}.jpg", uploads[i])}, timeout=120)

    try:
        with _writer_lock(index):  # a write in progress
            threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            _wait_for(lambda: app.extensions.get("cbir_uploads") is not None and
                      app.extensions["cbir_uploads"].waiting() >= 6)
        for t in threads:
            t.join()
    finally:
        srv.close()
    ids = [answers[i].json().get("id") for i in range(7)]
    assert all(answers[i].status_code == 201 for i in range(7)), [answers[i].text for i in range(7)]
    assert answers[7].status_code == 400 and len(set(ids)) == 7
    index.refresh()
    assert index.manifest.generation - first <= 4  # one at a time: 7 commits (and their merges)
    for i in range(7):
        assert index.search(uploads[i], k=1)[0].id == ids[i]


def test_writable_on_a_network_address_without_a_token_is_refused_before_binding(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", str(base / "idx"), "--host", "0.0.0.0", "--public", "--writable", "--port", "1"])
    assert code == 2 and "--writable" in capsys.readouterr().err


def _wait_for(condition, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError("not within the time allowed")


def test_the_watcher_follows_a_copied_a_moved_and_a_deleted_photo(base: Path, tmp_path: Path) -> None:
    from cbir.watch import Watcher
    from indexer import BuildOptions

    data, out = copy_of(base, tmp_path)
    (data / "while-away.jpg").write_bytes(jpeg_bytes(photo((64, 48), seed=300)))  # changed while nothing watched
    watcher = Watcher(data, out, BuildOptions(device="cpu"))
    watcher.catch_up()
    index = watcher.index
    assert index is not None and index.id_of("while-away.jpg") is not None
    thread = threading.Thread(target=watcher.run)
    thread.start()
    try:
        time.sleep(0.5)
        (data / "copied.jpg").write_bytes(jpeg_bytes(photo((64, 48), seed=301)))
        took = _wait_for(lambda: index.id_of("copied.jpg") is not None)
        assert took < 5.0  # searchable within 5 s of the copy
        vector = index.vector_of(index.id_of("img0003.jpg"))
        (data / "sub").mkdir()
        (data / "img0003.jpg").rename(data / "sub" / "moved.jpg")
        _wait_for(lambda: index.id_of("sub/moved.jpg") is not None and index.id_of("img0003.jpg") is None)
        np.testing.assert_array_equal(index.vector_of(index.id_of("sub/moved.jpg")), vector)  # not embedded again
        (data / "img0004.jpg").unlink()
        _wait_for(lambda: index.id_of("img0004.jpg") is None)
    finally:
        watcher.stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    reopened = Index.open(out)
    assert reopened.id_of("copied.jpg") is not None and reopened.id_of("img0004.jpg") is None
