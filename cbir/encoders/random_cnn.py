"""A small CNN with random weights: the floor that shows what any learnt encoder adds (benchmark baseline)."""

from __future__ import annotations

import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders.base import Encoder, Preprocess, make_pool, sha256_state

PREPROCESS = Preprocess(size=128, resize="center_crop", crop_pct=0.875)


@register("random_cnn", description="AlexNet-style CNN, random weights (seed 0), GeM (baseline)",
          dims={"gem": 256, "avg": 256, "max": 256}, default_pooling="gem", default_weights="none",
          weights_status=lambda: "none needed (random, seeded)")
def create(weights: str, pooling: str, device: torch.device) -> Encoder:
    from cbir.training.models import _seed_cnn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = _seed_cnn()
    net = nn.Sequential(body, make_pool(pooling))
    return Encoder("random_cnn", net, 256, PREPROCESS, pooling, {"source": "none", "seed": 0,
                                                                  "sha256": sha256_state(net)}, device)
