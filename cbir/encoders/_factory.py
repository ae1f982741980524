"""Creating encoders: `create` (ready-made from the prepared cache when it can be) and `from_config` (exactly
the encoder an index records, or an error)."""

from __future__ import annotations

from typing import Any

from cbir.encoders import _builder, _prepared
from cbir.encoders._device import resolve_device
from cbir.encoders._registry import PRECISIONS
from cbir.encoders.base import Encoder, Preprocess
from cbir.errors import CbirError


def create(name: str, weights: str | None = None, pooling: str | None = None, device: str = "auto",
           precision: str = "fp32", fold_batchnorm: bool = True, **options: Any) -> Encoder:
    """Build encoder `name`. weights: 'imagenet' (default where it applies), a file path, or 'none'.

    precision: 'fp32', 'bf16' (autocast), 'int8' (ONNX Runtime, calibrated by the indexer on the collection)
    or 'auto' (the indexer measures the modes on the collection and keeps the fastest that stays faithful
    to fp32; see _numeric.py). fold_batchnorm merges batch norms into convolutions for speed; False keeps
    the network exactly as built (to compare against, or to train).
    """
    if precision not in PRECISIONS:
        raise CbirError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fold_batchnorm:
        enc = _prepared_encoder(name, weights, pooling, device, options)
    else:  # the network exactly as built
        enc = _builder.build(name, weights, pooling, device, options, part_factory=create)
    enc.precision = "fp32" if enc.fixed_precision else precision
    return enc


def _prepared_encoder(name: str, weights: str | None, pooling: str | None, device: str,
                      options: dict[str, Any]) -> Encoder:
    """Built and folded once, then loaded ready from the cache (see _prepared.py)."""
    dev = resolve_device(device)
    key = _prepared.key(name, weights, pooling, dev.type, options)
    enc = _prepared.load(key, dev)
    if enc is not None:
        return enc
    with _prepared.recording() as files:
        enc = _builder.build(name, weights, pooling, device, options, part_factory=create)
    enc.fold_batchnorm()
    _prepared.save(key, enc, files)
    return enc


def from_config(config: dict[str, Any], device: str = "auto", weights: str | None = None) -> Encoder:
    """Rebuild exactly the encoder an index was made with; any difference is an error, never a silent drift.

    `weights` overrides where a weights file is found (an index moved to another machine), but its
    sha256 must still match.
    """
    w = config["weights"]
    source = w.get("source")
    if weights is None:
        weights = {"file": w.get("path"), "none": "none", "hub": w.get("tag") or "hub"}.get(source, source)
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
