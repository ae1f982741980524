"""Search index kinds: exact numpy/faiss agreement, auto selection, measured recall, plans stored and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest

from cbir import Index
from cbir.cli import main
from cbir.errors import CbirError
from cbir.search.plan import EXACT_UP_TO, HeldOut, SearchPlan, nlist_for
from cbir.search.searcher import VectorSearch, exact_numpy
from cbir.search.tuning import pq_subquantizers
from tests.helpers import segment_files, vector_search


def clustered(n: int, d: int, clusters: int = 100, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_numpy_matches_faiss_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(3000, 48)
    q = clustered(7, 48, seed=1)
    flat = faiss.IndexFlatIP(48)
    flat.add(x)
    fs, fi = flat.search(q, 10)
    ns, ni = exact_numpy(x, q, 10)
    assert np.array_equal(fi, ni)
    np.testing.assert_allclose(fs, ns, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr("cbir.search.searcher.SIMS_BUDGET", 3000 * 3)  # 3 queries per block: blocks must not matter
    bs, bi = exact_numpy(x, q, 10)
    assert np.array_equal(bi, ni)
    np.testing.assert_allclose(bs, ns, rtol=1e-5, atol=1e-6)
    s, i = exact_numpy(x[:4], q[:1], 4)  # k == N: everything, sorted
    assert sorted(i[0].tolist()) == [0, 1, 2, 3] and np.all(np.diff(s[0]) <= 0)


def test_single_and_batched_queries_agree_and_return_rows() -> None:
    x = clustered(2000, 32)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3
    vs = vector_search(x, ids)
    _, one = vs.search(x[5], 10)  # numpy path
    _, many = vs.search(np.repeat(x[5:6], 40, axis=0), 10)  # above NUMPY_MAX_BATCH: faiss
    assert one[0, 0] == 5 and np.array_equal(one[0], many[0]) and np.array_equal(many[0], many[-1])
    scores, got = vs.search(x[:1], 2005)  # k beyond N: padded
    assert (got[0, 2000:] == -1).all() and np.isinf(scores[0, 2000:]).all()


def test_auto_is_exact_for_small_collections_and_ivf_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(4000, 32)
    ids = np.arange(4000, dtype=np.int64)
    small = vector_search(x, ids, index_type="auto")
    assert small.plan.type == "flat" and small.exact and small.plan.requested == "auto"
    monkeypatch.setattr("cbir.search.tuning.EXACT_UP_TO", 3000)
    big = vector_search(x, ids, index_type="auto")
    assert big.plan.type == "ivf" and big.plan.requested == "auto"
    assert big.plan.recall_at_10 >= 0.99 and big.plan.queries == 500
    assert big.plan.params["nlist"] == nlist_for(4000, 4)
    assert EXACT_UP_TO == 50_000


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_reach_the_target_and_the_recorded_recall_is_true(kind: str) -> None:
    x = clustered(6000, 64, clusters=60)
    ids = np.arange(6000, dtype=np.int64) + 100
    vs = vector_search(x, ids, index_type=kind)
    assert vs.plan.type == kind and vs.plan.recall_at_10 >= 0.99
    # Re-measure on other queries than the tuner used: the recall holds for the collection, not just its sample.
    rng = np.random.default_rng(7)
    rows = rng.choice(6000, 300, replace=False)
    _, exact = exact_numpy(x, x[rows], 11)
    _, approx = vs.search(x[rows], 11)  # row positions (the segment maps them to its ids)
    hits = [len(set(e[1:]) & set(a[1:])) / 10 for e, a in zip(exact.tolist(), approx.tolist(), strict=True)]
    assert np.mean(hits) >= 0.97


def test_unreachable_target_falls_back_to_exact_with_a_note() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 64)).astype(np.float32)  # iid noise: no structure for IVF to use
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vs = vector_search(x, np.arange(3000), index_type="ivf")
    assert vs.plan.type == "flat" and "did not reach" in vs.plan.note
    tiny = vector_search(x[:50], np.arange(50), index_type="hnsw")
    assert tiny.plan.type == "flat" and "at least 1000" in tiny.plan.note
    with pytest.raises(CbirError, match="unknown index type"):
        vector_search(x, np.arange(3000), index_type="lsh")


def test_recall_helper_on_a_hand_made_case() -> None:
    x = clustered(1500, 16)
    held = HeldOut.sample(x, seed=0)
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    assert held.recall(flat.search(held.queries, 11)[1]) == 1.0
    assert (held.truth != held.rows[:, None]).all()  # the query itself never counts as its own neighbour
    assert pq_subquantizers(1280) == 80 and pq_subquantizers(2048) == 128 and 1280 % pq_subquantizers(1280) == 0


def test_plan_survives_save_and_load(tmp_path: Path) -> None:
    x = clustered(5000, 32)
    vs = vector_search(x, np.arange(5000), index_type="ivf")
    vs.save(tmp_path / "f.index")
    again = VectorSearch.load(tmp_path / "f.index", SearchPlan.from_dict(vs.plan.to_dict()))
    assert faiss.extract_index_ivf(again._inner).nprobe == vs.plan.params["nprobe"]
    assert np.array_equal(again.search(x[:30], 10)[1], vs.search(x[:30], 10)[1])


def test_index_records_plan_and_float16_storage(tmp_path: Path, samples: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["index", str(samples), "--out", str(a), "-q", "--device", "cpu", "--precision", "fp32"]) == 0
    assert main(["index", str(samples), "--out", str(b), "-q", "--device", "cpu", "--precision", "fp32",
                 "--float16", "--index-type", "hnsw"]) == 0
    with h5py.File(segment_files(b)[0]) as f:
        assert f["vectors"].dtype == np.float16 and f.attrs["vector_dtype"] == "float16"
        plan = json.loads(f.attrs["search"])
    assert plan["type"] == "flat" and plan["requested"] == "hnsw" and "at least 1000" in plan["note"]
    ia, ib = Index.open(a, device="cpu"), Index.open(b, device="cpu")
    assert ib.rows().vectors.dtype == np.float32
    np.testing.assert_allclose(ia.rows().vectors, ib.rows().vectors, atol=2e-3)
    for i in range(0, len(ia), 5):
        assert [r.id for r in ia.search_id(i, k=3)] == [r.id for r in ib.search_id(i, k=3)]
    capsys.readouterr()
    assert main(["info", str(b)]) == 0
    shown = capsys.readouterr().out
    assert "float16 vectors" in shown and "rows  flat" in shown and "precision fp32" in shown
    # --update keeps the storage type and the requested index type
    assert main(["index", str(samples), "--out", str(b), "--update", "-q", "--device", "cpu"]) == 0
    with h5py.File(segment_files(b)[0]) as f:
        assert f["vectors"].dtype == np.float16 and json.loads(f.attrs["search"])["requested"] == "hnsw"
