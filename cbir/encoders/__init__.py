"""The encoder registry: one decorator registers an encoder, one call creates it.

    enc = cbir.encoders.create("resnet50", weights="none", pooling="gem")
    vectors = enc.embed([pil_image])          # float32, L2-normalised rows
    same = cbir.encoders.from_config(enc.config)

Adding an encoder is one new module in this package (every module here is imported on first use) or a
third-party module named by an entry point in the group ``cbir.encoders``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from cbir.device import resolve_device
from cbir.encoders.base import POOLINGS, Encoder, Preprocess
from cbir.errors import CbirError, WeightsUnavailable
from cbir.weights import Weights

__all__ = ["Encoder", "EncoderEntry", "Preprocess", "WeightsUnavailable", "POOLINGS", "register", "create",
           "from_config", "list_encoders", "get_entry", "Weights"]


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    factory: Callable[..., Encoder]
    description: str
    dims: dict[str, int | None]  # output dimension per pooling choice; None: set by the weights (trained models)
    default_pooling: str
    default_weights: str
    weights_status: Callable[[], str]  # one line: where the default weights are, or what is missing

    @property
    def poolings(self) -> tuple[str, ...]:
        return tuple(self.dims)


_REGISTRY: dict[str, EncoderEntry] = {}
_plugins_loaded = False


def register(name: str, *, description: str, dims: dict[str, int | None], default_pooling: str,
             default_weights: str = "imagenet", weights_status: Callable[[], str] | None = None):
    """Class-free registration: decorate a factory `f(weights: Weights, pooling, device, **options) -> Encoder`.

    A name is registered once: a second encoder under the same name is an error, not a silent replacement.
    `dims` declares the output dimension per pooling; `create` checks every encoder it builds against it.
    """

    def decorate(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        known = _REGISTRY.get(name)
        same_definition = known is not None and "<locals>" not in factory.__qualname__ and \
            (known.factory.__module__, known.factory.__qualname__) == (factory.__module__, factory.__qualname__)
        if known is not None and not same_definition:  # a module reloaded registers its own name again: fine
            raise CbirError(f"encoder name {name!r} is already registered by {known.factory.__module__}")
        _REGISTRY[name] = EncoderEntry(name, factory, description, dims, default_pooling, default_weights,
                                       weights_status or (lambda: "n/a"))
        return factory

    return decorate


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    for ep in entry_points(group="cbir.encoders"):
        ep.load()


def list_encoders() -> list[EncoderEntry]:
    _load_plugins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> EncoderEntry:
    _load_plugins()
    if name not in _REGISTRY:
        raise CbirError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


PRECISIONS = ("fp32", "bf16", "int8", "auto")


def create(name: str, weights: str | None = None, pooling: str | None = None, device: str = "auto",
           precision: str = "fp32", fold_batchnorm: bool = True, **options: Any) -> Encoder:
    """Build encoder `name`. weights: 'imagenet' (default where it applies), a file path, or 'none'.

    precision: 'fp32', 'bf16' (autocast), 'int8' (ONNX Runtime, calibrated by the indexer on the collection)
    or 'auto' (the indexer measures the modes on the collection and keeps the fastest that stays faithful
    to fp32; see cbir.numeric). fold_batchnorm merges batch norms into convolutions for speed; False keeps
    the network exactly as built (to compare against, or to train).
    """
    if precision not in PRECISIONS:
        raise CbirError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    enc = _prepared(name, weights, pooling, device, options) if fold_batchnorm else \
        _build(name, weights, pooling, device, options)
    enc.precision = "fp32" if enc.fixed_precision else precision
    return enc


def _build(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any]) -> Encoder:
    return _fused_encoder(name, weights, pooling, device, options) if "+" in name else \
        _single(name, weights, pooling, device, options)


def _prepared(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any]) -> Encoder:
    """Built and folded once, then loaded ready from the cache (see prepared.py)."""
    from cbir import prepared

    dev = resolve_device(device)
    key = prepared.key(name, weights, pooling, dev.type, options)
    enc = prepared.load(key, dev)
    if enc is not None:
        return enc
    with prepared.recording() as files:
        enc = _build(name, weights, pooling, device, options)
    enc.fold_batchnorm()
    prepared.save(key, enc, files)
    return enc


def _single(name: str, weights: str | None, pooling: str | None, device: str, options: dict[str, Any]) -> Encoder:
    entry = get_entry(name)
    pooling = pooling or entry.default_pooling
    if pooling not in entry.dims:
        raise CbirError(f"encoder {name} has no pooling {pooling!r}; choose one of {', '.join(entry.dims)}")
    parsed = Weights.parse(weights or entry.default_weights, encoder=name)
    enc = entry.factory(weights=parsed, pooling=pooling, device=resolve_device(device), **options)
    if entry.dims[pooling] is not None and enc.dim != entry.dims[pooling]:
        raise CbirError(f"encoder {name} declares dimension {entry.dims[pooling]} for pooling {pooling} but built "
                        f"{enc.dim}: fix its register(dims=...)")
    return enc


def _fused_encoder(name: str, weights: str | None, pooling: str | None, device: str,
                   options: dict[str, Any]) -> Encoder:
    """`a+b[:weights][*w]`: see _fused.py; weights go inside the name, per part; option `view`."""
    from cbir.encoders._fused import POOLING, VIEW, create_fused

    unknown = set(options) - {"view"}
    if unknown:
        raise CbirError(f"a fused encoder takes no option {', '.join(sorted(unknown))}")

    if weights not in (None, "", "parts"):
        raise CbirError("a fused encoder takes weights per part, in its name: name:FILE+name2 (not --weights)")
    if pooling not in (None, POOLING):
        raise CbirError(f"a fused encoder pools each part its own way; its pooling is {POOLING!r}")
    return create_fused(name, resolve_device(device), create, view=int(options.get("view", VIEW)))


def from_config(config: dict[str, Any], device: str = "auto", weights: str | None = None) -> Encoder:
    """Rebuild exactly the encoder an index was made with; any difference is an error, never a silent drift.

    `weights` overrides where a weights file is found (an index moved to another machine), but its
    sha256 must still match.
    """
    w = config["weights"]
    source = w.get("source")
    if weights is None:
        weights = {"file": w.get("path"), "none": "none"}.get(source, source)
        if source == "imagenet" and "enum" in w:  # a torchvision variant, e.g. ResNet50_Weights.IMAGENET1K_V2
            weights = str(w["enum"]).rpartition(".")[2]
    options = dict(config.get("options", {}))
    if "+" in config["name"]:
        options.setdefault("view", 1)  # a fused index made before views were recorded: parts saw the first view
    enc = create(config["name"], weights=weights, pooling=config["pooling"], device=device, **options)
    enc.restore_mode(config)
    if enc.weights.get("sha256") != w.get("sha256"):
        raise CbirError(
            f"encoder {config['name']}: the weights found ({enc.weights.get('path') or enc.weights.get('source')}, "
            f"sha256 {str(enc.weights.get('sha256'))[:12]}) are not the ones this index was built with "
            f"(sha256 {str(w.get('sha256'))[:12]}); pass the original file with --weights"
        )
    if enc.preprocess != Preprocess.from_dict(config["preprocess"]) or enc.dim != config["dim"]:
        raise CbirError(f"encoder {config['name']}: preprocessing or dimension differ from the index's record")
    return enc
