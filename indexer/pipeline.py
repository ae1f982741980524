"""The ingestion pipeline: discover -> decode (worker processes) -> batch -> embed -> write.

Modes: "create" (refuses an existing index), "rebuild" (re-embeds everything) and "update" (re-embeds only
new and changed files, drops deleted ones, keeps the ids of the others). Embedded batches are saved as
they are made (see work.py), so an interrupted run resumes; the index files are replaced at the end, by
renames, with vectors.h5 last: a reader sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

import cbir
from cbir import store as store_mod
from cbir.device import configure_threads
from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.images import ImageError, Skipped, discover, load_image
from cbir.index import FAISS, VECTORS
from cbir.search import VectorSearch
from indexer.work import Chunk, IndexLock, WorkDir

MODES = ("create", "rebuild", "update")


@dataclass
class Summary:
    out: Path
    indexed: int
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0
    resumed: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    mode: str = "create"

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (f"indexed {self.indexed} images, skipped {len(self.skipped)}, in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s) -> {self.out}")
        if self.mode == "update":
            text += (f"\nupdate: {self.added} added, {self.changed} changed, {self.removed} removed, "
                     f"{self.unchanged} unchanged")
        if self.resumed:
            text += f"\nresumed: {self.resumed} images were already embedded by an interrupted run"
        if self.skipped:
            shown = "\n".join(f"  skipped {s.path}: {s.reason}" for s in self.skipped[:20])
            more = f"\n  ... and {len(self.skipped) - 20} more (see cbir info)" if len(self.skipped) > 20 else ""
            text += "\n" + shown + more
        return text


def read_and_hash(path: Path) -> tuple[bytes, str, os.stat_result]:
    st = path.stat()
    with open(path, "rb") as fh:
        data = fh.read()
    return data, hashlib.sha256(data).hexdigest(), st


class DecodedFiles(Dataset):
    """Item i: (i, uint8 pixels or None, reason, mtime_ns, size, sha256). Runs in worker processes.

    Workers ship uint8 pixels (a quarter of float32's bytes); the main process normalises a whole batch at once.
    """

    def __init__(self, root: Path, files: list[str], encoder: Encoder) -> None:
        self.root, self.files, self.preprocess = root, files, encoder.preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.root / self.files[i]
        try:
            data, digest, st = read_and_hash(path)
            if not data:
                return i, None, "empty file (0 bytes)", 0, 0, ""
            im = load_image(io.BytesIO(data), draft=self.preprocess.draft_size)
            return i, self.preprocess.pixels(im), "", st.st_mtime_ns, st.st_size, digest
        except ImageError as exc:
            return i, None, str(exc), 0, 0, ""
        except FileNotFoundError:
            return i, None, "file not found (deleted or moved)", 0, 0, ""
        except OSError as exc:
            return i, None, f"file not readable: {exc.strerror or exc}", 0, 0, ""
        except Exception as exc:  # a decoder bug must cost one file, never the run
            return i, None, f"cannot decode: {exc.__class__.__name__}: {exc}", 0, 0, ""


def _collate(items: list) -> list:
    return items


def default_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0  # starting processes costs more than it saves
    return max(1, min(4, os.cpu_count() or 1))


DECODE_NICE = 19


def _decode_at_low_priority(_worker_id: int) -> None:
    """Decoding workers run at low priority: they take the cores only while the model waits.

    The model's threads move in lockstep, so a decoder pre-empting one of them stalls them all: on 2 cores a busy
    decoder at normal priority cut efficientnet_lite0 bf16 from 113 to 35 img/s; at nice 19 the model kept its
    speed and the decoder still ran in the gaps (benchmarks/decode_priority.py).
    """
    with contextlib.suppress(OSError):
        os.nice(DECODE_NICE)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def default_batch(encoder: Encoder) -> int:
    """16 on a CPU (benchmarks/index_throughput.py: the best or within 5% of it for every encoder), 64 on a GPU."""
    return 64 if encoder.device.type == "cuda" else 16


def build_index(root: Path, out: Path, encoder: Encoder, batch_size: int | None = None, workers: int | None = None,
                progress: bool = False, exclude: tuple[str, ...] = (), rebuild: bool = False,
                mode: str | None = None, verify: bool = False, index_type: str | None = None,
                float16: bool | None = None) -> Summary:
    """Index `root` into `out`. index_type / float16 None: as the old index had them (update), else auto / no."""
    root, out = Path(root), Path(out)
    mode = mode or ("rebuild" if rebuild else "create")
    if mode not in MODES:
        raise CbirError(f"unknown mode {mode!r}")
    batch_size = default_batch(encoder) if batch_size is None else batch_size
    if batch_size < 1:
        raise CbirError("--batch-size must be at least 1")
    if out.exists() and not out.is_dir():
        raise CbirError(f"--out {out} is a file, not a folder")
    try:
        found = discover(root, exclude)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CbirError(str(exc)) from exc
    exists = (out / VECTORS).is_file()
    if exists and mode == "create":
        raise CbirError(f"{out} already holds an index; pass --update to add new and changed files, or "
                        "--rebuild to re-embed everything")
    configure_threads()
    started = time.perf_counter()
    with IndexLock(out):
        old = store_mod.read(out / VECTORS) if exists and mode == "update" else None
        if old is not None and json.loads(old.attrs["encoder_config"])["weights"] != encoder.config["weights"] \
                or old is not None and old.attrs["encoder"] != encoder.name:
            raise CbirError(f"{out} was built with encoder {old.attrs['encoder']} and other weights or settings; "
                            "--update keeps the encoder: use --rebuild to change it")
        if old is not None:
            old_plan = json.loads(old.attrs["search"]) if "search" in old.attrs else {}
            index_type = index_type or old_plan.get("requested", "auto")
            float16 = float16 if float16 is not None else old.attrs.get("vector_dtype") == "float16"
            from cbir import precision

            precision.restore(encoder, json.loads(old.attrs["encoder_config"]))  # new rows as the old ones
        summary = Summary(out, 0, mode=mode)
        keep, todo = _plan(root, found.files, old, verify, summary)
        work = WorkDir(out, {"root": str(root.resolve()), "encoder": encoder.config["weights"],
                             "name": encoder.name, "pooling": encoder.pooling, "mode": mode,
                             "base": old.attrs.get("created") if old is not None else None})
        work.open()
        done = work.done()
        remaining = []
        for f in todo:
            prev = done.get(f)
            if prev is not None:
                try:
                    st = (root / f).stat()
                    if prev == (-1, -1) or prev == (st.st_size, st.st_mtime_ns):
                        summary.resumed += 1
                        continue
                except OSError:
                    pass
            remaining.append(f)
        embedded = len(remaining)
        if remaining and encoder.precision in ("auto", "int8") and \
                not (encoder.precision == "int8" and encoder.runtime is not None):
            sample = _calibrate(root, remaining, encoder, progress)
            if sample is not None:  # the sample's vectors in the chosen precision are already made: keep them
                work.write(sample)
                done_now = set(sample.paths) | {p for p, _ in sample.skipped}
                remaining = [f for f in remaining if f not in done_now]
        _embed(root, remaining, encoder, work, batch_size, workers, progress)
        summary.embedded = embedded
        _commit(root, out, encoder, old, keep, work, found.skipped, summary, started, index_type or "auto",
                bool(float16), progress)
        work.remove()
    summary.seconds = time.perf_counter() - started
    return summary


def _plan(root: Path, files: list[str], old: store_mod.Store | None, verify: bool,
          summary: Summary) -> tuple[dict[str, int], list[str]]:
    """Which old rows to keep (path -> row) and which files to embed."""
    if old is None:
        return {}, list(files)
    row = {p: i for i, p in enumerate(old.paths)}
    hashes = old.sha256
    keep: dict[str, int] = {}
    todo: list[str] = []
    for f in files:
        i = row.get(f)
        if i is None:
            todo.append(f)
            continue
        try:
            st = (root / f).stat()
        except OSError:
            todo.append(f)
            summary.changed += 1
            continue
        same = st.st_size == old.size[i] and st.st_mtime_ns == old.mtime_ns[i]
        if same and verify and hashes is not None:
            same = read_and_hash(root / f)[1] == hashes[i]
        if same:
            keep[f] = i
            summary.unchanged += 1
        else:
            todo.append(f)
            summary.changed += 1
    present = set(files)
    summary.removed = sum(p not in present for p in old.paths)
    return keep, todo


def _calibrate(root: Path, files: list[str], encoder: Encoder, progress: bool) -> Chunk | None:
    """Settle precision 'auto' (or calibrate 'int8') on a sample of the images about to be embedded.

    Returns the sample as a chunk embedded in the chosen precision (and the files of the sample that could
    not be decoded, as skipped), so that the sample is not decoded and embedded a second time.
    """
    from cbir import precision

    forced = "int8" if encoder.precision == "int8" else None
    if forced is None and len(files) < precision.AUTO_MIN_IMAGES:
        precision.skip(encoder, f"{len(files)} images to embed, fewer than {precision.AUTO_MIN_IMAGES}: "
                                "not worth calibrating")
        return None
    modes: tuple[str, ...] = ("fp32", "bf16")
    if not forced and len(files) >= precision.AUTO_INT8_MIN_IMAGES and precision.int8_possible(encoder):
        modes = (*modes, "int8")
    if not forced and precision.recall(encoder, modes):
        if progress:
            print(f"precision: {encoder.precision} (as measured on this machine before; "
                  f"{encoder.calibration['reused']})", file=sys.stderr, flush=True)
        return None
    picks = np.unique(np.linspace(0, len(files) - 1, num=2 * precision.SAMPLE).astype(int))
    ds = DecodedFiles(root, [files[i] for i in picks], encoder)
    items: list[tuple] = []
    pixels: list[np.ndarray] = []
    for i in range(len(ds)):  # spread over the collection; stops once the sample is full
        items.append(ds[i])
        if items[-1][1] is not None:
            pixels.append(items[-1][1])
            if len(pixels) == precision.SAMPLE:
                break
    if forced and len(pixels) < 4:
        raise CbirError("--precision int8 needs at least 4 decodable images to calibrate on")
    if not forced and len(pixels) < 16:
        precision.skip(encoder, "too few decodable images in the calibration sample")
        return None
    sample = encoder.preprocess.normalize(np.stack(pixels)).numpy()
    vectors: dict[str, np.ndarray] = {}
    chosen = precision.choose(encoder, sample, ("fp32",) if forced else modes, forced=forced, vectors=vectors)
    precision.remember(encoder, modes)
    if forced and not encoder.calibration["modes"]["int8"]["faithful"]:
        m = encoder.calibration["modes"]["int8"]
        print(f"warning: int8 is not faithful on this encoder (mean cosine {m['mean_cosine']:.4f}, top-10 "
              f"overlap {m['top10_overlap']:.3f} against fp32); --precision auto would not use it",
              file=sys.stderr)
    if progress:
        rates = ", ".join(f"{m} {v['images_per_s']:.1f} img/s cos {v['mean_cosine']:.4f} "
                          f"overlap {v['top10_overlap']:.3f}" for m, v in encoder.calibration["modes"].items())
        print(f"precision: {chosen} ({rates})", file=sys.stderr, flush=True)
    return _chunk(ds.files, items, vectors[chosen])


def _chunk(files: list[str], items: list[tuple], vectors: np.ndarray) -> Chunk:
    """DecodedFiles items (index into `files`) -> a work chunk; `vectors` are the decoded items' rows, in order."""
    good = [it for it in items if it[1] is not None]
    return Chunk([files[it[0]] for it in good], vectors, np.array([it[3] for it in good], np.int64),
                 np.array([it[4] for it in good], np.int64), [it[5] for it in good],
                 [(files[it[0]], it[2]) for it in items if it[1] is None])


def _embed(root: Path, files: list[str], encoder: Encoder, work: WorkDir, batch_size: int, workers: int | None,
           progress: bool) -> None:
    if not files:
        return
    n_workers = default_workers(len(files), batch_size) if workers is None else workers
    loader = DataLoader(DecodedFiles(root, files, encoder), batch_size=batch_size, shuffle=False,
                        num_workers=n_workers, collate_fn=_collate, prefetch_factor=4 if n_workers else None,
                        worker_init_fn=_decode_at_low_priority if n_workers else None)
    skipped_total = 0
    with _progress(len(files), progress) as bar:
        for items in loader:
            pixels = [it[1] for it in items if it[1] is not None]
            vecs = encoder.embed_pixels(np.stack(pixels)) if pixels else np.zeros((0, encoder.dim), np.float32)
            chunk = _chunk(files, items, vecs)
            work.write(chunk)
            skipped_total += len(chunk.skipped)
            bar.update(len(items))
            bar.set_postfix(skipped=skipped_total, refresh=False)


def _commit(root: Path, out: Path, encoder: Encoder, old: store_mod.Store | None, keep: dict[str, int],
            work: WorkDir, discovery_skips: list[Skipped], summary: Summary, started: float,
            index_type: str = "auto", float16: bool = False, progress: bool = False) -> None:
    """Merge kept rows and new chunks into new files, then rename them into place (vectors.h5 last)."""
    new_rows: dict[str, tuple[int, int]] = {}  # path -> (chunk number, row in chunk)
    chunks = list(work.chunks())
    skipped: dict[str, str] = {s.path: s.reason for s in discovery_skips}
    for ci, c in enumerate(chunks):
        for r, p in enumerate(c.paths):
            new_rows[p] = (ci, r)
            skipped.pop(p, None)
        for p, reason in c.skipped:
            if p not in new_rows:
                skipped[p] = reason
    old_ids = {p: int(old.ids[i]) for i, p in enumerate(old.paths)} if old is not None else {}
    next_id = (int(old.ids.max()) + 1) if old is not None and len(old.ids) else 0
    order = sorted(set(keep) | set(new_rows))
    ids: dict[str, int] = {}
    for p in order:
        if p in old_ids:
            ids[p] = old_ids[p]
        else:
            ids[p] = next_id
            next_id += 1
    if old is None:  # a fresh index numbers its rows 0..N-1 in path order
        ids = {p: n for n, p in enumerate(order)}
    attrs = {"encoder": encoder.name, "encoder_config": json.dumps(encoder.config, sort_keys=True),
             "root": str(root.resolve()), "cbir_version": cbir.__version__, "created": store_mod.now_iso()}
    tmp_vec = out / f"{VECTORS}.tmp-{os.getpid()}"
    tmp_faiss = out / f"{FAISS}.tmp-{os.getpid()}"
    attrs["vector_dtype"] = "float16" if float16 else "float32"
    writer = store_mod.VectorWriter(tmp_vec, encoder.dim, attrs, dtype=attrs["vector_dtype"])
    try:
        for p in sorted(skipped):
            writer.add_skipped(p, skipped[p])
        block = 1024
        for start in range(0, len(order), block):
            part = order[start:start + block]
            vecs = np.empty((len(part), encoder.dim), np.float32)
            mt = np.empty(len(part), np.int64)
            sz = np.empty(len(part), np.int64)
            hs: list[str] = []
            for j, p in enumerate(part):
                if p in new_rows:
                    ci, r = new_rows[p]
                    c = chunks[ci]
                    vecs[j], mt[j], sz[j] = c.vectors[r], c.mtime_ns[r], c.size[r]
                    hs.append(c.sha256[r])
                else:
                    i = keep[p]
                    assert old is not None and old.vectors is not None
                    vecs[j], mt[j], sz[j] = old.vectors[i], old.mtime_ns[i], old.size[i]
                    hs.append(old.sha256[i] if old.sha256 is not None else "")
            writer.append(vecs, part, mt, sz, ids=[ids[p] for p in part], sha256=hs)
        writer.close({"seconds": time.perf_counter() - started, "skipped_count": len(skipped)})
        final = store_mod.read(tmp_vec)
        assert final.vectors is not None
        search = VectorSearch.build(final.vectors, final.ids, index_type=index_type, progress=progress)
        search.save(tmp_faiss)
        store_mod.set_attrs(tmp_vec, {"search": json.dumps(search.plan.to_dict(), sort_keys=True)})
        os.replace(tmp_faiss, out / FAISS)
        os.replace(tmp_vec, out / VECTORS)  # the commit point
    except BaseException:
        writer.abort()
        for t in (tmp_vec, tmp_faiss):
            t.unlink(missing_ok=True)
        raise
    summary.indexed = len(order)
    summary.added = sum(p not in old_ids for p in order)
    summary.skipped = [Skipped(p, r) for p, r in sorted(skipped.items())]
