"""OpenCLIP models (open_clip_torch) as encoders: `clip:ARCH`, e.g. `clip:ViT-B-32 --weights laion2b_s34b_b79k`.

The image tower embeds the collection; the text tower embeds text queries into the same space ("a red bicycle"),
so an index of a CLIP model answers text, and a picture plus text. Weights: `--weights TAG` (one of open_clip's
pretrained tags for ARCH, whose file is looked for in the local Hugging Face cache, see _hub.py), `--weights FILE`
(a state dict or safetensors file of the whole CLIP model, open_clip's own key names or OpenAI's: open_clip converts
them), or nothing: the first of ARCH's tags that the cache holds. The preprocessing is the tag's (for a file, that
of ARCH's first tag: the tags of one architecture share it): size, mean, std, interpolation, and resize mode
('shortest' is a centre crop of the whole shorter side, 'squash' a squash). The vector is the image tower's
projected embedding, L2-normalised; so is a text's.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.encoders import _hub, register_family
from cbir.encoders._prepared import note_read
from cbir.encoders._weights import Weights, seeded, sha256_state
from cbir.encoders.base import Encoder, Preprocess
from cbir.errors import CbirError, WeightsUnavailable

POOLING = "joint"  # the image tower's projection into the space it shares with the text tower


def tags_of(arch: str) -> list[str]:
    from open_clip.pretrained import list_pretrained_tags_by_model

    return list(list_pretrained_tags_by_model(arch))


def check_arch(arch: str) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('clip:' + c for c in close)}?" if close else ""
        raise CbirError(f"open_clip has no model {arch!r}{hint} (python -c \"import open_clip; "
                        f"print(open_clip.list_pretrained())\" lists models and their tags)")


def hub_location(arch: str, tag: str) -> tuple[str, tuple[str, ...]] | None:
    """(repository, file names to look for) of ARCH's tag on the Hugging Face hub, as open_clip looks for them:
    'org/name/' means open_clip's default file in org/name, 'org/name/file' that file; safetensors first."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, get_pretrained_cfg

    repo, _, name = (get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").rpartition("/")
    if not repo:
        return None
    name = name or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if name == HF_WEIGHTS_NAME else name.rsplit(".", 1)[0] + ".safetensors"
    return repo, tuple(dict.fromkeys((safe, name)))


def cached_models() -> list[str]:
    """'clip:ARCH --weights TAG' for every pretrained CLIP model whose file the cache holds."""
    import open_clip

    repos = set(_hub.cached_repos(""))
    return [f"clip:{arch} --weights {tag}" for arch, tag in open_clip.list_pretrained()
            if (where := hub_location(arch, tag)) and where[0] in repos and _hub.cached(*where)]


def cached_tags(arch: str) -> list[str]:
    """ARCH's pretrained tags whose file the Hugging Face cache holds."""
    return [tag for tag in tags_of(arch) if (where := hub_location(arch, tag)) and _hub.cached(*where)]


def status(arch: str | None) -> str:
    """Where the weights of clip:`arch` (of any CLIP model, for None) are looked for, and which are there."""
    if arch is None:
        here = cached_models()
        listed = ", ".join(here[:4]) + (" ..." if len(here) > 4 else "")
        return (f"--weights FILE, or --weights TAG from the Hugging Face cache {_hub.cache_dir()} (the repository "
                f"open_clip names for ARCH and TAG); cached here: {listed or 'none'}")
    try:
        check_arch(arch)
    except CbirError as exc:
        return str(exc)
    present = cached_tags(arch)
    if present:
        return f"present: --weights {', '.join(present)}"
    tags = tags_of(arch)
    return f"missing: hf download the repository of one of the tags {', '.join(tags[:5])}, or --weights FILE" \
        if tags else "open_clip knows no pretrained tags for it: --weights FILE"


@register_family("clip", description="an OpenCLIP model: image tower for the index, text tower for text queries",
                 poolings=(POOLING,), default_pooling=POOLING,
                 examples=("clip:ViT-B-32 --weights laion2b_s34b_b79k", "clip:ViT-B-16-SigLIP --weights webli"),
                 status=status)
def create(arch: str, weights: Weights, pooling: str, device: torch.device, **options: Any) -> Encoder:
    kwargs = dict(options.pop("model_kwargs", None) or {})
    if options:
        raise CbirError(f"clip:{arch} takes no option {', '.join(sorted(options))}")
    check_arch(arch)
    tag = _tag(arch, weights)
    model, ident = _network(arch, tag, weights, kwargs)
    visual = model.visual
    model.visual = nn.Identity()  # the text tower keeps the rest; the image tower is the encoder's network
    pre = preprocess_of(visual.preprocess_cfg)
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
    return Encoder(name=f"clip:{arch}", model=visual, dim=dim, preprocess=pre, pooling=pooling, weights=ident,
                   device=device, options={"model_kwargs": kwargs} if kwargs else {},
                   text=TextTower(model, arch, device))


def _tag(arch: str, weights: Weights) -> str | None:
    """The pretrained tag the weights are (None for a file or random weights)."""
    if weights.source in ("file", "none"):
        return None
    if weights.source != "hub":
        raise WeightsUnavailable(f"clip:{arch} takes --weights TAG, a file, or none; not {weights.source!r}")
    tags = tags_of(arch)
    if weights.variant is None:
        present = cached_tags(arch)
        if not present:
            raise WeightsUnavailable(f"clip:{arch}: say which weights: --weights TAG (one of {', '.join(tags)}) "
                                     "whose file is in the Hugging Face cache, or --weights FILE" if tags else
                                     f"clip:{arch} has no pretrained tags in open_clip: pass --weights FILE")
        return present[0]
    if weights.variant not in tags:
        raise WeightsUnavailable(f"clip:{arch} has no pretrained tag {weights.variant!r}; its tags: "
                                 f"{', '.join(tags) or 'none (pass --weights FILE)'}")
    return weights.variant


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip reports through the root logger ("initialized randomly" before weights we load ourselves)."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def _network(arch: str, tag: str | None, weights: Weights, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    first = tags_of(arch)[:1]  # a file's preprocessing: that of ARCH's tags (its activation: ARCH's own)
    cfg = get_pretrained_cfg(arch, tag or (first[0] if first else "")) or {}
    keys = ("mean", "std", "interpolation", "resize_mode")
    with _quiet():
        def build() -> nn.Module:
            return open_clip.create_model(arch, pretrained=None, load_weights=False,
                                          force_quick_gelu=bool(tag and cfg.get("quick_gelu")),
                                          force_preprocess_cfg={k: cfg[k] for k in keys if k in cfg}, **kwargs)

        if weights.source == "none":
            model = seeded(build)
            return model.eval(), weights.identity(sha256=sha256_state(model))
        model = build()
    if tag is None:
        assert weights.path is not None
        path, ident = weights.path, weights.identity()
    else:
        where = hub_location(arch, tag)
        if where is None:
            raise WeightsUnavailable(f"open_clip keeps no Hugging Face copy of clip:{arch} {tag}: pass --weights FILE")
        found = _hub.find(*where, f"clip:{arch} --weights {tag}")
        ident = Weights(source="file", path=found.path).identity(source="hub", tag=tag, **found.identity())
        path = found.path
    note_read(path)
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # a file of another model, or not a weights file at all
        raise WeightsUnavailable(f"the weights in {path} do not fit clip:{arch}: {' '.join(str(exc).split())[:300]}"
                                 ) from None
    return model.eval(), ident


def preprocess_of(cfg: dict[str, Any]) -> Preprocess:
    """open_clip's preprocessing of the image tower as cbir's (the resize modes cbir repeats exactly)."""
    size = cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
    if h != w or mode not in ("shortest", "squash") or interpolation not in ("bilinear", "bicubic"):
        raise CbirError(f"cbir cannot reproduce this model's preprocessing (input {h}x{w}, resize {mode}, "
                        f"{interpolation}): it takes square inputs, 'shortest' or 'squash', bilinear or bicubic")
    return Preprocess(size=int(h), resize="center_crop" if mode == "shortest" else "squash", crop_pct=1.0,
                      mean=tuple(map(float, cfg["mean"])), std=tuple(map(float, cfg["std"])),
                      interpolation=interpolation)


class TextTower:
    """Texts -> L2-normalised float32 rows in the image tower's space (fp32 whatever the images' mode: a text query
    is one short sequence, and fp32 keeps its vector the model's own)."""

    def __init__(self, model: nn.Module, arch: str, device: torch.device) -> None:
        self.model, self.arch, self.device = model.eval().to(device), arch, device
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import open_clip

            try:
                self._tokenizer = open_clip.get_tokenizer(self.arch, context_length=getattr(
                    self.model, "context_length", None), cache_dir=str(_hub.cache_dir()))
            except Exception as exc:  # an HF tokenizer: transformers missing, or its files not in the cache
                raise CbirError(f"the tokenizer of clip:{self.arch} cannot be loaded ({exc.__class__.__name__}: "
                                f"{str(exc)[:200]}); its text queries need it: pip install transformers, and its "
                                "tokenizer files in the Hugging Face cache") from None
        return self._tokenizer

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer()(texts).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return np.ascontiguousarray(F.normalize(feats, dim=1).cpu().numpy(), dtype=np.float32)
