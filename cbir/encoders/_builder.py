"""Building a network from its registry entry: pooling and weights checked, one part per fused component."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from cbir.encoders._device import resolve_device
from cbir.encoders._registry import get_entry
from cbir.encoders._weights import Weights
from cbir.encoders.base import Encoder
from cbir.errors import CbirError


def build(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any], *,
          part_factory: Callable[..., Encoder]) -> Encoder:
    """The eager network for `name` (a fused name builds each part with `part_factory`: the public `create`)."""
    if "+" in name:
        return _fused(name, weights, pooling, device, options, part_factory)
    return _single(name, weights, pooling, device, options)


def _single(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any]) -> Encoder:
    entry = get_entry(name)
    pooling = pooling or entry.default_pooling
    if pooling not in entry.dims:
        raise CbirError(f"encoder {name} has no pooling {pooling!r}; choose one of {', '.join(entry.dims)}")
    parsed = Weights.parse(weights or entry.default_weights, encoder=name, hub=entry.hub)
    dev = resolve_device(device)
    try:
        inspect.signature(entry.factory).bind(weights=parsed, pooling=pooling, device=dev, **options)
    except TypeError:
        raise CbirError(f"encoder {name} takes no option {', '.join(sorted(options))} (model_kwargs are for "
                        "timm:NAME and clip:ARCH)") from None
    enc = entry.factory(weights=parsed, pooling=pooling, device=dev, **options)
    if entry.dims[pooling] is not None and enc.dim != entry.dims[pooling]:
        raise CbirError(f"encoder {name} declares dimension {entry.dims[pooling]} for pooling {pooling} but built "
                        f"{enc.dim}: fix its register(dims=...)")
    return enc


def _fused(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any],
           part_factory: Callable[..., Encoder]) -> Encoder:
    """`a+b[:weights][*w]`: see _fused.py; weights go inside the name, per part; option `view`."""
    from cbir.encoders._fused import POOLING, VIEW, create_fused

    unknown = set(options) - {"view"}
    if unknown:
        raise CbirError(f"a fused encoder takes no option {', '.join(sorted(unknown))}")
    if weights not in (None, "", "parts"):
        raise CbirError("a fused encoder takes weights per part, in its name: name:FILE+name2 (not --weights)")
    if pooling not in (None, POOLING):
        raise CbirError(f"a fused encoder pools each part its own way; its pooling is {POOLING!r}")
    return create_fused(name, resolve_device(device), part_factory, view=int(options.get("view", VIEW)))
