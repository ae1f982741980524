"""Building, storing and searching an index: real HDF5, real FAISS, the real default encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest

from cbir import CbirError, Index
from tests.badfiles import EXPECTED_OK, EXPECTED_SKIPS
from tests.helpers import segment_files, vector_search


def test_schema_of_the_index_files(sample_index: Index) -> None:
    manifest = json.loads((sample_index.directory / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["generation"] >= 1 and len(manifest["segments"]) == 1
    for key in ("encoder", "root", "index_type", "vector_dtype", "expansion", "words"):
        assert key in manifest["settings"], key
    path, faiss_path = segment_files(sample_index.directory)
    with h5py.File(path, "r") as f:
        n = f["vectors"].shape[0]
        assert manifest["next_id"] == n and manifest["segments"][0]["rows"] == n
        assert f["vectors"].dtype == np.float32 and f["vectors"].shape == (n, 1280)
        assert f["ids"].dtype == np.int64 and f["mtime_ns"].dtype == np.int64 and f["size"].dtype == np.int64
        assert h5py.check_string_dtype(f["paths"].dtype).encoding == "utf-8"
        for key in ("dim", "cbir_version", "created", "search", "complete"):
            assert key in f.attrs, key
        cfg = manifest["settings"]["encoder"]
        assert cfg["name"] == "efficientnet_lite0"
        assert len(cfg["weights"]["sha256"]) == 64 and cfg["preprocess"]["size"] == 224
        assert {"torch", "torchvision", "timm", "cbir"} <= set(cfg["versions"])
        vectors = f["vectors"][()]
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert len(set(f["ids"][()].tolist())) == n
        assert all(s > 0 for s in f["size"][()]) and all(m > 0 for m in f["mtime_ns"][()])
    index = faiss.read_index(str(faiss_path))
    assert index.ntotal == n and index.d == 1280


def test_every_bad_file_is_skipped_with_its_reason_and_the_rest_indexed(sample_index: Index) -> None:
    skipped = dict(sample_index.skipped)
    for name, words in EXPECTED_SKIPS.items():
        assert words in skipped[f"bad/{name}"], (name, skipped.get(f"bad/{name}"))
    paths = set(sample_index.rows().paths)
    for name in EXPECTED_OK:
        assert f"bad/{name}" in paths
    assert sum(p.startswith("photos/") for p in paths) == 36
    assert not any("@eaDir" in p or ".hidden" in p or p.endswith(".txt") for p in paths)
    assert len(paths) + len([p for p in skipped if p.startswith("bad/")]) == 36 + len(EXPECTED_OK) + len(EXPECTED_SKIPS)


def test_every_indexed_image_finds_itself_first(sample_index: Index) -> None:
    root = sample_index.root
    for path in sample_index.rows().paths:
        if not path.startswith("photos/"):
            continue
        top = sample_index.search(root / path, k=3)
        assert top[0].path == path and top[0].score > 0.999, (path, top)
        assert [r.rank for r in top] == [1, 2, 3] and top[0].score >= top[1].score >= top[2].score


def test_variants_of_a_photo_rank_above_other_photos(sample_index: Index) -> None:
    results = sample_index.search(sample_index.root / "photos/cat/chelsea.jpg", k=4)
    assert {r.path for r in results} == {f"photos/cat/chelsea{s}.jpg" for s in ("", "_crop", "_mirror", "_rotated")}


def test_search_by_id_matches_search_by_file(sample_index: Index) -> None:
    pos = sample_index.rows().paths.index("photos/coffee/coffee.jpg")
    id_ = int(sample_index.rows().ids[pos])
    by_id = sample_index.search_id(id_, k=5)
    by_file = sample_index.search(sample_index.root / "photos/coffee/coffee.jpg", k=6)[1:]
    assert [r.id for r in by_id] == [r.id for r in by_file]
    assert id_ not in [r.id for r in by_id]
    with pytest.raises(CbirError, match="no image with id"):
        sample_index.search_id(10**9)


def test_k_larger_than_collection_and_bad_k(sample_index: Index) -> None:
    results = sample_index.search_id(int(sample_index.rows().ids[0]), k=10_000)
    assert len(results) == len(sample_index) - 1
    with pytest.raises(CbirError, match="k must be"):
        sample_index.search_id(int(sample_index.rows().ids[0]), k=0)


def test_bad_query_images_are_clear_errors(sample_index: Index, tmp_path: Path) -> None:
    with pytest.raises(CbirError, match="not found"):
        sample_index.search(tmp_path / "missing.jpg")
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(CbirError, match="not an image"):
        sample_index.search(tmp_path / "x.png")
    with pytest.raises(CbirError, match="empty"):
        sample_index.search(b"")


def test_indexing_is_deterministic(sample_index: Index, good_and_bad: Path, tmp_path: Path) -> None:
    again = Index.build(good_and_bad / "photos", out=tmp_path / "again", device="cpu", batch_size=5, workers=2)
    ref = {p: sample_index.rows().vectors[i] for i, p in enumerate(sample_index.rows().paths)}
    assert again.rows().paths == sorted(again.rows().paths)
    for i, p in enumerate(again.rows().paths):
        np.testing.assert_allclose(again.rows().vectors[i], ref["photos/" + p], atol=2e-5)


def test_existing_index_is_refused_then_rebuilt(good_and_bad: Path, tmp_path: Path) -> None:
    out = tmp_path / "cats"
    Index.build(good_and_bad / "photos" / "cat", out=out, device="cpu")
    with pytest.raises(CbirError, match="already holds an index.*--rebuild"):
        Index.build(good_and_bad / "photos" / "coffee", out=out, device="cpu")
    assert Index.open(out).rows().paths[0] == "chelsea.jpg"  # untouched by the refused run
    Index.build(good_and_bad / "photos" / "coffee", out=out, device="cpu", rebuild=True)
    assert Index.open(out).rows().paths[0] == "coffee.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cats"]  # no temporary folders left


def test_failed_build_leaves_no_partial_index(tmp_path: Path, good_and_bad: Path) -> None:
    with pytest.raises(CbirError, match="folder not found"):
        Index.build(tmp_path / "nowhere", out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_stale_faiss_file_is_detected_and_search_stays_correct(sample_index: Index, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sample_index.directory, copy)
    vector_search(sample_index.rows().vectors[:5], np.arange(5)).save(segment_files(copy)[1])
    with pytest.warns(UserWarning, match="does not match"):
        reopened = Index.open(copy)
    assert sum(s.search.ntotal for s in reopened.generation.segments) == len(sample_index)
    q = sample_index.rows().vectors[7]
    assert reopened.search_vector(q, k=1)[0].id == int(sample_index.rows().ids[7])


def test_incomplete_vectors_file_is_refused(sample_index: Index, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sample_index.directory, copy)
    with h5py.File(segment_files(copy)[0], "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(CbirError, match="incomplete"):
        Index.open(copy)
    with pytest.raises(CbirError, match="no index at"):
        Index.open(tmp_path / "nothing-here")


def test_moved_index_still_opens_and_searches(sample_index: Index, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "idx"
    shutil.copytree(sample_index.directory, moved)
    index = Index.open(moved)
    v = sample_index.rows().vectors[3]
    assert index.search_vector(v, k=1)[0].path == sample_index.rows().paths[3]


def test_a_folder_without_images_writes_no_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CbirError, match="found no image to index in .*empty .*; it is empty. Nothing was written"):
        Index.build(tmp_path / "empty", out=tmp_path / "idx", device="cpu")
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    for name in ("readme.txt", "sub/table.csv", ".DS_Store"):
        (notes / name).write_text("not a picture")
    with pytest.raises(CbirError, match=r"left out: 1 .csv \(not an image\); 1 .txt \(not an image\); 1 hidden, "
                                        r"system or excluded. Nothing was written"):
        Index.build(notes, out=tmp_path / "idx", device="cpu")
    assert not (tmp_path / "idx").exists()


def test_a_folder_of_unreadable_images_writes_no_index(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"this is text, not a jpeg")
    (tmp_path / "bad" / "b.png").write_bytes(b"")
    with pytest.raises(CbirError, match=r"none of the 2 image files in .*bad could be read: a.jpg \(not an image.*\); "
                                        r"b.png \(empty file \(0 bytes\)\). No index was written"):
        Index.build(tmp_path / "bad", out=tmp_path / "idx", device="cpu")
    assert not (tmp_path / "idx" / "vectors.h5").exists()


def test_faiss_file_with_same_ids_but_other_vectors_is_caught(sample_index: Index, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sample_index.directory, copy)
    v = sample_index.rows().vectors
    vector_search(v[::-1].copy(), sample_index.rows().ids).save(segment_files(copy)[1])
    with pytest.warns(UserWarning, match="does not match"):
        reopened = Index.open(copy)
    assert reopened.search_vector(v[2], k=1)[0].id == int(sample_index.rows().ids[2])
