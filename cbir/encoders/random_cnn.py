"""A small CNN with random weights: the floor that shows what any learnt encoder adds (benchmark baseline)."""

from __future__ import annotations

import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders._weights import Weights, seeded, sha256_state
from cbir.encoders.base import Encoder, Preprocess, make_pool

PREPROCESS = Preprocess(size=128, resize="center_crop", crop_pct=0.875)


def seed_cnn() -> nn.Sequential:
    """A small AlexNet-style CNN (the original project's encoder), for 128 px input; 256 channels out."""

    def block(cin: int, cout: int, k: int, s: int = 1, pool: bool = False) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout),
                                   nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(3, 2, 1)] if pool else [])

    return nn.Sequential(*block(3, 64, 7, 2, True), *block(64, 128, 5, 1, True), *block(128, 256, 3),
                         *block(256, 256, 3, 1, True), *block(256, 256, 3))


@register("random_cnn", description="AlexNet-style CNN, random weights (seed 0), GeM (baseline)",
          dims={"gem": 256, "avg": 256, "max": 256}, default_pooling="gem", default_weights="none",
          weights_status=lambda: "none needed (random, seeded)")
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    net = nn.Sequential(seeded(seed_cnn), make_pool(pooling))
    return Encoder(name="random_cnn", model=net, dim=256, preprocess=PREPROCESS, pooling=pooling,
                   weights=Weights(source="none").identity(sha256=sha256_state(net)),
                   device=device)
