"""Finding duplicates in an index: byte-identical files (same sha256), and copies: pairs of pictures whose global
vectors are close (candidates) and whose local features match under one geometric transform (verified, see
copies.py). Different photos of the same kind of thing are close in the global vectors too; verification is what
keeps them apart.

A group is a picture (its hub, listed first) and the pictures verified as copies of it: nothing joins a group
through a chain of look-alikes, and keeping the first of each group loses nothing that is not a copy of what is
kept. Every member says why.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from typing import Any

import faiss
import numpy as np

from cbir.copies import MIRROR_COSINE, NO_EVIDENCE, Evidence, FeatureCache
from cbir.errors import CbirError
from cbir.index import Index

# Candidates: pairs at this cosine or above are verified. Chosen by `cbir bench --task copies` on animals4 with
# efficientnet_lite0 (benchmarks/RESULTS.md): every edited copy scored above it against its source.
DEFAULT_THRESHOLD = 0.7
NEIGHBOURS = 5  # and each picture's 5 nearest ...
FLOOR = 0.5  # ... down to this cosine
WORKERS = 4
COMPLETE = 40  # pictures linked by verified pairs: up to this many, every pair among them is checked


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
            cos = self.cosines.get(key)
            if cos is None:
                cos = float(self.vectors[key[0]] @ self.vectors[key[1]])
            try:  # a mirror image keeps its global vector (>= 0.93 for every mirrored copy measured): look only then
                self.evidence[key] = self.cache.compare(self.file(key[0]), self.file(key[1]),
                                                        mirror=cos >= MIRROR_COSINE)
            except Exception:  # a file gone or unreadable since indexing: no evidence, no group
                self.evidence[key] = NO_EVIDENCE
        return self.evidence[key]

    def check_all(self, pairs: list[tuple[int, int]]) -> None:
        with ThreadPoolExecutor(WORKERS) as pool:  # OpenCV releases the GIL
            list(pool.map(lambda p: self.check(*p), pairs))

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


def _stars(pairs: list[tuple[int, int]], sizes: np.ndarray, verifier: _Verifier) -> list[list[int]]:
    """Groups as "a picture and its copies": each group is a hub and the pictures verified as copies of the hub.

    Within each set of pictures linked by verified pairs, every pair is checked (up to COMPLETE pictures), and the
    hub is the picture verified against the most others (ties: the most matching points in all, then the larger
    file), which is the original when the others are its edits. Keeping the hub and deleting the rest never loses a
    picture that is not a copy of one kept; nothing joins a group through a chain of pairs.
    """
    partners: dict[int, set[int]] = defaultdict(set)
    for i, j in pairs:
        partners[i].add(j)
        partners[j].add(i)
    for component in _components(pairs):
        if len(component) <= COMPLETE:
            for a, b in combinations(component, 2):
                if verifier.check(a, b).verified:
                    partners[a].add(b)
                    partners[b].add(a)
    assigned: set[int] = set()
    groups = []
    while True:
        free = [(len(partners[i] - assigned), sum(verifier.check(i, j).inliers for j in partners[i] - assigned),
                 int(sizes[i]), -i) for i in partners if i not in assigned]  # copies, points, bytes, -row
        if not free or max(free)[0] == 0:
            return groups
        hub = -max(free)[3]
        members = [hub, *sorted(partners[hub] - assigned)]
        assigned.update(members)
        groups.append(members)


def _member(verifier: _Verifier, hub: int, i: int) -> dict[str, Any]:
    s = verifier.index.rows()
    if i == hub:
        return {"id": int(s.ids[i]), "path": s.paths[i], "best_score": 1.0, "hub": True, "evidence": []}
    cos = verifier.cosines.get((min(i, hub), max(i, hub)), 0.0)
    return {"id": int(s.ids[i]), "path": s.paths[i], "best_score": round(cos, 4), "hub": False,
            "copy_of": s.paths[hub], "evidence": [verifier.describe(i, hub)]}


def find_duplicates(index: Index, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Byte-identical groups, and groups of verified copies with the evidence for each pair."""
    if index.generation.lazy:
        raise CbirError(f"cbir duplicates compares every picture with its neighbours in memory; index {index.name} "
                        "is an on-disk index larger than that (run it on a subset, indexed without --on-disk)")
    s = index.rows()
    identical: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(s.sha256 or []):
        if h:
            identical[h].append(i)
    same_bytes = sorted((sorted(g) for g in identical.values() if len(g) > 1), key=lambda g: s.paths[g[0]])
    byte_group = {i: n for n, g in enumerate(same_bytes) for i in g}
    # the encoder's own rows: database-side augmentation pulls look-alikes together, which is right for
    # search and wrong for deciding what is a copy
    own = s.raw_vectors() if index.expansion.dba_k else s.vectors
    assert own is not None
    candidates = [(i, j, c) for i, j, c in candidate_pairs(own, threshold)
                  if not (i in byte_group and byte_group.get(j) == byte_group[i])]
    verifier = _Verifier(index, {(i, j): c for i, j, c in candidates}, own)
    verifier.check_all([(i, j) for i, j, _ in candidates])
    verified = [(i, j) for i, j, _ in candidates if verifier.check(i, j).verified]
    groups = sorted(_stars(verified, s.size, verifier), key=lambda g: s.paths[g[0]])
    return {
        "index": str(index.directory),
        "threshold": threshold,
        "candidates": len(candidates),
        "verified_pairs": len(verified),
        "identical": [[{"id": int(s.ids[i]), "path": s.paths[i], "why": "byte-identical (same sha256)"} for i in g]
                      for g in same_bytes],
        "near": [[_member(verifier, g[0], i) for i in g] for g in groups],
    }
