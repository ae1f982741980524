"""Convolutional autoencoder trained without labels on the user's images (`cbir train autoencoder`)."""

from __future__ import annotations

import torch

from cbir.encoders import register
from cbir.encoders._trained import create_trained
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder


@register("autoencoder", description="Conv autoencoder bottleneck, trained here: cbir train autoencoder DIR",
          dims={"bottleneck": None}, default_pooling="bottleneck", default_weights="",
          weights_status=lambda: "trained: pass --weights MODEL.pt")
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    return create_trained("autoencoder", weights, pooling, device)
