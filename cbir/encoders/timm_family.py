"""Any timm model as an encoder: `timm:NAME`, e.g. `timm:vit_small_patch14_dinov2.lvd142m`, `timm:convnext_tiny`.

Weights: `--weights FILE` (a state dict or a safetensors file, in timm's key names or its publisher's: timm's own
checkpoint filter converts them, as it does for its downloads), or by default the pretrained tag's file in the local
Hugging Face cache (repository `timm/NAME.TAG`, see _hub.py). NAME without a tag means timm's default tag, and the
encoder is named with the tag it resolved to, so that the index says exactly which weights it holds.

The vector is the model's own head-less output (num_classes=0: a ViT's CLS token or mean token, a CNN's pooled last
map, as the model is configured), L2-normalised. The preprocessing is the tag's own pretrained config: input size,
crop fraction and mode, interpolation, mean and std. Option `model_kwargs` is passed to timm.create_model and recorded
(tests build tiny networks with it; a user may set e.g. `img_size` in Python).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from cbir.encoders import _hub, register_family
from cbir.encoders._weights import Weights, seeded, sha256_state, state_dict_from_file
from cbir.encoders.base import Encoder, Preprocess
from cbir.errors import CbirError, WeightsUnavailable

POOLING = "native"
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm itself looks for in a hub repository


def resolve(name: str) -> tuple[str, Any]:
    """(ARCH.TAG, its pretrained config) for `name`, or an error naming close matches."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise CbirError(f"timm has no model {name!r}{hint} (python -c \"import timm; print(timm.list_models("
                        f"'*{name.split('.')[0][:12]}*', pretrained=True))\" lists its models)")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown tag
        raise CbirError(f"timm:{name}: {exc}") from None
    if cfg is None:
        return name, None
    return (f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture), cfg


def status(name: str | None) -> str:
    """Where the weights of timm:`name` (of any timm model, for None) are looked for, and whether they are there."""
    if name is None:
        cached = _hub.cached_repos("timm/")
        listed = ", ".join(r.removeprefix("timm/") for r in cached[:6]) + (" ..." if len(cached) > 6 else "")
        return (f"--weights FILE, or the Hugging Face cache {_hub.cache_dir()} (models--timm--NAME); "
                f"cached here: {listed or 'none'}")
    try:
        full, cfg = resolve(name)
    except CbirError as exc:
        return str(exc)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return f"timm has no Hugging Face copy of {full}'s weights: pass --weights FILE"
    try:
        return f"present ({_hub.find(repo, TIMM_FILES, f'timm:{full}').path})"
    except WeightsUnavailable:
        return f"missing: hf download {repo} (into {_hub.cache_dir()}), or --weights FILE"


@register_family("timm", description="any timm model: its own pooled output, its own preprocessing",
                 poolings=(POOLING,), default_pooling=POOLING,
                 examples=("timm:vit_small_patch14_dinov2.lvd142m", "timm:convnext_tiny"), status=status)
def create(name: str, weights: Weights, pooling: str, device: torch.device, **options: Any) -> Encoder:
    kwargs = dict(options.pop("model_kwargs", None) or {})
    if options:
        raise CbirError(f"timm:{name} takes no option {', '.join(sorted(options))}")
    if weights.source == "hub" and weights.variant:  # --weights TAG: the tag in the name is the usual way
        if "." in name:
            raise CbirError(f"timm:{name} names its tag already; leave out --weights {weights.variant}")
        name = f"{name}.{weights.variant}"
    full, cfg = resolve(name)
    model, ident = _network(full, cfg, weights, kwargs)
    model.eval()
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Encoder(name=f"timm:{full}", model=model, dim=dim, preprocess=preprocess_of(model, kwargs),
                   pooling=pooling, weights=ident, device=device, options={"model_kwargs": kwargs} if kwargs else {})


def _network(full: str, cfg: Any, weights: Weights, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    if weights.source == "none":
        model = seeded(lambda: timm.create_model(full, pretrained=False, num_classes=0, **kwargs))
        return model, weights.identity(sha256=sha256_state(model))
    if weights.source == "file":
        assert weights.path is not None
        return _load(full, cfg, weights.path, kwargs), weights.identity()
    if weights.source != "hub":
        raise WeightsUnavailable(f"timm:{full} takes --weights hub (the default: the Hugging Face cache), a file, "
                                 f"or none; not {weights.source!r}")
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsUnavailable(f"timm has no Hugging Face copy of {full}'s weights: pass --weights FILE")
    found = _hub.find(cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_FILES, f"timm:{full}")
    ident = Weights(source="file", path=found.path).identity(source="hub", **found.identity())
    return _load(full, cfg, found.path, kwargs), ident


def _load(full: str, cfg: Any, path: Any, kwargs: dict[str, Any]) -> nn.Module:
    """The head-less network with the file's weights, through timm's own loading (its key filter), strictly."""
    import timm

    state = state_dict_from_file(path)
    classifiers = cfg.classifier if cfg is not None else ()
    for head in (classifiers,) if isinstance(classifiers, str) else classifiers or ():
        state.pop(f"{head}.weight", None)  # the classifier is not used; without it every other tensor must fit
        state.pop(f"{head}.bias", None)
    try:
        model = timm.create_model(full, pretrained=True, num_classes=0, **kwargs,
                                  pretrained_cfg_overlay={"state_dict": state, "num_classes": 0})
    except (RuntimeError, KeyError, ValueError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise WeightsUnavailable(f"the weights in {path} do not fit timm:{full}: {why}") from None
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps the overlay: a second copy of every tensor
    return model


def preprocess_of(model: nn.Module, kwargs: dict[str, Any]) -> Preprocess:
    """The model's own pretrained preprocessing (input size from `img_size` when the network was built with one)."""
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(model)
    size = kwargs.get("img_size", data["input_size"][1:])
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    mode, interpolation = data.get("crop_mode", "center"), data["interpolation"]
    if h != w or mode not in ("center", "squash") or interpolation not in ("bilinear", "bicubic"):
        raise CbirError(f"cbir cannot reproduce this model's preprocessing (input {h}x{w}, crop {mode}, "
                        f"{interpolation}): it takes square inputs, center or squash crops, bilinear or bicubic")
    return Preprocess(size=int(h), resize="center_crop" if mode == "center" else "squash",
                      crop_pct=float(data["crop_pct"]), mean=tuple(map(float, data["mean"])),
                      std=tuple(map(float, data["std"])), interpolation=interpolation)
