"""The on-disk index: built shard by shard it answers as one built in one piece, exactly at nprobe = nlist, and an
index folder holding one opens without reading its vectors or paths (real FAISS, real HDF5 files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.index import Index
from cbir.layout import FAISS, VECTORS
from cbir.search import ondisk
from cbir.search import store as store_mod
from cbir.search.plan import ON_DISK_RECALL, ONDISK, SearchPlan, exact_top
from cbir.search.searcher import VectorSearch
from cbir.search.writer import IndexWriter, RowBlock

N, DIM = ondisk.MIN_VECTORS, 32


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, DIM))
    x = centres[rng.integers(0, 100, N)] + 0.7 * rng.standard_normal((N, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _search(folder: Path, x: np.ndarray, nprobe: int, k_factor: int) -> VectorSearch:
    plan = SearchPlan(ONDISK, {"nprobe": nprobe, "k_factor": k_factor})
    return VectorSearch(ondisk.load(folder / FAISS), plan, exact_rows=lambda ids: x[ids])


def test_four_shards_answer_as_one_piece_and_as_exact_search(vectors, tmp_path):
    built = {}
    for name, shard_rows in (("four", N // 4), ("one", N)):
        folder = tmp_path / name
        folder.mkdir()
        _, data = ondisk.build(vectors, folder / FAISS, folder, shard_rows=shard_rows)
        assert data.is_file() and data.parent == folder
        assert not list(folder.glob(".shards-*")), "shard files are temporary"
        built[name] = (folder, None)
    queries = vectors[:300]
    nlist = ondisk.layout_for(N, DIM).nlist
    four = _search(built["four"][0], vectors, 8, 4).search(queries, 10)
    one = _search(built["one"][0], vectors, 8, 4).search(queries, 10)
    np.testing.assert_array_equal(four[1], one[1])
    np.testing.assert_allclose(four[0], one[0], atol=1e-6)
    assert _search(built["four"][0], vectors, 8, 4).search(queries, 10)[1].min() >= 0
    # every list probed, and enough candidates re-ranked with the exact vectors: exact search
    _, ids = _search(built["four"][0], vectors, nlist, 50).search(queries, 10)
    truth = exact_top(vectors, queries, 10)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(truth, axis=1))


def test_an_on_disk_index_opens_without_reading_its_columns(vectors, tmp_path):
    """An on-disk index as the previous version wrote it (vectors.h5 + faiss.index): it opens lazily, answers, and
    takes an update as a new segment encoded with its trained index, its own files untouched."""
    out = tmp_path / "idx"
    out.mkdir()
    config = {"name": "synthetic", "dim": DIM, "pooling": "none", "weights": {"source": "none", "sha256": ""}}
    attrs = {"encoder": "synthetic", "encoder_config": json.dumps(config), "root": str(tmp_path),
             "vector_dtype": "float16", "created": store_mod.now_iso()}
    writer = store_mod.VectorWriter(out / VECTORS, DIM, attrs, dtype="float16", rows=N)
    for start in range(0, N, 4096):  # shard by shard, as the commit stage writes
        part = vectors[start:start + 4096]
        zeros = np.zeros(len(part), np.int64)
        writer.append(part.astype(np.float16), [f"img/{i:06d}.jpg" for i in range(start, start + len(part))],
                      zeros, zeros, ids=range(start, start + len(part)))
    writer.close({"ids_are_rows": True})
    plan = ondisk.build_index(out / VECTORS, out / FAISS, shard_rows=N // 4)
    assert plan.type == ONDISK and plan.recall_at_10 >= ON_DISK_RECALL and plan.queries > 0
    store_mod.set_attrs(out / VECTORS, {"search": json.dumps(plan.to_dict())})

    index = Index.open(out)
    assert index.generation.lazy and isinstance(index.rows().vectors, np.memmap)
    assert isinstance(index.rows().ids, range) and not isinstance(index.rows().paths, list)
    assert len(index) == N and index.generation.segments[0].search.plan.type == ONDISK
    results = index.search_vector(vectors[123], k=10)
    assert results[0].id == 123 and results[0].path == "img/000123.jpg"
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    truth = exact_top(vectors, vectors[123:124], 10)[0]
    assert len({r.id for r in results} & set(truth.tolist())) >= 9
    more = index.search_id(77, k=5)
    assert 77 not in [r.id for r in more] and len(more) == 5
    assert index.path_of(9999) == "img/009999.jpg"
    info = index.info()
    assert info["search"]["type"] == ONDISK and info["images"] == N
    from cbir.duplicates import find_duplicates

    with pytest.raises(CbirError, match="on-disk"):
        find_duplicates(index)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.suffix in (".h5", ".index")}
    extra = vectors[:500] * np.float32(-1.0)  # rows unlike any indexed one
    writer = IndexWriter(out, index.manifest)
    ids = writer.new_ids(len(extra))
    writer.add_segment(len(extra), [RowBlock(ids=ids, paths=[f"new/{i}.jpg" for i in ids], vectors=extra,
                                             mtime_ns=np.zeros(500, np.int64), size=np.zeros(500, np.int64),
                                             sha256=[""] * 500)])
    writer.commit()
    assert index.refresh() and len(index) == N + 500
    added = index.generation.segments[1]
    assert added.search.plan.type == ONDISK and "trained index" in added.search.plan.note
    assert index.search_vector(extra[7], k=1)[0].path == f"new/{ids[7]}.jpg"
    assert {name: (out / name).read_bytes() for name in before} == before


def test_an_index_without_its_data_file_is_a_clear_error(vectors, tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    _, data = ondisk.build(vectors, folder / FAISS, folder, shard_rows=N)
    data.unlink()
    with pytest.raises(CbirError, match="rebuild"):
        ondisk.load(folder / FAISS)


def test_auto_goes_on_disk_only_above_the_memory_budget():
    from indexer.options import BuildOptions
    from indexer.run import _on_disk

    assert _on_disk(BuildOptions(memory_budget=10 * 2**20), None, rows=10_000, dim=1280)  # 51 MB > 10 MB
    assert not _on_disk(BuildOptions(memory_budget=100 * 2**20), None, rows=10_000, dim=1280)
    assert not _on_disk(BuildOptions(memory_budget=10 * 2**20, index_type="flat"), None, rows=10_000, dim=1280)
    assert _on_disk(BuildOptions(on_disk=True), None, rows=10, dim=8)


def test_on_disk_for_a_small_collection_is_a_clear_error_and_keeps_the_old_index(samples, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "idx"
    first = subprocess.run([sys.executable, "-m", "cbir", "index", str(samples), "--out", str(out), "-q",
                            "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    again = subprocess.run([sys.executable, "-m", "cbir", "index", str(samples), "--out", str(out), "-q",
                            "--rebuild", "--on-disk", "--precision", "fp32"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode != 0 and "at least 10,000 images" in again.stderr and "Traceback" not in again.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"} == before
    assert len(Index.open(out, device="cpu")) > 0


def _block(ids: np.ndarray, x: np.ndarray) -> RowBlock:
    zeros = np.zeros(len(ids), np.int64)
    return RowBlock(ids=ids, paths=[f"img/{i:06d}.jpg" for i in ids], vectors=x.astype(np.float16), mtime_ns=zeros,
                    size=zeros, sha256=[""] * len(ids))


def test_updates_of_an_on_disk_index_are_searched_as_one_index(vectors, tmp_path):
    """A base segment and two updates encoded with its trained index are searched in one coarse pass
    (cbir/search/ondisk_group.py): with every list probed and every candidate re-ranked the answers are exactly the
    top-10 over the live rows of all three, deleted rows never among them; at the tuned settings close to it."""
    from cbir.search import ondisk_group
    from cbir.search.manifest import Manifest, Settings

    out = tmp_path / "idx"
    out.mkdir()
    config = {"name": "synthetic", "dim": DIM, "pooling": "none", "weights": {"source": "none", "sha256": ""}}
    settings = Settings(encoder=config, root=str(tmp_path), index_type="ivfpq", vector_dtype="float16", on_disk=True)
    rng = np.random.default_rng(1)
    extra = vectors[rng.permutation(N)[:1000]] + 0.05 * rng.standard_normal((1000, DIM)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    everything = np.vstack([vectors, extra])
    writer = IndexWriter(out, Manifest(generation=0, settings=settings))
    writer.add_segment(N, [_block(writer.new_ids(N), vectors)])
    manifest = writer.commit()
    for part in (extra[:500], extra[500:]):
        writer = IndexWriter(out, manifest)
        writer.add_segment(len(part), [_block(writer.new_ids(len(part)), part)])
        manifest = writer.commit()
    gone = np.concatenate([np.arange(0, 2000, 7), np.arange(N, N + 1000, 5)])
    writer = IndexWriter(out, manifest)
    writer.delete(gone)
    writer.commit()
    index = Index.open(out)
    gen = index.generation
    assert len(gen.segments) == 3 and ondisk_group.groups(gen.segments) == [[0, 1, 2]]
    live = np.setdiff1d(np.arange(N + 1000), gone)
    queries = everything[::97][:60]
    tuned = np.array([[r.id for r in index.search_vector(q, k=10)] for q in queries])
    assert not np.isin(tuned, gone).any()
    truth = live[exact_top(everything[live], queries, 10)]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tuned, truth, strict=True)]) >= 0.9
    for seg in gen.segments:  # every list, every candidate: exact
        seg.search.plan.params.update(nprobe=ondisk.layout_for(N, DIM).nlist, k_factor=400)
    _, ids = gen.search(queries, 10)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(truth, axis=1))
