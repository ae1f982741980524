"""Pretrained weights from the local Hugging Face cache, where timm, open_clip and transformers keep them.

The cache is found as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME or ~/.cache,
then huggingface/hub), read when asked rather than when a library was imported, so a process that sets the variable
late still gets what it set. Its layout: `models--ORG--NAME/refs/main` holds a commit hash and
`models--ORG--NAME/snapshots/<hash>/<file>` the files.

Nothing is downloaded unless the user allows it: CBIR_DOWNLOAD=1 allows it, HF_HUB_OFFLINE=1 or CBIR_OFFLINE=1
forbid it whatever else is set. A missing file is an error that names the repository, the file and the folder to
put it in. No torch here: `cbir encoders` asks where weights would be looked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbir.errors import WeightsUnavailable


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cache_dir() -> Path:
    """The Hugging Face hub cache folder, as the environment says now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub"


def download_allowed() -> bool:
    return _flag("CBIR_DOWNLOAD") and not _flag("HF_HUB_OFFLINE") and not _flag("CBIR_OFFLINE")


def repo_folder(repo_id: str) -> Path:
    return cache_dir() / f"models--{repo_id.replace('/', '--')}"


@dataclass(frozen=True, kw_only=True)
class HubFile:
    """A file of a hub repository in the local cache."""

    repo: str
    file: str
    revision: str
    path: Path

    def identity(self) -> dict[str, str]:
        return {"repo": self.repo, "file": self.file, "revision": self.revision}


def find(repo_id: str, filenames: tuple[str, ...], what: str) -> HubFile:
    """The first of `filenames` that the cache holds for `repo_id` (downloaded first only when allowed)."""
    found = cached(repo_id, filenames)
    if found is not None:
        return found
    hint = (f"{what}: the weights are not on this machine. On a machine with network run `hf download {repo_id} "
            f"{filenames[0]}` and copy {repo_folder(repo_id)} to the same place here (or set HF_HUB_CACHE to the "
            f"folder that holds it), or pass --weights FILE with the weights file"
            f"{'' if download_allowed() else ', or set CBIR_DOWNLOAD=1 to let cbir download them'}")
    if not download_allowed():
        raise WeightsUnavailable(hint)
    from huggingface_hub import hf_hub_download

    errors = []
    for name in filenames:
        try:
            hf_hub_download(repo_id, name, cache_dir=str(cache_dir()))
            break
        except Exception as exc:  # not found, no network, a proxy ...
            errors.append(f"{name}: {exc.__class__.__name__}")
    found = cached(repo_id, filenames)
    if found is None:
        raise WeightsUnavailable(f"{hint} (download failed: {'; '.join(errors)})")
    return found


def cached(repo_id: str, filenames: tuple[str, ...]) -> HubFile | None:
    """The first of `filenames` that the cache holds for `repo_id`, else None; never a download."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir()))
        if isinstance(found, str):  # else None (not cached) or a marker (cached as missing upstream)
            path = Path(found)
            return HubFile(repo=repo_id, file=name, revision=path.parent.name, path=path)
    return None


def cached_repos(prefix: str) -> list[str]:
    """Repository ids in the cache whose id starts with `prefix` (e.g. 'timm/') and that hold a snapshot."""
    root = cache_dir()
    head = f"models--{prefix.replace('/', '--')}"
    if not root.is_dir():
        return []
    return sorted(d.name.removeprefix("models--").replace("--", "/") for d in root.glob(head + "*")
                  if (d / "snapshots").is_dir() and any((d / "snapshots").iterdir()))
