"""Embed stage: decoded batches -> the encoder in its numeric mode -> chunks for the write stage.

Numeric mode 'auto' (or 'int8') is settled first on a sample of the images about to be embedded
(cbir.encoders._numeric); the sample's vectors in the chosen mode are kept, so it is not decoded and embedded twice.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np

from cbir import metadata
from cbir.encoders import Encoder
from cbir.encoders import _numeric as numeric
from cbir.errors import CbirError
from cbir.local_features import pack
from indexer.decode import Decoded, Decoder, decode
from indexer.options import BuildOptions
from indexer.source import Source
from indexer.work import Chunk, WorkDir

log = logging.getLogger(__name__)


def default_batch(encoder: Encoder) -> int:
    """16 on a CPU (benchmarks/index_throughput.py: the best or within 5% of it for every encoder), 64 on a GPU."""
    return 64 if encoder.device.type == "cuda" else 16


def to_chunk(items: list[Decoded], vectors: np.ndarray) -> Chunk:
    """Decoded items -> a work chunk; `vectors` are the rows of the decodable items, in order (their local features
    too, when they were extracted)."""
    good = [it for it in items if it.ok]
    features = pack([it.features for it in good]) if any(it.features is not None for it in good) else None
    return Chunk(paths=[it.file for it in good], vectors=vectors, mtime_ns=np.array([it.mtime_ns for it in good],
                 np.int64),
                 size=np.array([it.size for it in good], np.int64), sha256=[it.sha256 for it in good],
                 skipped=[(it.file, it.reason) for it in items if not it.ok], features=features,
                 meta=metadata.to_columns([it.meta or metadata.Meta(taken_ns=metadata.file_time_ns(it.mtime_ns))
                                           for it in good]))


def embed_files(source: Source, files: list[str], encoder: Encoder, work: WorkDir, options: BuildOptions,
                decoder: Decoder | None = None) -> None:
    """Embed `files` batch by batch, each batch saved as a chunk the moment it is made.

    `decoder`, if given, is one started early (indexer/run.py); it is used if it covers the files with the
    encoder's own preprocessing, else replaced.
    """
    if not files:
        return
    files = settle_mode(source, files, encoder, work, features=options.local_features)
    batch_size = options.batch_size or default_batch(encoder)
    if decoder is None or not decoder.covers(files, encoder.preprocess):
        if decoder is not None:
            decoder.close()
        decoder = Decoder(source, files, encoder.preprocess, options.workers, batch_size,
                          features=options.local_features)
    skipped = 0
    with _progress(len(files), options.progress) as bar, contextlib.closing(decoder):
        for items in decoder.batches(files, batch_size):
            pixels = [it.pixels for it in items if it.ok]
            vecs = encoder.embed_pixels(np.stack(pixels)) if pixels else np.zeros((0, encoder.dim), np.float32)
            chunk = to_chunk(items, vecs)
            work.write(chunk)
            skipped += len(chunk.skipped)
            bar.update(len(items))
            bar.set_postfix(skipped=skipped, refresh=False)


def settle_mode(source: Source, files: list[str], encoder: Encoder, work: WorkDir, *, features: bool) -> list[str]:
    """Calibrate the numeric mode if needed (its sample saved as the first chunk, with local features if the index
    keeps them); the files still to embed."""
    sample = calibrate(source, files, encoder, features=features)
    if sample is None:
        return files
    work.write(sample)
    done = set(sample.paths) | {p for p, _ in sample.skipped}
    return [f for f in files if f not in done]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _modes_to_measure(encoder: Encoder, n_files: int) -> tuple[str, ...] | None:
    """The modes worth measuring for this job, or None when the encoder's mode is settled already."""
    if encoder.precision == "int8":
        return None if encoder.runtime is not None else ("fp32",)
    if encoder.precision != "auto":
        return None
    if n_files < numeric.AUTO_MIN_IMAGES:
        numeric.skip(encoder, f"{n_files} images to embed, fewer than {numeric.AUTO_MIN_IMAGES}: "
                              "not worth calibrating")
        return None
    if n_files >= numeric.AUTO_INT8_MIN_IMAGES and numeric.int8_possible(encoder):
        return ("fp32", "bf16", "int8")
    return ("fp32", "bf16")


def calibrate(source: Source, files: list[str], encoder: Encoder, *, features: bool = False) -> Chunk | None:
    """Settle numeric mode 'auto' (or calibrate 'int8') on a sample of `files`.

    Returns the sample as a chunk embedded in the chosen mode (its undecodable files as skipped), or None when
    nothing was embedded (mode already settled, a measurement reused, or too few images).
    """
    modes = _modes_to_measure(encoder, len(files))
    if modes is None:
        return None
    forced = "int8" if encoder.precision == "int8" else None
    if not forced and numeric.reuse_measurement(encoder, modes):
        log.info(f"precision: {encoder.precision} (as measured on this machine before; "
                 f"{encoder.calibration['reused']})")
        return None
    items = _sample(source, files, encoder, features)
    pixels = [it.pixels for it in items if it.ok]
    if forced and len(pixels) < 4:
        raise CbirError("--precision int8 needs at least 4 decodable images to calibrate on")
    if not forced and len(pixels) < 16:
        numeric.skip(encoder, "too few decodable images in the calibration sample")
        return None
    vectors: dict[str, np.ndarray] = {}
    sample = encoder.preprocess.normalize(np.stack(pixels)).numpy()
    chosen = numeric.choose(encoder, sample, modes, forced=forced, vectors=vectors)
    numeric.keep_measurement(encoder, modes)
    _report(encoder, chosen, forced)
    return to_chunk(items, vectors[chosen])


def _sample(source: Source, files: list[str], encoder: Encoder, features: bool) -> list[Decoded]:
    """Decoded files spread over the collection, until SAMPLE of them decode."""
    picks = np.unique(np.linspace(0, len(files) - 1, num=2 * numeric.SAMPLE).astype(int))
    items: list[Decoded] = []
    for i in picks:
        items.append(decode(source, files[i], encoder.preprocess, features))
        if sum(it.ok for it in items) == numeric.SAMPLE:
            break
    return items


def _report(encoder: Encoder, chosen: str, forced: str | None) -> None:
    modes = encoder.calibration["modes"]
    if forced and not modes["int8"]["faithful"]:
        m = modes["int8"]
        log.warning(f"warning: int8 is not faithful on this encoder (mean cosine {m['mean_cosine']:.4f}, top-10 "
                    f"overlap {m['top10_overlap']:.3f} against fp32); --precision auto would not use it")
    rates = ", ".join(f"{m} {v['images_per_s']:.1f} img/s cos {v['mean_cosine']:.4f} "
                      f"overlap {v['top10_overlap']:.3f}" for m, v in modes.items())
    log.info(f"precision: {chosen} ({rates})")
