"""Duplicate review: three tiers kept apart, a default pick per group, "not duplicates" remembered, moves undone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
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


def _files(root: Path) -> dict[str, tuple[str, int]]:
    from cbir.files import sha256_file

    return {p.relative_to(root).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_move_then_undo_restores_every_file_and_the_index(tmp_path: Path, samples: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = make_collection(tmp_path / "collection", samples)
    index = Index.build(root, out=tmp_path / "idx", device="cpu")
    before_files = _files(root)
    before_ids = sorted(int(i) for i in index.ids())
    moved = {"photos/coffee.jpg", "photos/astronaut_small.jpg"}  # the copies of the kept pictures
    gone_ids = {index.id_of(p): p for p in moved}
    vectors = {p: index.vector_of(index.id_of(p)) for p in moved}
    meta = index.generation.meta_of(sorted(gone_ids))
    dest = tmp_path / "dupes"

    assert main(["duplicates", str(index.directory), "--move-to", str(dest)]) == 0  # a dry run
    assert "dry run: 2 files would move" in capsys.readouterr().out
    assert _files(root) == before_files and not dest.exists()

    assert main(["duplicates", str(index.directory), "--move-to", str(dest), "--apply"]) == 0
    assert "moved 2 files" in capsys.readouterr().out
    assert {p for p in _files(dest)} == moved and not any((root / p).exists() for p in moved)
    after = Index.open(index.directory, device="cpu")
    assert sorted(int(i) for i in after.ids()) == sorted(set(before_ids) - set(gone_ids))
    astronaut = after.id_of("photos/astronaut.jpg")
    assert "photos/astronaut_small.jpg" not in [r.path for r in after.search_id(astronaut, k=20)]

    assert main(["duplicates", str(index.directory), "--undo"]) == 0
    assert "2 files put back and indexed again" in capsys.readouterr().out
    assert _files(root) == before_files  # every file back, byte for byte, with its time
    back = Index.open(index.directory, device="cpu")
    assert sorted(int(i) for i in back.ids()) == before_ids  # the same ids
    for id_, path in gone_ids.items():
        assert back.path_of(id_) == path and np.allclose(back.vector_of(id_), vectors[path])
    again = back.generation.meta_of(sorted(gone_ids))
    assert all(np.array_equal(again[k], meta[k]) for k in ("taken_ns", "width", "height", "tags"))
    assert "photos/astronaut_small.jpg" in [r.path for r in back.search_id(astronaut, k=20)]
    assert main(["duplicates", str(index.directory), "--undo"]) == 0
    assert "0 files put back" in capsys.readouterr().out


def test_move_to_inside_the_collection_is_refused(review_index: Index, capsys: pytest.CaptureFixture[str]) -> None:
    inside = review_index.root / "dupes"
    assert main(["duplicates", str(review_index.directory), "--move-to", str(inside), "--apply"]) == 2
    assert "is inside the indexed folder" in capsys.readouterr().err and not inside.exists()
