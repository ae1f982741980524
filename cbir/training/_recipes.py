"""What to train (`TrainConfig`) and the training recipes: one class per kind of model (`cbir train KIND`),
registered by a decorator.

A recipe says what differs between kinds: its default settings, its architecture and network, how it draws a
batch, its loss, and how it is validated. The trainer (`trainer.py`) does the rest the same for every kind
(split, cached views, epochs, early stop, saving, resuming). Adding a kind is one module in this package that
defines a `Recipe` subclass decorated with `@register("kind")`; every public module here other than the trainer
and its data is imported on first lookup, as the encoders are.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir import metrics
from cbir.errors import CbirError

if TYPE_CHECKING:
    from cbir.encoders.base import Preprocess

PACKAGE = __name__.rpartition(".")[0]  # cbir.training
MACHINERY = {"data", "trainer"}  # the public modules of the package that are not recipes


@dataclass(kw_only=True)
class TrainConfig:
    """What to train; None: the recipe's default for its kind."""

    kind: str  # a registered recipe: siamese | autoencoder
    data: str
    out: str
    labels: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    backbone: str = "efficientnet_lite0"
    emb_dim: int = 256
    margin: float = 1.0
    lr: float | None = None
    patience: int = 5
    views: int | None = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    progress: bool = True
    backbone_weights: str = "imagenet"  # the pretrained trunk: imagenet, none or a state-dict file
    assignments: list[str] | None = None  # train/val/test per image of the collection, instead of a fresh split
    trainable_blocks: int = 1  # siamese: the backbone's last blocks trained with the head
    bottleneck: int | None = None  # autoencoder: channels of the code
    grid: int | None = None  # autoencoder: the code pooled to grid x grid


@dataclass(kw_only=True)
class Views:
    """The frozen trunk's output for every cached view of the train and val images, and who is who."""

    cached: torch.Tensor  # [image, view, ...] trunk outputs in float16
    is_train: np.ndarray
    is_val: np.ndarray
    labels: np.ndarray  # class number per image; without labels, the image's own number
    has_labels: bool
    count: int  # views per image
    device: torch.device

    def take(self, images: np.ndarray, views: np.ndarray | int) -> torch.Tensor:
        """The trunk outputs of (image, view) pairs, on the training device as float32."""
        which = torch.from_numpy(views) if isinstance(views, np.ndarray) else views
        return self.cached[torch.from_numpy(images), which].to(self.device).float()

    @torch.inference_mode()
    def embed(self, recipe: Recipe, net: nn.Module, images: np.ndarray, view: int) -> np.ndarray:
        """L2-normalised embeddings of one view of `images`, 128 at a time."""
        net.eval()
        out = []
        for i in range(0, len(images), 128):
            out.append(F.normalize(recipe.embed(net, self.take(images[i:i + 128], view)).float(), dim=1).cpu().numpy())
        return np.concatenate(out)


def precision_at_k(queries: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                   q_index_in_gallery: np.ndarray, k: int = 10) -> float:
    ranking = metrics.rank(queries, gallery, q_index_in_gallery, depth=k)
    return float(metrics.precision_at(metrics.relevance(ranking, q_labels, g_labels), k).mean())


class Recipe:
    """How one kind of model trains. The defaults below are a retrieval embedding's: validated by P@10 over
    the val images with labels, else by finding each val image's other view (view-recall@1)."""

    kind = ""
    keeps_untrained_start = False  # True: a run that never beats the untrained network saves that network instead

    def defaults(self, cfg: TrainConfig) -> dict[str, Any]:
        """Values for the settings the user left as None (epochs, batch_size, image_size, lr, views, ...)."""
        raise NotImplementedError

    def arch(self, cfg: TrainConfig) -> dict[str, Any]:
        """The plain-dict architecture the checkpoint stores (the network is rebuilt from it alone)."""
        raise NotImplementedError

    def build(self, arch: dict[str, Any], pretrained: str) -> tuple[nn.Module, Preprocess]:
        """The network (its frozen part as `.trunk`, the rest from `.trainable()`) and its preprocessing."""
        raise NotImplementedError

    def batch(self, rng: np.random.Generator, train: np.ndarray, views: Views,
              cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
        """One batch of (image, view) pairs drawn from the train images `train`."""
        raise NotImplementedError

    def loss(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The embedding of a batch of trunk outputs (not yet normalised)."""
        raise NotImplementedError

    def train_mode(self, net: nn.Module, cfg: TrainConfig) -> None:
        net.train()

    def metric_name(self, has_labels: bool) -> str:
        return "P@10" if has_labels else "view-recall@1"

    def validate(self, net: nn.Module, views: Views) -> float:
        val = np.flatnonzero(views.is_val)
        gallery_idx = np.flatnonzero(views.is_train | views.is_val)
        gallery = views.embed(self, net, gallery_idx, 0)
        pos = {int(g): n for n, g in enumerate(gallery_idx)}
        q_in_g = np.array([pos[int(i)] for i in val])
        if views.has_labels:
            return precision_at_k(gallery[q_in_g], gallery, views.labels[val], views.labels[gallery_idx], q_in_g)
        other = views.embed(self, net, val, min(1, views.count - 1))
        top1 = np.argmax(other @ gallery.T, axis=1)
        return float((top1 == q_in_g).mean())


_RECIPES: dict[str, Recipe] = {}
_loaded = False


def register(kind: str):
    """Class decorator: `@register("siamese") class Siamese(Recipe)` makes `cbir train siamese` use it."""

    def decorate(cls: type[Recipe]) -> type[Recipe]:
        known = _RECIPES.get(kind)
        if known is not None and (type(known).__module__, type(known).__qualname__) != (cls.__module__,
                                                                                       cls.__qualname__):
            raise CbirError(f"training kind {kind!r} is already registered by {type(known).__module__}")
        recipe = cls()
        recipe.kind = kind
        _RECIPES[kind] = recipe
        return cls

    return decorate


def _modules() -> Iterator[str]:
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in MACHINERY and not mod.name.startswith("_"):
            yield f"{PACKAGE}.{mod.name}"


def kinds() -> list[str]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _modules():
            importlib.import_module(module)
    return sorted(_RECIPES)


def get_recipe(kind: str) -> Recipe:
    if kind not in kinds():
        raise CbirError(f"cbir train: unknown model kind {kind!r}; use {' or '.join(kinds())}")
    return _RECIPES[kind]
