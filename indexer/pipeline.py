"""The ingestion pipeline: discover -> decode (worker processes) -> batch -> embed -> write.

Vectors stream into `vectors.h5` batch by batch inside a temporary folder beside the output; the FAISS
index is built from them; only then is the folder moved into place. An interrupted run leaves the last
good index untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cbir
from cbir import store as store_mod
from cbir.device import configure_threads
from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.images import Skipped, discover, load_image
from cbir.index import FAISS, VECTORS
from cbir.search import VectorSearch


@dataclass
class Summary:
    out: Path
    indexed: int
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"indexed {self.indexed} images, skipped {len(self.skipped)}, in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s) -> {self.out}")
        if self.skipped:
            shown = "\n".join(f"  skipped {s.path}: {s.reason}" for s in self.skipped[:20])
            more = f"\n  ... and {len(self.skipped) - 20} more (see cbir info)" if len(self.skipped) > 20 else ""
            text += "\n" + shown + more
        return text


class DecodedFiles(Dataset):
    """Item i: (i, preprocessed array or None, reason, mtime_ns, size). Runs in worker processes."""

    def __init__(self, root: Path, files: list[str], encoder: Encoder) -> None:
        self.root, self.files, self.preprocess = root, files, encoder.preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, int, int]:
        path = self.root / self.files[i]
        try:
            st = path.stat()
            im = load_image(path, draft=self.preprocess.draft_size)
            return i, self.preprocess(im), "", st.st_mtime_ns, st.st_size
        except cbir.images.ImageError as exc:
            return i, None, str(exc), 0, 0
        except OSError as exc:
            return i, None, f"file not readable: {exc.strerror or exc}", 0, 0
        except Exception as exc:  # a decoder bug must cost one file, never the run
            return i, None, f"cannot decode: {exc.__class__.__name__}: {exc}", 0, 0


def _collate(items: list) -> list:
    return items


def default_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0  # starting processes costs more than it saves
    return max(1, min(4, (os.cpu_count() or 1)))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def build_index(root: Path, out: Path, encoder: Encoder, batch_size: int = 32, workers: int | None = None,
                progress: bool = False, exclude: tuple[str, ...] = (), rebuild: bool = False) -> Summary:
    root, out = Path(root), Path(out)
    if batch_size < 1:
        raise CbirError("--batch-size must be at least 1")
    try:
        found = discover(root, exclude)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CbirError(str(exc)) from exc
    if out.exists() and (out / VECTORS).exists() and not rebuild:
        raise CbirError(f"{out} already holds an index; pass --rebuild to replace it")
    if out.exists() and not out.is_dir():
        raise CbirError(f"--out {out} is a file, not a folder")
    configure_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.perf_counter()
    attrs = {
        "encoder": encoder.name,
        "encoder_config": json.dumps(encoder.config, sort_keys=True),
        "root": str(root.resolve()),
        "cbir_version": cbir.__version__,
        "created": store_mod.now_iso(),
    }
    writer = store_mod.VectorWriter(tmp / VECTORS, encoder.dim, attrs)
    skipped = list(found.skipped)
    try:
        for s in found.skipped:
            writer.add_skipped(s.path, s.reason)
        n_workers = default_workers(len(found.files), batch_size) if workers is None else workers
        loader = DataLoader(DecodedFiles(root, found.files, encoder), batch_size=batch_size, shuffle=False,
                            num_workers=n_workers, collate_fn=_collate,
                            prefetch_factor=4 if n_workers else None, persistent_workers=False)
        chunks: list[np.ndarray] = []
        with _progress(len(found.files), progress) as bar:
            for items in loader:
                good = [it for it in items if it[1] is not None]
                for i, _, reason, _, _ in items:
                    if reason:
                        skipped.append(Skipped(found.files[i], reason))
                        writer.add_skipped(found.files[i], reason)
                if good:
                    vecs = encoder.embed_tensor(torch.from_numpy(np.stack([it[1] for it in good])))
                    writer.append(vecs, [found.files[it[0]] for it in good], [it[3] for it in good],
                                  [it[4] for it in good])
                    chunks.append(vecs)
                bar.update(len(items))
                bar.set_postfix(skipped=len(skipped), refresh=False)
        seconds = time.perf_counter() - started
        writer.close({"seconds": seconds, "skipped_count": len(skipped)})
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
        VectorSearch.build(vectors, np.arange(len(vectors), dtype=np.int64)).save(tmp / FAISS)
        _swap_into_place(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Summary(out, len(vectors), skipped, seconds)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder; the old index stays intact until the new one is whole."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
