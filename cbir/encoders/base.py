"""What every encoder is: a network, its preprocessing, its pooling, and a description that rebuilds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cbir.errors import CbirError
from cbir.preprocess import Preprocess

__all__ = ["POOLINGS", "Encoder", "GeM", "Preprocess", "library_versions", "make_pool"]

POOLINGS = ("gem", "avg", "max", "fc")


class GeM(nn.Module):
    """Generalised-mean pooling (p=3): between average and max, the usual best choice for retrieval."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def make_pool(pooling: str) -> nn.Module:
    if pooling == "gem":
        return GeM()
    if pooling == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if pooling == "max":
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
    raise CbirError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")


def library_versions() -> dict[str, str]:
    """Recorded with every encoder; read from package metadata, so that recording them imports nothing."""
    from importlib.metadata import PackageNotFoundError, version

    from cbir.version import __version__

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "absent"

    versions = {"cbir": __version__, "torch": torch.__version__, "torchvision": installed("torchvision"),
                "timm": installed("timm"), "numpy": np.__version__}
    return {k: str(v) for k, v in versions.items()}  # plain str: checkpoints must load with weights_only


@dataclass(kw_only=True)
class Encoder:
    """A ready network: `embed(images)` gives float32, L2-normalised rows of length `dim`.

    `config` is the complete description (name, weights identity and sha256, pooling, preprocessing,
    library versions); `cbir.encoders.from_config(config)` rebuilds the same encoder.
    """

    name: str
    model: nn.Module
    dim: int
    preprocess: Preprocess
    pooling: str
    weights: dict[str, Any]
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # numeric mode: fp32, bf16 or int8; "auto" until _numeric.choose() has measured it
    calibration: dict[str, Any] = field(default_factory=dict)  # what choose() measured
    runtime: Any = field(default=None, repr=False)  # the ONNX Runtime int8 model when precision is int8
    fixed_precision: bool = False  # a computation, not a network (the colour histogram): always fp32
    folded_batchnorms: int = 0  # conv -> batch norm pairs merged by fold_batchnorm()
    text: Any = field(default=None, repr=False)  # texts -> vectors in the same space (a CLIP model's text tower)
    max_batch: int | None = None  # the largest batch that fits, once the GPU ran out of memory (_memory.py)

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        if self.device.type == "cpu":
            self.model.to(memory_format=torch.channels_last)

    def fold_batchnorm(self) -> None:
        """Merge each batch norm into the convolution before it (same vectors, faster; see _batchnorm.py)."""
        from cbir.encoders._batchnorm import fold_batchnorm

        size = self.preprocess.size
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        self.model, n = fold_batchnorm(self.model, example)
        self.folded_batchnorms += n
        if n and self.device.type == "cpu":
            self.model.to(memory_format=torch.channels_last)

    def restore_mode(self, config: dict[str, Any]) -> None:
        """Embed the way an index's encoder record says: its numeric mode, its calibration and, for int8, the
        very model its rows came from."""
        self.precision = "fp32" if self.fixed_precision else config.get("precision", "fp32")
        self.calibration = dict(config.get("calibration", {}))
        if self.precision != "int8":
            self.runtime = None
            return
        record = self.calibration.get("int8_model") or {}
        if not record:
            raise CbirError("this index says int8 but records no int8 model; rebuild it")
        if self.runtime is None or self.runtime.sha256 != record.get("sha256"):
            from cbir.encoders._onnx_backend import OrtModel

            self.runtime = OrtModel(record["path"], record.get("sha256"))

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "pooling": self.pooling,
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
            "options": self.options,
            "precision": self.precision if self.precision != "auto" else "fp32",
            "calibration": self.calibration,
            "versions": library_versions(),
            **({"text": True} if self.text is not None else {}),  # text queries work (older records lack it)
        }

    def embed_tensor(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch [B, 3, H, W] (in halves, should the GPU run out of memory)."""
        from cbir.encoders._memory import in_parts

        return in_parts(self._embed_tensor, batch, self)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Embed texts into the image vectors' space (float32, L2-normalised rows): a CLIP model's text tower."""
        if self.text is None:
            raise CbirError(f"encoder {self.name} has no text tower, so it cannot search by text; index with a CLIP "
                            "model for that, e.g. --encoder clip:ViT-B-32 --weights laion2b_s34b_b79k")
        from cbir.encoders._memory import in_parts

        return in_parts(self.text, list(texts), self)

    @torch.inference_mode()
    def _embed_tensor(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        if self.precision == "int8":
            if self.runtime is None:
                raise CbirError("int8 needs a model calibrated on the collection: index with --precision int8 or auto")
            feats = torch.from_numpy(self.runtime(torch.as_tensor(batch).cpu().numpy())).float().flatten(1)
            return np.ascontiguousarray(F.normalize(feats, dim=1).numpy(), dtype=np.float32)
        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            feats = self.model(x).float().flatten(1)
        feats = F.normalize(feats, dim=1)
        return np.ascontiguousarray(feats.cpu().numpy(), dtype=np.float32)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Embed decoded RGB pictures."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_pixels(np.stack([self.preprocess.pixels(im) for im in images]))

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a batch of `preprocess.pixels` arrays, uint8 [B, H, W, 3]."""
        return self.embed_tensor(self.preprocess.normalize(pixels))

    def __repr__(self) -> str:
        w = self.weights.get("source", "?")
        return (f"Encoder({self.name}, dim={self.dim}, pooling={self.pooling}, weights={w}, device={self.device}, "
                f"precision={self.precision})")
