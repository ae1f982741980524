"""Incremental updates, resumable and crash-safe indexing (real SIGKILL), locking, hostile files, duplicates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir import CbirError, Index
from cbir.cli import main
from cbir.encoders import create
from indexer.lock import IndexLock
from tests.badfiles import EXPECTED_OK, EXPECTED_SKIPS, jpeg_bytes, photo, write_bad_files
from tests.helpers import build_index


def make_folder(root: Path, n: int, seed0: int = 0, size: tuple[int, int] = (96, 72)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(photo(size, seed=seed0 + i)))
    return root


@pytest.fixture(scope="module")
def encoder():
    return create("efficientnet_lite0", device="cpu")


def test_update_embeds_only_what_changed_and_keeps_ids(tmp_path: Path, encoder) -> None:
    data = make_folder(tmp_path / "data", 12)
    out = tmp_path / "idx"
    build_index(data, out, encoder)
    before = Index.open(out)
    ids_before = dict(zip(before.rows().paths, before.rows().ids.tolist(), strict=True))
    (data / "img0003.jpg").unlink()
    (data / "img0005.jpg").write_bytes(jpeg_bytes(photo((96, 72), seed=500)))
    os.utime(data / "img0005.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    for i in (100, 101):
        (data / f"new{i}.jpg").write_bytes(jpeg_bytes(photo((96, 72), seed=i)))
    summary = build_index(data, out, encoder, mode="update")
    assert (summary.added, summary.changed, summary.removed, summary.unchanged) == (2, 1, 1, 10)
    assert summary.embedded == 3
    after = Index.open(out)
    ids_after = dict(zip(after.rows().paths, after.rows().ids.tolist(), strict=True))
    for p, i in ids_before.items():
        if p != "img0003.jpg":
            assert ids_after[p] == i, p  # unchanged and changed files keep their ids
    assert "img0003.jpg" not in ids_after
    assert min(ids_after["new100.jpg"], ids_after["new101.jpg"]) > max(ids_before.values())
    assert len(after) == 13
    top = after.search(data / "new101.jpg", k=1)[0]
    assert top.path == "new101.jpg" and top.score > 0.999
    changed = after.search(data / "img0005.jpg", k=1)[0]
    assert changed.path == "img0005.jpg" and changed.score > 0.999
    assert not (out / ".work").exists()


def test_verify_catches_content_changes_that_keep_size_and_mtime(tmp_path: Path, encoder) -> None:
    data = make_folder(tmp_path / "data", 4)
    out = tmp_path / "idx"
    build_index(data, out, encoder)
    target = data / "img0001.jpg"
    st = target.stat()
    blob = bytearray(target.read_bytes())
    blob[-3] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(blob))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_index(data, out, encoder, mode="update").changed == 0
    assert build_index(data, out, encoder, mode="update", verify=True).changed == 1


def test_update_refuses_a_different_encoder(tmp_path: Path, encoder) -> None:
    data = make_folder(tmp_path / "data", 3)
    build_index(data, tmp_path / "idx", encoder)
    with pytest.raises(CbirError, match="--rebuild to change it"):
        build_index(data, tmp_path / "idx", create("colour_histogram", device="cpu"), mode="update")


def test_cli_update_reports_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_folder(tmp_path / "data", 3)
    assert main(["index", str(data), "--out", str(tmp_path / "i"), "-q"]) == 0
    (data / "extra.jpg").write_bytes(jpeg_bytes(photo(seed=77)))
    capsys.readouterr()
    assert main(["index", str(data), "--out", str(tmp_path / "i"), "--update", "-q"]) == 0
    assert "1 added, 0 changed, 0 removed, 3 unchanged" in capsys.readouterr().out
    assert main(["index", str(data), "--out", str(tmp_path / "i"), "--update", "--rebuild"]) == 2
    assert "update and rebuild exclude each other" in capsys.readouterr().err
    with pytest.raises(CbirError, match="update and rebuild exclude each other"):  # the same rule, the same words
        Index.build(data, out=tmp_path / "i", update=True, rebuild=True)


def test_api_update_keeps_the_encoder_the_index_was_built_with(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", 3)
    out = tmp_path / "idx"
    Index.build(data, out=out, encoder="colour_histogram", device="cpu")
    (data / "extra.jpg").write_bytes(jpeg_bytes(photo(seed=99)))
    index = Index.build(data, out=out, update=True, device="cpu")  # no encoder named: the index's own
    assert index.encoder_config["name"] == "colour_histogram" and len(index) == 4
    assert index.encoder.name == "colour_histogram"
    with pytest.raises(CbirError, match="--update keeps the encoder"):
        Index.build(data, out=out, update=True, encoder="efficientnet_lite0", device="cpu")


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path, encoder) -> None:
    data = make_folder(tmp_path / "data", 2)
    out = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from indexer.lock import IndexLock\n"
                               f"with IndexLock(Path({str(out)!r})):\n    print('locked', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(CbirError, match=f"another cbir process \\(pid {holder.pid}\\)"):
            build_index(data, out, encoder)
    finally:
        holder.kill()
        holder.wait()
    build_index(data, out, encoder)  # the lock died with its holder, even killed
    with IndexLock(out):
        pass


def _wait_for_chunks(work: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(work.glob("chunk-*.npz"))) < n:
        assert proc.poll() is None, "indexer finished before it could be killed"
        assert time.monotonic() < deadline, "indexer made no progress"
        time.sleep(0.05)


def test_sigkill_mid_run_then_rerun_resumes_and_matches_a_clean_build(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", 90)
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "cbir", "index", str(data), "--out", str(out), "--batch-size", "4", "--workers",
           "0", "--device", "cpu", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_chunks(out / ".work", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # nothing half-made is presented as an index
    with pytest.raises(CbirError, match="no index at"):
        Index.open(out)
    done = len(list((out / ".work").glob("chunk-*.npz")))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    resumed = int(rerun.stdout.split("resumed: ")[1].split()[0])
    assert resumed >= 4 * done - 4 and resumed < 90
    index = Index.open(out)
    assert len(index) == 90 and not (out / ".work").exists()
    clean = Index.build(data, out=tmp_path / "clean", device="cpu", batch_size=7)
    assert clean.rows().paths == index.rows().paths
    np.testing.assert_allclose(clean.rows().vectors, index.rows().vectors, atol=2e-5)


def test_sigkill_during_rebuild_leaves_the_old_index_working(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", 60)
    out = tmp_path / "idx"
    Index.build(data, out=out, device="cpu")
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    make_folder(data, 60, seed0=1000)  # every file changes
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "index", str(data), "--out", str(out), "--rebuild",
                             "--batch-size", "4", "--workers", "0", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for_chunks(out / ".work", 2, proc)
    proc.kill()
    proc.wait()
    assert all((out / name).read_bytes() == data for name, data in before.items())  # the commit point too
    old = Index.open(out)
    assert len(old) == 60 and old.search_vector(old.rows().vectors[5], k=1)[0].id == int(old.rows().ids[5])


def test_hostile_corpus_completes_with_matching_counts(tmp_path: Path, encoder, monkeypatch) -> None:
    root = tmp_path / "corpus"
    write_bad_files(root)
    (root / "loop").mkdir()
    os.symlink(root, root / "loop" / "back")  # a symlink loop
    (root / "exif.jpg").write_bytes(jpeg_bytes(photo(seed=3), exif=_exif_rotated()))
    bad_name = os.path.join(os.fsencode(root), b"caf\xe9.jpg")  # Latin-1 name: not valid UTF-8
    with open(bad_name, "wb") as fh:
        fh.write(jpeg_bytes(photo(seed=4)))
    (root / "vanishes.jpg").write_bytes(jpeg_bytes(photo(seed=5)))

    import indexer.source as pipeline

    real_discover = pipeline.discover

    def discover_then_delete(*args, **kwargs):
        found = real_discover(*args, **kwargs)
        (root / "vanishes.jpg").unlink()  # deleted after discovery, before decoding
        return found

    monkeypatch.setattr(pipeline, "discover", discover_then_delete)
    summary = build_index(root, tmp_path / "idx", encoder, batch_size=4)
    skipped = {s.path: s.reason for s in summary.skipped}
    for name, words in EXPECTED_SKIPS.items():
        assert words in skipped[name]
    assert "not found" in skipped["vanishes.jpg"]
    assert any("not valid UTF-8" in r for r in skipped.values())
    assert any("already visited" in r for r in skipped.values())
    index = Index.open(tmp_path / "idx")
    for name in [*EXPECTED_OK, "exif.jpg"]:
        assert name in index.rows().paths
    n_candidates = len(EXPECTED_OK) + len(EXPECTED_SKIPS) + 2 + 1  # + exif, vanishes, bad name
    assert summary.indexed + sum(1 for r in skipped.values() if "already visited" not in r) == n_candidates
    assert len(index) == summary.indexed and len(index.skipped) == len(summary.skipped)


def _exif_rotated() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8
    return exif.tobytes()


def test_duplicates_finds_copies_and_identical_files(tmp_path: Path, samples: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image, ImageOps

    data = tmp_path / "d"
    data.mkdir()
    for sub in ("cat", "coffee", "rocket"):
        for f in sorted((samples / sub).glob("*.jpg"))[:1]:
            shutil.copy(f, data / f.name)
    shutil.copy(data / "chelsea.jpg", data / "chelsea_copy.jpg")  # byte-identical
    im = Image.open(data / "coffee.jpg")
    im.resize((im.width * 7 // 10, im.height * 7 // 10)).save(data / "coffee_small.jpg", quality=60)
    ImageOps.mirror(Image.open(data / "rocket.jpg")).save(data / "rocket_flipped.jpg", quality=85)
    out = tmp_path / "idx"
    Index.build(data, out=out, device="cpu")
    assert main(["duplicates", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    identical = [sorted(x["path"] for x in g) for g in found["identical"]]
    near = [sorted(x["path"] for x in g) for g in found["near"]]
    assert identical == [["chelsea.jpg", "chelsea_copy.jpg"]]
    assert ["coffee.jpg", "coffee_small.jpg"] in near and ["rocket.jpg", "rocket_flipped.jpg"] in near
    assert not any("chelsea.jpg" in g and "coffee.jpg" in g for g in near)
    assert main(["duplicates", str(out), "--threshold", "2"]) == 2
