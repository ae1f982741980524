"""VGG16 (torchvision): 512-d from conv5_3, or 4096-d from the penultimate FC layer (fc7) as demos do."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG16_Weights, vgg16

from cbir.encoders import _torchvision as tv
from cbir.encoders import register
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder, Preprocess, make_pool

PREPROCESS = Preprocess(size=224, resize="center_crop", crop_pct=0.875)


@register("vgg16", description="VGG16, ImageNet (torchvision); GeM over conv5_3",
          dims={"gem": 512, "avg": 512, "max": 512, "fc": 4096}, default_pooling="gem",
          weights_status=lambda: tv.status(VGG16_Weights.IMAGENET1K_V1))
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    model, ident = tv.build("vgg16", vgg16, VGG16_Weights, weights)
    if pooling == "fc":
        # conv -> 7x7 pool -> fc6 -> relu -> dropout -> fc7 -> relu (dropout is inactive in eval)
        net: nn.Module = nn.Sequential(model.features, model.avgpool, nn.Flatten(), *model.classifier[:-1])
        dim = 4096
    else:
        conv5_3 = model.features[:-1]  # drop the last max-pool: a finer 14x14 map pools better
        net, dim = nn.Sequential(conv5_3, make_pool(pooling)), 512
    return Encoder(name="vgg16", model=net, dim=dim, preprocess=PREPROCESS, pooling=pooling, weights=ident,
                   device=device)
