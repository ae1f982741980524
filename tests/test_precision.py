"""Precision modes: bf16 autocast stays faithful on the real default encoder; 'auto' measures and records."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbir import Index
from cbir.encoders import Encoder, Preprocess, create, from_config
from cbir.encoders import _numeric as precision
from cbir.errors import CbirError
from cbir.images import discover
from tests.helpers import build_index


def _sample_batch(samples: Path, enc, n: int = 24) -> np.ndarray:
    files = discover(samples).files[:n]
    return np.stack([enc.preprocess(Image.open(samples / f).convert("RGB")) for f in files])


def test_neighbour_overlap_hand_cases() -> None:
    a = np.eye(4, dtype=np.float32)
    a[0, 1] = a[1, 0] = 0.9  # rows 0 and 1 are each other's nearest
    assert precision.neighbour_overlap(a, a, k=1) == 1.0
    b = a.copy()
    b[0, 1] = b[1, 0] = 0.0
    b[0, 2] = b[2, 0] = 0.9  # now 0 <-> 2; row 3 ties everywhere (stable order keeps it)
    # row 0: {1} vs {2}: 0; row 1: {0} vs {0}: 1 (ties broken by index); row 2: {0} vs {0}: 1; row 3: {0} vs {0}
    assert precision.neighbour_overlap(a, b, k=1) == pytest.approx(0.75)
    assert precision.neighbour_overlap(a[:1], b[:1]) == 1.0


def test_bf16_on_real_weights_is_faithful_and_recorded(samples: Path) -> None:
    enc = create("efficientnet_lite0", device="cpu")
    batch = _sample_batch(samples, enc)
    found = precision.measure(enc, batch)
    assert set(found) == {"fp32", "bf16"} and enc.precision == "fp32"  # measuring leaves the mode alone
    assert found["fp32"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and found["fp32"]["top10_overlap"] == 1.0
    assert found["bf16"]["mean_cosine"] >= precision.MIN_COSINE
    assert found["bf16"]["images_per_s"] > 0
    chosen = precision.choose(enc, batch)
    assert enc.precision == chosen in ("fp32", "bf16")
    cal = enc.calibration
    assert cal["chosen"] == chosen and cal["sample"] == len(batch) and cal["modes"]["bf16"]["faithful"] is True
    if chosen == "bf16":  # only when it was measured faster by the margin
        assert cal["modes"]["bf16"]["images_per_s"] >= precision.MIN_SPEEDUP * cal["modes"]["fp32"]["images_per_s"]
    again = from_config(enc.config, device="cpu")
    assert again.precision == chosen and again.calibration == cal


class _SlowFirstCall(torch.nn.Module):
    """A real network whose first forward for each batch size is slow, as oneDNN's bf16 kernels are."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.seen = torch.nn.Conv2d(3, 8, 8, stride=8), set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) not in self.seen:
            self.seen.add(len(x))
            time.sleep(0.5)
        return self.proj(x).mean((2, 3))


def test_speed_is_measured_after_the_first_batch_and_vectors_cover_the_sample() -> None:
    enc = Encoder(name="slow_first", model=_SlowFirstCall(), dim=8, preprocess=Preprocess(size=32), pooling="avg",
                  weights={"source": "none"},
                  device=torch.device("cpu"))
    x = np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32)  # 16 + 16 + 8
    found = precision.measure(enc, x, ("fp32",))
    assert found["fp32"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # all 40 rows, in order
    # a 0.5 s stall per new shape would put 40 images under 80 images/s if one were timed
    assert found["fp32"]["images_per_s"] > 200


def test_unfaithful_mode_is_never_chosen(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = create("efficientnet_lite0", device="cpu")
    monkeypatch.setattr(precision, "MIN_COSINE", 1.01)  # nothing but fp32 can pass
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    assert precision.choose(enc, _sample_batch(samples, enc, 16)) == "fp32"
    assert enc.calibration["modes"]["bf16"]["faithful"] is False


def test_auto_in_the_indexer_small_and_calibrated(tmp_path: Path, samples: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    small = Index.build(samples, out=tmp_path / "small", device="cpu")  # precision auto by default
    cfg = small.encoder_config
    assert cfg["precision"] == "fp32" and "not worth calibrating" in cfg["calibration"]["reason"]
    monkeypatch.setattr(precision, "AUTO_MIN_IMAGES", 10)
    monkeypatch.setattr(precision, "SAMPLE", 16)
    big = Index.build(samples, out=tmp_path / "cal", device="cpu", precision="auto")
    cal = json.loads((big.directory / "manifest.json").read_text())["settings"]["encoder"]["calibration"]
    assert cal["sample"] == 16 and set(cal["modes"]) == {"fp32", "bf16"} and "reused" not in cal
    assert big.encoder.precision == cal["chosen"]  # queries are embedded as the index was
    # whichever was chosen, the index agrees with an fp32 index on the nearest neighbours
    ref = small.rows().vectors
    assert float(np.mean(np.sum(ref * big.rows().vectors, axis=1))) >= precision.MIN_COSINE
    # measured at first use: the next index with this encoder on this machine takes the same choice, and says so
    again = Index.build(samples, out=tmp_path / "again", device="cpu", precision="auto")
    cal2 = again.encoder_config["calibration"]
    assert cal2["reused"].startswith(os.environ["CBIR_CACHE"]) and cal2["chosen"] == cal["chosen"]
    assert cal2["modes"] == cal["modes"] and again.encoder.precision == cal["chosen"]
    # a different test (sample size) is a different measurement
    monkeypatch.setattr(precision, "SAMPLE", 17)
    third = Index.build(samples, out=tmp_path / "third", device="cpu", precision="auto")
    assert "reused" not in third.encoder_config["calibration"]
    assert third.encoder_config["calibration"]["sample"] == 17


def test_calibration_sample_is_embedded_once_in_the_chosen_precision(tmp_path: Path, samples: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The indexer keeps the calibration sample's vectors instead of decoding and embedding it again."""
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(samples, root)
    (root / "aaa-not-a-photo.jpg").write_text("this is text, not a JPEG")  # first in the sample's order
    ref = Index.build(root, out=tmp_path / "fp32", device="cpu", precision="fp32")
    monkeypatch.setattr(precision, "AUTO_MIN_IMAGES", 10)
    monkeypatch.setattr(precision, "SAMPLE", 16)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # bf16 whatever the machine's timing: rows must differ
    monkeypatch.setattr("cbir.words.SAMPLE", 0)  # the confidence words embed edited pictures of their own: not counted
    enc = create("efficientnet_lite0", device="cpu", precision="auto")
    embedded: list[int] = []
    embed_pixels = enc.embed_pixels

    def counting(pixels: np.ndarray) -> np.ndarray:  # the real encoder, with a count of the rows it embeds
        embedded.append(len(pixels))
        return embed_pixels(pixels)

    monkeypatch.setattr(enc, "embed_pixels", counting)
    summary = build_index(root, tmp_path / "auto", enc)
    idx = Index.open(tmp_path / "auto", device="cpu")
    assert idx.encoder_config["precision"] == "bf16" and idx.encoder_config["calibration"]["sample"] == 16
    assert sum(embedded) == len(ref) - 16 and summary.embedded == len(ref) + 1  # the sample is not redone
    assert idx.rows().paths == ref.rows().paths and len(set(idx.rows().paths)) == len(idx.rows().paths)
    assert [p for p, _ in idx.skipped] == ["aaa-not-a-photo.jpg"]
    sims = idx.rows().vectors @ ref.rows().vectors.T
    assert np.array_equal(sims.argmax(axis=1), np.arange(len(sims)))  # every row belongs to its own path
    assert np.diag(sims).min() >= 0.98 and np.diag(sims).max() < 1 - 1e-7  # all in bf16, the sample's included


def test_explicit_bf16_index_searches_like_fp32(tmp_path: Path, samples: Path) -> None:
    fp = Index.build(samples, out=tmp_path / "fp", device="cpu", precision="fp32")
    bf = Index.build(samples, out=tmp_path / "bf", device="cpu", precision="bf16")
    assert bf.encoder_config["precision"] == "bf16" and bf.encoder.precision == "bf16"
    same = np.mean([len({r.id for r in fp.search_id(i)} & {r.id for r in bf.search_id(i)}) / 10
                    for i in range(len(fp))])
    assert same >= 0.9
    with pytest.raises(CbirError, match="unknown precision"):
        create("efficientnet_lite0", device="cpu", precision="int4")


def test_int8_is_calibrated_recorded_reloaded_and_judged(tmp_path: Path, samples: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="indexer")
    idx = Index.build(samples, out=tmp_path / "i8", device="cpu", precision="int8")
    cfg = idx.encoder_config
    cal = cfg["calibration"]
    assert cfg["precision"] == "int8" and cal["forced"] is True and set(cal["modes"]) == {"fp32", "int8"}
    model = Path(cal["int8_model"]["path"])
    assert model.is_file() and str(model).startswith(os.environ["CBIR_CACHE"])
    # EfficientNet-Lite0's depthwise convolutions do not survive int8: the measurement says so, and warns
    m = cal["modes"]["int8"]
    assert m["mean_cosine"] < precision.MIN_COSINE and m["faithful"] is False
    assert "not faithful" in caplog.text  # the library logs; the command line shows it on stderr
    # a query goes through the very same int8 model as the indexed rows
    enc = idx.encoder
    assert enc.precision == "int8" and enc.runtime is not None
    first = idx.rows().paths[0]
    np.testing.assert_allclose(idx.embed(samples / first), idx.rows().vectors[0], atol=1e-5)
    assert idx.search(samples / first, k=1)[0].path == first
    # the model file gone: a clear error, not a silent switch to another precision
    moved = model.with_suffix(".moved")
    model.rename(moved)
    try:
        with pytest.raises(CbirError, match="int8 model .* is missing"):
            from_config(cfg, device="cpu")
    finally:
        moved.rename(model)
