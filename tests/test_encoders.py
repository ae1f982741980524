"""Encoders: registry, output contract, real EfficientNet-Lite0 weights, torchvision weight handling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import cbir.encoders as encoders
from cbir.encoders import WeightsUnavailable, create, from_config
from cbir.errors import CbirError
from cbir.images import load_image
from tests.badfiles import photo

IMAGES = [photo(seed=s) for s in range(3)]


def test_registry_lists_all_builtin_encoders() -> None:
    names = [e.name for e in encoders.list_encoders()]
    assert {"efficientnet_lite0", "resnet50", "vgg16"} <= set(names)
    entry = encoders.get_entry("efficientnet_lite0")
    assert entry.dims["avg"] == 1280 and entry.weights_status().startswith("present")


def test_register_decorator_plugs_in_a_new_encoder() -> None:
    from torch import nn

    from cbir.encoders.base import Encoder, Preprocess

    @encoders.register("tiny_test", description="test", dims={"avg": 3}, default_pooling="avg",
                       default_weights="none")
    def _make(weights: str, pooling: str, device: torch.device) -> Encoder:
        net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Encoder(name="tiny_test", model=net, dim=3, preprocess=Preprocess(size=32), pooling=pooling,
                       weights={"source": "none", "sha256": "0"}, device=device)

    try:
        enc = create("tiny_test", device="cpu")
        v = enc.embed(IMAGES)
        assert v.shape == (3, 3) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    finally:
        encoders._registry._REGISTRY.pop("tiny_test")


def test_registry_refuses_a_second_encoder_of_the_same_name_and_a_wrong_dimension() -> None:
    from torch import nn

    from cbir.encoders.base import Encoder, Preprocess

    def make(dim: int):
        def factory(weights, pooling: str, device: torch.device) -> Encoder:
            net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            return Encoder(name="tiny_dims", model=net, dim=dim, preprocess=Preprocess(size=32), pooling=pooling,
                           weights={"source": "none", "sha256": "0"},
                           device=device)
        return factory

    encoders.register("tiny_dims", description="test", dims={"avg": 5}, default_pooling="avg",
                      default_weights="none")(make(3))
    try:
        with pytest.raises(CbirError, match="declares dimension 5 for pooling avg but built 3"):
            create("tiny_dims", device="cpu")
        with pytest.raises(CbirError, match="'tiny_dims' is already registered"):
            encoders.register("tiny_dims", description="other", dims={"avg": 3}, default_pooling="avg")(make(3))
        with pytest.raises(CbirError, match="already registered"):
            encoders.register("efficientnet_lite0", description="mine", dims={"avg": 3}, default_pooling="avg")(make(3))
    finally:
        encoders._registry._REGISTRY.pop("tiny_dims")
    assert encoders.get_entry("efficientnet_lite0").description.startswith("EfficientNet-Lite0")


def test_weights_argument_is_parsed_once_into_a_value_with_its_identity(tmp_path: Path) -> None:
    from cbir.encoders._weights import Weights

    assert Weights.parse("imagenet") == Weights(source="imagenet")
    assert Weights.parse("IMAGENET1K_V2") == Weights(source="imagenet", variant="IMAGENET1K_V2")
    assert Weights.parse("none").identity()["seed"] == 0
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    w = Weights.parse(str(f))
    assert w.source == "file" and w.identity()["sha256"].startswith("ba7816bf")
    assert Weights.parse(w.argument) == w
    with pytest.raises(WeightsUnavailable, match="model file not found"):
        Weights.parse(str(tmp_path / "missing.pt"), encoder="siamese")


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(CbirError, match="unknown encoder 'nope'.*available"):
        create("nope")
    with pytest.raises(CbirError, match="no pooling 'fc'"):
        create("efficientnet_lite0", pooling="fc")


@pytest.mark.parametrize(
    ("name", "pooling", "dim"),
    [("resnet50", "gem", 2048), ("resnet50", "avg", 2048), ("resnet50", "max", 2048), ("resnet50", "fc", 1000),
     ("vgg16", "gem", 512), ("vgg16", "fc", 4096), ("efficientnet_lite0", "gem", 1280)],
)
def test_output_contract_float32_unit_rows(name: str, pooling: str, dim: int) -> None:
    enc = create(name, weights="none", pooling=pooling, device="cpu")
    v = enc.embed(IMAGES)
    assert enc.dim == dim and v.shape == (3, dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(v[0], v[1])


def test_random_weights_are_reproducible_and_identified() -> None:
    a, b = create("resnet50", weights="none", device="cpu"), create("resnet50", weights="none", device="cpu")
    assert a.weights["sha256"] == b.weights["sha256"] and a.weights["source"] == "none"
    np.testing.assert_array_equal(a.embed(IMAGES[:1]), b.embed(IMAGES[:1]))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_real_weights_recognise_a_cat(samples: Path, name: str) -> None:
    """The packaged ImageNet weights load by position (offline) and classify the bundled cat photo as a cat."""
    enc = create(name, device="cpu", fold_batchnorm=False)  # the network as built, classifier included
    backbone = enc.model.backbone
    x = torch.from_numpy(enc.preprocess(load_image(samples / "cat" / "chelsea.jpg")))[None]
    with torch.inference_mode():
        top5 = backbone(x).softmax(1)[0].topk(5).indices.tolist()
    assert set(top5) & set(range(281, 286)), top5  # ImageNet classes 281-285 are domestic cats
    assert enc.weights["source"] == "imagenet" and len(enc.weights["sha256"]) == 64


def test_config_rebuilds_identical_encoder() -> None:
    enc = create("efficientnet_lite0", device="cpu")
    again = from_config(enc.config, device="cpu")
    np.testing.assert_array_equal(enc.embed(IMAGES), again.embed(IMAGES))
    for key in ("name", "dim", "pooling", "weights", "preprocess", "versions"):
        assert key in enc.config
    assert enc.config["preprocess"]["mean"] == [0.498] * 3 or tuple(enc.config["preprocess"]["mean"]) == (0.498,) * 3


def test_config_with_other_weights_is_refused_and_moved_file_accepted(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "r50.pth"
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, path)
    cfg = create("resnet50", weights=str(path), device="cpu").config
    moved = tmp_path / "moved.pth"
    path.rename(moved)
    assert from_config(cfg, device="cpu", weights=str(moved)).weights["sha256"] == cfg["weights"]["sha256"]
    state["conv1.weight"] += 1
    torch.save(state, path)
    with pytest.raises(CbirError, match="not the ones this index was built with"):
        from_config(cfg, device="cpu")


def test_missing_torchvision_weights_fail_with_instructions(_isolated_torch_home: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        create("vgg16", device="cpu")  # weights="imagenet" by default, nothing in TORCH_HOME, offline
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg and str(_isolated_torch_home) in msg and "--weights" in msg


def test_imagenet_weights_are_found_in_torch_home(_isolated_torch_home: Path) -> None:
    """Torchvision's standard cache path: a file placed there is used (here test-made weights)."""
    import torchvision

    ckpt = _isolated_torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    path = ckpt / "resnet50-0676ba61.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    try:
        enc = create("resnet50", device="cpu")
        assert enc.weights["source"] == "imagenet" and enc.weights["path"] == str(path)
        assert "present" in encoders.get_entry("resnet50").weights_status()
        assert enc.embed(IMAGES[:1]).shape == (1, 2048)
    finally:
        os.remove(path)


def test_bad_weights_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="neither 'imagenet', 'none' nor an existing file"):
        create("resnet50", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="cannot read weights file"):
        create("resnet50", weights=str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(WeightsUnavailable, match="do not fit"):
        create("vgg16", weights=str(wrong))
    with pytest.raises(WeightsUnavailable, match="hold 1 tensors"):
        create("efficientnet_lite0", weights=str(wrong))


def test_preprocess_resizes_only_the_kept_box_like_resize_then_crop(samples: Path) -> None:
    """pixels() resizes just the centre crop's box; it must give what resizing the whole picture then
    cropping gives (same filter, same pixel centres), within a rounding step, and normalise like the formula."""
    from PIL import Image

    pre = create("efficientnet_lite0", device="cpu").preprocess
    for im in (load_image(samples / "cat" / "chelsea.jpg"), photo(seed=7, size=(640, 480)),
               photo(seed=8, size=(300, 900))):
        w, h = im.size
        scale = pre.draft_size / min(w, h)
        nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[pre.interpolation]
        ref = np.asarray(im.resize((nw, nh), resample).crop((left, top, left + pre.size, top + pre.size)))
        got = pre.pixels(im)
        assert got.shape == (pre.size, pre.size, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.02
        norm = (ref.astype(np.float32) / 255 - np.float32(pre.mean)) / np.float32(pre.std)
        np.testing.assert_allclose(pre(im), norm.transpose(2, 0, 1), atol=1.01 / 255 / min(pre.std))
