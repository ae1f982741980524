"""A write that fails for want of space or rights is one plain line; the old index stays searchable and the same
command resumes. The failure is real: `cbir index --update` runs as a child process whose files may not grow past a
limit (RLIMIT_FSIZE), so the kernel refuses the write of its new segment (EFBIG) as a full disk refuses it (ENOSPC,
on a small tmpfs where the test may mount one): h5py sees a failed write() either way."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir import Index
from cbir.cli import main
from cbir.errors import CbirError
from cbir.files import WriteError, atomic_path, writing
from cbir.layout import WORK

OLD, NEW = ("cat", "coffee", "rocket", "bricks"), ("astronaut", "camera", "grass", "gravel", "retina")


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> tuple[Path, Path]:
    """An index of 16 photos, and its folder grown to 36 since (an update has 20 to add)."""
    root = tmp_path_factory.mktemp("grown") / "photos"
    for name in OLD:
        shutil.copytree(samples / name, root / name)
    out = root.parent / "idx"
    assert main(["index", str(root), "--out", str(out), "--device", "cpu", "--precision", "fp32", "-q"]) == 0
    for name in NEW:
        shutil.copytree(samples / name, root / name)
    return root, out


def _update(root: Path, out: Path, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def limited() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "cbir", "index", str(root), "--out", str(out), "--update", "-q",
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=600,
                          preexec_fn=limited, env=dict(os.environ))


def test_a_failed_write_is_one_line_loses_nothing_and_the_same_command_resumes(grown: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    root, shared = grown
    out = tmp_path / "idx"
    shutil.copytree(shared, out)
    # batches of 4 pictures (~130 KB each with their local features) fit under the limit; the new segment of 20 not
    failed = _update(root, out, "--batch-size", "4", limit=320 * 1024)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr and "Exception" not in failed.stderr, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("cbir: error:")]
    assert len(errors) == 1 and errors[0] == failed.stderr.strip().splitlines()[-1], failed.stderr
    line = errors[0]
    assert re.match(rf"cbir: error: cannot write {re.escape(str(out))}/seg-\d{{6}}\.h5: the file would grow past the "
                    r"largest size this process may write", line), line
    assert re.search(r"\(about [\d.]+ [KM]B needed, [\d.]+ [KMG]B free there\)\. Nothing was lost", line), line
    assert "run the same command again: it resumes" in line
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no half-written file left beside the index

    old = Index.open(out)  # the old index, untouched and searchable
    five = int(old.rows().ids[5])
    assert len(old) == 16 and old.search_vector(old.vector_of(five), k=1)[0].id == five
    assert len(list((out / WORK).glob("chunk-*.npz"))) == 5  # the 20 new photos, embedded and kept

    again = _update(root, out)
    assert again.returncode == 0, again.stderr
    assert "resumed: 20 images were already embedded by an interrupted run; 0 embedded now" in again.stdout
    new = Index.open(out)
    assert len(new) == 36 and np.allclose(new.vector_of(new.id_of("cat/chelsea.jpg")),
                                          old.vector_of(old.id_of("cat/chelsea.jpg")), atol=2e-3)
    assert new.features_of([new.id_of("camera/camera.jpg")])[0] is not None  # the resumed rows kept theirs


@pytest.fixture
def small_fs(tmp_path: Path):
    """mount(size, options) -> a tmpfs of `size` bytes at a fresh folder (skipped where mounting is not allowed)."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = []

    def mount(size: int, options: str = "") -> Path:
        opts = f"size={size},{options}" if options else f"size={size}"
        verb = ["-o", f"remount,{options}"] if mounted else ["-t", "tmpfs", "-o", opts, "tmpfs"]
        done = subprocess.run(["mount", *verb, str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a small file system needs root here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_and_a_read_only_one_for_real(grown: tuple[Path, Path], small_fs) -> None:
    root, shared = grown
    old_bytes = sum(f.stat().st_size for f in shared.iterdir() if f.is_file())
    per_row = max(f.stat().st_size for f in shared.glob("seg-*.h5")) // 16
    size = old_bytes + 20 * per_row + 10 * per_row  # the old index and the 20 new batched rows fit, the new segment
    # (its rows, or its FAISS file after them) not
    fs = small_fs(size)
    out = fs / "idx"
    shutil.copytree(shared, out)
    full = _update(root, out)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    line = full.stderr.strip().splitlines()[-1]
    assert re.match(rf"cbir: error: cannot write {re.escape(str(out))}/seg-\d{{6}}\.(h5|faiss): no space left on the "
                    r"device \(about [\d.]+ [KM]B needed, [\d.]+ KB free there\)\. Nothing was lost", line), line
    assert len(Index.open(out)) == 16 and len(list((out / WORK).glob("chunk-*.npz"))) >= 2

    small_fs(size, "ro")
    refused = _update(root, out)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "the file system is read-only" in refused.stderr.strip().splitlines()[-1]
    assert len(Index.open(out)) == 16


@pytest.mark.parametrize(("code", "words"), [
    (errno.EDQUOT, "the disk quota is used up"),
    (errno.EACCES, "permission denied"),
    (errno.EPERM, "operation not permitted"),
])
def test_every_kind_of_refused_write_gets_its_words(tmp_path: Path, code: int, words: str) -> None:
    """The kinds this machine cannot produce for real (no quotas; root may write anywhere) are raised by the writer
    itself, as the C library reports them."""
    with pytest.raises(WriteError) as caught, atomic_path(tmp_path / "vectors.h5", needed=3 * 2**20) as tmp:
        tmp.write_bytes(b"x")
        raise OSError(code, os.strerror(code), str(tmp))
    text = str(caught.value)
    assert text.startswith(f"cannot write {tmp_path / 'vectors.h5'}: {words} (about 3.0 MB needed, ")
    assert isinstance(caught.value, CbirError) and isinstance(caught.value, OSError)
    assert caught.value.errno == code and not list(tmp_path.iterdir())


def test_library_errors_are_read_for_their_errno(tmp_path: Path) -> None:
    """h5py and FAISS report a failed write in their own words; the errno in them is what counts."""
    with pytest.raises(WriteError, match="no space left on the device"), writing(tmp_path):
        raise OSError("Can't synchronously write data (file write failed: time = Mon, filename = 'x.h5', file "
                      "descriptor = 5, errno = 28, error message = 'No space left on device')")
    with pytest.raises(WriteError, match="would grow past"), writing(tmp_path):
        raise RuntimeError("Error in faiss::FileIOWriter: write error: File too large")
    with pytest.raises(RuntimeError, match="something else"), writing(tmp_path):
        raise RuntimeError("something else")
