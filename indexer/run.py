"""The one way to build an index: discover -> plan -> read and decode -> embed -> write -> commit.

    from indexer import BuildOptions, build
    summary = build("photos/", "indexes/photos", BuildOptions(mode="update", progress=True))

Used by `Index.build`, `cbir index` and `cbir bench`. Each stage is a module of this package, named for it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.errors import CbirError
from cbir.images import Discovery
from cbir.layout import DEFAULT_DIR, VECTORS
from cbir.search import store as store_mod
from cbir.search.expansion import Expansion
from cbir.search.store import Store
from indexer.decode import Decoder
from indexer.lock import IndexLock
from indexer.options import DEFAULT_ENCODER, BuildOptions, preset_matching
from indexer.plan import make_plan, resume
from indexer.source import Source
from indexer.summary import Summary
from indexer.work import WorkDir

if TYPE_CHECKING:  # torch, faiss: imported once decoding has started (see _decode_early)
    from cbir.encoders import Encoder
    from indexer.distributed import Engine

log = logging.getLogger(__name__)


def build(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
          options: BuildOptions | None = None, *, encoder: Encoder | None = None) -> Summary:
    """Index the images under `source` into `out` (default ./indexes/<folder name>).

    `encoder`, if given, is used as it is (bench passes one it has just trained); otherwise it is made from the
    options, or with mode "update" and no encoder named, rebuilt from the index's own record.
    """
    opts = options or BuildOptions()
    opts.validate()
    root = Source.of(source)
    out = Path(out) if out is not None else DEFAULT_DIR / root.name
    found = _discover(root, out, opts)
    early = _decode_early(root, found, opts) if encoder is None else None
    try:
        return _build(root, out, opts, found, encoder, early)
    finally:
        if early is not None:
            early.close()


def _decode_early(root: Source, found: Discovery, opts: BuildOptions) -> Decoder | None:
    """Start decoding a new index's files now, before the encoder is loaded (and torch imported), when its
    preprocessing is known already: the encoder was prepared on this machine before (cbir/encoders/_prepared.py)."""
    if opts.mode == "update" or opts.engine != "local" or not found.files:
        return None
    from cbir.encoders._prepared import known_preprocess

    preprocess = known_preprocess(opts.encoder or DEFAULT_ENCODER, opts.weights, opts.pooling)
    if preprocess is None:
        return None
    return Decoder(root, found.files, preprocess, opts.workers, opts.batch_size or 16)


def _build(root: Source, out: Path, opts: BuildOptions, found: Discovery, encoder: Encoder | None,
           early: Decoder | None) -> Summary:
    from cbir.encoders._device import configure_threads
    from indexer.commit import CommitJob, commit

    enc = encoder or _make_encoder(opts, out)
    log.info(f"encoder: {enc.name} ({enc.dim}-d, {enc.pooling} pooling, weights {enc.weights['source']}, "
             f"device {enc.device})")
    configure_threads()
    started = time.perf_counter()
    with IndexLock(out):
        old = store_mod.read(out / VECTORS, vectors=False, raw=True) \
            if opts.mode == "update" and (out / VECTORS).is_file() else None
        if old is not None:
            _check_same_encoder(old, enc, out)
            enc.restore_mode(old.encoder_config)  # new rows embedded as the old ones were
        plan = make_plan(root, found.files, old, opts.verify)
        work = WorkDir(out, _manifest(root, enc, opts.mode, old))
        work.open()
        todo = resume(plan, root, work.done())
        engine = _embed(root, plan.todo, todo, enc, work, opts, early=early)
        index_type, float16 = _search_settings(opts, old)
        on_disk = _on_disk(opts, old, len(plan.keep) + len(todo), enc.dim)
        expansion = _expansion(opts, old)
        job = CommitJob(source=root, out=out, encoder=enc, old=old, keep=plan.keep, work=work,
                        discovery_skips=found.skipped, index_type="ivfpq" if on_disk else index_type,
                        float16=float16 or (on_disk and opts.float16 is None), started=started, expansion=expansion,
                        preset=preset_matching(enc.name, expansion.qe_k, expansion.dba_k), on_disk=on_disk,
                        mapper=engine.map if engine is not None else None)
        try:
            done = commit(job)
        finally:
            if engine is not None:
                engine.close()
        work.remove()
    return Summary(out=out, encoder=enc, mode=opts.mode, indexed=done.indexed, skipped=done.skipped,
                   seconds=time.perf_counter() - started, embedded=len(todo), resumed=plan.resumed, added=done.added,
                   changed=plan.changed, removed=plan.removed, unchanged=plan.unchanged, left_out=found.left_out)


def _embed(root: Source, planned: list[str], todo: list[str], enc: Encoder, work: WorkDir, opts: BuildOptions, *,
           early: Decoder | None) -> Engine | None:
    """The embed stage on this machine, or on a Ray cluster (returned, still connected: the commit may use it)."""
    if opts.engine != "ray":
        from indexer.embed import embed_files

        embed_files(root, todo, enc, work, opts, early)
        return None
    from indexer import distributed

    engine = distributed.connect(opts.ray_address)
    try:
        distributed.embed_files(engine, root, todo, enc, work, opts, planned=planned)
    except BaseException:
        engine.close()
        raise
    return engine


def _discover(root: Source, out: Path, opts: BuildOptions) -> Discovery:
    if out.exists() and not out.is_dir():
        raise CbirError(f"--out {out} is a file, not a folder")
    if (out / VECTORS).is_file() and opts.mode == "create":
        raise CbirError(f"{out} already holds an index; pass --update to add new and changed files, or "
                        "--rebuild to re-embed everything")
    return root.discover(opts.exclude)


def _make_encoder(opts: BuildOptions, out: Path) -> Encoder:
    from cbir.encoders import create, from_config

    if opts.mode == "update" and opts.encoder is None and (out / VECTORS).is_file():
        config = store_mod.read(out / VECTORS, vectors=False).encoder_config
        return from_config(config, device=opts.device, weights=opts.weights)
    return create(opts.encoder or DEFAULT_ENCODER, weights=opts.weights, pooling=opts.pooling, device=opts.device,
                  precision=opts.precision or "auto")


def _check_same_encoder(old: Store, enc: Encoder, out: Path) -> None:
    if old.attrs["encoder"] != enc.name or old.encoder_config["weights"] != enc.config["weights"]:
        raise CbirError(f"{out} was built with encoder {old.attrs['encoder']} and other weights or settings; "
                        "--update keeps the encoder: use --rebuild to change it")


def _manifest(root: Source, enc: Encoder, mode: str, old: Store | None) -> dict:
    """What makes saved chunks reusable: same collection, same encoder, same job."""
    return {"root": root.resolved(), "encoder": enc.config["weights"], "name": enc.name, "pooling": enc.pooling,
            "mode": mode, "base": old.attrs.get("created") if old is not None else None}


def _expansion(opts: BuildOptions, old: Store | None) -> Expansion:
    """alpha-QE / alpha-DBA as asked, else as the old index had them, else none."""
    before = Expansion.from_dict(json.loads(old.attrs["expansion"])) if old is not None and \
        "expansion" in old.attrs else Expansion()
    return Expansion(qe_k=before.qe_k if opts.qe is None else opts.qe,
                     dba_k=before.dba_k if opts.dba is None else opts.dba)


def _on_disk(opts: BuildOptions, old: Store | None, rows: int, dim: int) -> bool:
    """As asked; else as the old index was; else (auto) when the float32 vectors would not fit the memory budget."""
    if opts.on_disk is not None:
        return opts.on_disk
    if old is not None and "search" in old.attrs:
        from cbir.search.plan import ONDISK

        return json.loads(old.attrs["search"]).get("type") == ONDISK
    if (opts.index_type or "auto") != "auto":
        return False
    budget = opts.memory_budget or default_memory_budget()
    if rows * dim * 4 > budget:
        log.info(f"{rows} vectors of {dim} floats exceed the memory budget of {budget / 2**30:.1f} GiB: "
                 "building an on-disk IVF-PQ index")
        return True
    return False


def default_memory_budget() -> int:
    """Half of this machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _search_settings(opts: BuildOptions, old: Store | None) -> tuple[str, bool]:
    """Index type and storage as asked, else as the old index had them, else auto and float32."""
    old_plan = json.loads(old.attrs["search"]) if old is not None and "search" in old.attrs else {}
    index_type = opts.index_type or old_plan.get("requested", "auto")
    if opts.float16 is not None:
        return index_type, opts.float16
    return index_type, old is not None and old.attrs.get("vector_dtype") == "float16"
