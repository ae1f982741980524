"""Tiny random-weight models of each encoder family, saved the ways users have real ones: as weights files (a torch
state dict, a safetensors file) and in a local Hugging Face cache (models--ORG--NAME/snapshots/<rev>/FILE, refs/main),
so that tests load them through the code a real checkpoint takes. Nothing is downloaded.

The networks are the real architectures made small through the same model keyword arguments a user could pass
(`model_kwargs`, recorded in the index): a ViT of 1 block and 32 dimensions at 32 px, a ConvNeXt of 4 blocks, a CLIP
ViT-B-32 of one block per tower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

VIT = "vit_tiny_patch16_224"
VIT_TAG = "augreg_in21k_ft_in1k"  # timm's default tag of VIT: repository timm/VIT.VIT_TAG
VIT_KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}
CONVNEXT = "convnext_atto.d2_in1k"
CONVNEXT_KWARGS = {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 24)}
CLIP = "ViT-B-32"
CLIP_TAG = "laion2b_s34b_b79k"  # its repository: laion/CLIP-ViT-B-32-laion2B-s34B-b79K
CLIP_KWARGS = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                               "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
REVISION = "0123456789abcdef0123456789abcdef01234567"


@dataclass(kw_only=True)
class Tiny:
    hub: Path  # the fake Hugging Face cache (HF_HUB_CACHE)
    vit_pt: Path  # torch state dict of the ViT
    vit_safetensors: Path  # the same weights as safetensors
    convnext: Path
    clip: Path  # safetensors of the whole CLIP model
    clip_pt: Path  # a torch checkpoint holding the same under 'state_dict'


def cache_file(hub: Path, repo: str, name: str) -> Path:
    """Where the Hugging Face cache keeps `name` of `repo` (refs/main names the snapshot)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    path = folder / "snapshots" / REVISION / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make(root: Path) -> Tiny:
    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hub = root / "hub"
    vit = timm.create_model(VIT, pretrained=False, **VIT_KWARGS)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    torch.save(state, root / "vit.pt")
    save_file(state, str(root / "vit.safetensors"))
    save_file(state, str(cache_file(hub, f"timm/{VIT}.{VIT_TAG}", "model.safetensors")))
    convnext = timm.create_model(CONVNEXT, pretrained=False, **CONVNEXT_KWARGS)
    torch.save(convnext.state_dict(), root / "convnext.pth")
    clip = open_clip.create_model(CLIP, pretrained=None, **CLIP_KWARGS)
    clip_state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(clip_state, str(root / "clip.safetensors"))
    torch.save({"state_dict": clip_state, "epoch": 3}, root / "clip_checkpoint.pt")
    save_file(clip_state, str(cache_file(hub, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors")))
    return Tiny(hub=hub, vit_pt=root / "vit.pt", vit_safetensors=root / "vit.safetensors",
                convnext=root / "convnext.pth", clip=root / "clip.safetensors", clip_pt=root / "clip_checkpoint.pt")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models, with HF_HUB_CACHE pointing at their fake cache for the session (and the servers and
    commands the tests start)."""
    made = make(tmp_path_factory.mktemp("tiny_models"))
    before = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(made.hub)
    yield made
    if before is None:
        os.environ.pop("HF_HUB_CACHE", None)
    else:
        os.environ["HF_HUB_CACHE"] = before


@pytest.fixture(scope="session")
def clip_index(tiny: Tiny, samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample photos indexed with the tiny CLIP model, its weights found by tag in the cache."""
    from cbir import Index

    out = tmp_path_factory.mktemp("clip_index") / "clip"
    Index.build(samples, out=out, encoder=f"clip:{CLIP}", weights=CLIP_TAG, device="cpu", precision="fp32",
                model_kwargs=CLIP_KWARGS)
    return out
