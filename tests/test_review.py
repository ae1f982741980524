"""Duplicate review: three tiers kept apart, a default pick per group, "not duplicates" remembered, moves undone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from cbir import Index, metadata
from cbir.cli import main
from cbir.duplicates import find_duplicates
from cbir.images import load_image
from cbir.review import Decisions, choose_keep

DISTINCT = ("rocket/rocket", "grass/grass", "bricks/brick")


def _shot(im: Image.Image, path: Path, when: str, subsec: str) -> None:
    exif = Image.Exif()
    exif[metadata.MAKE], exif[metadata.MODEL] = "Google", "Pixel 7"
    exif.get_ifd(metadata.EXIF_IFD).update({metadata.DATE_TIME_ORIGINAL: when, metadata.SUBSEC_TIME_ORIGINAL: subsec})
    im.save(path, quality=92, exif=exif.tobytes())


def make_collection(root: Path, samples: Path) -> Path:
    """A picture and its half-size copy; two byte-identical files (the backup older); a burst of two shots (the
    camera moved a little, the light changed, 0.4 s apart); distinct photos."""
    (root / "photos").mkdir(parents=True)
    (root / "backup").mkdir()
    (root / "burst").mkdir()
    astronaut = load_image(samples / "astronaut/astronaut.jpg")
    astronaut.save(root / "photos/astronaut.jpg", quality=92)
    astronaut.resize((astronaut.width // 2, astronaut.height // 2), Image.LANCZOS).save(
        root / "photos/astronaut_small.jpg", quality=80)
    shutil.copy(samples / "coffee/coffee.jpg", root / "photos/coffee.jpg")
    shutil.copy(samples / "coffee/coffee.jpg", root / "backup/coffee.jpg")
    os.utime(root / "backup/coffee.jpg", (1_500_000_000, 1_500_000_000))
    cat = load_image(samples / "cat/chelsea.jpg")
    w, h = cat.size
    _shot(cat.crop((0, 0, w - 12, h - 8)), root / "burst/shot1.jpg", "2024:05:01 12:00:00", "10")
    _shot(ImageEnhance.Brightness(cat.crop((12, 8, w, h))).enhance(1.06), root / "burst/shot2.jpg",
          "2024:05:01 12:00:00", "50")
    for src in DISTINCT:
        shutil.copy(samples / f"{src}.jpg", root / "photos" / f"{Path(src).name}.jpg")
    return root


@pytest.fixture(scope="module")
def review_index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Index:
    root = make_collection(tmp_path_factory.mktemp("review") / "collection", samples)
    return Index.build(root, out=tmp_path_factory.mktemp("review_idx") / "idx", device="cpu")


def _groups(found: dict, tier: str) -> list[set[str]]:
    return [{m["path"] for m in g} for g in found[tier]]


def _kept(found: dict, tier: str) -> list[str]:
    return [m["path"] for g in found[tier] for m in g if m["keep"]]


def test_three_tiers_are_kept_apart(review_index: Index) -> None:
    found = find_duplicates(review_index)
    assert _groups(found, "identical") == [{"backup/coffee.jpg", "photos/coffee.jpg"}]
    assert _groups(found, "near") == [{"photos/astronaut.jpg", "photos/astronaut_small.jpg"}]
    assert _groups(found, "same_scene") == [{"burst/shot1.jpg", "burst/shot2.jpg"}]
    scene = found["same_scene"][0][1]
    assert "taken 0.40 s apart" in scene["why"] and scene["cosine"] >= 0.88
    # the default pick: the largest picture, then the oldest (the backup of the same bytes is older)
    assert _kept(found, "identical") == ["backup/coffee.jpg"]
    assert _kept(found, "near") == ["photos/astronaut.jpg"]
    assert _kept(found, "same_scene") == ["burst/shot1.jpg"]


def test_keep_order() -> None:
    members = [{"path": "b", "pixels": 100, "taken_ns": 5}, {"path": "a", "pixels": 400, "taken_ns": 9},
               {"path": "c", "pixels": 400, "taken_ns": 1}]
    assert choose_keep(members) == 2


def test_not_duplicates_is_remembered_by_later_runs(review_index: Index, capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    directory = tmp_path / "copy_of_index"
    shutil.copytree(review_index.directory, directory)
    code = main(["duplicates", str(directory), "--not-duplicates", "burst/shot1.jpg", "burst/shot2.jpg", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    assert "remembered" in out
    found = json.loads(out[out.index("{"):])
    assert found["same_scene"] == [] and len(found["near"]) == 1  # this run already leaves the pair out
    assert Decisions.load(directory).separated("burst/shot2.jpg", "burst/shot1.jpg")
    again = find_duplicates(Index.open(directory, device="cpu"))  # a new process's view: read from review.json
    assert again["same_scene"] == [] and _groups(again, "identical") == _groups(found, "identical")
