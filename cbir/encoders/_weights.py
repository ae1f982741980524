"""The weights argument, parsed once: 'imagenet', 'none' (seeded random), a file, a named variant, or (families such
as timm: and clip:) 'hub' or a pretrained tag, found in the local Hugging Face cache (cbir/encoders/_hub.py).

Like torchvision's weight enums, the parsed value carries its identity: `Weights.identity()` is what an
index records, and what `cbir.encoders.from_config` checks the rebuilt encoder against (sha256).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbir.errors import WeightsUnavailable
from cbir.files import sha256_file

RANDOM_SEED = 0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True, kw_only=True)
class Weights:
    """source: 'imagenet' (the publisher's weights; `variant` names one of several), 'none', 'file', or 'hub' (a
    family's pretrained weights from the Hugging Face cache; `variant` is a pretrained tag, None for the default)."""

    source: str
    path: Path | None = None
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | Weights | None, encoder: str = "encoder", *, hub: bool = False) -> Weights:
        """`hub`: the encoder is of a family that finds pretrained weights by tag (timm:, clip:)."""
        if isinstance(text, Weights):
            return text
        value = (text or "none").strip()
        if value in ("imagenet", "none") or hub and value == "hub":
            return cls(source=value)
        path = Path(value).expanduser()
        if path.is_file():
            return cls(source="file", path=path.resolve())
        if hub and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) and not value.endswith(WEIGHT_SUFFIXES):
            return cls(source="hub", variant=value)  # a pretrained tag, e.g. laion2b_s34b_b79k
        if not hub and re.fullmatch(r"[A-Z][A-Z0-9_]*", value):  # a torchvision enum member, e.g. IMAGENET1K_V2
            return cls(source="imagenet", variant=value)
        choices = "'hub', a pretrained tag, 'none'" if hub else "'imagenet', 'none'"
        raise WeightsUnavailable(f"weights for {encoder}: model file not found: {value} ({value!r} is neither "
                                 f"{choices} nor an existing file)")

    @property
    def argument(self) -> str:
        """The command-line form that parses back to this value."""
        return str(self.path) if self.path is not None else self.variant or self.source

    def identity(self, **extra: Any) -> dict[str, Any]:
        """What an index records about these weights; a file's sha256 is computed here."""
        ident: dict[str, Any] = {"source": self.source}
        if self.path is not None:
            ident.update(path=str(self.path), sha256=sha256_file(self.path))
        if self.source == "none":
            ident["seed"] = RANDOM_SEED
        ident.update(extra)
        return ident


def seeded(constructor: Callable[[], nn.Module], seed: int = RANDOM_SEED) -> nn.Module:
    """Build a network with reproducible random weights, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return constructor()


def sha256_state(model: nn.Module) -> str:
    """Hash of the parameters and buffers themselves, for weights that have no file (random or trained)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def is_safetensors(path: Path) -> bool:
    """A safetensors file, whatever its name: 8 bytes of header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20


def state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict (a safetensors file, or a torch file, perhaps a checkpoint holding one under 'state_dict')
    without running pickled code."""
    from cbir.encoders._prepared import note_read

    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailable(f"weights file not found: {path}")
    note_read(p)
    try:
        if is_safetensors(p):
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many kinds for a bad file
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):  # a checkpoint of cbir train, or of a training script, holding one
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"weights file {path} does not hold a state dict")
    return obj


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsUnavailable(f"weights in {source} do not fit this network: {first}") from exc


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Accept the network's own key names, or another naming whose tensors match one for one in order."""
    target = model.state_dict()
    if set(state) == set(target):
        load_state(model, state, source)
        return
    if len(state) != len(target):
        raise WeightsUnavailable(f"weights in {source} hold {len(state)} tensors; {arch} has {len(target)}")
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (key, want), tensor in zip(target.items(), state.values(), strict=True):
        if tuple(want.shape) != tuple(tensor.shape):
            raise WeightsUnavailable(f"weights in {source} do not fit {arch} at {key}")
        renamed[key] = tensor
    load_state(model, renamed, source)

