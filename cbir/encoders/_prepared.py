"""Prepared encoders: a built, batch-norm-folded network kept as TorchScript, so later runs skip building it.

Building efficientnet_lite0 from scratch costs ~1.6 s on 2 cores before the first image: importing timm (which
imports torchvision and torch._dynamo, ~1.3 s), creating the network, loading and checking its weights, folding.
The first `create` of an encoder on a machine saves the finished network, traced, in
$CBIR_CACHE/prepared/<key>.pt with a record (<key>.json) of what it was built from; later runs load it in ~0.1 s
and import neither timm nor torchvision (benchmarks/startup.py).

The record keeps the encoder's description and the size and mtime of every weights file the build read, and the
key covers the request, the device and the torch and cbir versions: a changed file or library builds again.
A network is kept only if its traced form gives the eager network's outputs (fp32, another batch size) and its
weights fit MAX_BYTES; otherwise that is recorded and it is built every time, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.files import atomic_path, sha256_bytes, write_in_one_go
from cbir.preprocess import Preprocess

if TYPE_CHECKING:  # torch only where a network is loaded or saved: the indexer asks `known_preprocess` before
    import torch

    from cbir.encoders.base import Encoder

log = logging.getLogger(__name__)

FORMAT = 1
MAX_BYTES = 256 * 2**20  # bigger networks (VGG16: 528 MB) spend on reading their copy what they save on building
CHECK_BATCH = 3  # traced with 2 images, checked with 3: a batch size frozen into the graph shows

_reads: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("cbir_weights_reads", default=None)


def note_read(path: Path) -> None:
    """Called by the weights loader: a prepared network is valid while the files it was built from are unchanged."""
    reads = _reads.get()
    if reads is not None:
        reads.append(Path(path).resolve())


@contextlib.contextmanager
def recording() -> Iterator[list[Path]]:
    """The weights files read inside the block."""
    reads: list[Path] = []
    token = _reads.set(reads)
    try:
        yield reads
    finally:
        _reads.reset(token)


def _folder() -> Path:
    from cbir.cache import cache_dir

    return cache_dir("prepared")


def key(name: str, weights: Any, pooling: str | None, device: str, options: dict[str, Any]) -> str:
    """One prepared network per request (name, weights argument, pooling, options), device type and library
    versions (read from package metadata: no import of torch)."""
    from cbir.version import __version__

    w = None if weights is None else str(weights)
    if w is not None and os.path.isfile(os.path.expanduser(w)):
        w = str(Path(w).expanduser().resolve())
    request = {"name": name, "weights": w, "pooling": pooling, "options": options, "device": device,
               "torch": _torch_version(), "cbir": __version__, "format": FORMAT}
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:60]
    return f"{safe}-{sha256_bytes(json.dumps(request, sort_keys=True, default=str).encode())[:24]}"


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:  # installed without package metadata (some system builds): ask torch itself
        import torch

        return torch.__version__


def _stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _read(k: str) -> dict[str, Any] | None:
    """The record under key `k` in this format, whatever it says, else None."""
    try:
        record = json.loads((_folder() / f"{k}.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _record(k: str) -> dict[str, Any] | None:
    """The record of a kept network whose weights files are unchanged, else None."""
    record = _read(k)
    if record is None or not record.get("kept"):
        return None
    try:
        if any(_stamp(Path(p)) != [p, size, mtime] for p, size, mtime in record["files"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def known_preprocess(name: str, weights: Any = None, pooling: str | None = None) -> Preprocess | None:
    """The preprocessing of an encoder prepared on this machine before, without torch (the indexer starts decoding
    with it while torch is still being imported); None if it is not prepared."""
    record = _record(key(name, weights, pooling, "cpu", {}))
    return Preprocess.from_dict(record["encoder"]["preprocess"]) if record else None


def load(k: str, device: torch.device) -> Encoder | None:
    """The prepared encoder under key `k`, if there is one and the files it was built from are unchanged."""
    import torch

    from cbir.encoders.base import Encoder

    if device.type != "cpu":
        return None
    record = _record(k)
    if record is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit announces its deprecation on every call
            model = torch.jit.load(str(_folder() / f"{k}.pt"), map_location="cpu")
    except (OSError, ValueError, RuntimeError):
        return None  # absent or damaged: built again (and saved again)
    e = record["encoder"]
    return Encoder(name=e["name"], model=model, dim=e["dim"], preprocess=Preprocess.from_dict(e["preprocess"]),
                   pooling=e["pooling"], weights=e["weights"],
                   device=device, options=e["options"], fixed_precision=e["fixed_precision"],
                   folded_batchnorms=e["folded_batchnorms"])


def save(k: str, encoder: Encoder, files: list[Path]) -> None:
    """Keep `encoder` (just built and folded) for the next run, if its traced form is faithful."""
    import torch

    if encoder.device.type != "cpu" or encoder.text is not None:
        return  # a text tower is not traced: a CLIP encoder is built each time, both towers from the same file
    folder = _folder()
    record: dict[str, Any] = {"format": FORMAT, "kept": False}
    try:
        record["files"] = [_stamp(p) for p in dict.fromkeys(files)]
        if _already_refused(k, record["files"]):
            return  # measured before: not worth tracing again on every run
        size = sum(t.numel() * t.element_size() for t in encoder.model.state_dict().values())
        traced = _trace(encoder) if size <= MAX_BYTES else None
        if traced is not None:
            with atomic_path(folder / f"{k}.pt", suffix=".pt") as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_in_one_go(tmp, lambda f: torch.jit.save(traced, f))
            record["kept"] = True
            record["encoder"] = {"name": encoder.name, "dim": encoder.dim, "preprocess": encoder.preprocess.to_dict(),
                                 "pooling": encoder.pooling, "weights": encoder.weights, "options": encoder.options,
                                 "fixed_precision": encoder.fixed_precision,
                                 "folded_batchnorms": encoder.folded_batchnorms}
        else:
            record["reason"] = "larger than MAX_BYTES" if size > MAX_BYTES else "its traced form differs"
        with atomic_path(folder / f"{k}.json") as tmp:
            tmp.write_text(json.dumps(record, sort_keys=True, default=str))
    except (OSError, TypeError, ValueError) as exc:  # a read-only or full cache only costs the next run the build
        log.debug(f"prepared encoder not kept: {exc}")


def _already_refused(k: str, files: list[list[Any]]) -> bool:
    record = _read(k)
    return record is not None and not record.get("kept") and record.get("files") == files


def _trace(encoder: Encoder) -> torch.jit.ScriptModule | None:
    """The traced network, or None if it does not reproduce the eager one."""
    import torch

    size = encoder.preprocess.size
    gen = torch.Generator().manual_seed(1)
    example = torch.rand(2, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    check = torch.rand(CHECK_BATCH, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    model = encoder.model
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            same = torch.allclose(traced(check).float(), model(check).float(), rtol=1e-4, atol=1e-5)
    except Exception as exc:  # anything the tracer cannot follow: build every time, as before
        log.debug(f"cannot trace {encoder.name}: {exc}")
        return None
    return traced if same else None
