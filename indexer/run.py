"""The one way to build an index: discover -> plan -> read and decode -> embed -> write -> commit.

    from indexer import BuildOptions, build
    summary = build("photos/", "indexes/photos", BuildOptions(mode="update", progress=True))

Used by `Index.build`, `cbir index` and `cbir bench`. Each stage is a module of this package, named for it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cbir.errors import CbirError
from cbir.images import Discovery
from cbir.layout import DEFAULT_DIR, holds_index
from cbir.metadata import GivenTags, read_tags_csv
from cbir.search import manifest as manifest_mod
from cbir.search.expansion import Expansion
from cbir.search.manifest import Manifest, Settings
from indexer.decode import Decoder
from indexer.lock import IndexLock
from indexer.options import DEFAULT_ENCODER, BuildOptions, preset_matching
from indexer.plan import catalog, make_plan, resume
from indexer.source import Source
from indexer.space import Needs, guarded
from indexer.summary import Summary
from indexer.work import WorkDir

if TYPE_CHECKING:  # torch, faiss: imported once decoding has started (see _decode_early)
    from cbir.encoders import Encoder

log = logging.getLogger(__name__)


def build(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
          options: BuildOptions | None = None, *, encoder: Encoder | None = None) -> Summary:
    """Index the images under `source` into `out` (default ./indexes/<folder name>).

    `encoder`, if given, is used as it is (bench passes one it has just trained); otherwise it is made from the
    options, or with mode "update" and no encoder named, rebuilt from the index's own record.
    """
    opts = (options or BuildOptions()).resolved()
    tags = read_tags_csv(opts.tags) if opts.tags else None  # checked before anything is embedded
    root = Source.of(source)
    out = Path(out) if out is not None else DEFAULT_DIR / root.name
    found = _discover(root, out, opts)
    early = _decode_early(root, found, opts) if encoder is None else None
    needs = Needs()
    try:
        with guarded(out, needs):  # a write that fails for want of space or rights: one plain message
            return _build(root, out, opts, found, encoder, early, needs=needs, tags=tags)
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
    return Decoder(root, found.files, preprocess, opts.workers, opts.batch_size or 16, features=opts.local_features)


def _build(root: Source, out: Path, opts: BuildOptions, found: Discovery, encoder: Encoder | None,
           early: Decoder | None, *, needs: Needs, tags: GivenTags | None = None) -> Summary:
    from cbir.encoders._device import configure_threads
    from indexer.commit import CommitJob, commit
    from indexer.engine import connect

    base = manifest_mod.load(out) if opts.mode != "create" and holds_index(out) else None
    enc = encoder or _make_encoder(opts, base)
    log.info(f"encoder: {enc.name} ({enc.dim}-d, {enc.pooling} pooling, weights {enc.weights['source']}, "
             f"device {enc.device})")
    configure_threads()
    started = time.perf_counter()
    with IndexLock(out):
        base = manifest_mod.load(out) if opts.mode != "create" and holds_index(out) else None  # under the lock
        updating = opts.mode == "update" and base is not None
        if updating:
            _check_same_encoder(base, enc, out)
            enc.restore_mode(base.settings.encoder)  # new rows embedded as the old ones were
        old = catalog(out, base) if updating else None
        plan = make_plan(root, found.files, old, verify=opts.verify, removed=base.removed if updating else None)
        work = WorkDir(out, _manifest(root, enc, opts.mode, base))
        work.open()
        todo = resume(plan, root, work.done())
        # a new segment of the planned rows
        needs.rows, needs.todo, needs.dim, needs.features = len(plan.todo), len(todo), enc.dim, opts.local_features
        engine = connect(opts)
        try:
            engine.embed(root, todo, enc, work, opts, planned=plan.todo, early=early)
            settings = _settings(opts, base if updating else None, enc, root, len(plan.todo) + len(old or {}))
            job = CommitJob(source=root, out=out, encoder=enc, base=_base(base, settings), fresh=not updating,
                            plan=plan, work=work, settings=settings, engine=engine, discovery_skips=found.skipped,
                            left_out=found.left_out, tags=_known_tags(tags, found), started=started)
            done = commit(job)
        finally:
            engine.close()
        work.remove()
    return Summary(out=out, encoder=enc, mode=opts.mode, indexed=done.indexed, skipped=done.skipped,
                   seconds=time.perf_counter() - started, embedded=len(todo), resumed=plan.resumed, added=done.added,
                   changed=plan.changed, removed=plan.removed, unchanged=plan.unchanged, renamed=len(plan.reuse),
                   segments=len(done.manifest.segments), left_out=found.left_out, retagged=plan.retagged)


def _known_tags(tags: GivenTags | None, found: Discovery) -> GivenTags | None:
    """The tags file's paths that are not pictures of the collection are named (a typo, or a file gone)."""
    if tags is None:
        return None
    unknown = sorted(set(tags.by_path) - set(found.files))
    if unknown:
        log.warning(f"--tags {tags.source}: {len(unknown)} paths are not pictures of the folder (first: "
                    f"{unknown[0]!r}); paths are relative to the folder indexed")
    return tags


def _base(base: Manifest | None, settings: Settings) -> Manifest:
    """The generation the run changes; a new index starts from an empty one."""
    return base if base is not None else Manifest(generation=0, settings=settings)


def _discover(root: Source, out: Path, opts: BuildOptions) -> Discovery:
    if out.exists() and not out.is_dir():
        raise CbirError(f"--out {out} is a file, not a folder")
    if holds_index(out) and opts.mode == "create":
        raise CbirError(f"{out} already holds an index; pass --update to add new and changed files, or "
                        "--rebuild to re-embed everything")
    found = root.discover(opts.exclude)
    if not found.files:  # an empty index helps no one, and would replace one that had pictures
        raise CbirError(found.nothing_found(root.location))
    return found


def _make_encoder(opts: BuildOptions, base: Manifest | None) -> Encoder:
    from cbir.encoders import create, from_config

    if opts.mode == "update" and opts.encoder is None and base is not None:
        return from_config(base.settings.encoder, device=opts.device, weights=opts.weights)
    options = {"model_kwargs": opts.model_kwargs} if opts.model_kwargs else {}
    return create(opts.encoder or DEFAULT_ENCODER, weights=opts.weights, pooling=opts.pooling, device=opts.device,
                  precision=opts.precision or "auto", **options)


def _check_same_encoder(base: Manifest, enc: Encoder, out: Path) -> None:
    recorded = base.settings.encoder
    if recorded["name"] != enc.name or recorded["weights"] != enc.config["weights"]:
        raise CbirError(f"{out} was built with encoder {recorded['name']} and other weights or settings; "
                        "--update keeps the encoder: use --rebuild to change it")


def _manifest(root: Source, enc: Encoder, mode: str, base: Manifest | None) -> dict:
    """What makes saved chunks reusable: same collection, same encoder, same job."""
    return {"root": root.resolved(), "encoder": enc.config["weights"], "name": enc.name, "pooling": enc.pooling,
            "mode": mode, "base": base.created if base is not None else None}


def _settings(opts: BuildOptions, before: Manifest | None, enc: Encoder, root: Source, rows: int) -> Settings:
    """What the index records: as asked, else as the index had it (an update), else the defaults."""
    old = before.settings if before is not None else Settings(encoder=enc.config, root=root.resolved())
    expansion = Expansion(qe_k=old.expansion.qe_k if opts.qe is None else opts.qe,
                          dba_k=old.expansion.dba_k if opts.dba is None else opts.dba)
    on_disk = _on_disk(opts, old if before is not None else None, rows, enc.dim)
    if on_disk and expansion.dba_k:
        raise CbirError("database-side augmentation (--dba) is not available with an on-disk index")
    float16 = opts.float16
    if float16 is None:  # as before; a new on-disk index stores float16 rows (half the disk it reads per query)
        float16 = old.vector_dtype == "float16" if before is not None else on_disk
    index_type = "ivfpq" if on_disk else opts.index_type or old.index_type
    return Settings(encoder=enc.config, root=root.resolved(), index_type=index_type,
                    vector_dtype="float16" if float16 else "float32", on_disk=on_disk, expansion=expansion,
                    words=old.words, preset=preset_matching(enc.name, expansion.qe_k, expansion.dba_k),
                    local_features=opts.local_features)


def _on_disk(opts: BuildOptions, old: Settings | None, rows: int, dim: int) -> bool:
    """As asked; else as the index was; else (auto) when the float32 vectors would not fit the memory budget."""
    if opts.on_disk is not None:
        return opts.on_disk
    if old is not None:
        return old.on_disk
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
