"""Siamese network trained with contrastive loss on the user's images (`cbir train siamese`)."""

from __future__ import annotations

import torch

from cbir.encoders import register
from cbir.encoders._trained import create_trained
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder


@register("siamese", description="Siamese net, contrastive loss, trained here: cbir train siamese DIR",
          dims={"head": None}, default_pooling="head", default_weights="",
          weights_status=lambda: "trained: pass --weights MODEL.pt")
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    return create_trained("siamese", weights, pooling, device)
