"""Shared loading for encoders trained by `cbir train`: the checkpoint is the whole description."""

from __future__ import annotations

import torch

from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder, Preprocess
from cbir.errors import CbirError, WeightsUnavailable


def create_trained(kind: str, weights: Weights, pooling: str, device: torch.device) -> Encoder:
    from cbir.encoders._trainable import load_checkpoint, network_from_checkpoint

    if weights.path is None:
        raise WeightsUnavailable(
            f"the {kind} encoder is trained on your images: run 'cbir train {kind} DIR --out MODEL.pt', "
            f"then pass --weights MODEL.pt"
        )
    try:
        ckpt = load_checkpoint(str(weights.path))
    except CbirError as exc:
        raise WeightsUnavailable(str(exc)) from exc
    if ckpt["kind"] != kind:
        raise WeightsUnavailable(f"{weights.path} holds a model of kind {ckpt['kind']}, not {kind}")
    net, pre, dim = network_from_checkpoint(ckpt, str(weights.path))
    training = ckpt.get("training", {})
    ident = weights.identity(kind=kind, arch=ckpt["arch"], trained_on=training.get("fingerprint"),
                             training_metric=training.get("metric"), training_best_val=training.get("best_val"))
    return Encoder(name=kind, model=net, dim=dim, preprocess=Preprocess.from_dict(ckpt["preprocess"]),
                   pooling=pooling, weights=ident, device=device)
