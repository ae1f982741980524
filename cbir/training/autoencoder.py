"""The autoencoder recipe: learn to rebuild a frozen trunk's feature map (or the pixels) without labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cbir.encoders import _trainable as models
from cbir.errors import CbirError
from cbir.training._recipes import Recipe, TrainConfig, Views, register

if TYPE_CHECKING:
    from cbir.encoders.base import Preprocess


@register("autoencoder")
class Autoencoder(Recipe):
    def defaults(self, cfg: TrainConfig) -> dict[str, Any]:
        pixels = cfg.backbone == "none"  # the pixel autoencoder keeps a 2x2 grid of a narrower bottleneck
        return {"epochs": 30, "batch_size": 32, "image_size": 128, "lr": 2e-3, "views": 3,
                "bottleneck": 128 if pixels else 256, "grid": 2 if pixels else 1}

    def arch(self, cfg: TrainConfig) -> dict[str, Any]:
        if cfg.backbone not in models.AE_TRUNKS:
            raise CbirError(f"autoencoder --backbone must be one of {', '.join(models.AE_TRUNKS)}")
        return {"image_size": cfg.image_size, "bottleneck": cfg.bottleneck, "grid": cfg.grid, "loss": "mse",
                "trunk": cfg.backbone}

    def build(self, arch: dict[str, Any], pretrained: str) -> tuple[nn.Module, Preprocess]:
        return models.build_autoencoder(arch, pretrained=pretrained)

    def batch(self, rng: np.random.Generator, train: np.ndarray, views: Views,
              cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
        images = rng.choice(train, size=min(cfg.batch_size, len(train)), replace=False)
        return images, rng.integers(0, cfg.views, len(images))

    def loss(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        return net.loss(x)

    def embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.embed(x)

    def metric_name(self, has_labels: bool) -> str:
        return "-mse"

    @torch.inference_mode()
    def validate(self, net: nn.Module, views: Views) -> float:
        """Minus the mean reconstruction error of the val images' plain view (higher is better, as for P@10)."""
        net.eval()
        val = np.flatnonzero(views.is_val)
        errs = []
        for i in range(0, len(val), 64):
            x = views.take(val[i:i + 64], 0)
            errs.append(float(net.loss(x)) * len(x))
        return -sum(errs) / len(val)
