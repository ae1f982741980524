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

A query is verified against its candidates in their global order, with the indexed pictures' features as the index
keeps them (cbir/local_features.py; computed from the file for an index that has none), and stops after the first
strong copy and the run of copies around it: finding the original of a copy costs the query's own features and a few
matches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from cbir.images import load_image
from cbir.local_features import KEEP_SIDE, SIDE, Features, extract

if TYPE_CHECKING:
    from cbir.index import Index, Result
    from cbir.search.filters import WhereLike

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
MIRROR_COSINE = 0.85  # mirrored copies are looked for only above this cosine (animals4: all mirrored copies >= 0.936)
# After a strong copy, checking stops at this many candidates in a row that are not copies: copies of one picture
# come together at the top of the global order, one weak copy (a thumbnail) among them is passed over.
STOP_AFTER_MISSES = 2


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """Why two pictures are (or are not) copies of each other."""

    inliers: int
    matches: int
    mirrored: bool = False
    keypoints: int = 0  # of the sparser picture
    checked: bool = True  # False: not looked at (a stronger copy was found first)

    @property
    def agreement(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    @property
    def verified(self) -> bool:
        if self.inliers >= STRONG_INLIERS or (self.inliers >= MIN_INLIERS and self.agreement >= MIN_AGREEMENT):
            return True
        many_for_its_points = self.inliers >= max(SPARSE_INLIERS, SPARSE_SHARE * self.keypoints)
        return many_for_its_points and self.agreement >= SPARSE_AGREEMENT

    @property
    def strong(self) -> bool:
        return self.inliers >= STRONG_INLIERS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": round(self.agreement, 3), "verified": self.verified}


NO_EVIDENCE = Evidence(inliers=0, matches=0)  # no features to compare, or a file gone since indexing
NOT_CHECKED = Evidence(inliers=0, matches=0, checked=False)  # not looked at: checking had stopped


def match(a: Features, b: Features) -> Evidence:
    """Ratio-test matches of a's descriptors in b, and how many one similarity transform explains."""
    return matched_points(a, b)[0]


def matched_points(a: Features, b: Features) -> tuple[Evidence, np.ndarray, np.ndarray]:
    """`match`, with the points that agree: positions in a and in b ([M, 2] each), for drawing."""
    import cv2

    none = np.zeros((0, 2), np.float32)
    if len(a) < 2 or len(b) < 2:
        return NO_EVIDENCE, none, none
    keypoints = min(len(a), len(b))
    # float32: OpenCV's brute-force L2 matcher is 6x slower on uint8 rows (17 ms against 2.7 ms for 300 x 500)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.descriptors.astype(np.float32), b.descriptors.astype(np.float32),
                                                k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO_TEST * p[1].distance]
    best: dict[int, cv2.DMatch] = {}  # one match per point of b: many points onto one is no evidence
    for m in good:
        if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
            best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < 4:
        return Evidence(inliers=0, matches=len(good), keypoints=keypoints), none, none
    src = a.xy[[m.queryIdx for m in good]]
    dst = b.xy[[m.trainIdx for m in good]]
    cv2.setRNGSeed(0)  # the same pair gets the same answer every time
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION_PX,
                                                  maxIters=5000, confidence=0.999)
    inliers = mask.ravel().astype(bool) if mask is not None else np.zeros(len(good), bool)
    if transform is None or not _plausible(transform, src[inliers], dst[inliers], a.size, b.size):
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
    """Features of files (and of their mirror images, made when first asked), least recently used dropped first;
    computed once per file version."""

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
        found = extract(ImageOps.mirror(im) if mirrored else im)
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
    fa, fb = extract(ia), extract(ib)
    evidence, src, dst = matched_points(fa, fb)
    if not evidence.verified:
        flipped, fsrc, fdst = matched_points(extract(ImageOps.mirror(ia)), fb)
        if (flipped.verified, flipped.inliers) > (evidence.verified, evidence.inliers):
            evidence, src, dst = replace(flipped, mirrored=True), fsrc.copy(), fdst
            src[:, 0] = fa.size[0] - 1 - src[:, 0]
    (wa, ha), (wb, hb) = fa.size, fb.size
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


FeaturesOf = Callable[[list[int]], list[Features | None]]  # ids -> their kept features (None: not kept)


class _Query:
    """A query picture's features at each scale it is matched at, and its mirror image's, each made once and only
    when first asked for (features of one picture at two scales repeat poorly: a candidate's kept features, at
    KEEP_SIDE, are matched with the query's at KEEP_SIDE; features made from its file, at SIDE, with those at SIDE)."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self._made: dict[tuple[int, bool], Features] = {}

    def features(self, side: int, mirrored: bool = False) -> Features:
        if (side, mirrored) not in self._made:
            self._made[side, mirrored] = extract(ImageOps.mirror(self.image) if mirrored else self.image, side=side)
        return self._made[side, mirrored]


@dataclass(kw_only=True)
class Verification:
    """How a query's candidates are checked: how many, where their features come from, when to stop."""

    candidates: int = 20  # the global top this many are candidates
    features_of: FeaturesOf | None = None  # default: the index's own (Index.features_of), else from the files
    cache: FeatureCache = field(default_factory=FeatureCache)  # features computed from files
    stop_early: bool = True  # after a strong copy, stop at STOP_AFTER_MISSES candidates in a row that are not copies
    mirror_cosine: float = MIRROR_COSINE  # a mirror image is tried for candidates at least this close
    kept_side: int = KEEP_SIDE  # the longer side the kept features were found at


def rank_copies_first(index: Index, image: Image.Image, k: int = 10, candidates: int = 20, *,
                      cache: FeatureCache | None = None, vector: np.ndarray | None = None,
                      how: Verification | None = None, where: WhereLike = None) -> list[tuple[Result, Evidence]]:
    """The top `k` for a query picture with its verified copies first (strongest first), then the rest in order.

    Candidates are the global top `candidates`, checked in order against the query (and its mirror image, for the
    close ones); once one has verified strongly, checking stops at STOP_AFTER_MISSES in a row that do not verify
    (copies of one picture come together at the top of the global order). Those after are not checked
    (`Evidence.checked` is False). `vector` is the query's embedding when the caller has it already; `where` keeps
    to the pictures it allows.
    """
    how = how or Verification(candidates=candidates, cache=cache or FeatureCache())
    query = index.embed(image) if vector is None else vector
    found = index.search_vector(query, k=max(k, how.candidates), where=where)
    checked = _verify(index, _Query(image), found, how)
    copies = sorted((c for c in checked if c[1].verified), key=lambda c: -c[1].inliers)
    others = [c for c in checked if not c[1].verified]
    return [(replace(r, rank=n + 1), e) for n, (r, e) in enumerate((copies + others)[:k])]


def _verify(index: Index, query: _Query, found: list[Result], how: Verification) -> list[tuple[Result, Evidence]]:
    kept = (how.features_of or index.features_of)([r.id for r in found])
    checked: list[tuple[Result, Evidence]] = []
    strong, misses = False, 0
    for r, target in zip(found, kept, strict=True):
        if how.stop_early and strong and misses >= STOP_AFTER_MISSES:
            checked.append((r, NOT_CHECKED))
            continue
        side = how.kept_side if target is not None else SIDE
        try:
            target = target if target is not None else how.cache.get(index.file_of(r.id))
        except (OSError, ValueError):
            checked.append((r, NO_EVIDENCE))
            continue
        if r.score >= how.mirror_cosine:
            evidence = either_way(query.features(side), lambda at=side: query.features(at, mirrored=True), target)
        else:
            evidence = match(query.features(side), target)
        checked.append((r, evidence))
        strong = strong or evidence.strong
        misses = 0 if evidence.verified else misses + 1
    return checked
