"""cbir: content-based image retrieval.

Data flow: files -> decoded batches -> encoder -> vectors (HDF5) -> FAISS -> ranked results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cbir.errors import CbirError
from cbir.version import __version__

if TYPE_CHECKING:
    from cbir.index import Index, Result

__all__ = ["CbirError", "Index", "Result", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import cbir.encoders` should not pull in h5py and faiss.
    if name in ("Index", "Result"):
        from cbir import index

        return getattr(index, name)
    raise AttributeError(name)
