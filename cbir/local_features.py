"""Local features of a picture (SIFT keypoints), compact enough to keep one set per indexed picture.

Verifying that a picture is a copy of another (cbir/copies.py) matches their local features. Computing them for
every candidate at query time cost 0.36 s per query (20 candidates); an index keeps each picture's features
instead, extracted while the picture is decoded for embedding (indexer/decode.py), so a query computes its own
only. What is kept was measured (benchmarks/copy_features.py, animals4, 504 edited copies and 100 photos with no
copy): SIFT on the picture scaled to `KEEP_SIDE` px, its `KEEP` strongest keypoints, descriptors as uint8 (OpenCV's
SIFT descriptors are whole numbers 0-255 already: nothing is lost) and positions as float16 (a quarter pixel at most,
well inside the 4-px RANSAC tolerance): 26 KB a picture. Recall@1 with verified copies first was the same (0.994)
keeping 500, 300 or 200 keypoints, extracted at 400, 256 or 200 px; 128 keypoints lost one copy in 504. Extraction
costs the indexer 12 ms of CPU a picture at 256 px (22 ms at 400). The query keeps more (`QUERY_KEYPOINTS` at `SIDE`
px): it is extracted once and matched against every candidate.

Many pictures are kept as one ragged table (`pack`): all keypoints in order, and each picture's first keypoint and
size, so a store reads one picture's features as two slices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 400  # pictures are matched at this longer side ...
MAX_UPSCALE = 2.0  # ... small ones upscaled at most this much (more adds keypoints of blur, not of the picture)
QUERY_KEYPOINTS = 500  # a query keeps this many: matched against every candidate, computed once
KEEP = 200  # an indexed picture keeps its strongest this many (benchmarks/copy_features.py: as good as 500) ...
KEEP_SIDE = 256  # ... found at this longer side (as good as 400 px, half the extraction time)
DIM = 128


@dataclass(frozen=True, kw_only=True)
class Features:
    """SIFT keypoints of one picture: positions in the picture scaled to `size`, and their descriptors."""

    xy: np.ndarray  # float32 [N, 2]
    descriptors: np.ndarray  # uint8 [N, 128]
    size: tuple[int, int]  # width, height

    def __len__(self) -> int:
        return len(self.xy)

    def strongest(self, n: int) -> Features:
        """The first `n` keypoints (`extract` orders them strongest first)."""
        return self if len(self) <= n else Features(xy=self.xy[:n], descriptors=self.descriptors[:n], size=self.size)


_local = threading.local()


def _sift(keypoints: int):
    """One SIFT detector per thread and keypoint budget (OpenCV releases the GIL: threads extract in parallel)."""
    import cv2

    detectors = _local.__dict__.setdefault("sift", {})
    if keypoints not in detectors:
        detectors[keypoints] = cv2.SIFT_create(nfeatures=keypoints)
    return detectors[keypoints]


def extract(im: Image.Image, keypoints: int = QUERY_KEYPOINTS, side: int = SIDE) -> Features:
    """The picture's `keypoints` strongest SIFT keypoints at `side` px (its longer side), strongest first."""
    import cv2

    grey = np.asarray(im.convert("L"))
    scale = min(side / max(grey.shape), MAX_UPSCALE)
    if scale != 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else
                          cv2.INTER_CUBIC)
    found, descriptors = _sift(keypoints).detectAndCompute(grey, None)
    order = np.argsort([-k.response for k in found], kind="stable")[:keypoints]  # SIFT keeps ties past the count
    xy = np.float32([found[i].pt for i in order]).reshape(-1, 2)
    desc = np.zeros((0, DIM), np.uint8) if descriptors is None else descriptors[order].astype(np.uint8)
    return Features(xy=xy, descriptors=desc, size=(grey.shape[1], grey.shape[0]))


def to_keep(im: Image.Image) -> Features:
    """What an index keeps of a picture (its features for others to match against)."""
    return extract(im, KEEP, KEEP_SIDE)


@dataclass(frozen=True, kw_only=True)
class Packed:
    """Features of many pictures as one table: keypoints of picture i are rows offsets[i]:offsets[i + 1]."""

    xy: np.ndarray  # float16 [K, 2]
    descriptors: np.ndarray  # uint8 [K, 128]
    offsets: np.ndarray  # int64 [N + 1]
    sizes: np.ndarray  # uint16 [N, 2]: width, height (0, 0: none were extracted)

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int) -> Features | None:
        """Picture i's features, or None when it has none (not extracted)."""
        if not self.sizes[i].any():
            return None
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Features(xy=self.xy[a:b].astype(np.float32), descriptors=self.descriptors[a:b],
                        size=(int(self.sizes[i, 0]), int(self.sizes[i, 1])))


def pack(items: list[Features | None]) -> Packed:
    """One table of many pictures' features (None: a picture without any)."""
    counts = [0 if f is None else len(f) for f in items]
    real = [f for f in items if f is not None]
    return Packed(xy=np.concatenate([f.xy for f in real]).astype(np.float16) if real else np.zeros((0, 2), np.float16),
                  descriptors=np.concatenate([f.descriptors for f in real]) if real else np.zeros((0, DIM), np.uint8),
                  offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                  sizes=np.array([(0, 0) if f is None else f.size for f in items], np.uint16).reshape(-1, 2))


def bytes_per_picture(keypoints: int = KEEP) -> int:
    """Disk space one picture's kept features take at most (descriptors, positions, offset, size)."""
    return keypoints * (DIM + 4) + 8 + 4
