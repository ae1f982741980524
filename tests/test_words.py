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
