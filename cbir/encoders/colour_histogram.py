"""HSV colour histogram (8x8x8 bins, Hellinger): the classic baseline every learnt encoder must beat.

Rows are square roots of the normalised histogram, so the inner product of two rows is the Bhattacharyya
coefficient (1 - squared Hellinger distance / 2) and ranking by it is ranking by Hellinger distance.
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.encoders import register
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder, Preprocess

PREPROCESS = Preprocess(size=128, resize="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
BINS = 8


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV in [0, 1]."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, _ = x.max(dim=1)
    mn, _ = x.min(dim=1)
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return torch.stack([h, s, mx], dim=1)


class HSVHistogram(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hsv = rgb_to_hsv(x.float().clamp(0, 1))
        q = (hsv * BINS).long().clamp(0, BINS - 1)
        code = (q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2]  # [B, H, W]
        flat = code.flatten(1)
        hist = x.new_zeros((x.shape[0], BINS**3), dtype=torch.float32)  # not len(x): traceable
        hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=hist.dtype))
        return (hist / flat.shape[1]).sqrt()


@register("colour_histogram", description="HSV colour histogram 8x8x8, Hellinger (baseline, no weights)",
          dims={"hist": BINS**3}, default_pooling="hist", default_weights="none",
          weights_status=lambda: "none needed")
def create(weights: Weights, pooling: str, device: torch.device) -> Encoder:
    return Encoder(name="colour_histogram", model=HSVHistogram(), dim=BINS**3, preprocess=PREPROCESS, pooling=pooling,
                   weights={"source": "none", "sha256": "none"}, device=device, fixed_precision=True)
