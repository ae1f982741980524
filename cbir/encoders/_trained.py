"""Shared loading for encoders trained by `cbir train`: the checkpoint is the whole description."""

from __future__ import annotations

from pathlib import Path

import torch

from cbir.encoders.base import Encoder, Preprocess, WeightsUnavailable, sha256_file
from cbir.errors import CbirError


def create_trained(kind: str, weights: str, pooling: str, device: torch.device) -> Encoder:
    from cbir.training.models import load_checkpoint, network_from_checkpoint

    if weights in ("imagenet", "none", "", None):
        raise WeightsUnavailable(
            f"the {kind} encoder is trained on your images: run 'cbir train {kind} DIR --out MODEL.pt', "
            f"then pass --weights MODEL.pt"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"{kind} model file not found: {weights}")
    try:
        ckpt = load_checkpoint(str(path))
    except CbirError as exc:
        raise WeightsUnavailable(str(exc)) from exc
    if ckpt["kind"] != kind:
        raise WeightsUnavailable(f"{weights} holds a model of kind {ckpt['kind']}, not {kind}")
    net, pre, dim = network_from_checkpoint(ckpt, str(path))
    training = ckpt.get("training", {})
    ident = {"source": "file", "path": str(path.resolve()), "sha256": sha256_file(path), "kind": kind,
             "arch": ckpt["arch"], "trained_on": training.get("fingerprint"),
             "training_metric": training.get("metric"), "training_best_val": training.get("best_val")}
    return Encoder(kind, net, dim, Preprocess.from_dict(ckpt["preprocess"]), pooling, ident, device)
