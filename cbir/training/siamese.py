"""The Siamese recipe: a pretrained trunk, a trainable tail and projection head, contrastive loss on pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.encoders import _trainable as models
from cbir.training._recipes import Recipe, TrainConfig, Views, register

if TYPE_CHECKING:
    from cbir.encoders.base import Preprocess


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float, hard: int = 8) -> torch.Tensor:
    """Contrastive loss on L2-normalised embeddings, all positive pairs and the hardest negatives per anchor.

    positive pair: d^2; negative pair: max(0, margin - d)^2, with d the Euclidean distance.
    """
    z = F.normalize(emb, dim=1)
    d = torch.cdist(z, z).clamp_min(1e-9)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = same & ~eye
    neg = ~same
    pos_loss = (d.pow(2) * pos).sum() / pos.sum().clamp_min(1)
    neg_d = d.masked_fill(~neg, float("inf"))
    k = min(hard, int(neg.sum(1).min().item())) if neg.any() else 0
    if k == 0:
        return pos_loss
    hardest = neg_d.topk(k, dim=1, largest=False).values
    neg_loss = F.relu(margin - hardest).pow(2).mean()
    return pos_loss + neg_loss


@register("siamese")
class Siamese(Recipe):
    keeps_untrained_start = True  # a pretrained trunk is a strong start: never save something worse than it

    def defaults(self, cfg: TrainConfig) -> dict[str, Any]:
        seed_cnn = cfg.backbone == "seed-cnn"  # learnt from scratch: smaller pictures, more epochs, a larger step
        return {"epochs": 40 if seed_cnn else 30, "batch_size": 64, "image_size": 128 if seed_cnn else 224,
                "lr": 1e-3 if seed_cnn else 3e-4, "views": 4}

    def arch(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"backbone": cfg.backbone, "emb_dim": cfg.emb_dim, "image_size": cfg.image_size,
                "trainable_blocks": cfg.trainable_blocks}

    def build(self, arch: dict[str, Any], pretrained: str) -> tuple[nn.Module, Preprocess]:
        return models.build_siamese(arch, pretrained=pretrained)

    def batch(self, rng: np.random.Generator, train: np.ndarray, views: Views,
              cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
        """With labels, P classes x K images each; without, two different views of each image."""
        if views.has_labels:
            classes = np.unique(views.labels[train])
            per = max(2, cfg.batch_size // len(classes))
            chosen = []
            for c in rng.permutation(classes)[: max(2, cfg.batch_size // per)]:
                members = train[views.labels[train] == c]
                chosen.extend(rng.choice(members, size=min(per, len(members)), replace=False))
            images = np.array(chosen)
            return images, rng.integers(0, cfg.views, len(images))
        half = rng.choice(train, size=min(cfg.batch_size // 2, len(train)), replace=False)
        v1 = rng.integers(0, cfg.views, len(half))
        v2 = (v1 + rng.integers(1, max(2, cfg.views), len(half))) % cfg.views
        return np.concatenate([half, half]), np.concatenate([v1, v2])

    def train_mode(self, net: nn.Module, cfg: TrainConfig) -> None:
        net.train()
        net.trunk.eval()
        for m in net.tail.modules():  # small batches: keep the pretrained batch-norm statistics
            if isinstance(m, nn.BatchNorm2d) and cfg.backbone != "seed-cnn":
                m.eval()

    def loss(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        return contrastive_loss(net.from_trunk(x), labels, cfg.margin)

    def embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.from_trunk(x)
