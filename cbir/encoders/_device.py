"""Choosing where models and indexes run: the GPU when there is one, the CPU otherwise."""

from __future__ import annotations

import os

import torch

from cbir.errors import CbirError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' means CUDA when torch sees a GPU, else CPU; asking for 'cuda' without one is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CbirError(f"--device {name} was asked for, but torch sees no CUDA GPU on this machine")
        return _card(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CbirError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def _card(name: str) -> torch.device:
    """'cuda' (torch's current card) or 'cuda:N', which must exist."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CbirError(f"unknown device {name!r}: use cuda or cuda:N (N counts from 0)") from None
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CbirError(f"--device {name}: torch sees {count} GPU{'s' if count != 1 else ''} (cuda:0 to "
                        f"cuda:{count - 1}); CUDA_VISIBLE_DEVICES, if set, renumbers them from 0")
    return device


def configure_threads() -> None:
    """Use every core for intra-op work unless the user set OMP/torch threads already."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
