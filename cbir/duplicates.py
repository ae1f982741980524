"""Finding duplicates in an index: byte-identical files (same sha256) and near-duplicates (embedding
similarity at or above a threshold: re-encoded, resized, lightly cropped or mirrored copies).

The default threshold was measured with benchmarks/duplicates.py on generated copies of real photos
(see README): it is the value that keeps precision near 1 while finding most copies.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import faiss
import numpy as np

from cbir import store
from cbir.index import Index

# Chosen by benchmarks/duplicates.py on 212 animals4 photos x 4 copies (resize 70%, JPEG q40, crop 10%, mirror),
# efficientnet_lite0: at 0.84 pair precision 0.998, recall 0.989 (0.82: 0.983/0.995; 0.86: 1.000/0.981).
DEFAULT_THRESHOLD = 0.84


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


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


def find_duplicates(index: Index, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    s = index.store
    assert s.vectors is not None
    identical: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(s.sha256 or []):
        if h:
            identical[h].append(i)
    same_bytes = [sorted(g) for g in identical.values() if len(g) > 1]
    byte_group = {i: n for n, g in enumerate(same_bytes) for i in g}

    # the encoder's own rows: database-side augmentation pulls look-alikes together, which is right for
    # search and wrong for deciding what is a copy
    own = store.read(s.path, vectors=False, raw=True).raw_vectors if index.expansion.dba_k else s.vectors
    assert own is not None
    pairs = similar_pairs(own, threshold)
    uf = _UnionFind(len(s.paths))
    best: dict[int, float] = defaultdict(float)
    for i, j, score in pairs:
        if i in byte_group and byte_group.get(j) == byte_group[i]:
            continue
        uf.union(i, j)
        best[i] = max(best[i], score)
        best[j] = max(best[j], score)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(s.paths)):
        groups[uf.find(i)].append(i)
    near = [sorted(g) for g in groups.values() if len(g) > 1]
    near.sort(key=lambda g: s.paths[g[0]])
    same_bytes.sort(key=lambda g: s.paths[g[0]])
    return {
        "index": str(index.directory),
        "threshold": threshold,
        "identical": [[{"id": int(s.ids[i]), "path": s.paths[i]} for i in g] for g in same_bytes],
        "near": [[{"id": int(s.ids[i]), "path": s.paths[i], "best_score": round(best[i], 4)} for i in g]
                 for g in near],
    }
