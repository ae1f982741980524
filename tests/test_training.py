"""cbir train: both encoders learn on generated images, checkpoints reload exactly, resume and Ctrl-C work."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir import CbirError, Index
from cbir.encoders import create, from_config
from cbir.training.data import load_collection, stratified_split
from cbir.training.siamese import contrastive_loss
from cbir.training.trainer import TrainConfig, Trainer
from tests.badfiles import photo


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 images: each class is a family of pictures sharing a base pattern, with variations."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for c, base_seed in enumerate((101, 202, 303)):
        base = np.asarray(photo((96, 96), seed=base_seed), dtype=np.float32)
        (root / f"class{c}").mkdir()
        for i in range(12):
            other = np.asarray(photo((96, 96), seed=1000 + 50 * c + i), dtype=np.float32)
            mix = 0.7 * base + 0.3 * other + rng.normal(0, 8, base.shape)
            from PIL import Image

            Image.fromarray(mix.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"img{i:02d}.jpg")
    return root


def small(kind: str, data: Path, out: Path, **kw) -> TrainConfig:
    base = {"siamese": dict(image_size=96, batch_size=12, views=2),
            "autoencoder": dict(image_size=64, batch_size=8, views=2)}[kind]
    base.update(kw)
    return TrainConfig(kind=kind, data=str(data), out=str(out), progress=False, seed=0, **base)


def test_contrastive_loss_matches_hand_computation() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # positives (0,1),(1,0): d=0. Negatives: d(0,2)=d(1,2)=sqrt(2) > margin 0.5 -> no loss
    assert float(contrastive_loss(emb, labels, margin=0.5)) == pytest.approx(0.0, abs=1e-6)
    # with margin 2: hardest negative per anchor is at sqrt(2): (2 - 1.4142)^2 = 0.3431
    assert float(contrastive_loss(emb, labels, margin=2.0, hard=1)) == pytest.approx((2 - 2**0.5) ** 2, abs=1e-4)
    # positives 0,1 orthogonal: d^2 = 2. Items 1 and 2 coincide but differ in label: a negative at d = 0, the
    # hardest for anchors 1 and 2 (loss 0.1^2 each), anchor 0's only negative is far: mean (0 + .01 + .01) / 3
    emb2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    expected = 2.0 + 0.02 / 3
    assert float(contrastive_loss(emb2, torch.tensor([0, 0, 1]), margin=0.1)) == pytest.approx(expected, abs=1e-4)


def test_split_is_stratified_deterministic_and_saved(labelled: Path, tmp_path: Path) -> None:
    coll = load_collection(labelled)
    assert coll.labels is not None and len(set(coll.labels)) == 3
    a, b = stratified_split(coll, seed=3), stratified_split(coll, seed=3)
    assert a == b and a != stratified_split(coll, seed=4)
    for c in ("class0", "class1", "class2"):
        parts = [s for s, lab in zip(a, coll.labels, strict=True) if lab == c]
        assert (parts.count("train"), parts.count("val"), parts.count("test")) == (7, 2, 3) or \
            (parts.count("train"), parts.count("val")) == (7, 3)
    Trainer(small("siamese", labelled, tmp_path / "m.pt", epochs=1)).run()
    with open(tmp_path / "m.split.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 36 and {r["split"] for r in rows} == {"train", "val", "test"}


@pytest.mark.parametrize("kind,backbone", [("siamese", "efficientnet_lite0"), ("autoencoder", "efficientnet_lite0"),
                                           ("autoencoder", "none")])
def test_training_lowers_the_loss_and_the_model_reloads_exactly(kind: str, backbone: str, labelled: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.pt"
    result = Trainer(small(kind, labelled, out, epochs=3, patience=10, backbone=backbone)).run()
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # safe to load
    if kind == "autoencoder":  # the feature autoencoder over a frozen trunk, or the classic pixel one
        assert ckpt["arch"]["trunk"] == backbone
    hist = torch.load(out.with_suffix(".last.pt"), map_location="cpu", weights_only=True)["history"]  # all epochs
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"], hist
    assert ckpt["training"]["history"] == hist[: len(ckpt["training"]["history"])]  # the best model's own past
    assert ckpt["training"]["fingerprint"] and ckpt["training"]["versions"]["torch"]
    assert out.with_suffix(".loss.png").stat().st_size > 1000
    a = create(kind, weights=str(out), device="cpu")
    b = from_config(a.config, device="cpu")
    ims = [photo(seed=s) for s in range(4)]
    np.testing.assert_array_equal(a.embed(ims), b.embed(ims))
    v = a.embed(ims)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert result["best_epoch"] >= 1


def test_siamese_beats_its_starting_point_on_validation(labelled: Path, tmp_path: Path) -> None:
    result = Trainer(small("siamese", labelled, tmp_path / "s.pt", epochs=4, patience=10)).run()
    assert result["best_val"] >= result["baseline_val"]


def test_a_siamese_that_gets_worse_keeps_its_untrained_start(labelled: Path, tmp_path: Path, caplog) -> None:
    """A learning rate that wrecks the network: the run says so and the model file holds the untrained network."""
    model = tmp_path / "s.pt"
    with caplog.at_level("WARNING"):
        result = Trainer(small("siamese", labelled, model, epochs=2, patience=10, lr=50.0, labels="none")).run()
    assert result["kept_untrained"] and result["best_epoch"] == 0 and result["best_val"] == result["baseline_val"]
    assert "did not improve on the untrained encoder" in caplog.text
    kept = from_config(Index.build(labelled, out=tmp_path / "idx", encoder="siamese", weights=str(model),
                                   device="cpu").encoder_config, device="cpu")
    vectors = kept.embed([photo((96, 96), seed=s) for s in range(3)])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_index_records_the_trained_model(labelled: Path, tmp_path: Path) -> None:
    model = tmp_path / "s.pt"
    Trainer(small("siamese", labelled, model, epochs=1)).run()
    index = Index.build(labelled, out=tmp_path / "idx", encoder="siamese", weights=str(model), device="cpu")
    w = index.encoder_config["weights"]
    assert index.encoder_config["name"] == "siamese" and w["path"] == str(model.resolve())
    assert w["arch"]["backbone"] == "efficientnet_lite0" and len(w["sha256"]) == 64 and w["trained_on"]
    reopened = Index.open(tmp_path / "idx")
    hit = reopened.search(labelled / "class1" / "img03.jpg", k=1)[0]
    assert hit.path == "class1/img03.jpg" and hit.score > 0.999


def test_resume_continues_where_it_stopped(labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.pt"
    first = Trainer(small("autoencoder", labelled, out, epochs=2, patience=10)).run()
    again = Trainer(small("autoencoder", labelled, out, epochs=4, patience=10, resume=True))
    measured = []
    validate = again.validate
    again.validate = lambda net: measured.append(validate(net)) or measured[-1]  # counts, the real one runs
    res = again.run()
    hist = torch.load(out.with_suffix(".last.pt"), weights_only=True)["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and res["epochs_run"] == 4
    # the baseline is the first run's, restored: validation ran once per new epoch, not once more before them
    assert res["baseline_val"] == first["baseline_val"] and measured == [h["val"] for h in hist[2:]]
    with pytest.raises(CbirError, match="no interrupted run"):
        Trainer(small("autoencoder", labelled, tmp_path / "other.pt", resume=True)).run()


def test_ctrl_c_leaves_a_usable_checkpoint(labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "int.pt"
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "train", "autoencoder", str(labelled), "--out", str(out),
                             "--epochs", "500", "--image-size", "64", "--batch-size", "8", "--patience", "500", "-q"],
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored: give the child Ctrl-C back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("epoch   2/"):
            break
        assert time.monotonic() < deadline, "training never reached epoch 2"
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    enc = create("autoencoder", weights=str(out), device="cpu")
    assert enc.dim == 256 and enc.embed([photo()]).shape == (1, 256)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "siamese", "{data}", "--out", "{tmp}/m.pt", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "gan", "{data}", "--out", "{tmp}/m.pt"], "unknown model kind 'gan'; use autoencoder or siamese"),
        (["train", "siamese", "{data}", "--out", "{tmp}/m.pt", "--labels", "nope.csv"], "--labels must be"),
        (["train", "siamese", "{data}/class0", "--out", "{tmp}/m.pt", "--labels", "folders"], "class sub-folder"),
        (["train", "siamese", "{tmp}/missing", "--out", "{tmp}/m.pt"], "folder not found"),
        (["train", "siamese", "{data}", "--out", "{tmp}/m.pt", "--backbone", "alexnet"], "unknown backbone"),
        (["train", "autoencoder", "{data}", "--out", "{tmp}/m.pt", "--image-size", "100"], "multiple of 16"),
        (["train", "siamese", "{data}", "--out", "{tmp}/m.pt", "--split", "a,b"], "--split takes"),
        (["index", "{data}", "--out", "{tmp}/i", "--encoder", "siamese"], "cbir train siamese"),
        (["index", "{data}", "--out", "{tmp}/i", "--encoder", "autoencoder", "--weights", "{tmp}/no.pt"],
         "model file not found"),
    ],
)
def test_bad_arguments_are_clear_errors(argv: list[str], message: str, labelled: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cbir.cli import main

    assert main([a.format(data=labelled, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_kind_is_one_registered_recipe() -> None:
    """`cbir train KIND` finds every recipe module by itself; a second recipe under a taken name is refused."""
    from cbir.training import _recipes

    assert _recipes.kinds() == ["autoencoder", "siamese"]
    with pytest.raises(CbirError, match="already registered by cbir.training.siamese"):
        @_recipes.register("siamese")
        class Other(_recipes.Recipe):
            pass
    try:
        @_recipes.register("tiny")
        class Tiny(_recipes.Recipe):
            pass

        assert isinstance(_recipes.get_recipe("tiny"), Tiny) and _recipes.get_recipe("tiny").kind == "tiny"
    finally:
        _recipes._RECIPES.pop("tiny", None)


def test_wrong_kind_of_model_file_is_refused(labelled: Path, tmp_path: Path) -> None:
    model = tmp_path / "ae.pt"
    Trainer(small("autoencoder", labelled, model, epochs=1)).run()
    with pytest.raises(CbirError, match="holds a model of kind autoencoder, not siamese"):
        create("siamese", weights=str(model), device="cpu")
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(CbirError, match="not a model made by cbir train"):
        create("autoencoder", weights=str(plain), device="cpu")
    assert os.path.exists(model)
