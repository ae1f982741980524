"""An encoder's numeric mode (fp32, bf16, int8), chosen by measurement: a faster mode only where it is faster
*and* faithful.

bf16 autocast roughly doubles convolution throughput on CPUs with AVX512-BF16/AMX and on GPUs, and is
slower on CPUs without them; int8 (ONNX Runtime, see onnx_backend.py) is faster still but loses more,
how much depending on the network. So `auto` embeds a calibration sample of the collection in each mode
and keeps a faster one only if (1) the mean cosine between the two embeddings of each image is >= 0.995,
(2) the top-10 neighbours of each sample image among the sample agree on >= 95% of places, and (3) it is
at least 10% faster than fp32. int8 quantizes on half the sample and is measured on all of it. The
measurement is recorded in the index, and kept in ~/.cache/cbir/precision for the same encoder on the same
machine, so it is taken at first use only (delete that folder to measure again).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.encoders import Encoder
from cbir.errors import CbirError
from cbir.files import atomic_path, sha256_bytes
from cbir.metrics import overlap, rank

MIN_COSINE = 0.995
MIN_OVERLAP = 0.95
MIN_SPEEDUP = 1.10
SAMPLE = 64  # calibration images
AUTO_MIN_IMAGES = 500  # below this, calibrating costs more than bf16 could save: fp32
AUTO_INT8_MIN_IMAGES = 2000  # int8 export and quantization take ~15 s: only worth trying for larger jobs


def int8_possible(encoder: Encoder) -> bool:
    from cbir.encoders import _onnx_backend as onnx_backend

    return encoder.device.type == "cpu" and onnx_backend.available()


def prepare_int8(encoder: Encoder, calibration: np.ndarray) -> None:
    """Give the encoder its int8 model, quantized with activation ranges from `calibration`."""
    from cbir.encoders import _onnx_backend as onnx_backend

    if not onnx_backend.available():
        raise CbirError("--precision int8 needs ONNX Runtime: pip install onnxruntime onnx")
    encoder.runtime = onnx_backend.OrtModel(onnx_backend.quantize_int8(encoder, calibration))


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's top-k neighbours (itself excluded) that two embeddings of the same rows agree on."""
    k = min(k, len(a) - 1)
    if k < 1:
        return 1.0
    rows = np.arange(len(a))
    return overlap(rank(a, a, rows, k), rank(b, b, rows, k))


def _embed_timed(encoder: Encoder, x: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, float]:
    """Embeddings of x and the images/s it took.

    The first batch is not timed: it pays for choosing kernels for that batch shape (oneDNN creates bf16
    primitives per shape, which made bf16 look barely faster than fp32 over 64 images). The rate is the median
    over the later full batches, so one interruption on a shared machine does not decide the mode.
    """
    chunks = [x[i:i + batch] for i in range(0, len(x), batch)]
    vecs = [encoder.embed_tensor(chunks[0])]
    times = []
    for chunk in chunks[1:]:
        t = time.perf_counter()
        vecs.append(encoder.embed_tensor(chunk))
        if len(chunk) == batch:
            times.append(time.perf_counter() - t)
    if not times:  # a sample of one batch: time it again
        t = time.perf_counter()
        encoder.embed_tensor(chunks[0])
        times.append(time.perf_counter() - t)
    return np.concatenate(vecs), len(chunks[0]) / float(np.median(times))


def measure(encoder: Encoder, sample: np.ndarray, modes: tuple[str, ...] = ("fp32", "bf16"),
            vectors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per mode: images/s, and against fp32: mean cosine and top-10 overlap on `sample` [N, 3, H, W].

    `vectors`, if given, receives each mode's embeddings of the sample (the indexer keeps the chosen ones).
    """
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    before = encoder.precision
    out: dict[str, Any] = {}
    ref: np.ndarray | None = None
    try:
        for mode in modes:
            if mode == "int8" and encoder.runtime is None:
                prepare_int8(encoder, sample[::2])
            encoder.precision = mode
            vecs, rate = _embed_timed(encoder, x)  # one pass gives both the vectors and the speed
            if ref is None:
                ref = vecs
            if vectors is not None:
                vectors[mode] = vecs
            out[mode] = {
                "images_per_s": round(rate, 2),
                "mean_cosine": round(float(np.mean(np.sum(vecs * ref, axis=1))), 5),
                "top10_overlap": round(neighbour_overlap(ref, vecs), 4),
            }
    finally:
        encoder.precision = before
    return out


def choose(encoder: Encoder, sample: np.ndarray, modes: tuple[str, ...] = ("fp32", "bf16"),
           forced: str | None = None, vectors: dict[str, np.ndarray] | None = None) -> str:
    """Set and return the encoder's precision, with the measurement in `encoder.calibration`.

    `forced` (the user asked for that mode) is used whatever the measurement says; it is still recorded.
    `vectors` receives each measured mode's embeddings of the sample.
    """
    if forced is not None and forced not in modes:
        modes = (*modes, forced)
    started = time.perf_counter()
    found = measure(encoder, sample, modes, vectors)
    base = found["fp32"]["images_per_s"]
    chosen = "fp32"
    for mode, m in found.items():
        m["faithful"] = bool(m["mean_cosine"] >= MIN_COSINE and m["top10_overlap"] >= MIN_OVERLAP)
        # fp32 is the fallback, held to MIN_SPEEDUP alone; among the other modes that pass, the fastest wins
        beats = chosen == "fp32" or m["images_per_s"] > found[chosen]["images_per_s"]
        if mode != "fp32" and m["faithful"] and m["images_per_s"] >= MIN_SPEEDUP * base and beats:
            chosen = mode
    if forced is not None:
        chosen = forced
    encoder.precision = chosen
    encoder.calibration = {"chosen": chosen, "sample": len(sample), "device": str(encoder.device),
                           "thresholds": {"mean_cosine": MIN_COSINE, "top10_overlap": MIN_OVERLAP,
                                          "speedup": MIN_SPEEDUP}, "modes": found,
                           "seconds": round(time.perf_counter() - started, 2)}
    if forced is not None:
        encoder.calibration["forced"] = True
    if chosen == "int8":
        encoder.calibration["int8_model"] = encoder.runtime.record()
    else:
        encoder.runtime = None
    return chosen


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memo_path(encoder: Encoder, modes: tuple[str, ...]) -> Path:
    """One file per (encoder, machine, library, test): what makes the measurement valid again."""
    from cbir.cache import cache_dir

    cfg = encoder.config
    key = {"encoder": {k: cfg[k] for k in ("name", "pooling", "weights", "preprocess", "options")},
           "folded_batchnorms": encoder.folded_batchnorms, "device": str(encoder.device), "cpu": _cpu_name(),
           "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "modes": list(modes), "sample": SAMPLE, "thresholds": [MIN_COSINE, MIN_OVERLAP, MIN_SPEEDUP]}
    digest = sha256_bytes(json.dumps(key, sort_keys=True, default=str).encode())[:32]
    return cache_dir("precision") / f"{encoder.name}-{digest}.json"


def reuse_measurement(encoder: Encoder, modes: tuple[str, ...]) -> bool:
    """Take an earlier measurement of this encoder on this machine, if there is one (never an int8 choice:
    its model is quantized on the collection's own images)."""
    path = _memo_path(encoder, modes)
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cal, dict) or cal.get("chosen") not in ("fp32", "bf16"):
        return False
    encoder.precision = cal["chosen"]
    encoder.runtime = None
    encoder.calibration = {**cal, "reused": str(path)}
    return True


def keep_measurement(encoder: Encoder, modes: tuple[str, ...]) -> None:
    """Cache the measurement just taken for the next run of the same encoder on this machine."""
    cal = encoder.calibration
    if cal.get("chosen") not in ("fp32", "bf16") or cal.get("forced") or "modes" not in cal:
        return
    try:
        with atomic_path(_memo_path(encoder, modes)) as tmp:
            tmp.write_text(json.dumps({**cal, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, sort_keys=True))
    except OSError:  # a read-only home only costs the next run a measurement
        pass


def skip(encoder: Encoder, reason: str) -> None:
    """'auto' without measuring (a small job): fp32, with the reason recorded."""
    encoder.precision = "fp32"
    encoder.calibration = {"chosen": "fp32", "reason": reason}
