"""Choosing an encoder's arithmetic by measurement: bf16 only where it is faster *and* faithful.

bf16 autocast roughly doubles convolution throughput on CPUs with AVX512-BF16/AMX and on GPUs, and is
slower on CPUs without them; how far its vectors drift from fp32 depends on the network. So `auto` embeds a
calibration sample of the collection in both modes and keeps bf16 only if (1) the mean cosine between the
two embeddings of each image is >= 0.995, (2) the top-10 neighbours of each sample image among the sample
agree on >= 95% of places, and (3) it is at least 10% faster. The measurement is recorded in the index.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cbir.encoders import Encoder

MIN_COSINE = 0.995
MIN_OVERLAP = 0.95
MIN_SPEEDUP = 1.10
SAMPLE = 64  # calibration images
AUTO_MIN_IMAGES = 500  # below this, calibrating costs more than bf16 could save: fp32


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's top-k neighbours (itself excluded) that two embeddings of the same rows agree on."""
    n = len(a)
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def top(x: np.ndarray) -> np.ndarray:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist(), strict=True)]))


def _rate(encoder: Encoder, batch: torch.Tensor, repeats: int = 3) -> float:
    """Images/s of the model alone on this batch: best of `repeats` after one warm-up."""
    encoder.embed_tensor(batch)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        encoder.embed_tensor(batch)
        best = min(best, time.perf_counter() - t)
    return len(batch) / best


def measure(encoder: Encoder, sample: np.ndarray, modes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """Per mode: images/s, and against fp32: mean cosine and top-10 overlap on `sample` [N, 3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    timing = x[: min(len(x), 32)]
    before = encoder.precision
    out: dict[str, Any] = {}
    ref: np.ndarray | None = None
    try:
        for mode in modes:
            encoder.precision = mode
            vecs = encoder.embed_tensor(x)
            if ref is None:
                ref = vecs
            out[mode] = {
                "images_per_s": round(_rate(encoder, timing), 2),
                "mean_cosine": round(float(np.mean(np.sum(vecs * ref, axis=1))), 5),
                "top10_overlap": round(neighbour_overlap(ref, vecs), 4),
            }
    finally:
        encoder.precision = before
    return out


def choose(encoder: Encoder, sample: np.ndarray) -> str:
    """Set and return the encoder's precision for 'auto', with the measurement in `encoder.calibration`."""
    found = measure(encoder, sample)
    base = found["fp32"]["images_per_s"]
    chosen = "fp32"
    for mode, m in found.items():
        m["faithful"] = bool(m["mean_cosine"] >= MIN_COSINE and m["top10_overlap"] >= MIN_OVERLAP)
        if mode != "fp32" and m["faithful"] and m["images_per_s"] >= MIN_SPEEDUP * base \
                and m["images_per_s"] > found[chosen]["images_per_s"]:
            chosen = mode
    encoder.precision = chosen
    encoder.calibration = {"chosen": chosen, "sample": len(sample), "device": str(encoder.device),
                           "thresholds": {"mean_cosine": MIN_COSINE, "top10_overlap": MIN_OVERLAP,
                                          "speedup": MIN_SPEEDUP}, "modes": found}
    return chosen


def skip(encoder: Encoder, reason: str) -> None:
    """'auto' without measuring (a small job): fp32, with the reason recorded."""
    encoder.precision = "fp32"
    encoder.calibration = {"chosen": "fp32", "reason": reason}
