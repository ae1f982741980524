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
            raise CbirError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CbirError(f"unknown device {device!r}: use auto, cpu or cuda")


def configure_threads() -> None:
    """Use every core for intra-op work unless the user set OMP/torch threads already."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
