"""Embed stage on a Ray cluster (`cbir index --engine ray`): the same decoding and the same encoder, on many machines.

    driver: manifest (sorted files, size and mtime each)                 -> IDX/.work/files.tsv
    Ray Data: paths -> read bytes + decode (CPU tasks, cbir's own preprocessing) -> embed (actor pool, one model
              per actor, a GPU each on GPU nodes) -> back to the driver
    driver: numbered chunks under IDX/.work/ (the write stage's own format), progress with images/s

Everything after (commit: vectors.h5, faiss.index) is the one-machine code, so both engines give the same index.
Resuming is the write stage's: a chunk is written whole or not at all, and a re-run embeds only the files no
chunk holds. The workers need cbir installed (same version) and the collection reachable at the same path or
URL; the index folder must be on storage that the driver writes (and, with --on-disk, that the workers read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir import metadata
from cbir.files import atomic_path
from cbir.local_features import DIM, KEEP, Features
from indexer import guardian
from indexer.decode import DECODE_NICE, Decoded, decode
from indexer.options import BuildOptions
from indexer.source import Source
from indexer.work import META, WorkDir

if TYPE_CHECKING:  # the driver's side; Ray's decoding workers import this module without torch
    from cbir.encoders import Encoder

log = logging.getLogger(__name__)
MANIFEST = "files.tsv"
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every address 127.0.0.1


class RayEngine:
    """A connection to a Ray cluster (indexer/engine.py's interface); a local cluster started for the run ends with
    it (indexer/guardian.py)."""

    def __init__(self, watcher: subprocess.Popen | None, quiet: QuietRay | None = None) -> None:
        self.watcher = watcher
        self.quiet = quiet

    def embed(self, source: Source, files: list[str], encoder: Encoder, work: WorkDir, options: BuildOptions, *,
              planned: list[str], early: Any = None) -> None:
        """Decode and embed on the cluster (a decoder started early on this machine is not used)."""
        if early is not None:
            early.close()
        embed_files(self, source, files, encoder, work, options, planned=planned)

    def map(self, fn: Callable[..., int], *iterables: Iterable[Any]) -> list[int]:
        """`fn` over the argument lists as Ray tasks (the on-disk index's shards); results in order."""
        import ray

        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(*args) for args in zip(*iterables, strict=True)])

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.watcher is not None:
            guardian.stop(self.watcher)
        if self.quiet is not None:
            self.quiet.close()


def connect(address: str | None) -> RayEngine:
    """Join `address`, else the cluster in RAY_ADDRESS, else start a local one for this run."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage over the network
    if address is None or address.split("://")[-1].startswith(("127.", "localhost")):
        # A cluster on this machine talks over loopback only (Ray would otherwise use the machine's own address).
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        from cbir.errors import CbirError

        raise CbirError('--engine ray needs Ray: pip install -e ".[ray]"') from None
    if address is not None:
        _check_reachable(address)
    engine = RayEngine(None, None if _verbose() else QuietRay())
    try:
        if not ray.is_initialized():
            log.info(f"ray: joining the cluster at {address}" if address else "ray: starting a local cluster")
            engine.watcher = guardian.start() if address is None else None
            _init(ray, address)
        _quiet_ray_data()
    except BaseException:
        engine.close()
        raise
    return engine


def _init(ray: Any, address: str | None) -> None:
    try:
        forwarded = _forwarded_env()  # a runtime environment only when needed: it costs fresh worker processes
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": forwarded} if forwarded else None)
    except ConnectionError as exc:
        from cbir.errors import CbirError

        raise CbirError(f"cannot join the Ray cluster at {address}: {exc}. A cluster started with `ray start` "
                        "uses token authentication: set RAY_AUTH_MODE=token (the token is read from "
                        "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None


def _verbose() -> bool:
    """`cbir -v`: other libraries' messages are shown (the root logger lets DEBUG through)."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class QuietRay:
    """Ray's own lines only with --verbose: its Python warnings at start-up ("Token authentication is enabled for this
    Ray cluster ...") and the log lines its C++ core writes straight to file descriptor 2 ("core_worker.cc: Actor
    with class name ... has constructor arguments in the object store"; RAY_BACKEND_LOG_LEVEL would silence those but
    announces itself in one more line). While Ray runs, fd 2 goes to /dev/null (the processes Ray starts inherit it)
    and Python's stderr (cbir's messages, the progress bar) to a copy of the real one. Errors that stop the run still
    reach the user as exceptions."""

    def __init__(self) -> None:
        logging.getLogger("ray").setLevel(logging.ERROR)  # after `import ray`, which sets its loggers up
        sys.stderr.flush()
        self.stream = sys.stderr
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding="utf-8",  # noqa: SIM115 (closed in close)
                          errors="backslashreplace")

    def close(self) -> None:
        if self.saved < 0:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.close()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved = -1
        sys.stderr = self.stream


def _check_reachable(address: str) -> None:
    """Fail at once, plainly, when nothing listens at a host:port address (Ray itself retries for a minute)."""
    import socket

    from cbir.errors import CbirError

    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", a ray:// client URL without a port...: Ray's own checks apply
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise CbirError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                        f"`ray start --head --port {port}` there, or leave out --ray-address to use this "
                        "machine") from None


def _forwarded_env() -> dict[str, str]:
    """The driver's object-store settings (endpoint, region, credentials), passed to the workers with the job."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "CBIR_S3_ENDPOINT"}


def _quiet_ray_data() -> None:
    import warnings

    from ray.data import DataContext

    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\..*")
    if not _verbose():
        logging.getLogger("ray").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar, with images/s
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def write_manifest(work: WorkDir, source: Source, files: list[str]) -> None:
    """The run's files with their size and mtime, written once per job (a resumed run keeps the one it finds).

    Rows are numbered by the commit, as the one-machine engine's are: the manifest carries no ids."""
    path = work.dir / MANIFEST
    if path.is_file() and read_manifest(path) >= set(files):
        return
    stats = source.stats(files)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{stats[f][0]}\t{stats[f][1]}\t{f}\n" for f in sorted(files)), encoding="utf-8")


def embed_files(engine: RayEngine, source: Source, files: list[str], encoder: Encoder, work: WorkDir,
                options: BuildOptions, *, planned: list[str]) -> int:
    """Embed `files` (those of `planned` that no chunk holds yet) on the cluster; returns how many were embedded."""
    from indexer.embed import default_batch, settle_mode, to_chunk

    write_manifest(work, source, planned)
    if not files:
        return 0
    # on the driver: the actors rebuild the settled mode
    files = settle_mode(source, files, encoder, work, features=options.local_features)
    batch_size = options.batch_size or default_batch(encoder)
    embedded, started, first = 0, time.perf_counter(), None
    devices: dict[str, int] = {}
    with _progress(len(files), options.progress) as bar:
        for batch in _pipeline(source, files, encoder, batch_size, options.local_features):
            work.write(to_chunk(_records(batch), batch["vector"][batch["ok"]]))
            for where in batch["device"]:
                devices[str(where)] = devices.get(str(where), 0) + 1
            if first is None:
                first = (time.perf_counter(), len(batch["path"]))
            embedded += len(batch["path"])
            bar.update(len(batch["path"]))
    if devices:  # which actor embedded what: each GPU actor its own card (Ray sets CUDA_VISIBLE_DEVICES per actor)
        log.info("ray: embedded on " + "; ".join(f"{where} ({n} images)" for where, n in sorted(devices.items())))
    if first is not None and embedded > first[1]:
        running = (embedded - first[1]) / max(1e-9, time.perf_counter() - first[0])
        log.info(f"ray: first results after {first[0] - started:.1f} s (workers starting, models loading), then "
                 f"{running:.1f} images/s")
    return embedded


def _pipeline(source: Source, files: list[str], encoder: Encoder, batch_size: int,
              features: bool) -> Iterator[dict[str, np.ndarray]]:
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0)]
    actors = gpus or max(1, len(cpus))
    # An embedding actor reserves all but one CPU of the smallest node (half of a 1-CPU node) and runs torch on
    # all its cores, as the local embed stage does; decoding tasks (half a CPU each, at nice 19) use the gaps.
    actor_cpus = 1.0 if gpus else max(0.5, min(cpus, default=1.0) - 1)
    ds = ray.data.from_items([{"path": p} for p in files],
                             override_num_blocks=max(1, min(len(files) // batch_size, 64 * actors)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"source": source, "preprocess": encoder.preprocess,
                                                 "features": features},
                        batch_size=batch_size, batch_format="numpy", num_cpus=0.5)
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"config": encoder.config, "gpu": gpus > 0},
                        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                        num_cpus=actor_cpus, num_gpus=1 if gpus else 0)
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    if not _verbose():  # Ray Data sets its loggers up on first use: quiet them after
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    yield from batches


def _records(batch: dict[str, np.ndarray]) -> list[Decoded]:
    """The batch as the write stage's records (pixels are not carried back: a marker says which decoded)."""
    marker = np.zeros(0, np.uint8)
    kept = _unpad(batch) if "kp_count" in batch else [None] * len(batch["path"])
    meta = {name.removeprefix(META): column for name, column in batch.items() if name.startswith(META)}
    return [Decoded(file=str(p), pixels=marker if ok else None, reason=str(r), mtime_ns=int(m), size=int(s),
                    sha256=str(h), meta=metadata.from_columns(meta, j) if ok else None, features=f)
            for j, (p, ok, r, m, s, h, f) in enumerate(zip(batch["path"], batch["ok"], batch["reason"],
                                                           batch["mtime_ns"], batch["size"], batch["sha256"], kept,
                                                           strict=True))]


def decode_batch(batch: dict[str, np.ndarray], source: Source, preprocess: Any,
                 features: bool = False) -> dict[str, np.ndarray]:
    """Read and decode a batch of files (cbir's own preprocessing) at low priority, like the local decoders."""
    with contextlib.suppress(OSError):
        os.nice(max(0, DECODE_NICE - os.nice(0)))
    items = [decode(source, str(p), preprocess, features) for p in batch["path"]]
    columns = _decoded_columns(batch, items, preprocess.size)
    return {**columns, **_padded(items)} if features else columns


def _padded(items: list[Decoded]) -> dict[str, np.ndarray]:
    """Local features as fixed-shape columns (Ray Data's numpy batches): KEEP rows per picture, and the count."""
    n = len(items)
    out = {"kp_count": np.zeros(n, np.int32), "kp_xy": np.zeros((n, KEEP, 2), np.float16),
           "kp_descriptors": np.zeros((n, KEEP, DIM), np.uint8), "kp_size": np.zeros((n, 2), np.uint16)}
    for j, it in enumerate(items):
        if it.features is not None:
            f = it.features.strongest(KEEP)
            out["kp_count"][j], out["kp_size"][j] = len(f), f.size
            out["kp_xy"][j, :len(f)], out["kp_descriptors"][j, :len(f)] = f.xy, f.descriptors
    return out


def _unpad(batch: dict[str, np.ndarray]) -> list[Features | None]:
    return [Features(xy=batch["kp_xy"][j, :c].astype(np.float32), descriptors=batch["kp_descriptors"][j, :c],
                     size=(int(batch["kp_size"][j, 0]), int(batch["kp_size"][j, 1]))) if batch["kp_size"][j].any()
            else None for j, c in enumerate(batch["kp_count"])]


def _decoded_columns(batch: dict[str, np.ndarray], items: list[Decoded], size: int) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(items), size, size, 3), np.uint8)
    for j, it in enumerate(items):
        if it.ok:
            pixels[j] = it.pixels
    return {"path": batch["path"], "pixels": pixels,
            "ok": np.array([it.ok for it in items], bool), "reason": np.array([it.reason for it in items]),
            "mtime_ns": np.array([it.mtime_ns for it in items], np.int64),
            "size": np.array([it.size for it in items], np.int64),
            "sha256": np.array([it.sha256 for it in items]),
            **{f"{META}{name}": column for name, column in metadata.to_columns(
                [it.meta or metadata.Meta(taken_ns=0) for it in items]).items()}}


class EmbedBatch:
    """One model per actor, rebuilt exactly from the index's encoder record (weights, pooling, numeric mode)."""

    def __init__(self, config: dict[str, Any], gpu: bool) -> None:
        import torch

        from cbir.encoders import from_config

        torch.set_num_threads(os.cpu_count() or 1)  # the node's cores, as the local embed stage uses them
        self.encoder = from_config(config, device="cuda" if gpu else "cpu")
        self.encoder.restore_mode(config)
        self.where = where_embedded(gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"]
        vectors = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.embed_pixels(batch["pixels"][ok])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        out["device"] = np.array([self.where] * len(ok))
        return out


def where_embedded(gpu: bool) -> str:
    """'host: GPU 2 (NVIDIA ...)' for an actor on a card (Ray's id for it: the actor sees it as cuda:0), else
    'host: cpu, N threads'."""
    import socket

    import torch

    host = socket.gethostname()
    if not gpu:
        return f"{host}: cpu, {torch.get_num_threads()} threads"
    import ray

    cards = ",".join(str(g) for g in ray.get_gpu_ids()) or "?"
    return f"{host}: GPU {cards} ({torch.cuda.get_device_name(0)})"


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing (ray)", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def read_manifest(path: Path) -> set[str]:
    """The paths a run's manifest lists."""
    return {line.split("\t", 2)[2] for line in path.read_text(encoding="utf-8").splitlines()}
