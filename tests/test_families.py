"""Bring your own model: timm:NAME and clip:ARCH from weights files and from a local Hugging Face cache (tiny
random-weight networks of the real architectures, tests/tiny_models.py), indexed, searched by image and by text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir import Index
from cbir.cli import main
from cbir.encoders import WeightsUnavailable, create, from_config
from cbir.errors import CbirError
from tests.badfiles import photo
from tests.tiny_models import (
    CLIP,
    CLIP_KWARGS,
    CLIP_TAG,
    CONVNEXT,
    CONVNEXT_KWARGS,
    REVISION,
    VIT,
    VIT_KWARGS,
    VIT_TAG,
    Tiny,
)

IMAGES = [photo(seed=s) for s in range(4)]


def test_a_timm_model_loads_alike_from_a_state_dict_a_safetensors_file_and_the_hub_cache(tiny: Tiny) -> None:
    import timm

    from_pt = create(f"timm:{VIT}", weights=str(tiny.vit_pt), device="cpu", model_kwargs=VIT_KWARGS)
    from_st = create(f"timm:{VIT}", weights=str(tiny.vit_safetensors), device="cpu", model_kwargs=VIT_KWARGS)
    from_hub = create(f"timm:{VIT}", device="cpu", model_kwargs=VIT_KWARGS)  # default weights: the cache
    assert from_hub.name == f"timm:{VIT}.{VIT_TAG}"  # named with the tag its weights are
    w = from_hub.weights
    assert (w["source"], w["repo"], w["revision"], w["file"]) == ("hub", f"timm/{VIT}.{VIT_TAG}", REVISION,
                                                                 "model.safetensors")
    # preprocessing: the tag's own pretrained config (mean 0.5, crop 0.9, bicubic), at the network's input size
    assert (from_hub.preprocess.size, from_hub.preprocess.crop_pct, from_hub.preprocess.mean,
            from_hub.preprocess.interpolation) == (32, 0.9, (0.5, 0.5, 0.5), "bicubic")
    vectors = [e.embed(IMAGES) for e in (from_pt, from_st, from_hub)]
    assert vectors[0].shape == (4, 32) and vectors[0].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[0], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)
    # the vector is the model's own head-less output (its CLS token), as timm computes it
    ref = timm.create_model(VIT, pretrained=False, num_classes=0, **VIT_KWARGS).eval()
    ref.load_state_dict(torch.load(tiny.vit_pt, weights_only=True), strict=False)
    x = from_hub.preprocess.normalize(np.stack([from_hub.preprocess.pixels(im) for im in IMAGES]))
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref(x), dim=1).numpy()
    np.testing.assert_allclose(vectors[2], want, atol=1e-5)
    again = from_config(json.loads(json.dumps(from_hub.config)), device="cpu")  # as an index records it
    np.testing.assert_allclose(again.embed(IMAGES), vectors[2], atol=1e-5)


def test_a_timm_cnn_gives_its_pooled_last_map(tiny: Tiny) -> None:
    enc = create(f"timm:{CONVNEXT}", weights=str(tiny.convnext), device="cpu", model_kwargs=CONVNEXT_KWARGS)
    v = enc.embed(IMAGES)
    assert enc.dim == CONVNEXT_KWARGS["dims"][-1] and v.shape == (4, enc.dim)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(CONVNEXT)  # the tag's own preprocessing
    assert (enc.preprocess.size, enc.preprocess.crop_pct, enc.preprocess.mean) == (cfg.input_size[-1], cfg.crop_pct,
                                                                                  cfg.mean)
    assert not np.allclose(v[0], v[1])


def test_a_clip_model_embeds_pictures_and_texts_like_open_clip(tiny: Tiny) -> None:
    import open_clip

    enc = create(f"clip:{CLIP}", device="cpu", model_kwargs=CLIP_KWARGS)  # the only tag in the cache
    assert enc.weights["tag"] == CLIP_TAG and enc.weights["source"] == "hub" and enc.config["text"] is True
    from_file = create(f"clip:{CLIP}", weights=str(tiny.clip_pt), device="cpu", model_kwargs=CLIP_KWARGS)
    ref = open_clip.create_model(CLIP, pretrained=str(tiny.clip), **CLIP_KWARGS).eval()
    tokens = open_clip.get_tokenizer(CLIP)(["a red bicycle", "a cat at night"])
    x = enc.preprocess.normalize(np.stack([enc.preprocess.pixels(im) for im in IMAGES]))
    with torch.no_grad():
        want_images = torch.nn.functional.normalize(ref.encode_image(x), dim=1).numpy()
        want_texts = torch.nn.functional.normalize(ref.encode_text(tokens), dim=1).numpy()
    for e in (enc, from_file):
        np.testing.assert_allclose(e.embed(IMAGES), want_images, atol=1e-5)
        np.testing.assert_allclose(e.embed_text(["a red bicycle", "a cat at night"]), want_texts, atol=1e-5)
    pre = enc.preprocess  # OpenCLIP's: the whole shorter side, centre crop, CLIP's mean, bicubic
    assert (pre.resize, pre.crop_pct, pre.interpolation, pre.mean[0]) == ("center_crop", 1.0, "bicubic", 0.48145466)


def test_missing_weights_unknown_names_and_wrong_files_are_plain_errors(tiny: Tiny, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CbirError, match=r"timm has no model 'convnext_tinyy'; did you mean timm:convnext_tiny"):
        create("timm:convnext_tinyy", device="cpu")
    with pytest.raises(CbirError, match="open_clip has no model 'ViT-B-33'; did you mean clip:ViT-B-32"):
        create("clip:ViT-B-33", device="cpu")
    with pytest.raises(WeightsUnavailable, match="has no pretrained tag 'laion9'; its tags: openai"):
        create(f"clip:{CLIP}", weights="laion9", device="cpu")
    with pytest.raises(CbirError, match="unknown encoder 'nope:x'.*timm:NAME"):
        create("nope:x", device="cpu")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # a machine without the files ...
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cbir"))  # ... that never prepared the network either
    with pytest.raises(WeightsUnavailable) as missing:
        create(f"timm:{VIT}", device="cpu", model_kwargs=VIT_KWARGS)
    message = str(missing.value)
    assert f"hf download timm/{VIT}.{VIT_TAG} model.safetensors" in message  # what to download ...
    assert str(tmp_path / "empty" / f"models--timm--{VIT}.{VIT_TAG}") in message  # ... and where to put it
    assert "--weights FILE" in message
    with pytest.raises(WeightsUnavailable, match="clip:ViT-B-32: say which weights: --weights TAG"):
        create(f"clip:{CLIP}", device="cpu", model_kwargs=CLIP_KWARGS)
    with pytest.raises(WeightsUnavailable, match=f"the weights in {tiny.clip} do not fit timm:{VIT}"):
        create(f"timm:{VIT}", weights=str(tiny.clip), device="cpu", model_kwargs=VIT_KWARGS)
    with pytest.raises(WeightsUnavailable, match="model file not found: models/missing.safetensors"):
        create(f"clip:{CLIP}", weights="models/missing.safetensors", device="cpu")
    with pytest.raises(CbirError, match="efficientnet_lite0 takes no option model_kwargs"):
        create("efficientnet_lite0", device="cpu", model_kwargs={"depth": 1})
    with pytest.raises(CbirError, match="has no text tower, so it cannot search by text"):
        create("colour_histogram", device="cpu").embed_text(["a red bicycle"])


def test_fused_names_keep_family_parts_and_their_weights_unambiguous(tiny: Tiny) -> None:
    from cbir.encoders._fused import Part

    part = Part.parse(f"timm:{VIT}:{tiny.vit_pt}*0.5")
    assert (part.name, part.weights, part.weight) == (f"timm:{VIT}", str(tiny.vit_pt), 0.5)
    assert Part.parse(f"timm:{VIT}") == Part(name=f"timm:{VIT}")
    assert Part.parse("siamese:models/s.pt") == Part(name="siamese", weights="models/s.pt")  # the old form is unchanged
    from cbir.bench.run import parse_encoders  # cbir bench --encoders reads names the same way

    assert parse_encoders(f"resnet50:none,timm:{VIT}:{tiny.vit_pt}")[:2] == [("resnet50", "none"),
                                                                             (f"timm:{VIT}", str(tiny.vit_pt))]
    with pytest.raises(CbirError, match="timm has no model 'convnext_tinyy'"):  # the part went to the family
        create("random_cnn+timm:convnext_tinyy", device="cpu")
    with pytest.raises(CbirError, match="a fused encoder takes no option model_kwargs"):
        create(f"random_cnn+timm:{VIT}:{tiny.vit_pt}", device="cpu", model_kwargs=VIT_KWARGS)


def test_cbir_encoders_says_where_family_weights_are_looked_for(tiny: Tiny, capsys: pytest.CaptureFixture) -> None:
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert str(tiny.hub) in rows["timm:NAME"]["weights"] and f"{VIT}.{VIT_TAG}" in rows["timm:NAME"]["weights"]
    assert f"clip:{CLIP} --weights {CLIP_TAG}" in rows["clip:NAME"]["weights"]
    assert "efficientnet_lite0" in rows  # the registered encoders are still listed


def test_an_index_of_a_timm_model_built_from_a_file_with_the_command(tiny: Tiny, samples: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "vit"
    assert main(["index", str(samples), "--out", str(out), "--encoder", f"timm:{VIT}", "--weights",
                 str(tiny.vit_safetensors), "--model-kwargs", json.dumps(VIT_KWARGS), "-q"]) == 0
    index = Index.open(out, device="cpu")
    assert index.encoder_config["name"] == f"timm:{VIT}.{VIT_TAG}" and not index.has_text
    assert index.encoder_config["options"] == {"model_kwargs": VIT_KWARGS}
    capsys.readouterr()
    assert main(["search", str(out), str(samples / "cat" / "chelsea.jpg"), "-k", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    assert found[0]["path"] == "cat/chelsea.jpg" and found[0]["score"] > 0.999
    # that search prepared the verified ONNX query model: the next process searches without torch, same answer
    command = ("import json, sys\nfrom cbir.cli import main\n"
               f"main(['search', {str(out)!r}, {str(samples / 'cat' / 'chelsea.jpg')!r}, '-k', '3', '--json'])\n"
               "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120, check=True)
    *answer, torch_line = proc.stdout.strip().splitlines()
    assert torch_line == "no torch", proc.stderr[-2000:]
    assert [r["path"] for r in json.loads("\n".join(answer))["results"]] == [r["path"] for r in found]
    assert main(["search", str(out), "--text", "a cat"]) == 2
    assert "has no text tower: text search needs an index of a CLIP model" in capsys.readouterr().err
    assert main(["index", str(samples), "--out", str(tmp_path / "x"), "--encoder", f"timm:{VIT}",
                 "--model-kwargs", "[1]"]) == 2
    assert "--model-kwargs takes a JSON object" in capsys.readouterr().err


def _ranking(index: Index, query: np.ndarray, k: int) -> list[str]:
    """The top k by brute force over the stored vectors."""
    rows = index.rows()
    order = np.argsort(-(np.asarray(rows.vectors) @ query), kind="stable")[:k]
    return [rows.paths[int(i)] for i in order]


def test_text_search_ranks_by_the_text_towers_vector(clip_index: Path, tiny: Tiny, samples: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import open_clip

    index = Index.open(clip_index, device="cpu")
    assert index.has_text and index.summary()["text"] is True
    ref = open_clip.create_model(CLIP, pretrained=str(tiny.clip), **CLIP_KWARGS).eval()
    with torch.no_grad():
        text = torch.nn.functional.normalize(ref.encode_text(open_clip.get_tokenizer(CLIP)(["a red bicycle"])),
                                             dim=1)[0].numpy()
    assert [r.path for r in index.search_text("a red bicycle", k=5)] == _ranking(index, text, 5)
    picture = samples / "coffee" / "coffee.jpg"
    both = index.embed(picture) + text
    want = _ranking(index, both / np.linalg.norm(both), 5)
    assert [r.path for r in index.search_text("a red bicycle", k=5, image=picture)] == want
    assert main(["search", str(clip_index), str(picture), "--text", "a red bicycle", "-k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "a red bicycle" and [r["path"] for r in out["results"]] == want
    assert main(["search", str(clip_index), "--text", "a red bicycle", "-k", "5"]) == 0
    table = capsys.readouterr().out
    assert all(p in table for p in _ranking(index, text, 5))
    for bad, words in (("   ", "the text query is empty"), ("x" * 1001, "at most 1000")):
        with pytest.raises(CbirError, match=words):
            index.search_text(bad)


def test_a_moved_index_of_a_family_model_is_rebuilt_from_its_record(clip_index: Path, tiny: Tiny,
                                                                   tmp_path: Path) -> None:
    """Its weights are found again in the cache (or given as a file), and checked by sha256."""
    moved = tmp_path / "moved"
    shutil.copytree(clip_index, moved)
    index = Index.open(moved, device="cpu")
    assert index.encoder.weights["sha256"] == index.encoder_config["weights"]["sha256"]
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny.clip))
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(other))
    with pytest.raises(CbirError, match="are not the ones this index was built with"):
        _ = Index.open(moved, device="cpu", weights=str(other)).encoder
