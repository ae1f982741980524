"""Confidence words fitted to each index: ordered thresholds, measured per encoder, used by the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbir import Index
from cbir.words import Words, fit


def test_fit_orders_the_thresholds_and_follows_the_data() -> None:
    rng = np.random.default_rng(0)
    w = fit(rng.uniform(0.9, 1.0, 80), rng.uniform(0.0, 0.4, 4000))
    assert w.fitted and w.near_duplicate > w.similar > w.borderline
    assert w.near_duplicate == pytest.approx(np.percentile(rng.uniform(0.9, 1.0, 80), 5), abs=0.03)
    assert [w.word(s) for s in (0.99, w.similar + 0.01, w.borderline + 0.01, 0.0)] == \
        ["near-duplicate", "similar", "borderline", "different"]
    odd = fit(np.array([0.3, 0.32]), np.array([0.5, 0.6]))  # chance above the copies: still in order
    assert odd.near_duplicate > odd.similar > odd.borderline


def test_each_index_gets_its_own_words(tmp_path: Path, samples: Path) -> None:
    lite = Index.build(samples, out=tmp_path / "lite", device="cpu")
    hist = Index.build(samples, out=tmp_path / "hist", device="cpu", encoder="colour_histogram")
    for index in (lite, hist):
        w = Index.open(index.directory).words
        assert w.fitted and 0 < w.borderline < w.similar < w.near_duplicate <= 1
    assert Index.open(lite.directory).words != Index.open(hist.directory).words
    assert Words() == Words.from_dict(None)  # an index from before keeps the defaults
    again = Index.build(samples, out=tmp_path / "lite", device="cpu", update=True)
    assert again.words == Index.open(lite.directory).words  # an update keeps them: no sample embedded again


def test_an_expanded_index_fits_its_words_on_the_scores_search_shows(tmp_path: Path, samples: Path) -> None:
    """With alpha-QE and alpha-DBA, copies score higher than between plain vectors: the words follow the scores
    that search returns, not the encoder's raw cosines."""
    from cbir.edits import EDITS
    from cbir.images import load_image

    plain = Index.build(samples, out=tmp_path / "plain", device="cpu")
    expanded = Index.build(samples, out=tmp_path / "exp", device="cpu", qe=2, dba=2)
    edits = ("JPEG quality 20", "brightness and contrast", "text banner")
    scores: dict[str, list[float]] = {"plain": [], "exp": []}
    for path in list(expanded.rows().paths)[::4]:
        im = load_image(samples / path)
        for name, index in (("plain", plain), ("exp", expanded)):
            vectors = index.encoder.embed([EDITS[e](im) for e in edits])
            for v in vectors:  # the source's score (the samples hold crops of one another: not always first)
                found = {r.path: r.score for r in index.search_vector(v, k=3)}
                assert path in found
                scores[name].append(found[path])
    assert np.median(scores["exp"]) > np.median(scores["plain"])  # expansion moves the scores...
    assert expanded.words.near_duplicate > plain.words.near_duplicate  # ...and the words move with them
    for name, index in (("plain", plain), ("exp", expanded)):
        labelled = [index.words.word(s) for s in scores[name]]
        assert labelled.count("near-duplicate") >= 0.8 * len(labelled), (name, index.words, scores[name])
