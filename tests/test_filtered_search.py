"""Search within: folder, date (EXIF and file time), camera and tag filters give only matching images, and exactly
the top-k an exact search over the matching images gives; through Python, the command line and the HTTP API."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests

from cbir import Index, metadata
from cbir.cli import main
from cbir.search.filters import FilterError
from tests.test_metadata import XMP

# path -> (sample picture, EXIF date or None (then the file time below), camera or None, XMP keywords)
PICTURES = {
    "Holidays/2023/beach.jpg": ("astronaut/astronaut", "2023:07:14 10:22:01", "Pixel 7", ["beach"]),
    "Holidays/2023/sea.jpg": ("coffee/coffee", "2023:08:01 09:00:00", "Pixel 7", []),
    "Holidays/2022/ski.jpg": ("rocket/rocket", "2022:02:01 12:00:00", "EOS R5", ["snow"]),
    "Work/product1.jpg": ("cat/chelsea", None, None, []),
    "Work/product2.jpg": ("bricks/brick", None, None, []),
    "misc/grass.jpg": ("grass/grass", None, "Pixel 7", []),
    "misc/camera.jpg": ("camera/camera", "2021:01:01 08:00:00", None, []),
    "misc/gravel.jpg": ("gravel/gravel", None, None, []),
}
FILE_TIMES = {"Work/product1.jpg": datetime(2024, 3, 1, 12), "Work/product2.jpg": datetime(2021, 5, 5, 12),
              "misc/grass.jpg": datetime(2023, 3, 3, 3), "misc/gravel.jpg": datetime(2020, 1, 1)}
TAGS_CSV = "path,tag\nWork/product1.jpg,product\nWork/product2.jpg,product\nWork/product2.jpg,red\n"


def make_collection(root: Path, samples: Path) -> Path:
    from PIL import Image

    for rel, (sample, taken, model, keywords) in PICTURES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if taken is None and model is None:
            shutil.copy(samples / f"{sample}.jpg", path)
        else:
            xmp = XMP.replace(b"<rdf:li>product</rdf:li><rdf:li>red &amp; blue</rdf:li>",
                              b"".join(b"<rdf:li>%s</rdf:li>" % k.encode() for k in keywords)) if keywords else b""
            with Image.open(samples / f"{sample}.jpg") as im:
                im.convert("RGB").save(path, "JPEG", quality=92)
            _exif_onto(path, taken, model, xmp)
        when = FILE_TIMES.get(rel, datetime(2025, 1, 1))
        os.utime(path, (when.timestamp(), when.timestamp()))
    (root / "tags.csv").write_text(TAGS_CSV)
    return root


def _exif_onto(path: Path, taken: str | None, model: str | None, xmp: bytes) -> None:
    """The sample's own pixels, saved again with an EXIF date, a camera and XMP keywords."""
    from PIL import Image

    exif = Image.Exif()
    if model:
        exif[metadata.MAKE], exif[metadata.MODEL] = ("Canon", "Canon EOS R5") if model == "EOS R5" else \
            ("Google", model)
    if taken:
        exif.get_ifd(metadata.EXIF_IFD)[metadata.DATE_TIME_ORIGINAL] = taken
    with Image.open(path) as im:
        pixels = im.copy()
    pixels.save(path, "JPEG", quality=92, exif=exif.tobytes(), **({"xmp": xmp} if xmp else {}))


@pytest.fixture(scope="module")
def filtered_index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Index:
    root = make_collection(tmp_path_factory.mktemp("within") / "photos", samples)
    tags = tmp_path_factory.mktemp("tags") / "tags.csv"
    shutil.move(root / "tags.csv", tags)
    return Index.build(root, out=tmp_path_factory.mktemp("within_idx") / "idx", device="cpu", tags=str(tags))


def _exact(index: Index, query_id: int, allowed: set[str], k: int) -> list[str]:
    """The top-k of an exact search over the allowed images alone (the query itself left out)."""
    rows = index.rows()
    vectors, paths, ids = np.asarray(rows.vectors), list(rows.paths), np.asarray(rows.ids)
    q = vectors[int(np.flatnonzero(ids == query_id)[0])]
    scored = sorted(((float(vectors[n] @ q), p) for n, p in enumerate(paths) if p in allowed and ids[n] != query_id),
                    key=lambda t: -t[0])
    return [p for _, p in scored[:k]]


CASES = [  # filter words -> the paths they allow
    ({"folder": "Holidays"}, {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg", "Holidays/2022/ski.jpg"}),
    ({"folder": "Holidays/2023"}, {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg"}),
    ({"after": "2023-01-01", "before": "2024-01-01"},  # EXIF dates, and a file time (grass: March 2023)
     {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg", "misc/grass.jpg"}),
    ({"after": "2024-01-01"}, {"Work/product1.jpg"}),  # a file time
    ({"before": "2021-06-01"}, {"Work/product2.jpg", "misc/camera.jpg", "misc/gravel.jpg"}),
    ({"camera": "Pixel 7"}, {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg", "misc/grass.jpg"}),
    ({"camera": "canon"}, {"Holidays/2022/ski.jpg"}),
    ({"tags": ["product"]}, {"Work/product1.jpg", "Work/product2.jpg"}),
    ({"tags": ["product", "red"]}, {"Work/product2.jpg"}),
    ({"tags": ["beach"]}, {"Holidays/2023/beach.jpg"}),
    ({"folder": "Holidays", "camera": "Pixel 7", "after": "2023-08-01"}, {"Holidays/2023/sea.jpg"}),
]


@pytest.mark.parametrize(("words", "allowed"), CASES, ids=[json.dumps(w) for w, _ in CASES])
def test_each_filter_gives_the_exact_top_k_of_the_matching_images(filtered_index: Index, words: dict,
                                                                   allowed: set[str]) -> None:
    index = filtered_index
    assert {index.path_of(int(i)) for i in index.matching(words)} == allowed
    for query_path in ("misc/gravel.jpg", "Holidays/2023/beach.jpg"):
        query_id = index.id_of(query_path)
        got = [r.path for r in index.search_id(query_id, k=5, where=words)]
        assert set(got) <= allowed
        assert got == _exact(index, query_id, allowed, 5)


def test_a_filter_that_matches_one_image_returns_it(filtered_index: Index) -> None:
    query = filtered_index.id_of("misc/gravel.jpg")
    found = filtered_index.search_id(query, k=10, where={"tags": "beach"})
    assert [r.path for r in found] == ["Holidays/2023/beach.jpg"]
    vector = filtered_index.vector_of(filtered_index.id_of("Holidays/2022/ski.jpg"))
    assert [r.path for r in filtered_index.search_vector(vector, k=3, where={"camera": "EOS R5"})] == \
        ["Holidays/2022/ski.jpg"]


def test_unknown_values_bad_dates_and_no_match(filtered_index: Index) -> None:
    query = filtered_index.id_of("misc/gravel.jpg")
    with pytest.raises(FilterError, match="no folder 'Holiday'"):
        filtered_index.search_id(query, where={"folder": "Holiday"})
    with pytest.raises(FilterError, match="not a date"):
        filtered_index.search_id(query, where={"after": "14/07/2023"})
    assert filtered_index.search_id(query, where={"folder": "Work", "camera": "Pixel 7"}) == []


def test_facets_and_info(filtered_index: Index, capsys: pytest.CaptureFixture[str]) -> None:
    facets = filtered_index.facets()
    assert facets["cameras"] == {"Google Pixel 7": 3, "Canon EOS R5": 1}
    assert facets["tags"] == {"product": 2, "beach": 1, "red": 1, "snow": 1}
    assert facets["dates"]["first"] == "2020-01-01" and facets["dates"]["from_camera"] == 4
    assert main(["info", str(filtered_index.directory)]) == 0
    out = capsys.readouterr().out
    assert "cameras   Google Pixel 7 (3), Canon EOS R5 (1)" in out and "tags      product (2)" in out
    assert "dates     2020-01-01 .. " in out and "(4 from the camera, 4 from file times)" in out


def test_cli_search_with_filters(filtered_index: Index, capsys: pytest.CaptureFixture[str], samples: Path) -> None:
    idx = str(filtered_index.directory)
    query = str(samples / "gravel/gravel.jpg")
    assert main(["search", idx, query, "--folder", "Holidays", "--camera", "Pixel 7", "--json", "--no-prepare"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["matched"] == 2 and {r["path"] for r in found["results"]} == {"Holidays/2023/beach.jpg",
                                                                               "Holidays/2023/sea.jpg"}
    assert main(["search", idx, query, "--tag", "product", "--tag", "red", "--no-prepare"]) == 0
    out = capsys.readouterr().out
    assert "of 1 images matching --tag 'product' --tag 'red'" in out and "Work/product2.jpg" in out
    assert main(["search", idx, query, "--folder", "Nope", "--no-prepare"]) == 2
    assert "cbir: error: no folder 'Nope' in this index; folders: 'Holidays'" in capsys.readouterr().err
    assert main(["search", idx, query, "--before", "2023-02-30", "--no-prepare"]) == 2
    assert "is not a date" in capsys.readouterr().err


def test_http_api_filters(filtered_index: Index, start_server, samples: Path) -> None:
    base = start_server([filtered_index.directory])
    query = filtered_index.id_of("misc/gravel.jpg")
    got = requests.get(f"{base}/api/search", params={"id": query, "folder": "Holidays", "after": "2023-01-01"},
                       timeout=60).json()
    assert {r["path"] for r in got["results"]} == {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg"}
    assert got["matched"] == 2 and got["filters"] == {"folder": "Holidays", "after": "2023-01-01"}
    with open(samples / "gravel/gravel.jpg", "rb") as fh:
        posted = requests.post(f"{base}/api/search", params={"tag": ["product", "red"]}, files={"image": fh},
                               timeout=60).json()
    assert [r["path"] for r in posted["results"]] == ["Work/product2.jpg"]
    for params, status, words in (({"folder": "Holiday"}, 400, "no folder 'Holiday'"),
                                  ({"after": "yesterday"}, 400, "not a date"),
                                  ({"after": "2024-01-01", "before": "2023-01-01"}, 400, "no date is in that range"),
                                  ({"camera": "Pixel 9"}, 400, "no camera 'Pixel 9'")):
        resp = requests.get(f"{base}/api/search", params={"id": query, **params}, timeout=60)
        assert resp.status_code == status and words in resp.json()["error"], params
    empty = requests.get(f"{base}/api/search", params={"id": query, "folder": "Work", "camera": "Pixel 7"},
                         timeout=60)
    assert empty.status_code == 200 and empty.json()["results"] == []
    assert "no image in" in empty.json()["message"] and empty.json()["matched"] == 0
