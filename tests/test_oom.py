"""Out of GPU memory, on the CPU: a network wrapped to raise torch.cuda.OutOfMemoryError for batches over a size, as
a small card does, run through the indexer's embed stage and the server's batches. Both halve and go on, with the
vectors of an unbroken run; one image that does not fit is a plain error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cbir import Index
from cbir.encoders import create
from cbir.errors import CbirError
from tests.badfiles import photo
from tests.helpers import build_index


class SmallCard(nn.Module):
    """The network, on a "card" that holds at most `fits` images at once (the error CUDA's allocator raises)."""

    def __init__(self, net: nn.Module, fits: int) -> None:
        super().__init__()
        self.net, self.fits, self.refused = net, fits, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.fits:
            self.refused.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0] * 40} MiB")
        return self.net(x)


def _encoder(fits: int | None):
    enc = create("random_cnn", device="cpu")
    if fits is not None:
        enc.model = SmallCard(enc.model, fits)
    return enc


def test_indexing_halves_the_batch_and_gives_the_unbroken_runs_vectors(samples: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    whole = build_index(samples, tmp_path / "whole", _encoder(None), batch_size=16, precision="fp32")
    small = _encoder(fits=5)
    with caplog.at_level(logging.WARNING, logger="cbir"):
        broken = build_index(samples, tmp_path / "small", small, batch_size=16, precision="fp32")
    assert broken.indexed == whole.indexed == 36
    assert small.model.refused == [16, 8]  # 16 did not fit, nor 8; 4 did, and 4 is kept for the rest
    assert small.max_batch == 4
    said = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert said == ["random_cnn: out of GPU memory at a batch of 16; going on with batches of 8 (the same vectors)",
                    "random_cnn: out of GPU memory at a batch of 8; going on with batches of 4 (the same vectors)"]
    a, b = Index.open(tmp_path / "whole", device="cpu"), Index.open(tmp_path / "small", device="cpu")
    assert list(a.rows().paths) == list(b.rows().paths)
    np.testing.assert_allclose(a.rows().vectors, b.rows().vectors, atol=1e-5)  # batch size changes only rounding


def test_serving_batches_and_text_halve_too_and_one_image_too_many_is_a_plain_error() -> None:
    whole, small = _encoder(None), _encoder(fits=3)
    pixels = np.stack([whole.preprocess.pixels(photo(seed=s)) for s in range(7)])
    np.testing.assert_allclose(small.embed_pixels(pixels), whole.embed_pixels(pixels), atol=1e-5)
    assert small.model.refused == [7, 4] and small.max_batch == 2  # 7 did not fit, nor 4; 2 did
    texts = ["a red bicycle", "a cat", "at night", "snow", "a dog on a sofa"]

    def text_card(batch: list[str]) -> np.ndarray:  # a text tower on a card that holds 1 text at once
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return np.eye(32, dtype=np.float32)[[len(t) for t in batch]]

    small.text = text_card
    np.testing.assert_array_equal(small.embed_text(texts), np.eye(32, dtype=np.float32)[[len(t) for t in texts]])
    assert small.max_batch == 1  # one size for the encoder's inputs, the smallest that was needed
    none_fits = _encoder(fits=0)
    with pytest.raises(CbirError, match="the GPU ran out of memory for a single image; .* --device cpu"):
        none_fits.embed_pixels(pixels[:2])
    other = _encoder(None)
    other.model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))  # a real bug, not memory: raised as it is
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        other.embed_pixels(pixels[:2])
    assert other.max_batch is None


def test_a_card_that_is_not_there_is_a_plain_error() -> None:
    from cbir.encoders._device import resolve_device

    cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(CbirError, match=f"--device cuda:{cards + 1}"):  # no GPU, or not that many
        resolve_device(f"cuda:{cards + 1}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's CI machines)")
def test_on_a_real_gpu_the_halved_batches_give_the_cpus_vectors() -> None:
    cpu = _encoder(None)
    gpu = create("random_cnn", device="cuda:0")
    gpu.model = SmallCard(gpu.model, fits=3)
    pixels = np.stack([cpu.preprocess.pixels(photo(seed=s)) for s in range(8)])
    np.testing.assert_allclose(gpu.embed_pixels(pixels), cpu.embed_pixels(pixels), atol=1e-4)
    assert gpu.max_batch == 2 and torch.cuda.memory_allocated() < 2**30
