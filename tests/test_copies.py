"""Copies versus look-alikes: every edited copy is grouped with its source, distinct pictures never are, and no
group stands on a chain of unverified pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cbir import Index
from cbir.cli import main
from cbir.copies import FeatureCache, rank_copies_first
from cbir.duplicates import find_duplicates
from cbir.edits import EDITS
from cbir.images import load_image

SOURCES = ("astronaut/astronaut", "cat/chelsea", "coffee/coffee", "rocket/rocket")  # not a brick wall: see README
HALVES = ("gravel/gravel", "camera/camera")  # halves, with the whole picture in the collection
LOOKALIKES = ("grass/grass", "retina/retina")  # halves only: nothing in the collection they are copies of


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    """Sources with every kind of edited copy; and pictures split in two: halves share no pixel, so they are
    different photos of one kind of thing (the same texture) or the same scene framed twice."""
    root = tmp_path_factory.mktemp("copies") / "photos"
    for src in SOURCES:
        name = src.split("/")[1]
        folder = root / name
        folder.mkdir(parents=True)
        im = load_image(samples / f"{src}.jpg")
        im.save(folder / f"{name}.jpg", quality=92)
        for n, edit in enumerate(EDITS.values()):
            edit(im).save(folder / f"{name}_edit{n:02d}.jpg", quality=92)
    for folder, sources in (("halves", HALVES), ("lookalikes", LOOKALIKES)):
        (root / folder).mkdir()
        for src in sources:
            name = src.split("/")[1]
            im = load_image(samples / f"{src}.jpg")
            w, h = im.size
            im.crop((0, 0, w // 2, h)).save(root / folder / f"{name}_left.jpg", quality=92)
            im.crop((w // 2, 0, w, h)).save(root / folder / f"{name}_right.jpg", quality=92)
            if folder == "halves":
                shutil.copy(samples / f"{src}.jpg", root / folder / f"{name}_whole.jpg")  # each half is a crop of it
    return root


@pytest.fixture(scope="module")
def index(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Index:
    return Index.build(collection, out=tmp_path_factory.mktemp("copies_idx") / "idx", device="cpu")


def test_every_copy_is_grouped_with_its_source_and_nothing_else(index: Index) -> None:
    found = find_duplicates(index)
    groups = [{m["path"] for m in g} for g in found["near"]]
    for src in SOURCES:
        name = src.split("/")[1]
        members = {p for p in index.rows().paths if p.startswith(f"{name}/")}
        mine = [g for g in groups if f"{name}/{name}.jpg" in g]
        assert mine and mine[0] == members, (name, sorted(members - mine[0]) if mine else "no group")
    for g in found["near"]:  # the first is the hub; every other member was verified as a copy of it, and says so
        hub = g[0]
        assert hub["hub"] and not hub["evidence"]
        for m in g[1:]:
            (e,) = m["evidence"]
            assert m["copy_of"] == hub["path"] == e["of_path"] and e["verified"] and "verified:" in e["why"]
        kinds = {Path(m["path"]).stem.split("_")[0] for m in g}
        assert len(kinds) == 1, [m["path"] for m in g]  # never two different sources in one group


def test_look_alikes_and_chains_are_never_grouped(index: Index) -> None:
    found = find_duplicates(index)
    grouped = {m["path"] for g in found["near"] for m in g}
    assert not {p for p in grouped if p.startswith("lookalikes/")}, "halves share no pixel: never copies"
    for name in (s.split("/")[1] for s in HALVES):
        for g in found["near"]:
            paths = {m["path"] for m in g}
            # left and right are each a copy of the whole picture, not of each other: together only as its copies
            if {f"halves/{name}_left.jpg", f"halves/{name}_right.jpg"} <= paths:
                assert g[0]["path"] == f"halves/{name}_whole.jpg", paths


def test_copies_of_a_query_come_first_with_their_evidence(index: Index, collection: Path) -> None:
    query = EDITS["crop 70% + JPEG 30"](load_image(collection / "coffee" / "coffee.jpg"))
    ranked = rank_copies_first(index, query, k=10, cache=FeatureCache())
    copies = [r.path for r, e in ranked if e.verified]
    assert ranked[0][0].path.startswith("coffee/") and ranked[0][1].verified
    assert len(copies) >= 8 and all(p.startswith("coffee/") for p in copies)
    assert [r.rank for r, _ in ranked] == list(range(1, 11))
    mirrored = rank_copies_first(index, Image.open(collection / "chelsea" / "chelsea.jpg").transpose(
        Image.FLIP_LEFT_RIGHT), k=3)
    assert mirrored[0][1].verified and mirrored[0][0].path.startswith("chelsea/")


def test_duplicates_json_keeps_its_shape_and_adds_evidence(index: Index, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["duplicates", str(index.directory), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {"identical", "near", "threshold"} <= set(found)
    member = found["near"][0][0]
    assert {"id", "path", "best_score", "evidence"} <= set(member)
    assert {"inliers", "agreement", "verified", "why"} <= set(found["near"][0][1]["evidence"][0])


def test_search_copies_from_the_command_line(index: Index, collection: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    query = tmp_path / "q.jpg"
    EDITS["rotate 15 + greyscale"](load_image(collection / "astronaut" / "astronaut.jpg")).save(query, quality=80)
    assert main(["search", str(index.directory), str(query), "--copies", "--json", "-k", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["path"].startswith("astronaut/") and rows[0]["copy"]["verified"]
    assert main(["search", str(index.directory), str(query), "--copies", "-k", "3"]) == 0
    assert "copy: " in capsys.readouterr().out


def test_copies_bench_reports_every_edit(tmp_path: Path, samples: Path) -> None:
    from cbir.bench.copies import CopiesConfig, run_copies

    report = run_copies(CopiesConfig(dataset=str(samples), out=str(tmp_path / "rep"), sources=2, device="cpu",
                                     progress=False))
    per_kind = report["encoders"]["efficientnet_lite0"]["per_kind"]
    assert set(per_kind) == set(EDITS)
    assert all(0.0 <= v["verified_recall_at_1"] <= 1.0 and v["recall_at_10"] >= v["recall_at_1"]
               for v in per_kind.values())
    assert report["encoders"]["efficientnet_lite0"]["queries"] == 2 * len(EDITS)
    for name in ("report.md", "report.html", "report.json"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
