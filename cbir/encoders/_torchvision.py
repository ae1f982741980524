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

from cbir.encoders.base import WeightsUnavailable, load_state, sha256_file, sha256_state, state_dict_from_file

RANDOM_SEED = 0


def checkpoint_path(weights_enum: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def offline() -> bool:
    return os.environ.get("CBIR_OFFLINE", "").lower() not in ("", "0", "false", "no")


def status(weights_enum: Any) -> str:
    path = checkpoint_path(weights_enum)
    return f"present ({path})" if path.is_file() else f"missing: put {path.name} in {path.parent} or use --weights FILE"


def build(name: str, constructor: Any, enum_cls: Any, weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """Make the torchvision network `constructor` with the asked weights; return it and their identity."""
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = constructor(weights=None)
        return model, {"source": "none", "seed": RANDOM_SEED, "sha256": sha256_state(model)}
    model = constructor(weights=None)
    if weights == "imagenet" or weights in enum_cls.__members__:
        member = enum_cls.IMAGENET1K_V1 if weights == "imagenet" else enum_cls[weights]
        path = checkpoint_path(member)
        if not path.is_file():
            hint = (f"ImageNet weights for {name} are not on this machine. Put the file {path.name} in "
                    f"{path.parent} (set TORCH_HOME to move that folder), or pass --weights FILE with a "
                    f"state dict, or --weights none for random weights (tests only).")
            if offline():
                raise WeightsUnavailable(hint)
            try:
                member.get_state_dict(progress=True, check_hash=True)
            except Exception as exc:  # no network, proxy, partial download...
                raise WeightsUnavailable(f"{hint} (download failed: {exc.__class__.__name__})") from exc
        load_state(model, state_dict_from_file(path), str(path))
        ident = {"source": "imagenet", "enum": str(member), "path": str(path), "sha256": sha256_file(path)}
        return model, ident
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights for {name}: {weights!r} is neither 'imagenet', 'none' nor an existing file"
        )
    load_state(model, state_dict_from_file(path), str(path))
    return model, {"source": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
