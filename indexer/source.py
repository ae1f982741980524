"""Where a collection's files come from: a local (or shared) folder, or an object store (`s3://bucket/prefix`).

Every stage reads files through a `Source`, so the same pipeline indexes both. Object stores go through
pyarrow's filesystems (pyarrow comes with `ray[data]`); an S3-compatible server other than AWS is named with
`AWS_ENDPOINT_URL` (or `CBIR_S3_ENDPOINT`), credentials come from the usual AWS variables.
A source is small and picklable: decoding tasks on other machines open their own connection.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cbir import formats
from cbir.errors import CbirError
from cbir.images import Discovery, discover

SCHEMES = ("s3://",)


def is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


@dataclass(frozen=True)
class Source:
    """A collection root: `location` is a folder path or an `s3://` URL."""

    location: str

    @classmethod
    def of(cls, location: str | os.PathLike[str]) -> Source:
        if is_url(location):
            return cls(str(location).rstrip("/"))
        return cls(str(Path(location)))

    @property
    def remote(self) -> bool:
        return is_url(self.location)

    @property
    def path(self) -> Path:
        """The local folder (local sources only)."""
        if self.remote:
            raise CbirError(f"{self.location} is not a local folder")
        return Path(self.location)

    @property
    def name(self) -> str:
        """The collection's own name (the default index name): the folder's, or the prefix's last part."""
        if not self.remote:
            return self.path.resolve().name
        return PurePosixPath(self.location.split("://", 1)[1]).name

    def resolved(self) -> str:
        """What the index records as its root."""
        return self.location if self.remote else str(self.path.resolve())

    def discover(self, exclude: tuple[str, ...] = ()) -> Discovery:
        if not self.remote:
            root = self.path
            if not root.is_dir():
                raise CbirError(f"folder not found: {root}" if not root.exists() else f"not a folder: {root}")
            try:
                return discover(root, exclude)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise CbirError(str(exc)) from exc
        left_out: Counter[tuple[str, str]] = Counter()
        return Discovery(files=sorted(self.listing(exclude, left_out)), skipped=[], left_out=dict(left_out))

    def listing(self, exclude: tuple[str, ...] = (),
                left_out: Counter[tuple[str, str]] | None = None) -> dict[str, tuple[int, int]]:
        """Object store: relative path -> (size, mtime_ns) of every image object under the prefix (told by name:
        sniffing would cost a request per object); the others are counted in `left_out` by reason and extension."""
        import fnmatch

        from pyarrow import fs

        from cbir.images import is_junk

        filesystem, base = self._fs()
        try:
            infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
        except (OSError, FileNotFoundError) as exc:
            raise CbirError(f"cannot list {self.location}: {exc}") from exc
        out: dict[str, tuple[int, int]] = {}
        for info in infos:
            if info.type != fs.FileType.File:
                continue
            rel = info.path[len(base):].lstrip("/")
            # the local discovery's rules: hidden and junk names, --exclude against names and relative paths
            if any(is_junk(part, exclude) for part in rel.split("/")) or any(fnmatch.fnmatch(rel, g) for g in exclude):
                continue
            reason = formats.left_out_by_name(rel)
            if reason is not None:
                if left_out is not None:
                    left_out[(reason, formats.extension(rel))] += 1
                continue
            out[rel] = (int(info.size), int(info.mtime_ns or 0))
        return out

    def stats(self, files: list[str]) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of each of `files` ((-1, -1) for one that is gone): one listing for an object store."""
        if self.remote:
            listing = self.listing()
            return {f: listing.get(f, (-1, -1)) for f in files}
        return {f: self.stat(f) or (-1, -1) for f in files}

    def stat(self, rel: str) -> tuple[int, int] | None:
        """(size, mtime_ns), or None when the file is gone."""
        if not self.remote:
            try:
                st = (self.path / rel).stat()
            except OSError:
                return None
            return st.st_size, st.st_mtime_ns
        from pyarrow import fs

        filesystem, base = self._fs()
        info = filesystem.get_file_info(f"{base}/{rel}")
        return None if info.type == fs.FileType.NotFound else (int(info.size), int(info.mtime_ns or 0))

    def read(self, rel: str) -> tuple[bytes, int, int]:
        """The file's bytes, size and mtime_ns. Raises FileNotFoundError or OSError."""
        if not self.remote:
            path = self.path / rel
            st = path.stat()
            with open(path, "rb") as fh:
                return fh.read(), st.st_size, st.st_mtime_ns
        filesystem, base = self._fs()
        info = filesystem.get_file_info(f"{base}/{rel}")
        if info.size is None:
            raise FileNotFoundError(rel)
        with filesystem.open_input_stream(f"{base}/{rel}") as fh:
            return fh.read(), int(info.size), int(info.mtime_ns or 0)

    def sidecar(self, rel: str) -> bytes | None:
        """The XMP sidecar of picture `rel` (IMG_1.xmp or IMG_1.CR2.xmp, any case), or None (object stores: not
        looked for, one request per picture)."""
        if self.remote:
            return None
        path = self.path / rel
        for candidate in (path.with_suffix(".xmp"), path.with_suffix(".XMP"), path.with_name(path.name + ".xmp"),
                          path.with_name(path.name + ".XMP")):
            try:
                return candidate.read_bytes()
            except OSError:
                continue
        return None

    def _fs(self) -> tuple[Any, str]:
        from pyarrow import fs

        bucket_and_prefix = self.location.split("://", 1)[1]
        options: dict[str, Any] = {}
        endpoint = os.environ.get("CBIR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            options.update(endpoint_override=host or endpoint, scheme=scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return fs.S3FileSystem(**options), bucket_and_prefix.rstrip("/")
