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

from cbir import store as store_mod
from cbir.device import configure_threads
from cbir.encoders import Encoder, create, from_config
from cbir.errors import CbirError
from cbir.expansion import Expansion
from cbir.images import Discovery, discover
from cbir.layout import VECTORS, default_out
from cbir.store import Store
from indexer.commit import CommitJob, commit
from indexer.embed import embed_files
from indexer.lock import IndexLock
from indexer.options import DEFAULT_ENCODER, BuildOptions
from indexer.plan import make_plan, resume
from indexer.summary import Summary
from indexer.work import WorkDir

log = logging.getLogger(__name__)


def build(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
          options: BuildOptions | None = None, *, encoder: Encoder | None = None) -> Summary:
    """Index the images under `source` into `out` (default ./indexes/<folder name>).

    `encoder`, if given, is used as it is (bench passes one it has just trained); otherwise it is made from the
    options, or with mode "update" and no encoder named, rebuilt from the index's own record.
    """
    opts = options or BuildOptions()
    opts.validate()
    root = Path(source)
    out = Path(out) if out is not None else default_out(root)
    found = _discover(root, out, opts)
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
        embed_files(root, todo, enc, work, opts)
        index_type, float16 = _search_settings(opts, old)
        done = commit(CommitJob(root, out, enc, old, plan.keep, work, found.skipped, index_type, float16, started,
                                _expansion(opts, old), opts.preset))
        work.remove()
    return Summary(out, enc, opts.mode, done.indexed, done.skipped, time.perf_counter() - started, len(todo),
                   plan.resumed, done.added, plan.changed, plan.removed, plan.unchanged)


def _discover(root: Path, out: Path, opts: BuildOptions) -> Discovery:
    if not root.is_dir():
        raise CbirError(f"folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    if out.exists() and not out.is_dir():
        raise CbirError(f"--out {out} is a file, not a folder")
    if (out / VECTORS).is_file() and opts.mode == "create":
        raise CbirError(f"{out} already holds an index; pass --update to add new and changed files, or "
                        "--rebuild to re-embed everything")
    try:
        return discover(root, opts.exclude)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CbirError(str(exc)) from exc


def _make_encoder(opts: BuildOptions, out: Path) -> Encoder:
    if opts.mode == "update" and opts.encoder is None and (out / VECTORS).is_file():
        config = store_mod.read(out / VECTORS, vectors=False).encoder_config
        return from_config(config, device=opts.device, weights=opts.weights)
    return create(opts.encoder or DEFAULT_ENCODER, weights=opts.weights, pooling=opts.pooling, device=opts.device,
                  precision=opts.precision or "auto")


def _check_same_encoder(old: Store, enc: Encoder, out: Path) -> None:
    if old.attrs["encoder"] != enc.name or old.encoder_config["weights"] != enc.config["weights"]:
        raise CbirError(f"{out} was built with encoder {old.attrs['encoder']} and other weights or settings; "
                        "--update keeps the encoder: use --rebuild to change it")


def _manifest(root: Path, enc: Encoder, mode: str, old: Store | None) -> dict:
    """What makes saved chunks reusable: same collection, same encoder, same job."""
    return {"root": str(root.resolve()), "encoder": enc.config["weights"], "name": enc.name, "pooling": enc.pooling,
            "mode": mode, "base": old.attrs.get("created") if old is not None else None}


def _expansion(opts: BuildOptions, old: Store | None) -> Expansion:
    """alpha-QE / alpha-DBA as asked, else as the old index had them, else none."""
    before = Expansion.from_dict(json.loads(old.attrs["expansion"])) if old is not None and \
        "expansion" in old.attrs else Expansion()
    return Expansion(qe_k=before.qe_k if opts.qe is None else opts.qe,
                     dba_k=before.dba_k if opts.dba is None else opts.dba)


def _search_settings(opts: BuildOptions, old: Store | None) -> tuple[str, bool]:
    """Index type and storage as asked, else as the old index had them, else auto and float32."""
    old_plan = json.loads(old.attrs["search"]) if old is not None and "search" in old.attrs else {}
    index_type = opts.index_type or old_plan.get("requested", "auto")
    if opts.float16 is not None:
        return index_type, opts.float16
    return index_type, old is not None and old.attrs.get("vector_dtype") == "float16"
