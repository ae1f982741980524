"""Finding duplicates in an index: byte-identical files (same sha256), and copies: pairs of pictures whose global
vectors are close (candidates) and whose local features match under one geometric transform (verified, see
copies.py). Different photos of the same kind of thing are close in the global vectors too; verification is what
keeps them apart.

A group is a picture (its hub, listed first) and the pictures verified as copies of it: nothing joins a group
through a chain of look-alikes, and keeping the first of each group loses nothing that is not a copy of what is
kept. Every member says why.

A third tier, "same scene", holds burst shots: pictures whose vectors are very close (SCENE_COSINE) but which are not
one picture: local features do not verify a copy, or they do but the camera dated the two shots apart. They are never
mixed with copies: keeping one of a burst loses the moment the others caught. Which member to keep by default, and
what a person decided, come from cbir/review.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from typing import Any

import faiss
import numpy as np

from cbir import metadata
from cbir.copies import MIRROR_COSINE, NO_EVIDENCE, Evidence, FeatureCache
from cbir.errors import CbirError
from cbir.index import Index
from cbir.metadata import Meta, show_date
from cbir.review import Decisions, choose_keep

# Candidates: pairs at this cosine or above are verified. Chosen by `cbir bench --task copies` on animals4 with
# efficientnet_lite0 (benchmarks/RESULTS.md): every edited copy scored above it against its source.
DEFAULT_THRESHOLD = 0.7
NEIGHBOURS = 5  # and each picture's 5 nearest ...
FLOOR = 0.5  # ... down to this cosine
WORKERS = 4
COMPLETE = 40  # pictures linked by verified pairs: up to this many, every pair among them is checked
TIERS = ("identical", "near", "same_scene")  # byte-identical, verified copies, burst shots
# "Same scene" (burst shots) from this cosine when not a verified copy. animals4 (efficientnet_lite0): of the pairs
# at 0.88 or above that local features do not verify, the one there is the same puppy photographed twice; below, from
# 0.869, different squirrels of one kind begin.
SCENE_COSINE = 0.88


def similar_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """All (i, j, cosine) with i < j and cosine >= threshold, by exact range search."""
    if len(vectors) < 2:
        return []
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    pairs = []
    for start in range(0, len(vectors), 4096):
        lims, dist, labels = index.range_search(np.ascontiguousarray(vectors[start:start + 4096]), threshold)
        for q in range(len(lims) - 1):
            i = start + q
            for pos in range(lims[q], lims[q + 1]):
                j = int(labels[pos])
                if j > i:
                    pairs.append((i, j, float(dist[pos])))
    return pairs


def candidate_pairs(vectors: np.ndarray, threshold: float, k: int = NEIGHBOURS,
                    floor: float = FLOOR) -> list[tuple[int, int, float]]:
    """Pairs worth verifying: all at cosine >= threshold, and each picture's k nearest down to `floor` (a
    greyscale or heavily cropped copy can fall below the threshold and still be the nearest)."""
    pairs = {(i, j): c for i, j, c in similar_pairs(vectors, threshold)}
    if len(vectors) > 1:
        scores, found = faiss.knn(np.ascontiguousarray(vectors, dtype=np.float32), vectors, min(k + 1, len(vectors)),
                                  metric=faiss.METRIC_INNER_PRODUCT)
        for i, (row_s, row_j) in enumerate(zip(scores, found, strict=True)):
            for c, j in zip(row_s, row_j, strict=True):
                if j >= 0 and j != i and c >= floor:
                    pairs.setdefault((min(i, int(j)), max(i, int(j))), float(c))
    return [(i, j, c) for (i, j), c in sorted(pairs.items())]


class _Verifier:
    """Evidence per pair of rows, computed once, files' features shared through one cache."""

    def __init__(self, index: Index, cosines: dict[tuple[int, int], float], vectors: np.ndarray) -> None:
        self.index, self.cosines, self.vectors = index, cosines, vectors
        self.cache = FeatureCache()
        self.evidence: dict[tuple[int, int], Evidence] = {}

    def file(self, row: int):
        return self.index.root / self.index.rows().paths[row]

    def check(self, i: int, j: int) -> Evidence:
        key = (min(i, j), max(i, j))
        if key not in self.evidence:
            cos = self.cosine(*key)
            try:  # a mirror image keeps its global vector (>= 0.93 for every mirrored copy measured): look only then
                self.evidence[key] = self.cache.compare(self.file(key[0]), self.file(key[1]),
                                                        mirror=cos >= MIRROR_COSINE)
            except Exception:  # a file gone or unreadable since indexing: no evidence, no group
                self.evidence[key] = NO_EVIDENCE
        return self.evidence[key]

    def check_all(self, pairs: list[tuple[int, int]]) -> None:
        with ThreadPoolExecutor(WORKERS) as pool:  # OpenCV releases the GIL
            list(pool.map(lambda p: self.check(*p), pairs))

    def cosine(self, i: int, j: int) -> float:
        key = (min(i, j), max(i, j))
        return self.cosines[key] if key in self.cosines else float(self.vectors[key[0]] @ self.vectors[key[1]])

    def describe(self, i: int, j: int) -> dict[str, Any]:
        e = self.check(i, j)
        cos = self.cosines.get((min(i, j), max(i, j)))
        why = f"verified: {e.inliers} matching points ({e.agreement:.0%} agree){', mirrored' if e.mirrored else ''}"
        return {"of_id": int(self.index.rows().ids[j]), "of_path": self.index.rows().paths[j], "why": why,
                **e.to_dict(), **({"cosine": round(cos, 4)} if cos is not None else {})}


def _components(pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for node in list(parent):
        groups[find(node)].append(node)
    return [sorted(g) for g in groups.values()]


def _stars(pairs: list[tuple[int, int]], sizes: np.ndarray, verifier: _Verifier,
           linked: Callable[[int, int], bool]) -> list[list[int]]:
    """Groups as "a picture and its copies": each group is a hub and the pictures verified as copies of the hub.

    Within each set of pictures linked by verified pairs, every pair is checked (up to COMPLETE pictures), and the
    hub is the picture verified against the most others (ties: the most matching points in all, then the larger
    file), which is the original when the others are its edits. Keeping the hub and deleting the rest never loses a
    picture that is not a copy of one kept; nothing joins a group through a chain of pairs. `linked(a, b)` says
    whether a verified pair counts (not two shots taken apart, not a pair a person said differs).
    """
    partners: dict[int, set[int]] = defaultdict(set)
    for i, j in pairs:
        partners[i].add(j)
        partners[j].add(i)
    for component in _components(pairs):
        if len(component) <= COMPLETE:
            for a, b in combinations(component, 2):
                if verifier.check(a, b).verified and linked(a, b):
                    partners[a].add(b)
                    partners[b].add(a)
    return _hubs(partners, lambda i, free: (sum(verifier.check(i, j).inliers for j in free), int(sizes[i])))


def _hubs(partners: dict[int, set[int]], rank: Callable[[int, set[int]], tuple]) -> list[list[int]]:
    """Star groups: repeatedly the picture with the most partners not yet grouped (ties by `rank`, then the lower
    row) and those partners."""
    assigned: set[int] = set()
    groups = []
    while True:
        free = [(len(partners[i] - assigned), *rank(i, partners[i] - assigned), -i) for i in partners
                if i not in assigned]
        if not free or max(free)[0] == 0:
            return groups
        hub = -max(free)[-1]
        members = [hub, *sorted(partners[hub] - assigned)]
        assigned.update(members)
        groups.append(members)


class _Facts:
    """Each picture's size, date and bytes, as the index recorded them (for the pick and for burst shots)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._meta: dict[int, Meta] = {}

    def meta(self, row: int) -> Meta:
        if row not in self._meta:
            columns = self.index.generation.meta_of([int(self.index.rows().ids[row])])
            self._meta[row] = metadata.from_columns(columns, 0)
        return self._meta[row]

    def shot_apart(self, i: int, j: int) -> bool:
        """Both pictures carry a camera date and the dates differ: two shots (a burst), not one picture and a copy
        (an edited copy keeps its DateTimeOriginal; a copy without EXIF says nothing either way)."""
        a, b = self.meta(i), self.meta(j)
        return a.taken_exif and b.taken_exif and a.taken_ns != b.taken_ns

    def member(self, row: int) -> dict[str, Any]:
        s, m = self.index.rows(), self.meta(row)
        return {"id": int(s.ids[row]), "path": s.paths[row], "width": m.width, "height": m.height,
                "pixels": m.width * m.height, "bytes": int(s.size[row]), "mtime_ns": int(s.mtime_ns[row]),
                "taken_ns": m.taken_ns, "taken": show_date(m.taken_ns) if m.taken_ns else "",
                "taken_from": "camera" if m.taken_exif else "file"}


def _member(verifier: _Verifier, facts: _Facts, hub: int, i: int) -> dict[str, Any]:
    if i == hub:
        return {**facts.member(i), "best_score": 1.0, "hub": True, "evidence": []}
    cos = verifier.cosines.get((min(i, hub), max(i, hub)), 0.0)
    return {**facts.member(i), "best_score": round(cos, 4), "hub": False, "copy_of": facts.index.rows().paths[hub],
            "evidence": [verifier.describe(i, hub)]}


def _scene_member(verifier: _Verifier, facts: _Facts, hub: int, i: int) -> dict[str, Any]:
    out = {**facts.member(i), "hub": i == hub}
    if i != hub:
        cos = verifier.cosine(i, hub)
        apart = abs(facts.meta(i).taken_ns - facts.meta(hub).taken_ns) / 1e9 if facts.shot_apart(i, hub) else None
        out["why"] = f"same scene: cosine {cos:.3f}" + (f", taken {apart:.2f} s apart" if apart is not None else
                                                        ", not one picture (local features do not verify a copy)")
        out["cosine"] = round(cos, 4)
    return out


def _with_keep(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = choose_keep(group)
    return [{**m, "keep": n == keep} for n, m in enumerate(group)]


def _identical(index: Index, apart: Callable[[int, int], bool]) -> list[list[int]]:
    """Groups of byte-identical files (same sha256), split where a person said two are not duplicates."""
    s = index.rows()
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(s.sha256 or []):
        if h:
            by_hash[h].append(i)
    groups = []
    for rows in by_hash.values():
        pairs = [(a, b) for a, b in combinations(rows, 2) if not apart(a, b)]
        groups += [g for g in _components(pairs) if len(g) > 1]
    return sorted(groups, key=lambda g: s.paths[g[0]])


def find_duplicates(index: Index, threshold: float = DEFAULT_THRESHOLD,
                    decisions: Decisions | None = None) -> dict[str, Any]:
    """Three tiers, kept apart: byte-identical files, verified copies (with the evidence for each pair), and the
    same scene (burst shots: very close vectors, but two shots). Pairs a person said are not duplicates (the index
    folder's review.json, or `decisions`) are left out. Each member says whether it is the one to keep by default."""
    if index.generation.lazy:
        raise CbirError(f"cbir duplicates compares every picture with its neighbours in memory; index {index.name} "
                        "is an on-disk index larger than that (run it on a subset, indexed without --on-disk)")
    s = index.rows()
    decisions = decisions if decisions is not None else Decisions.load(index.directory)

    def apart(i: int, j: int) -> bool:
        return decisions.separated(s.paths[i], s.paths[j])

    same_bytes = _identical(index, apart)
    byte_group = {i: n for n, g in enumerate(same_bytes) for i in g}
    # the encoder's own rows: database-side augmentation pulls look-alikes together, which is right for
    # search and wrong for deciding what is a copy
    own = s.raw_vectors() if index.expansion.dba_k else s.vectors
    assert own is not None
    candidates = [(i, j, c) for i, j, c in candidate_pairs(own, threshold)
                  if not (i in byte_group and byte_group.get(j) == byte_group[i]) and not apart(i, j)]
    verifier = _Verifier(index, {(i, j): c for i, j, c in candidates}, own)
    verifier.check_all([(i, j) for i, j, _ in candidates])
    facts = _Facts(index)

    def linked(i: int, j: int) -> bool:
        return not facts.shot_apart(i, j) and not apart(i, j)

    verified = [(i, j) for i, j, _ in candidates if verifier.check(i, j).verified and linked(i, j)]
    groups = sorted(_stars(verified, s.size, verifier, linked), key=lambda g: s.paths[g[0]])
    scenes = _scenes(candidates, groups, verifier, linked)
    return {
        "index": str(index.directory),
        "threshold": threshold,
        "scene_cosine": SCENE_COSINE,
        "candidates": len(candidates),
        "verified_pairs": len(verified),
        "identical": [_with_keep([{**facts.member(i), "why": "byte-identical (same sha256)"} for i in g])
                      for g in same_bytes],
        "near": [_with_keep([_member(verifier, facts, g[0], i) for i in g]) for g in groups],
        "same_scene": [_with_keep([_scene_member(verifier, facts, g[0], i) for i in g]) for g in scenes],
    }


def _scenes(candidates: list[tuple[int, int, float]], copies: list[list[int]], verifier: _Verifier,
            linked: Callable[[int, int], bool]) -> list[list[int]]:
    """Burst shots: pairs at SCENE_COSINE or above that are not one picture and a copy of it (not verified, or
    verified but taken apart), outside the copy groups' own pairs; grouped around hubs like copies."""
    group_of = {i: n for n, g in enumerate(copies) for i in g}
    partners: dict[int, set[int]] = defaultdict(set)
    for i, j, c in candidates:
        if c < SCENE_COSINE or (i in group_of and group_of.get(j) == group_of[i]):
            continue
        if verifier.check(i, j).verified and linked(i, j):
            continue  # a copy, grouped (or left out of a group on purpose) as one
        partners[i].add(j)
        partners[j].add(i)
    found = _hubs(partners, lambda i, free: (sum(verifier.cosine(i, j) for j in free),))
    return sorted(found, key=lambda g: verifier.index.rows().paths[g[0]])
