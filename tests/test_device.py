"""Where things run: CPU here, the GPU when one exists, and the same neighbours either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.encoders._device import resolve_device
from cbir.errors import CbirError
from cbir.search.searcher import gpu_count, use_gpu
from tests.helpers import vector_search


def clustered(n: int = 2000, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_device_follows_torch() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(CbirError, match="unknown device"):
        resolve_device("tpu")


def test_cuda_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(CbirError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_faiss_gpu_is_used_only_when_it_can_be() -> None:
    n = gpu_count()
    assert use_gpu("cpu") is False
    assert use_gpu("auto") is (n > 0)
    x = clustered()
    s = vector_search(x, np.arange(len(x)) * 10, gpu=True)
    assert s.gpu is (n > 0)


def test_exact_search_matches_brute_force_by_row() -> None:
    x = clustered()
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    s = vector_search(x, ids)
    scores, found = s.search(x[:50], 10)  # row positions: the segment maps them to its ids
    brute = np.argsort(-(x[:50] @ x.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found[:, 0], np.arange(50))
    agree = np.mean([len(set(found[i]) & set(brute[i])) / 10 for i in range(50)])
    assert agree > 0.99
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.skipif(gpu_count() == 0, reason="needs a GPU build of faiss and a GPU")
def test_gpu_and_cpu_return_the_same_neighbours() -> None:
    x = clustered(5000, 128)
    ids = np.arange(len(x), dtype=np.int64)
    cpu = vector_search(x, ids, gpu=False)
    gpu = vector_search(x, ids, gpu=True)
    assert gpu.gpu
    _, a = cpu.search(x[:200], 10)
    _, b = gpu.search(x[:200], 10)
    assert np.mean([len(set(a[i]) & set(b[i])) / 10 for i in range(200)]) > 0.99
