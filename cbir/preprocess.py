"""How a decoded picture becomes a network's input; recorded in every index so that search repeats it exactly.

Torch-free (numpy and PIL): decoding workers and the ONNX query path use it without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """Turns a decoded RGB picture into the network's input; recorded in every index so search repeats it.

    resize="center_crop": scale the shorter side to size/crop_pct, then cut the central size x size.
    resize="squash": scale the whole picture to size x size (keeps everything, distorts aspect).
    """

    size: int = 224
    resize: str = "center_crop"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @property
    def draft_size(self) -> int:
        """Smallest side the decoder must keep so that resizing never upsamples a draft decode."""
        return int(round(self.size / self.crop_pct)) if self.resize == "center_crop" else self.size

    def pixels(self, im: Image.Image) -> np.ndarray:
        """The network's view of `im` as uint8 [size, size, 3]: cheap to make in a worker and to ship."""
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.interpolation]
        w, h = im.size
        if self.resize == "squash":
            im = im.resize((self.size, self.size), resample, reducing_gap=3.0)
        else:
            # Resize only the box that the centre crop keeps (same filter, same pixel centres as resizing
            # the whole picture and cropping after): 2-3x less work on a 640x480 photo.
            scale = self.draft_size / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            im = im.resize((self.size, self.size), resample, box=box, reducing_gap=3.0)
        return np.array(im, dtype=np.uint8)  # a writable array: torch warns on read-only ones

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W], channels_last in memory (what the encoders run on)."""
        import torch

        x = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def normalize_numpy(self, pixels: np.ndarray) -> np.ndarray:
        """`normalize` without torch, as a contiguous float32 NCHW array (the ONNX query path)."""
        x = pixels.astype(np.float32).transpose(0, 3, 1, 2) * np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)

    def __call__(self, im: Image.Image) -> np.ndarray:
        """One picture -> normalised float32 [3, size, size]."""
        return np.ascontiguousarray(self.normalize(self.pixels(im)[None])[0].numpy())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)
