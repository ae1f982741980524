"""Confidence in words, fitted to each index: near-duplicate / similar / borderline / different.

A cosine means different things for different encoders (a trained siamese spreads its scores otherwise than
ImageNet features, a fused encoder otherwise again), so the thresholds are measured on the index's own encoder and
collection when it is built, and stored with it (attribute `words`):
  near-duplicate  from the 5th percentile of the cosines between sample pictures and their light edits (resized,
                  recompressed, mirrored, brighter, with a text banner), embedded by the index's encoder
  borderline      the median cosine of random pairs of the collection: more alike than two pictures picked at
                  random
  similar         40% of the way from borderline to near-duplicate (where the hand-read defaults, 0.35 / 0.55 /
                  0.85 for efficientnet_lite0, put it)
Words are a hint; whether a picture is a copy is decided by matching local features (cbir/copies.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LIGHT_EDITS = ("resize 50%", "JPEG quality 20", "mirror", "brightness and contrast", "text banner")
SAMPLE = 16
SIMILAR_AT = 0.4


@dataclass(frozen=True, kw_only=True)
class Words:
    near_duplicate: float = 0.85  # the defaults: read off efficientnet_lite0 on the samples and animals4
    similar: float = 0.55
    borderline: float = 0.35
    fitted: bool = False

    def word(self, score: float) -> str:
        if score >= self.near_duplicate:
            return "near-duplicate"
        if score >= self.similar:
            return "similar"
        if score >= self.borderline:
            return "borderline"
        return "different"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Words:
        return cls(**d) if d else cls()


def fit(copies: np.ndarray, random_pairs: np.ndarray) -> Words:
    """Thresholds from the two measurements (cosines), kept in order."""
    near = float(np.percentile(copies, 5)) if len(copies) else Words.near_duplicate
    borderline = min(float(np.median(random_pairs)) if len(random_pairs) else Words.borderline, near - 0.02)
    similar = borderline + SIMILAR_AT * (near - borderline)
    return Words(near_duplicate=round(near, 4), similar=round(similar, 4), borderline=round(borderline, 4), fitted=True)


def measure(encoder: Any, read: Callable[[str], bytes], paths: Sequence[str], vectors: np.ndarray,
            seed: int = 0, query: Callable[[np.ndarray], np.ndarray] | None = None) -> Words:
    """Fit the words on a collection: `vectors` are the rows searched for `paths` (whose bytes `read` gives).

    `query` turns an embedded query into what is searched with (an index's query expansion), so that the words are
    fitted on the very scores that search shows: expansion moves them (copies of a photo score ~0.98 instead of
    ~0.93 on efficientnet_lite0 with alpha-QE and alpha-DBA, and images of one kind score higher too).
    """
    searched = query or (lambda rows: rows)
    from cbir.edits import EDITS
    from cbir.errors import ImageError
    from cbir.images import load_image

    n = len(paths)
    if n < 3:
        return Words()
    rng = np.random.default_rng(seed)
    copies: list[float] = []
    for row in rng.choice(n, size=min(SAMPLE, n), replace=False):
        try:
            im = load_image(read(paths[row]))
        except (ImageError, OSError):
            continue
        edited = searched(encoder.embed([EDITS[name](im) for name in LIGHT_EDITS]))
        copies.extend((edited @ np.asarray(vectors[row], np.float32)).tolist())
    a, b = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    keep = a != b
    random_pairs = np.einsum("ij,ij->i", searched(np.asarray(vectors[a[keep]], np.float32)),
                             np.asarray(vectors[b[keep]], np.float32))
    return fit(np.asarray(copies), random_pairs)
