"""Query embedding without torch: the index's own network as a cached, verified ONNX model (ONNX Runtime).

A fresh `cbir search` spent ~1.8 s importing torch, ~2 s more importing timm and building, folding and checking
the network, for one image. So after a search of an fp32 index, the network is exported once to ONNX (fp32) and
checked against the torch encoder on the bundled sample photos; later processes embed queries with it, loading
neither torch nor timm. Only where the vectors are the index's own (cosine >= 0.9999 on every check image): fp32
indexes, and bf16 indexes through a model that rounds as bf16 autocast does (cbir/encoders/_onnx_bf16.py). int8 indexes
embed queries with their own quantized model, through torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cbir.cache import cache_dir, model_key
from cbir.errors import CbirError
from cbir.files import atomic_path, sha256_file
from cbir.preprocess import Preprocess

if TYPE_CHECKING:
    from cbir.encoders import Encoder

MIN_COSINE = 0.9999
QUERY_MODES = ("fp32", "bf16")  # bf16: the fp32 model rewritten to round as autocast does (cbir/encoders/_onnx_bf16.py)
SAMPLES = Path(__file__).resolve().parents[1] / "samples"  # cbir/samples: the bundled photos


def _check_path(config: dict[str, Any]) -> Path:
    mode = config.get("precision", "fp32")
    return cache_dir("onnx") / f"{model_key(config)}{'' if mode == 'fp32' else '.' + mode}.query.json"


def _usable(config: dict[str, Any]) -> bool:
    return config.get("precision", "fp32") in QUERY_MODES and config["name"] != "colour_histogram"


class OnnxQueryEncoder:
    """Embeds query pictures like the index's encoder: same preprocessing, same network, same numeric mode."""

    def __init__(self, path: Path, preprocess: Preprocess, dim: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.preprocess, self.dim = preprocess, dim

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_pixels(np.stack([self.preprocess.pixels(im) for im in images]))

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of `preprocess.pixels` arrays, uint8 [B, H, W, 3], as the torch encoder takes them."""
        feats = self.session.run(None, {"x": self.preprocess.normalize_numpy(pixels)})[0].reshape(len(pixels), -1)
        norms = np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(feats / norms, dtype=np.float32)


def load(config: dict[str, Any]) -> OnnxQueryEncoder | None:
    """The verified ONNX query encoder for an index's encoder record, or None (not verified, or not fp32 or bf16)."""
    if not _usable(config):
        return None
    try:
        check = json.loads(_check_path(config).read_text())
        path = Path(check["model"])
        if not check["verified"] or sha256_file(path) != check["model_sha256"]:
            return None
        return OnnxQueryEncoder(path, Preprocess.from_dict(config["preprocess"]), int(config["dim"]))
    except (OSError, ValueError, KeyError, ImportError):
        return None
    except Exception:  # an ONNX Runtime that cannot load the file: the torch path still works
        return None


def prepare(encoder: Encoder) -> bool:
    """Export `encoder` (fp32 or bf16) to ONNX and verify it against torch on the sample photos; True if usable."""
    from cbir.encoders import _onnx_backend as onnx_backend
    from cbir.images import load_image

    config = encoder.config
    if not _usable(config) or encoder.precision not in QUERY_MODES or not onnx_backend.available():
        return False
    try:
        if json.loads(_check_path(config).read_text()).get("export_failed"):
            return False  # this network does not export (measured before): not tried on every search
    except (OSError, ValueError):
        pass
    try:
        path = onnx_backend.export_fp32(encoder)
    except CbirError as exc:  # an operator ONNX lacks: queries keep using torch
        with atomic_path(_check_path(config)) as tmp:
            tmp.write_text(json.dumps({"verified": False, "export_failed": str(exc)[:500]}, sort_keys=True))
        return False
    if encoder.precision == "bf16":
        from cbir.encoders._onnx_bf16 import emulate

        with atomic_path(path.with_suffix(".bf16.onnx"), suffix=".onnx") as tmp:
            emulate(path, tmp)
        path = path.with_suffix(".bf16.onnx")
    images = [load_image(p, draft=encoder.preprocess.draft_size) for p in sorted(SAMPLES.rglob("*.jpg"))[:16]]
    ours = OnnxQueryEncoder(path, encoder.preprocess, encoder.dim).embed(images)
    theirs = encoder.embed(images)
    cosine = float(np.min(np.sum(ours * theirs, axis=1)))
    with atomic_path(_check_path(config)) as tmp:
        tmp.write_text(json.dumps({"model": str(path), "model_sha256": sha256_file(path), "images": len(images),
                                   "min_cosine": cosine, "verified": cosine >= MIN_COSINE}, sort_keys=True))
    return cosine >= MIN_COSINE
