"""ResNet50 (torchvision): 2048-d from the last conv map, or the 1000-d output of its single FC layer."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from cbir.encoders import _torchvision as tv
from cbir.encoders import register
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder, Preprocess, make_pool

PREPROCESS = Preprocess(size=224, resize="center_crop", crop_pct=0.875)


@register("resnet50", description="ResNet50, ImageNet (torchvision); GeM over the last conv map",
          dims={"gem": 2048, "avg": 2048, "max": 2048, "fc": 1000}, default_pooling="gem",
          weights_status=lambda: tv.status(ResNet50_Weights.IMAGENET1K_V1))
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    model, ident = tv.build("resnet50", resnet50, ResNet50_Weights, weights)
    if pooling == "fc":
        net: nn.Module = model  # ResNet has no hidden FC layer: its only FC layer's output is used
        dim = 1000
    else:
        body = nn.Sequential(*list(model.children())[:-2])  # up to layer4: [B, 2048, 7, 7]
        net, dim = nn.Sequential(body, make_pool(pooling)), 2048
    return Encoder(name="resnet50", model=net, dim=dim, preprocess=PREPROCESS, pooling=pooling, weights=ident,
                   device=device)
