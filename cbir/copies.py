"""Telling copies from look-alikes: local features that match under one geometric transform.

A copy is a picture made from another's pixels: resized, recompressed, cropped, rotated, mirrored, made grey, put
on a canvas, written over. Its SIFT keypoints match the original's under a single similarity transform (found with
RANSAC), with most matches agreeing. Two different photos of the same kind of thing, or of the same scene taken
again, share a category-level descriptor but no such transform: few matches, and those few disagree. Global
vectors propose candidates; this module decides, and says why (`Evidence`).

Thresholds were read off animals4 (benchmarks/RESULTS.md): over 480 edited copies of 40 photos (12 kinds of edit)
the weakest true matches were 30 inliers at 91% agreement (crop + JPEG) and 34 at 83% (a 96-px thumbnail); the
strongest different-photo pairs found by `cbir duplicates` (two ginger cats) had 25 inliers at 58% and 61%, 7%
of their keypoints; a tight crop of a sparse night photo (the rocket sample) has 21 inliers at 68%, 26% of its.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from cbir.images import load_image

if TYPE_CHECKING:
    from cbir.index import Index, Result
    from cbir.search.filters import WhereLike

SIDE = 400  # pictures are matched at this longer side ...
MAX_UPSCALE = 2.0  # ... small ones upscaled at most this much (more adds keypoints of blur, not of the picture)
RATIO_TEST = 0.8  # Lowe's ratio test for a match
REPROJECTION_PX = 4.0  # RANSAC inlier distance at SIDE
STRONG_INLIERS = 40  # this many points under one transform: a copy
MIN_INLIERS = 25  # from this many: a copy if the transform explains MIN_AGREEMENT of the matches
MIN_AGREEMENT = 0.7
# Pictures with few keypoints (a night sky, a thumbnail, a tight crop): a copy from SPARSE_INLIERS if they are
# SPARSE_SHARE of the sparser picture's keypoints and SPARSE_AGREEMENT of the matches.
SPARSE_INLIERS = 12
SPARSE_SHARE = 0.12
SPARSE_AGREEMENT = 0.6
MIN_SCALE = 0.15  # a copy is at most ~7x smaller or larger than its original (at SIDE px)
MIN_COVER = 0.3  # the matching points span at least this share of one picture's width and of its height


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """Why two pictures are (or are not) copies of each other."""

    inliers: int
    matches: int
    mirrored: bool = False
    keypoints: int = 0  # of the sparser picture

    @property
    def agreement(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    @property
    def verified(self) -> bool:
        if self.inliers >= STRONG_INLIERS or (self.inliers >= MIN_INLIERS and self.agreement >= MIN_AGREEMENT):
            return True
        many_for_its_points = self.inliers >= max(SPARSE_INLIERS, SPARSE_SHARE * self.keypoints)
        return many_for_its_points and self.agreement >= SPARSE_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": round(self.agreement, 3), "verified": self.verified}


NO_EVIDENCE = Evidence(inliers=0, matches=0)  # no features to compare, or a file gone since indexing


Features = tuple[np.ndarray, np.ndarray | None, tuple[int, int]]  # positions [N, 2], descriptors [N, 128], w x h


def features(im: Image.Image) -> Features:
    import cv2

    grey = np.asarray(im.convert("L"))
    scale = min(SIDE / max(grey.shape), MAX_UPSCALE)
    if scale != 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else
                          cv2.INTER_CUBIC)
    keypoints, descriptors = _sift().detectAndCompute(grey, None)
    return np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors, (grey.shape[1], grey.shape[0])


_local = threading.local()


def _sift():
    """One SIFT detector per thread (OpenCV releases the GIL: threads extract in parallel)."""
    if not hasattr(_local, "sift"):
        import cv2

        _local.sift = cv2.SIFT_create(nfeatures=500)
    return _local.sift


def match(a: Features, b: Features) -> Evidence:
    """Ratio-test matches of a's descriptors in b, and how many one similarity transform explains."""
    return matched_points(a, b)[0]


def matched_points(a: Features, b: Features) -> tuple[Evidence, np.ndarray, np.ndarray]:
    """`match`, with the points that agree: positions in a and in b ([M, 2] each, at SIDE px), for drawing."""
    import cv2

    none = np.zeros((0, 2), np.float32)
    (pa, da, size_a), (pb, db, size_b) = a, b
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return NO_EVIDENCE, none, none
    keypoints = min(len(pa), len(pb))
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(da, db, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO_TEST * p[1].distance]
    best: dict[int, cv2.DMatch] = {}  # one match per point of b: many points onto one is no evidence
    for m in good:
        if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
            best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < 4:
        return Evidence(inliers=0, matches=len(good), keypoints=keypoints), none, none
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    cv2.setRNGSeed(0)  # the same pair gets the same answer every time
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX,
                                                  maxIters=5000, confidence=0.999)
    inliers = mask.ravel().astype(bool) if mask is not None else np.zeros(len(good), bool)
    if transform is None or not _plausible(transform, src[inliers], dst[inliers], size_a, size_b):
        return Evidence(inliers=0, matches=len(good), keypoints=keypoints), none, none
    return Evidence(inliers=int(inliers.sum()), matches=len(good), keypoints=keypoints), src[inliers], dst[inliers]


def _plausible(transform: np.ndarray, src: np.ndarray, dst: np.ndarray, size_a: tuple[int, int],
               size_b: tuple[int, int]) -> bool:
    """A transform that keeps a picture a picture (not shrunk to a dot), and matching points that cover a fair part
    of at least one of the two pictures both ways (not one shared logo, banner or watermark)."""
    if len(src) < 2 or not MIN_SCALE <= float(np.hypot(*transform[0, :2])) <= 1 / MIN_SCALE:
        return False
    cover_a = float(np.min(np.ptp(src, axis=0) / np.maximum(size_a, 1)))
    cover_b = float(np.min(np.ptp(dst, axis=0) / np.maximum(size_b, 1)))
    return max(cover_a, cover_b) >= MIN_COVER


def either_way(direct: Features, mirrored: Callable[[], Features], target: Features) -> Evidence:
    """The evidence of `direct` against `target`, or of the mirror image's features when those do better (made
    only when the direct match does not verify: most pairs are settled by it)."""
    first = match(direct, target)
    if first.verified:
        return first
    flipped = match(mirrored(), target)
    if (flipped.verified, flipped.inliers) > (first.verified, first.inliers):
        return replace(flipped, mirrored=True)
    return first


class FeatureCache:
    """Features of indexed files (and of their mirror images, made when first asked), least recently used dropped
    first; computed once per file version."""

    def __init__(self, max_items: int = 20000) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, Features] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, mirrored: bool = False) -> Features:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, mirrored)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        im = load_image(path, draft=SIDE)
        found = features(ImageOps.mirror(im) if mirrored else im)
        with self._lock:
            self._items[key] = found
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return found

    def compare(self, a: Path, b: Path, mirror: bool = True) -> Evidence:
        """Evidence that the pictures at `a` and `b` are copies (a mirrored copy too, when `mirror`)."""
        if not mirror:
            return match(self.get(a), self.get(b))
        return either_way(self.get(a), lambda: self.get(a, mirrored=True), self.get(b))


LINE_COLOURS = ((46, 204, 113), (52, 152, 219), (241, 196, 15), (231, 76, 60), (155, 89, 182))


def evidence_picture(a: Path, b: Path, max_lines: int = 60) -> tuple[Image.Image, Evidence]:
    """The two pictures side by side (at SIDE px, as they were compared) with their matching points joined by lines:
    what "verified: 87 matching points" means, to look at. A mirrored copy is matched through its mirror image and
    its points drawn where they are in the picture as it is."""
    from PIL import ImageDraw

    ia, ib = load_image(a, draft=SIDE), load_image(b, draft=SIDE)
    fa, fb = features(ia), features(ib)
    evidence, src, dst = matched_points(fa, fb)
    if not evidence.verified:
        flipped, fsrc, fdst = matched_points(features(ImageOps.mirror(ia)), fb)
        if (flipped.verified, flipped.inliers) > (evidence.verified, evidence.inliers):
            evidence, src, dst = replace(flipped, mirrored=True), fsrc.copy(), fdst
            src[:, 0] = fa[2][0] - 1 - src[:, 0]
    (wa, ha), (wb, hb) = fa[2], fb[2]
    gap = 12
    canvas = Image.new("RGB", (wa + gap + wb, max(ha, hb)), (255, 255, 255))
    canvas.paste(ia.resize((wa, ha), Image.BICUBIC), (0, 0))
    canvas.paste(ib.resize((wb, hb), Image.BICUBIC), (wa + gap, 0))
    draw = ImageDraw.Draw(canvas)
    step = max(1, len(src) // max_lines)
    for n, ((x0, y0), (x1, y1)) in enumerate(zip(src[::step], dst[::step], strict=True)):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        draw.line([(x0, y0), (x1 + wa + gap, y1)], fill=colour, width=1)
        for x, y in ((x0, y0), (x1 + wa + gap, y1)):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    return canvas, evidence


def rank_copies_first(index: Index, image: Image.Image, k: int = 10, candidates: int = 20, *,
                      cache: FeatureCache | None = None, vector: np.ndarray | None = None,
                      where: WhereLike = None) -> list[tuple[Result, Evidence]]:
    """The top `k` for a query picture with its verified copies first (strongest first), then the rest in order.

    Candidates are the global top `candidates`; each is checked against the query (and its mirror image).
    `vector` is the query's embedding when the caller has it already.
    """
    cache = cache or FeatureCache()
    query = index.embed(image) if vector is None else vector
    found = index.search_vector(query, k=max(k, candidates), where=where)
    direct, flipped = features(image), features(ImageOps.mirror(image))
    checked: list[tuple[Result, Evidence]] = []
    for r in found:
        try:
            target = cache.get(index.file_of(r.id))
        except (OSError, ValueError):
            checked.append((r, NO_EVIDENCE))
            continue
        checked.append((r, either_way(direct, lambda: flipped, target)))
    copies = sorted((c for c in checked if c[1].verified), key=lambda c: -c[1].inliers)
    others = [c for c in checked if not c[1].verified]
    return [(replace(r, rank=n + 1), e) for n, (r, e) in enumerate((copies + others)[:k])]
