"""Shared weight handling for the torchvision encoders (vgg16, resnet50).

'imagenet' uses torchvision's weights enum, which looks in $TORCH_HOME/hub/checkpoints/ first and only
downloads when the file is missing (never when CBIR_OFFLINE=1); a path loads a state-dict file; 'none'
gives a seeded random init, identified by the sha256 of its tensors so that search can rebuild it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbir.encoders._weights import Weights, load_state, seeded, sha256_state, state_dict_from_file
from cbir.errors import WeightsUnavailable


def checkpoint_path(weights_enum: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def offline() -> bool:
    return os.environ.get("CBIR_OFFLINE", "").lower() not in ("", "0", "false", "no")


def status(weights_enum: Any) -> str:
    path = checkpoint_path(weights_enum)
    return f"present ({path})" if path.is_file() else f"missing: put {path.name} in {path.parent} or use --weights FILE"


def _fetch(name: str, member: Any) -> Path:
    """The enum member's file in torch's hub folder; downloaded only when allowed and missing."""
    path = checkpoint_path(member)
    if path.is_file():
        return path
    hint = (f"ImageNet weights for {name} are not on this machine. Put the file {path.name} in "
            f"{path.parent} (set TORCH_HOME to move that folder), or pass --weights FILE with a "
            f"state dict, or --weights none for random weights (tests only).")
    if offline():
        raise WeightsUnavailable(hint)
    try:
        member.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # no network, proxy, partial download...
        raise WeightsUnavailable(f"{hint} (download failed: {exc.__class__.__name__})") from exc
    return path


def build(name: str, constructor: Any, enum_cls: Any, weights: Weights) -> tuple[nn.Module, dict[str, Any]]:
    """Make the torchvision network `constructor` with the asked weights; return it and their identity."""
    if weights.source == "none":
        model = seeded(lambda: constructor(weights=None))
        return model, weights.identity(sha256=sha256_state(model))
    model = constructor(weights=None)
    if weights.source == "imagenet":
        variant = weights.variant or "IMAGENET1K_V1"
        if variant not in enum_cls.__members__:
            choices = ", ".join(enum_cls.__members__)
            raise WeightsUnavailable(f"{name} has no weights {variant}; choose one of {choices}")
        member = enum_cls[variant]
        path = _fetch(name, member)
        load_state(model, state_dict_from_file(path), str(path))
        return model, Weights(source="file", path=path).identity(source="imagenet", enum=str(member))
    assert weights.path is not None
    load_state(model, state_dict_from_file(weights.path), str(weights.path))
    return model, weights.identity()
