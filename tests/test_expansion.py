"""Better neighbours without labels: query expansion and database augmentation recorded in the index, fused
encoders that round-trip through the index file, presets."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from cbir import CbirError, Index
from cbir.encoders import create, from_config
from cbir.images import load_image
from cbir.search.expansion import Expansion, augment_database, combine, without_self
from tests.helpers import segment_files


@pytest.fixture(scope="module")
def expanded(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Index:
    out = tmp_path_factory.mktemp("qe") / "idx"
    return Index.build(samples, out=out, device="cpu", qe=2, dba=2)


def test_combine_weights_neighbours_by_cosine_to_the_power_alpha() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    neighbours = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)
    out = combine(q, neighbours, np.array([[0.5, -0.2]], np.float32), alpha=3.0)  # negative scores count 0
    expected = np.array([1.0, 0.125]) / np.hypot(1.0, 0.125)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_dba_uses_the_neighbours_not_the_row_itself_twice() -> None:
    x = np.eye(3, dtype=np.float32)
    x[2] = [0.6, 0.8, 0.0]

    def neighbours(rows: np.ndarray, start: int):
        s = rows @ x.T
        pos = np.argsort(-s, axis=1, kind="stable")[:, :2]
        scores, found = without_self(np.take_along_axis(s, pos, 1), pos, start, 1)
        return scores, x[found]

    out = augment_database(x, neighbours, alpha=1.0)
    np.testing.assert_allclose(out[0], (x[0] + 0.6 * x[2]) / np.linalg.norm(x[0] + 0.6 * x[2]), rtol=1e-6)


def test_expansion_is_recorded_and_kept_by_an_update(expanded: Index) -> None:
    assert expanded.expansion == Expansion(qe_k=2, dba_k=2)
    assert json.loads((expanded.directory / "manifest.json").read_text())["settings"]["expansion"]["dba_k"] == 2
    with h5py.File(segment_files(expanded.directory)[0]) as f:
        raw, searched = f["raw_vectors"][()], f["vectors"][()]
    assert raw.shape == searched.shape and not np.allclose(raw, searched)
    np.testing.assert_allclose(np.linalg.norm(searched, axis=1), 1.0, atol=1e-5)
    again = Index.build(expanded.root, out=expanded.directory, update=True, device="cpu")
    assert again.expansion == expanded.expansion
    with h5py.File(segment_files(expanded.directory)[0]) as f:  # kept rows keep their own vectors, not a DBA of a DBA
        np.testing.assert_allclose(f["raw_vectors"][()], raw, atol=1e-6)


def test_query_expansion_never_repeats_an_id_and_keeps_scores_ordered(expanded: Index, samples: Path) -> None:
    for id_ in map(int, expanded.rows().ids[:12]):
        found = expanded.search_id(id_, k=10)
        ids = [r.id for r in found]
        scores = [r.score for r in found]
        assert len(set(ids)) == len(ids) == 10 and id_ not in ids
        assert scores == sorted(scores, reverse=True)
    upload = expanded.search(samples / "cat" / "chelsea.jpg", k=5)
    assert upload[0].path == "cat/chelsea.jpg" and len({r.id for r in upload}) == 5


def test_fused_encoder_round_trips_through_the_index_file(tmp_path: Path, samples: Path) -> None:
    spec = "efficientnet_lite0+colour_histogram*0.5"
    index = Index.build(samples / "cat", out=tmp_path / "fused", device="cpu", encoder=spec)
    cfg = index.encoder_config
    assert cfg["name"] == spec and cfg["dim"] == 1280 + 512 and cfg["weights"]["source"] == "parts"
    rebuilt = from_config(Index.open(tmp_path / "fused").encoder_config, device="cpu")
    im = load_image(samples / "cat" / "chelsea.jpg")
    np.testing.assert_allclose(rebuilt.embed([im]), index.encoder.embed([im]), atol=1e-5)
    v = rebuilt.embed([im])[0]
    lite, hist = v[:1280], v[1280:]  # parts normalised, weighted 1 : 0.5, re-normalised
    assert np.dot(lite, lite) / np.dot(hist, hist) == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(CbirError, match="weights per part"):
        create(spec, weights="imagenet", device="cpu")
    with pytest.raises(CbirError, match="weight above 0"):
        create("efficientnet_lite0+colour_histogram*0", device="cpu")


def test_each_fused_part_sees_what_it_sees_alone_and_old_records_keep_their_view(samples: Path) -> None:
    """View 2: a part's slice of the fused vector is (nearly) the part's own vector; an index recorded before
    views existed is rebuilt with view 1, the way its rows were made."""
    ims = [load_image(p) for p in sorted(samples.rglob("*.jpg"))[:6]]
    fused = create("efficientnet_lite0+efficientnet_lite2", device="cpu")
    assert fused.config["options"] == {"view": 2}
    v = fused.embed(ims)
    alone = [create(n, device="cpu").embed(ims) for n in ("efficientnet_lite0", "efficientnet_lite2")]
    for part, own in zip((v[:, :1280], v[:, 1280:]), alone, strict=True):
        part = part / np.linalg.norm(part, axis=1, keepdims=True)
        assert np.sum(part * own, axis=1).min() > 0.99
    old_record = {**fused.config, "options": {}}
    old = from_config(old_record, device="cpu")
    assert old.config["options"] == {"view": 1}
    from cbir.cache import model_key

    assert model_key(old.config) != model_key(fused.config)  # their ONNX query models are not shared
    lite0_old = old.embed(ims)[:, :1280]
    lite0_old /= np.linalg.norm(lite0_old, axis=1, keepdims=True)
    assert np.sum(lite0_old * alone[0], axis=1).mean() < np.sum(
        (v[:, :1280] / np.linalg.norm(v[:, :1280], axis=1, keepdims=True)) * alone[0], axis=1).mean()


def test_presets_fill_what_was_not_given(tmp_path: Path, samples: Path) -> None:
    from indexer import BuildOptions

    given = BuildOptions(preset="balanced", dba=0)
    opts = given.resolved()
    assert (opts.encoder, opts.qe, opts.dba) == ("efficientnet_lite0", 2, 0)
    assert (given.encoder, given.qe) == (None, None)  # a copy: what the caller asked for stays as it was
    with pytest.raises(CbirError, match="unknown preset"):
        BuildOptions(preset="fastest").resolved()
    index = Index.build(samples / "coffee", out=tmp_path / "p", device="cpu", preset="balanced")
    assert index.info()["preset"] == "balanced" and index.expansion.qe_k == 2
    plain = Index.build(samples / "coffee", out=tmp_path / "d", device="cpu")  # no preset named: it is `fast`
    assert plain.info()["preset"] == "fast" and plain.expansion.qe_k == 0
    other = Index.build(samples / "coffee", out=tmp_path / "o", device="cpu", preset="balanced", dba=0)
    assert other.info()["preset"] is None  # settings of no preset: none is claimed
