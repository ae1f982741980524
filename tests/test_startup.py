"""Start-up: a search of an fp32 or bf16 index embeds its query through the verified ONNX model, without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir import Index
from cbir.cli import main


@pytest.fixture(scope="module")
def fp32_index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    out = tmp_path_factory.mktemp("startup") / "idx"
    Index.build(samples, out=out, device="cpu", precision="fp32")
    return out


def test_second_search_needs_no_torch_and_gives_the_same_answer(fp32_index: Path, samples: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    query = sorted(samples.rglob("*.jpg"))[3]
    assert main(["search", str(fp32_index), str(query), "--json"]) == 0  # torch; prepares the ONNX model
    first = json.loads(capsys.readouterr().out)
    code = ("import json, sys\nfrom cbir import Index\n"
            f"index = Index.open({str(fp32_index)!r}, device='cpu')\n"
            f"v = index.embed({str(query)!r})\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'timm': 'timm' in sys.modules,"
            " 'kind': type(index.query_encoder).__name__, 'vector': v.tolist(),"
            f" 'ids': [r.id for r in index.search_vector(v, k=10)]}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    second = json.loads(out.stdout)
    assert second["kind"] == "OnnxQueryEncoder" and not second["torch"] and not second["timm"]
    assert second["ids"] == [r["id"] for r in first["results"]]
    command = ("import sys\nfrom cbir.cli import main\n"
               f"code = main(['search', {str(fp32_index)!r}, {str(query)!r}, '--json'])\n"
               "print('torch loaded' if 'torch' in sys.modules else 'no torch', code)")
    out = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "no torch 0", out.stdout[-500:] + out.stderr[-2000:]
    ref = Index.open(fp32_index, device="cpu")
    assert type(ref.encoder).__name__ == "Encoder"  # built: queries now go through torch
    assert float(np.dot(ref.embed(str(query)), np.asarray(second["vector"], np.float32))) >= 0.9999


def test_bf16_index_queries_through_a_model_that_rounds_like_bf16(tmp_path: Path, samples: Path) -> None:
    """A bf16 index: the plain fp32 ONNX model is not faithful enough, the rounding one is, and is then used."""
    from cbir.encoders import _onnx_backend as onnx_backend
    from cbir.encoders._onnx_query import OnnxQueryEncoder, load
    from cbir.images import load_image

    out = tmp_path / "bf16"
    index = Index.build(samples, out=out, device="cpu", precision="bf16")
    assert index.encoder_config["precision"] == "bf16" and load(index.encoder_config) is None
    pictures = [load_image(p) for p in sorted(samples.rglob("*.jpg"))]
    torch_rows = index.encoder.embed(pictures)
    plain = OnnxQueryEncoder(onnx_backend.export_fp32(index.encoder), index.encoder.preprocess, index.encoder.dim)
    assert float(np.min(np.sum(plain.embed(pictures) * torch_rows, axis=1))) < 0.9999  # why the rewrite exists
    assert index.prepare_fast_queries() is True
    reopened = Index.open(out, device="cpu")
    assert type(reopened.query_encoder).__name__ == "OnnxQueryEncoder"
    onnx_rows = reopened.query_encoder.embed(pictures)
    assert float(np.min(np.sum(onnx_rows * torch_rows, axis=1))) >= 0.9999
    for picture, row in zip(pictures, torch_rows, strict=True):  # same answers, up to near-ties far down
        got, want = reopened.search(picture, k=5), index.search_vector(row, k=5)
        assert got[0].id == want[0].id
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=2e-3)


def test_int8_indexes_never_use_the_onnx_query_model() -> None:
    from cbir.encoders._onnx_query import _usable

    config = {"name": "efficientnet_lite0", "precision": "int8"}
    assert not _usable(config) and _usable({**config, "precision": "bf16"})


def _embed(name: str, weights: str | None, images: list, precision: str = "fp32"):
    from cbir.encoders import create

    enc = create(name, weights=weights, device="cpu", precision=precision)
    return enc, enc.embed(images)


def test_an_encoder_is_prepared_once_then_loaded_without_timm(tmp_path: Path, samples: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the built, folded network is kept; a later process loads it ready, with the same vectors."""
    import torch
    from PIL import Image

    from cbir.encoders.efficientnet_lite import VARIANTS, package_file

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "lite0.pth"  # a weights file of our own: its change must be noticed
    weights.write_bytes(package_file(VARIANTS["efficientnet_lite0"]).read_bytes())
    images = [Image.open(p).convert("RGB") for p in sorted(samples.rglob("*.jpg"))[:6]]
    built, ref = _embed("efficientnet_lite0", str(weights), images)
    assert not isinstance(built.model, torch.jit.ScriptModule)
    loaded, again = _embed("efficientnet_lite0", str(weights), images)
    assert isinstance(loaded.model, torch.jit.ScriptModule)
    assert loaded.config == built.config and loaded.folded_batchnorms == built.folded_batchnorms > 0
    assert np.abs(again - ref).max() < 1e-5
    _, bf16_built = _embed("efficientnet_lite0", str(weights), images, "bf16")
    assert np.sum(bf16_built * ref, axis=1).min() > 0.995  # (sanity: bf16 is bf16)
    code = ("import json, sys\nfrom cbir.encoders import create\n"
            f"e = create('efficientnet_lite0', weights={str(weights)!r}, device='cpu')\n"
            "print(json.dumps({'timm': 'timm' in sys.modules, 'torchvision': 'torchvision' in sys.modules,"
            " 'kind': type(e.model).__name__}))\n")
    env = {**__import__("os").environ, "CBIR_CACHE": str(tmp_path / "cache")}
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                    check=True, env=env).stdout)
    assert out == {"timm": False, "torchvision": False, "kind": "RecursiveScriptModule"}
    st = weights.stat()
    __import__("os").utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: build again
    rebuilt, _ = _embed("efficientnet_lite0", str(weights), images)
    assert not isinstance(rebuilt.model, torch.jit.ScriptModule)


def test_a_prepared_network_is_checked_at_another_batch_size(tmp_path: Path, samples: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace that froze the batch size would be wrong for every other batch: only faithful traces are kept."""
    import torch
    from PIL import Image

    from cbir.encoders import _prepared as prepared

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    images = [Image.open(p).convert("RGB") for p in sorted(samples.rglob("*.jpg"))[:5]]
    first, ref = _embed("colour_histogram", None, images)
    loaded, again = _embed("colour_histogram", None, images)
    assert isinstance(loaded.model, torch.jit.ScriptModule) and np.abs(again - ref).max() < 1e-6

    class FrozenBatch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)) + torch.zeros(len(x), 3)  # len(x) becomes a constant when traced

    first.model = FrozenBatch()
    assert prepared._trace(first) is None


def test_a_new_index_starts_decoding_before_torch_is_imported(tmp_path: Path, samples: Path) -> None:
    """Issue 15: with the encoder prepared, decoding starts while torch is still to be imported (the cores the
    import leaves idle decode), and the index is the one built the ordinary way."""
    import os

    env = {**os.environ, "CBIR_CACHE": str(tmp_path / "cache")}
    code = ("import json, sys\nimport indexer.decode as d\nseen = []\norig = d.Decoder.__init__\n"
            "def init(self, *a, **k):\n    seen.append('torch' in sys.modules)\n    orig(self, *a, **k)\n"
            "d.Decoder.__init__ = init\nfrom indexer import BuildOptions, build\n"
            f"build({str(samples)!r}, {str(tmp_path / 'early')!r}, BuildOptions(device='cpu', precision='fp32',"
            " workers=2, batch_size=4, progress=False))\nprint(json.dumps(seen))\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=300)  # prepares
    shutil.rmtree(tmp_path / "early")
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True,
                         timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False]  # one decoder, started before torch
    from cbir.encoders import create
    from indexer import BuildOptions, build

    build(samples, tmp_path / "plain", BuildOptions(device="cpu", workers=0, progress=False),
          encoder=create("efficientnet_lite0", device="cpu", precision="fp32"))  # given: no early decoding
    plain, early = Index.open(tmp_path / "plain"), Index.open(tmp_path / "early")
    assert list(early.rows().paths) == list(plain.rows().paths)
    np.testing.assert_allclose(early.rows().vectors, plain.rows().vectors, atol=1e-5)


def test_the_decoder_gives_exactly_the_files_asked_for_in_order(tmp_path: Path, samples: Path) -> None:
    from cbir.preprocess import Preprocess
    from indexer.decode import Decoder
    from indexer.source import Source

    root = tmp_path / "c"
    root.mkdir()
    files = []
    for i, p in enumerate(sorted(samples.rglob("*.jpg"))[:20]):
        (root / f"{i:02d}.jpg").write_bytes(p.read_bytes())
        files.append(f"{i:02d}.jpg")
    (root / "20.jpg").write_bytes(b"not a picture")
    files.append("20.jpg")
    pre = Preprocess(size=64)
    for workers in (0, 2):
        dec = Decoder(Source.of(root), files, pre, workers=workers)
        wanted = [*files[3::2], files[-1]]
        assert dec.covers(wanted, pre) and not dec.covers(wanted[::-1], pre) and not dec.covers(wanted, Preprocess())
        got = [r for b in dec.batches(wanted, 4) for r in b]
        dec.close()
        assert [r.file for r in got] == wanted
        assert all(r.ok and r.pixels.shape == (64, 64, 3) for r in got[:-1])
        assert not got[-1].ok and got[-1].reason  # the text file named .jpg keeps its reason


def test_a_network_refused_once_is_not_traced_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network whose trace is not faithful is built every time, as before, without paying for a trace each time."""
    import torch

    from cbir.encoders import _prepared as prepared
    from cbir.encoders import create

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(prepared, "_trace", lambda enc: calls.append(enc.name))  # "its traced form differs"
    for _ in range(3):
        enc = create("random_cnn", device="cpu")
        assert not isinstance(enc.model, torch.jit.ScriptModule)
    record = json.loads(next((tmp_path / "cache" / "prepared").glob("*.json")).read_text())
    assert record["kept"] is False and record["reason"] == "its traced form differs" and calls == ["random_cnn"]
