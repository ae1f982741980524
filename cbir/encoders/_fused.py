"""Fused encoders: an ensemble for retrieval, e.g. `efficientnet_lite0+efficientnet_lite2` or
`efficientnet_lite2+colour_histogram*0.5` or `efficientnet_lite0+siamese:models/siamese.pt`.

Each part's vector is L2-normalised and scaled by the square root of its weight (default 1), the parts are
concatenated and the whole re-normalised, so the cosine of two fused vectors is the weighted mean of the parts'
cosines. One decode serves every part: the picture is cut once, at the largest part's input size and centre
crop, in [0, 1]; each part takes from that crop the field of view it has alone (its own crop fraction), resizes
it to its own input size with its own filter and applies its own normalisation (view 2: each part's vectors are
within cosine ~0.996 of its vectors alone, against ~0.98 for view 1, which resized the whole crop bilinearly;
indexes made with view 1 keep it). The name and the view are the complete description (`from_config` rebuilds
every part from them, each part's weights checked by sha256 like any encoder's).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbir.encoders._registry import split_weights
from cbir.encoders.base import Encoder
from cbir.errors import CbirError
from cbir.preprocess import Preprocess

SEP = "+"
POOLING = "concat"
VIEW = 2  # how parts see the common crop (see above); an index records its view


@dataclass(frozen=True, kw_only=True)
class Part:
    name: str
    weights: str | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Part:
        """'name[:weights][*weight]'; a family's name has its own prefix: 'timm:convnext_tiny[:weights][*weight]'."""
        head, _, weight = text.strip().partition("*")
        name, weights = split_weights(head)
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise CbirError(f"fused encoder part {text!r}: the weight after * must be a number") from None
        if not name or w <= 0 or not math.isfinite(w):
            raise CbirError(f"fused encoder part {text!r}: give name[:weights][*weight] with a weight above 0")
        return cls(name=name, weights=weights, weight=w)

    @property
    def spec(self) -> str:
        weights = f":{self.weights}" if self.weights else ""
        weight = f"*{self.weight:g}" if self.weight != 1 else ""
        return f"{self.name}{weights}{weight}"


class FusedNet(nn.Module):
    """[B, 3, S, S] pixels in [0, 1] -> concatenated, weighted, per-part L2-normalised features."""

    def __init__(self, parts: list[Encoder], weights: list[float], common: Preprocess, view: int = VIEW) -> None:
        super().__init__()
        self.parts = nn.ModuleList(p.model for p in parts)
        self.sizes = [p.preprocess.size for p in parts]
        self.size = common.size
        self.crops = [_crop(p.preprocess, common) if view >= 2 else common.size for p in parts]
        self.modes = [p.preprocess.interpolation if view >= 2 else "bilinear" for p in parts]
        for i, p in enumerate(parts):
            self.register_buffer(f"mean{i}", torch.tensor(p.preprocess.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(p.preprocess.std).view(1, 3, 1, 1), persistent=False)
        self.scales = [math.sqrt(w) for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i, (model, size, scale) in enumerate(zip(self.parts, self.sizes, self.scales, strict=True)):
            crop, at = self.crops[i], (self.size - self.crops[i]) // 2
            xi = x[:, :, at:at + crop, at:at + crop] if crop != self.size else x
            if size != crop:
                xi = F.interpolate(xi, size=(size, size), mode=self.modes[i], antialias=True, align_corners=False)
            xi = (xi - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            out.append(F.normalize(model(xi).float().flatten(1), dim=1) * scale)
        return torch.cat(out, dim=1)


def _crop(part: Preprocess, common: Preprocess) -> int:
    """Pixels of the common crop that hold the part's own field of view (all of it for a squashing part)."""
    if part.resize != "center_crop" or common.resize != "center_crop" or part.crop_pct >= common.crop_pct:
        return common.size
    return round(common.size * part.crop_pct / common.crop_pct)


def create_fused(spec: str, device: torch.device, create: Callable[..., Encoder], view: int = VIEW) -> Encoder:
    """The fused encoder `spec`; `create` builds each part (cbir.encoders.create, passed in: no import cycle)."""
    if view not in (1, 2):
        raise CbirError(f"fused encoder view {view!r}: this version knows views 1 and 2")
    parts = [Part.parse(t) for t in spec.split(SEP)]
    if len(parts) < 2:
        raise CbirError(f"a fused encoder needs two parts or more, not {spec!r}")
    if any(SEP in p.name for p in parts):
        raise CbirError(f"fused encoders do not nest: {spec!r}")
    built = [create(p.name, weights=p.weights, device=str(device), precision="fp32", fold_batchnorm=False)
             for p in parts]
    big = max(built, key=lambda e: e.preprocess.size).preprocess
    common = Preprocess(size=big.size, resize="center_crop", crop_pct=big.crop_pct, mean=(0.0, 0.0, 0.0),
                        std=(1.0, 1.0, 1.0), interpolation=big.interpolation)
    idents = [e.weights for e in built]
    digest = hashlib.sha256("".join(str(i.get("sha256")) for i in idents).encode()).hexdigest()
    canonical = SEP.join(p.spec for p in parts)
    net = FusedNet(built, [p.weight for p in parts], common, view)
    return Encoder(name=canonical, model=net, dim=sum(e.dim for e in built), preprocess=common, pooling=POOLING,
                   weights={"source": "parts", "parts": idents, "sha256": digest}, device=device,
                   options={"view": view})
