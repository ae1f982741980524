"""A live index: segments plus a commit point. Updates write only what changed and search over the segments answers
as one index built from scratch; deleted rows never come back; merges keep ids; an index of the previous version opens
(real HDF5 files, real FAISS, the real pipeline; the colour-histogram encoder keeps it fast: exactness does not depend
on the encoder)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cbir import Index
from cbir.search import manifest as manifest_mod
from cbir.search import policy
from cbir.search.manifest import Manifest, Settings
from cbir.search.segments import Generation
from cbir.search.writer import IndexWriter, RowBlock
from indexer import BuildOptions, build
from tests.badfiles import jpeg_bytes, photo

ENCODER = "colour_histogram"


def folder_of(root: Path, seeds: range, size: tuple[int, int] = (64, 48)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (root / f"img{s:04d}.jpg").write_bytes(jpeg_bytes(photo(size, seed=s)))
    return root


def same_answers(a: Index, b: Index, queries: np.ndarray, k: int = 10) -> None:
    """Exact indexes over the same files: the same top-k paths and the same scores for every query."""
    for q in queries:
        got, want = a.search_vector(q, k=k), b.search_vector(q, k=k)
        assert [r.path for r in got] == [r.path for r in want]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-6)


def test_updates_write_segments_and_search_answers_as_a_fresh_build(tmp_path: Path) -> None:
    data = folder_of(tmp_path / "data", range(40))
    out = tmp_path / "idx"
    Index.build(data, out=out, encoder=ENCODER, device="cpu")
    first = {f.name: f.stat().st_mtime_ns for f in out.glob("seg-*")}
    (data / "img0003.jpg").unlink()
    (data / "img0004.jpg").unlink()
    (data / "img0005.jpg").rename(data / "renamed.jpg")
    (data / "img0006.jpg").write_bytes(jpeg_bytes(photo((64, 48), seed=999)))
    folder_of(data, range(100, 105))
    summary = build(data, out, BuildOptions(mode="update", device="cpu"))
    index = Index.open(out)
    assert len(index.manifest.segments) == 2 and index.manifest.deleted == 4  # 2 removed, 1 renamed, 1 changed
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("seg-000001.*") if ".del-" not in f.name} == \
        {k: v for k, v in first.items() if k.startswith("seg-000001.")}  # no existing segment file rewritten
    assert (out / "seg-000001.del-000002.npy").is_file()  # its deletions are a file of their own
    renamed = index.id_of("renamed.jpg")
    assert renamed is not None and renamed >= 40  # a new row ...
    np.testing.assert_array_equal(index.vector_of(renamed), Index.open(out).vector_of(renamed))
    assert index.id_of("img0006.jpg") == 6  # a changed file keeps its id
    (data / "img0010.jpg").unlink()
    Index.build(data, out=out, update=True, device="cpu")
    index = Index.open(out)
    fresh = Index.build(data, out=tmp_path / "fresh", encoder=ENCODER, device="cpu")
    assert sorted(index.rows().paths) == sorted(fresh.rows().paths), set(index.rows().paths) ^ set(fresh.rows().paths)
    assert len(index) == len(fresh) == 42
    same_answers(index, fresh, np.asarray(fresh.rows().vectors)[::3])
    assert summary.renamed == 1 and summary.embedded == 6  # the renamed file was not embedded again


def test_deleted_rows_never_come_back_even_when_they_were_the_whole_top_k(tmp_path: Path) -> None:
    data = folder_of(tmp_path / "data", range(30))
    index = Index.build(data, out=tmp_path / "idx", encoder=ENCODER, device="cpu")
    q = index.vector_of(7)
    top = [r.id for r in index.search_vector(q, k=12)]
    gone = top[:10]
    assert index.remove(gone) == 10 and len(index) == 20
    got = index.search_vector(q, k=10)
    assert len(got) == 10 and not {r.id for r in got} & set(gone)
    assert [r.id for r in got] == top[10:12] + [r.id for r in got][2:]  # the next best come up, in order
    with pytest.raises(Exception, match="no image with id"):
        index.vector_of(gone[0])
    reopened = Index.open(index.directory)
    assert [r.id for r in reopened.search_vector(q, k=10)] == [r.id for r in got]
    assert gone[0] not in set(np.asarray(reopened.ids()).tolist())


def test_api_add_remove_compact_keep_ids_and_files(tmp_path: Path) -> None:
    data = folder_of(tmp_path / "data", range(12))
    index = Index.build(data, out=tmp_path / "idx", encoder=ENCODER, device="cpu")
    upload = jpeg_bytes(photo((64, 48), seed=500))
    added = index.add([upload, data / "img0002.jpg"])
    assert added[0].new and added[0].path.startswith("cbir-uploads/") and not added[1].new and added[1].id == 2
    assert index.search(upload, k=1)[0].id == added[0].id  # searchable when add returns
    assert index.add([upload])[0].id == added[0].id  # the same bytes again: the same image
    own = index.id_of("img0009.jpg")
    assert index.remove([added[0].id, own]) == 2
    assert not (data / added[0].path).exists() and (data / "img0009.jpg").exists()  # only the upload is deleted
    assert index.manifest.removed.keys() == {"img0009.jpg"}
    summary = build(data, index.directory, BuildOptions(mode="update", device="cpu"))
    assert summary.embedded == 0 and Index.open(index.directory).id_of("img0009.jpg") is None  # kept out
    ids_before = dict(zip(index.rows().paths, np.asarray(index.rows().ids).tolist(), strict=True))
    index.compact()
    assert len(index.manifest.segments) == 1 and index.manifest.deleted == 0
    assert dict(zip(index.rows().paths, np.asarray(index.rows().ids).tolist(), strict=True)) == ids_before
    assert sorted(f.name for f in index.directory.glob("seg-*")) == \
        sorted(f for e in index.manifest.segments for f in e.files())
    os.utime(data / "img0009.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changes: it comes back
    Index.build(data, out=index.directory, update=True, device="cpu")
    assert Index.open(index.directory).id_of("img0009.jpg") is not None


def _settings(dim: int) -> Settings:
    return Settings(encoder={"name": "test", "dim": dim}, root="/nowhere")


def _block(ids: np.ndarray, x: np.ndarray) -> RowBlock:
    n = len(ids)
    return RowBlock(ids=ids, paths=[f"p{i}.jpg" for i in ids], vectors=x, mtime_ns=np.ones(n, np.int64),
                    size=np.ones(n, np.int64), sha256=[""] * n)


def _add_rows(folder: Path, manifest: Manifest, vectors: dict[int, np.ndarray], rng: np.random.Generator,
              dim: int) -> tuple[Manifest, np.ndarray]:
    """A write of 5 random rows as a new segment (their vectors noted in `vectors`)."""
    writer = IndexWriter(folder, manifest)
    ids = writer.new_ids(5)
    x = rng.normal(size=(5, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vectors.update(zip(ids.tolist(), x, strict=True))
    writer.add_segment(5, [_block(ids, x)])
    return writer.commit(), ids


def test_merge_policy_merges_a_full_tier_and_keeps_every_id(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim = 16
    manifest = Manifest(generation=0, settings=_settings(dim))
    manifest_mod.save(tmp_path, manifest)
    vectors: dict[int, np.ndarray] = {}
    for _ in range(policy.PER_TIER - 1):
        manifest, ids = _add_rows(tmp_path, manifest, vectors, rng, dim)
        writer = IndexWriter(tmp_path, manifest)  # a later write deletes one of its rows
        writer.delete([int(ids[0])])
        vectors.pop(int(ids[0]))
        manifest = writer.commit()
    assert len(manifest.segments) == policy.PER_TIER - 1 and policy.merges(manifest.segments) == []
    manifest, _ = _add_rows(tmp_path, manifest, vectors, rng, dim)
    manifest = policy.merge_small(tmp_path, manifest)
    assert len(manifest.segments) == 1 and manifest.deleted == 0
    gen = Generation.open(tmp_path)
    live = np.asarray(gen.ids())
    assert len(live) == manifest.live == len(vectors) == 4 * (policy.PER_TIER - 1) + 5
    for i in live:
        np.testing.assert_allclose(gen.vectors_of([int(i)])[0], vectors[int(i)], atol=1e-6)


def legacy_index(out: Path, data: Path) -> Path:
    """An index folder exactly as the previous version wrote it: vectors.h5 with the index's facts in its attributes
    and faiss.index beside it (no manifest), made with that version's writer calls."""
    from cbir.encoders import create
    from cbir.images import load_image
    from cbir.search import store, tuning
    from cbir.search.searcher import VectorSearch
    from cbir.words import Words

    enc = create(ENCODER, device="cpu")
    paths = sorted(p.name for p in data.glob("*.jpg"))
    x = enc.embed([load_image(data / p) for p in paths])
    out.mkdir(parents=True)
    attrs = {"encoder": ENCODER, "encoder_config": json.dumps(enc.config, sort_keys=True), "root": str(data.resolve()),
             "cbir_version": "0.1.0", "created": "2026-11-30T10:00:00+0000", "vector_dtype": "float32", "preset": ""}
    writer = store.VectorWriter(out / "vectors.h5", enc.dim, attrs, rows=len(paths))
    st = [(data / p).stat() for p in paths]
    writer.append(x, paths, [s.st_mtime_ns for s in st], [s.st_size for s in st],
                  sha256=[store_hash(data / p) for p in paths])
    index, plan = tuning.build(x, np.arange(len(paths)))
    writer.close({"seconds": 1.0, "skipped_count": 0, "ids_are_rows": True,
                  "search": json.dumps(plan.to_dict()), "expansion": json.dumps({"qe_k": 0, "qe_alpha": 3.0,
                                                                                  "dba_k": 0, "dba_alpha": 3.0}),
                  "words": json.dumps(Words().to_dict())})
    VectorSearch(index, plan).save(out / "faiss.index")
    return out


def store_hash(path: Path) -> str:
    from cbir.files import sha256_file

    return sha256_file(path)


def test_an_index_of_the_previous_version_opens_updates_and_compacts(tmp_path: Path) -> None:
    data = folder_of(tmp_path / "data", range(20))
    old = legacy_index(tmp_path / "old", data)
    before = (old / "vectors.h5").read_bytes()
    index = Index.open(old)
    assert len(index) == 20 and index.manifest.legacy and index.search_vector(index.vector_of(3), k=1)[0].id == 3
    folder_of(data, range(50, 53))
    (data / "img0001.jpg").unlink()
    Index.build(data, out=old, update=True, device="cpu")
    assert (old / "vectors.h5").read_bytes() == before  # the old segment is kept as it is
    updated = Index.open(old)
    assert len(updated) == 22 and len(updated.manifest.segments) == 2 and updated.id_of("img0001.jpg") is None
    fresh = Index.build(data, out=tmp_path / "fresh", encoder=ENCODER, device="cpu")
    same_answers(updated, fresh, np.asarray(fresh.rows().vectors)[::2])
    updated.compact()
    assert not (old / "vectors.h5").exists() and not (old / "faiss.index").exists()
    same_answers(Index.open(old), fresh, np.asarray(fresh.rows().vectors)[::2])


def test_a_server_picks_up_a_new_generation_opening_only_new_segments(tmp_path: Path) -> None:
    data = folder_of(tmp_path / "data", range(10))
    out = tmp_path / "idx"
    Index.build(data, out=out, encoder=ENCODER, device="cpu")
    reader = Index.open(out)
    first = reader.generation.segments[0]
    writer = Index.open(out)
    writer.add([jpeg_bytes(photo((64, 48), seed=77))])
    assert reader.refresh() and len(reader) == 11
    assert reader.generation.segments[0].store is first.store  # not read again
    assert not reader.refresh()


def test_every_reader_works_on_a_segmented_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """More like this, a region, copies first, duplicates, cbir info and the page, on an index of three segments with
    deleted rows."""
    from cbir.cli import main
    from cbir.copies import rank_copies_first
    from cbir.duplicates import find_duplicates
    from cbir.images import load_image
    from webui import create_app

    data = folder_of(tmp_path / "data", range(16), size=(160, 120))
    out = tmp_path / "idx"
    Index.build(data, out=out, encoder=ENCODER, device="cpu")
    (data / "copy-of-3.jpg").write_bytes((data / "img0003.jpg").read_bytes())  # byte-identical, another segment
    (data / "img0005.jpg").unlink()
    Index.build(data, out=out, update=True, device="cpu")
    index = Index.open(out)
    index.add([jpeg_bytes(photo((160, 120), seed=3).rotate(90, expand=True))])  # an edited copy, a third segment
    assert len(index.manifest.segments) == 3 and index.manifest.deleted == 1
    three = index.id_of("img0003.jpg")
    assert [r.path for r in index.search_id(three, k=2)][0] == "copy-of-3.jpg"
    assert index.search_id(three, k=1, box=(0, 0, 80, 60))[0].id != three
    ranked = rank_copies_first(index, load_image(data / "img0003.jpg"), k=3)
    assert {r.path for r, e in ranked if e.verified} >= {"copy-of-3.jpg"}
    found = find_duplicates(index)
    assert [sorted(m["path"] for m in g) for g in found["identical"]] == [["copy-of-3.jpg", "img0003.jpg"]]
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "segments  3 (generation 3; 1 deleted rows" in shown and "seg-000003" in shown
    page = create_app({"INDEXES": [str(out)], "DEVICE": "cpu"}).test_client().get("/")
    assert page.status_code == 200 and b"img0005.jpg" not in page.data and b"copy-of-3.jpg" in page.data
