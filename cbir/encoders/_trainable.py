"""The trainable networks, each split into a frozen `trunk` (run once, cached) and a trainable part.

    siamese:      trunk -> tail -> pool -> projection head -> (L2-normalised) embedding
    autoencoder:  [frozen trunk ->] conv encoder -> bottleneck (embedding, pooled) -> transposed-conv decoder
                  -> reconstruction of the encoder's input (the trunk's feature map, or the image itself)

`build(arch)` makes the network from its plain-dict description, which the checkpoint stores, so an
index can rebuild it from the file alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbir.encoders._weights import Weights, load_state
from cbir.encoders.base import Preprocess
from cbir.encoders.efficientnet_lite import network as lite_network
from cbir.encoders.random_cnn import seed_cnn
from cbir.errors import CbirError

BACKBONES = ("efficientnet_lite0", "resnet50", "seed-cnn")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE0 = ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502))


class SiameseNet(nn.Module):
    """One branch; the 'two branches sharing weights' are this module applied to both images of a pair."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, feat_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.trunk, self.tail = trunk, tail
        feature_map = not isinstance(tail, nn.Identity)  # a tail ends in a map to pool; without one, a flat vector
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if feature_map else nn.Flatten()
        self.head = nn.Sequential(nn.Linear(feat_dim, 512), nn.ReLU(inplace=True), nn.Linear(512, emb_dim))

    def from_trunk(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.tail(feats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_trunk(self.trunk(x))

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.tail, self.head])


def _lite0(pretrained: str) -> nn.Module:
    return lite_network(Weights.parse(pretrained, encoder="efficientnet_lite0"))[0]


def build_siamese(arch: dict[str, Any], pretrained: str = "none") -> tuple[SiameseNet, Preprocess]:
    backbone, emb, size = arch["backbone"], int(arch["emb_dim"]), int(arch["image_size"])
    if backbone == "efficientnet_lite0":
        m = _lite0(pretrained)
        split = int(arch.get("trainable_blocks", 1))
        trunk = nn.Sequential(m.conv_stem, m.bn1, *m.blocks[: len(m.blocks) - split])
        tail = nn.Sequential(*m.blocks[len(m.blocks) - split:], m.conv_head, m.bn2)
        net = SiameseNet(trunk, tail, 1280, emb)
        pre = Preprocess(size=size, crop_pct=0.875, mean=LITE0[0], std=LITE0[1], interpolation="bicubic")
    elif backbone == "resnet50":
        from torchvision.models import ResNet50_Weights, resnet50

        from cbir.encoders import _torchvision as tv

        m, _ = tv.build("resnet50", resnet50, ResNet50_Weights, Weights.parse(pretrained, encoder="resnet50"))
        trunk = nn.Sequential(*list(m.children())[:-1], nn.Flatten())
        net = SiameseNet(trunk, nn.Identity(), 2048, emb)
        pre = Preprocess(size=size, crop_pct=0.875, mean=IMAGENET[0], std=IMAGENET[1])
    elif backbone == "seed-cnn":
        net = SiameseNet(nn.Identity(), seed_cnn(), 256, emb)
        pre = Preprocess(size=size, crop_pct=0.875, mean=IMAGENET[0], std=IMAGENET[1])
    else:
        raise CbirError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    return net, pre


class ConvAutoencoder(nn.Module):
    """Pixel autoencoder: conv encoder (4 stride-2 stages) to a `bottleneck`-channel map at 1/16 size, mirrored
    decoder back to the image. The classic design; its bottleneck keeps colour and layout more than content."""

    def __init__(self, bottleneck: int = 128, grid: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Identity()
        chans = [3, 32, 64, 128, 256]
        enc: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True),
                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)]
        enc += [nn.Conv2d(256, bottleneck, 3, 1, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(bottleneck, 256, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True)]
        rev = chans[::-1]
        for cin, cout in zip(rev[:-1], rev[1:], strict=True):
            last = cout == 3
            dec += [nn.ConvTranspose2d(cin, cout if last else cout, 4, 2, 1)]
            if not last:
                dec += [nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)]
        self.decoder = nn.Sequential(*dec)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction error of a batch of trunk outputs (here: images in [0, 1])."""
        return F.mse_loss(torch.sigmoid(self(x)), x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder(x))

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.encoder, self.decoder])


class FeatureAutoencoder(nn.Module):
    """Conv autoencoder over a frozen ImageNet feature map (efficientnet_lite0 to stride 16, 112 channels).

    The encoder compresses the map to a `bottleneck`-channel map at half its size; the transposed-conv
    decoder reconstructs the map. Trained without labels on MSE, like the pixel autoencoder, but what it must
    keep is content rather than colour, which is what retrieval needs.
    """

    def __init__(self, trunk: nn.Module, in_ch: int = 112, bottleneck: int = 256, grid: int = 1) -> None:
        super().__init__()
        self.trunk = trunk
        act = nn.LeakyReLU(0.1, inplace=True)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_ch, 256, 3, 1, 1, bias=False), nn.BatchNorm2d(256), act,
            nn.Conv2d(256, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(256, bottleneck, 3, 1, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(bottleneck, 256, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(256, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(256, in_ch, 3, 1, 1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(feats))

    def loss(self, feats: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(feats), feats)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder(feats))

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.encoder, self.decoder])


class AutoencoderEmbedding(nn.Module):
    """Index-time network: trunk, encoder half and pooling."""

    def __init__(self, ae: ConvAutoencoder | FeatureAutoencoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.embed(self.ae.trunk(x))


AE_TRUNKS = ("efficientnet_lite0", "none")


def build_autoencoder(arch: dict[str, Any], pretrained: str = "none"
                      ) -> tuple[ConvAutoencoder | FeatureAutoencoder, Preprocess]:
    """`arch["trunk"]`: efficientnet_lite0 (default; frozen ImageNet trunk) or none (pixel autoencoder)."""
    size = int(arch["image_size"])
    if size % 16:
        raise CbirError("--image-size for the autoencoder must be a multiple of 16")
    trunk = arch.get("trunk", "none")
    if trunk == "none":
        ae = ConvAutoencoder(int(arch["bottleneck"]), int(arch["grid"]))
        return ae, Preprocess(size=size, resize="center_crop", crop_pct=1.0, mean=(0.0, 0.0, 0.0),
                              std=(1.0, 1.0, 1.0))
    if trunk != "efficientnet_lite0":
        raise CbirError(f"unknown autoencoder trunk {trunk!r}; choose one of {', '.join(AE_TRUNKS)}")
    m = _lite0(pretrained)
    frozen = nn.Sequential(m.conv_stem, m.bn1, *m.blocks[:5])  # stride 16, 112 channels
    ae = FeatureAutoencoder(frozen, 112, int(arch["bottleneck"]), int(arch["grid"]))
    return ae, Preprocess(size=size, crop_pct=0.875, mean=LITE0[0], std=LITE0[1], interpolation="bicubic")


def load_checkpoint(path: str) -> dict[str, Any]:
    """A cbir training checkpoint, read with weights_only=True (no pickled code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CbirError(f"model file not found: {path}") from None
    except Exception as exc:
        raise CbirError(f"cannot read model file {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "cbir-model-1":
        raise CbirError(f"{path} is not a model made by cbir train")
    return ckpt


def network_from_checkpoint(ckpt: dict[str, Any], source: str) -> tuple[nn.Module, Preprocess, int]:
    """Index-time network, preprocessing and output dimension from a checkpoint."""
    arch = ckpt["arch"]
    if ckpt["kind"] == "siamese":
        net, pre = build_siamese(arch, pretrained="none")
        load_state(net, ckpt["state_dict"], source)
        return net, pre, int(arch["emb_dim"])
    ae, pre = build_autoencoder(arch, pretrained="none")  # the checkpoint holds the trunk's weights too
    load_state(ae, ckpt["state_dict"], source)
    return AutoencoderEmbedding(ae), pre, int(arch["bottleneck"]) * int(arch["grid"]) ** 2
