"""`cbir watch DIR --out IDX`: keep an index in step with a folder (the pipeline's update, then live writes).

On start it catches up with what changed while it was not running (the ordinary `--update` plan), then follows the
folder's events (watchdog: inotify, or polling for network file systems and where inotify is unavailable). Events are
gathered until the folder is quiet for DEBOUNCE_S (at most MAX_WAIT_S after the first), so copying 10,000 photos in
makes a few segments, not 10,000; each batch is one write (indexer/live.py): new and changed files embedded, moved
ones keep their vectors, deleted ones removed. It runs beside `cbir serve` on the same index (one writer at a time:
each waits for the other's lock). Ctrl-C and SIGTERM end it after the batch in hand; a SIGKILL loses nothing
committed (the next start catches up).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cbir.errors import CbirError
from cbir.images import IMAGE_EXTENSIONS, is_junk
from indexer.options import BuildOptions

log = logging.getLogger(__name__)

DEBOUNCE_S = 1.0  # a batch is committed once the folder has been quiet this long ...
MAX_WAIT_S = 3.0  # ... or this long after its first event, whichever comes first
MAX_BATCH = 2000  # files per commit


@dataclass
class Pending:
    """Events seen since the last commit: paths relative to the root (the last event of a path wins)."""

    changed: set[str] = field(default_factory=set)
    moved: dict[str, str] = field(default_factory=dict)  # new path -> old path
    deleted: set[str] = field(default_factory=set)
    first: float = 0.0
    last: float = 0.0

    def __len__(self) -> int:
        return len(self.changed) + len(self.moved) + len(self.deleted)


class Watcher:
    """Folder events -> batches -> index writes."""

    def __init__(self, root: Path, out: Path, options: BuildOptions, *, poll: bool = False) -> None:
        self.root, self.out, self.options, self.poll = root.resolve(), out, options, poll
        self.pending = Pending()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.batches = 0
        self.index = None

    def catch_up(self) -> str:
        """The ordinary update (or the first build): what changed while nothing watched."""
        from cbir.index import Index
        from indexer import build
        from indexer.options import mode_of

        exists = (self.out / "manifest.json").is_file() or (self.out / "vectors.h5").is_file()
        opts = BuildOptions(**{**self.options.__dict__, "mode": mode_of(update=exists)})
        summary = build(self.root, self.out, opts)
        self.index = Index.open(self.out, device=self.options.device, encoder=summary.encoder)
        return summary.describe()

    def note(self, kind: str, path: str, dest: str | None = None) -> None:
        """One event from the observer (any thread)."""
        rel, new = self._relative(path), self._relative(dest) if dest else None
        now = time.monotonic()
        with self.lock:
            p = self.pending
            if kind == "moved" and new is not None:
                p.changed.discard(new)
                if rel is not None:
                    p.moved[new] = p.moved.pop(rel, rel)
                    p.changed.discard(rel)
                else:
                    p.changed.add(new)
            elif kind == "deleted" and rel is not None:
                p.changed.discard(rel)
                p.deleted.add(rel)
            elif rel is not None:
                p.deleted.discard(rel)
                p.changed.add(rel)
            else:
                return
            p.first = p.first or now
            p.last = now

    def _relative(self, path: str | None) -> str | None:
        """The path relative to the root if it is one the index would hold (not junk, an image's extension)."""
        if not path:
            return None
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except (ValueError, OSError):
            return None
        if any(is_junk(part, self.options.exclude) for part in rel.parts):
            return None
        return rel.as_posix() if rel.suffix.lower() in IMAGE_EXTENSIONS else None

    def due(self) -> Pending | None:
        """The batch to commit now, if the folder has been quiet long enough (taken out of `pending`)."""
        now = time.monotonic()
        with self.lock:
            p = self.pending
            if not len(p) or (now - p.last < DEBOUNCE_S and now - p.first < MAX_WAIT_S and len(p) < MAX_BATCH):
                return None
            self.pending = Pending()
            return p

    def apply(self, batch: Pending) -> str:
        """One batch as index writes: removals, then one segment of the new, changed and moved files."""
        from indexer import live

        index = self.index
        assert index is not None
        gone = [p for p in batch.deleted if not (self.root / p).exists()]
        reuse = {}
        for new, old in batch.moved.items():
            old_id = index.id_of(old)
            if old_id is not None:
                reuse[new] = old_id
        add = sorted({p for p in (*batch.changed, *batch.moved) if (self.root / p).is_file()})
        removed = live.remove_paths(index, gone) if gone else 0
        added = live.add(index, [str(self.root / p) for p in add], skip_bad=True, reuse=reuse) if add else []
        moved_away = [old for new, old in batch.moved.items() if new in reuse and not (self.root / old).exists()]
        if moved_away:
            removed += live.remove_paths(index, moved_away)
        self.batches += 1
        return (f"batch {self.batches}: {sum(a.new for a in added)} added or changed ({len(reuse)} moved, vectors "
                f"kept), {removed} removed; {len(index)} images in {len(index.manifest.segments)} segments")

    def run(self) -> None:
        """Observe until `stop` is set; commit batches as they fall due."""
        observer = self._observer()
        try:
            while not self.stop.is_set():
                batch = self.due()
                if batch is not None:
                    log.info(self.apply(batch))
                self.stop.wait(0.2)
        finally:
            observer.stop()
            observer.join(timeout=5)
        batch = self.due() if len(self.pending) else None
        if batch is not None:
            log.info(self.apply(batch))

    def _observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError as exc:  # installed by default; missing only in an environment set up by hand
            raise CbirError("cbir watch needs the watchdog package: pip install watchdog") from exc

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001
                if event.is_directory or event.event_type not in ("created", "modified", "moved", "deleted",
                                                                  "closed"):
                    return
                watcher.note(event.event_type, os.fsdecode(event.src_path),
                             os.fsdecode(getattr(event, "dest_path", "") or "") or None)

        for kind in ([PollingObserver] if self.poll else [Observer, PollingObserver]):
            observer = kind(timeout=1.0) if kind is PollingObserver else kind()
            try:
                observer.schedule(Handler(), str(self.root), recursive=True)
                observer.start()
                log.info(f"watching {self.root} ({'polling' if kind is PollingObserver else 'inotify'}); "
                         f"Ctrl+C stops")
                return observer
            except OSError as exc:  # inotify limits reached, or not supported by this file system
                log.warning(f"cannot watch {self.root} with {kind.__name__} ({exc}); polling instead")
        raise CbirError(f"cannot watch {self.root}")
