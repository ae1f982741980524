"""FAISS search over the vectors (`faiss.index`): exact inner product, on the GPU when there is one.

On disk the index is an IndexIDMap2 over an exact inner-product index, so it answers with the stable ids
of `vectors.h5`. For searching, the inner index is searched directly (cloned to the GPU when a GPU build of
faiss sees a GPU) and positions are mapped to ids here, which works the same on both.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from cbir.errors import CbirError


def gpu_count() -> int:
    """GPUs usable by faiss: 0 with the CPU build (no StandardGpuResources) or with no GPU present."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a GPU build without a driver
        return 0


def use_gpu(device: str) -> bool:
    """Search on the GPU only if the encoder device is CUDA (or auto) and faiss can really use a GPU."""
    if gpu_count() == 0:
        return False
    return device == "auto" or device.startswith("cuda")


class VectorSearch:
    """Exact cosine search (vectors are L2-normalised, so inner product = cosine)."""

    def __init__(self, index: faiss.Index, gpu: bool = False) -> None:
        self.index = index  # the CPU IndexIDMap2 that is saved
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        self.ids = (faiss.vector_to_array(index.id_map).astype(np.int64) if isinstance(index, faiss.IndexIDMap)
                    else np.arange(index.ntotal, dtype=np.int64))
        self.gpu = False
        self._search_index = inner
        if gpu and gpu_count() > 0:
            self._res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._res, 0, inner)
            self.gpu = True

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, gpu: bool = False) -> VectorSearch:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        if len(vectors):
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return cls(index, gpu=gpu)

    @classmethod
    def load(cls, path: Path, gpu: bool = False) -> VectorSearch:
        try:
            return cls(faiss.read_index(str(path)), gpu=gpu)
        except RuntimeError as exc:
            raise CbirError(f"cannot read FAISS index {path}: {str(exc).splitlines()[0]}") from exc

    def save(self, path: Path) -> None:
        """Write beside the target, then rename: a reader never sees half a file."""
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def reconstruct(self, row: int) -> np.ndarray:
        """The stored vector at position `row` (for consistency checks)."""
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        return inner.reconstruct(row)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each [B, k]; missing slots (k > N) have id -1 and score -inf."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise CbirError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        kk = min(k, self.ntotal)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if kk == 0:
            return scores, ids
        s, pos = self._search_index.search(q, kk)
        valid = pos >= 0
        scores[:, :kk] = np.where(valid, s, -np.inf)
        ids[:, :kk] = np.where(valid, self.ids[np.clip(pos, 0, None)], -1)
        return scores, ids
