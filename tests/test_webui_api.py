"""The JSON API and the no-JavaScript page through the real app (Flask test client, real index)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from cbir import CbirError, Index
from tests.badfiles import bomb_png, jpeg_bytes, photo
from webui import create_app
from webui.warm import Warmup


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> dict:
    base = tmp_path_factory.mktemp("web")
    root = base / "photos"
    shutil.copytree(samples, root, ignore=shutil.ignore_patterns("*.py", "*.md"))
    outside = base / "outside.jpg"
    outside.write_bytes(jpeg_bytes(photo(seed=99)))
    os.symlink(outside, root / "cat" / "zz_link_out.jpg")  # indexed, but points outside the root
    Index.build(root, out=base / "idx" / "sample", device="cpu")
    Index.build(root / "cat", out=base / "idx" / "cats", device="cpu")
    app = create_app({"INDEXES": [base / "idx" / "sample", base / "idx" / "cats"], "DEVICE": "cpu",
                      "MAX_CONTENT_LENGTH": 2 * 1024 * 1024, "RELOAD_CHECK_SECONDS": 0.0})
    assert app.extensions["cbir_warm"].ready.wait(300)  # "serving", as `cbir serve` says it once warm
    return {"app": app, "client": app.test_client(), "root": root, "base": base}


def chelsea(served: dict) -> bytes:
    return (served["root"] / "cat" / "chelsea.jpg").read_bytes()


def test_multipart_upload_returns_the_documented_shape(served: dict) -> None:
    r = served["client"].post("/api/search", data={"image": (io.BytesIO(chelsea(served)), "q.jpg")})
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) >= {"index", "encoder", "k", "took_ms", "results"}
    assert body["index"] == "sample" and body["encoder"] == "efficientnet_lite0" and body["k"] == 10
    assert len(body["results"]) == 10 and body["results"][0]["path"] == "cat/chelsea.jpg"
    first = body["results"][0]
    assert set(first) >= {"rank", "id", "path", "score", "thumbnail_url", "image_url"}
    assert first["rank"] == 1 and first["score"] > 0.999


def test_raw_body_upload_k_and_index(served: dict) -> None:
    r = served["client"].post("/api/search?k=3&index=cats", data=chelsea(served),
                              content_type="image/jpeg")
    body = r.get_json()
    assert r.status_code == 200 and body["index"] == "cats" and len(body["results"]) == 3
    assert body["results"][0]["path"] == "chelsea.jpg"


def test_search_by_id_excludes_the_query(served: dict) -> None:
    c = served["client"]
    top = c.post("/api/search?k=2", data=chelsea(served), content_type="image/png").get_json()["results"][0]
    r = c.get(f"/api/search?id={top['id']}&k=3")
    body = r.get_json()
    assert r.status_code == 200 and top["id"] not in [x["id"] for x in body["results"]]
    assert all(x["path"].startswith("cat/chelsea") for x in body["results"])


def test_indexes_and_health(served: dict) -> None:
    c = served["client"]
    names = [i["name"] for i in c.get("/api/indexes").get_json()["indexes"]]
    assert names == ["sample", "cats"]
    health = c.get("/api/health").get_json()
    assert health["status"] == "ok" and health["indexes"] == 2 and health["images"] > 36


def test_an_uploads_verified_copies_come_first_and_are_marked(served: dict) -> None:
    from cbir.edits import EDITS
    from cbir.images import load_image

    c = served["client"]
    edited = io.BytesIO()
    EDITS["crop 70% + JPEG 30"](load_image(served["root"] / "cat" / "chelsea.jpg")).save(edited, "JPEG")
    body = c.post("/api/search?k=5&copies=1", data=edited.getvalue(), content_type="image/jpeg").get_json()
    first = body["results"][0]
    assert first["path"].startswith("cat/chelsea") and first["copy"]["verified"] and first["copy"]["inliers"] >= 25
    assert all("copy" in r for r in body["results"])
    plain = c.post("/api/search?k=5", data=edited.getvalue(), content_type="image/jpeg").get_json()
    assert all("copy" not in r for r in plain["results"])
    page = c.post("/", data={"image": (io.BytesIO(edited.getvalue()), "q.jpg"), "k": "5", "copies": "1"},
                  content_type="multipart/form-data").get_data(as_text=True)
    assert re.search(r'class="card [a-z-]+ copy"', page)
    assert "copy of the query · " in page


def test_an_index_that_cannot_be_read_is_shown_with_the_reason_and_the_others_served(served: dict,
                                                                                  tmp_path: Path) -> None:
    good = served["base"] / "idx" / "cats"
    broken = shutil.copytree(good, tmp_path / "broken")
    (segment,) = broken.glob("seg-*.h5")
    segment.write_bytes(b"this is not an HDF5 file")
    app = create_app({"INDEXES": [broken, good, tmp_path / "gone"], "DEVICE": "cpu", "WARM_UP": False,
                      "RELOAD_CHECK_SECONDS": 0.0})
    c = app.test_client()
    body = c.get("/api/indexes").get_json()
    assert [i["name"] for i in body["indexes"]] == ["cats"] and body["default"] == "cats"
    reasons = {u["name"]: u["reason"] for u in body["unavailable"]}
    assert reasons["broken"].startswith(f"cannot read {segment}") and "no index at" in reasons["gone"]
    page = c.get("/").get_data(as_text=True)
    assert "<strong>broken</strong> is not served: cannot read" in page and "<strong>gone</strong>" in page
    assert c.get("/api/health").get_json()["unavailable"] == 2
    assert c.post("/api/search?index=cats&k=1", data=chelsea(served), content_type="image/jpeg").status_code == 200
    shutil.copy(good / segment.name, segment)  # repaired: served from the next check on
    body = c.get("/api/indexes").get_json()
    assert [i["name"] for i in body["indexes"]] == ["cats", "broken"] and [u["name"] for u in body["unavailable"]] \
        == ["gone"]
    with pytest.raises(CbirError, match="no index could be opened: .*gone: no index at"):
        create_app({"INDEXES": [tmp_path / "gone"], "DEVICE": "cpu", "WARM_UP": False})


def test_health_says_warming_until_every_index_has_answered_a_search(served: dict,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    app = create_app({"INDEXES": [served["base"] / "idx" / "sample", served["base"] / "idx" / "cats"],
                      "DEVICE": "cpu", "WARM_UP": False})
    app.extensions["cbir_warm"] = warm = Warmup(app)  # not started: as cbir serve is until the warm-up ends
    c = app.test_client()
    assert c.get("/api/health").get_json()["status"] == "warming"
    with caplog.at_level("INFO", logger="cbir.webui"):
        warm.run()
    assert c.get("/api/health").get_json()["status"] == "ok"
    assert "warmed up in" in caplog.text and "warming index" not in caplog.text and "failed" not in caplog.text


def test_cbir_serve_says_serving_only_when_warm(served: dict) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "serve", str(served["base"] / "idx" / "cats"), "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith(f"serving cats on http://127.0.0.1:{port}/"), proc.stderr.read() if proc.stderr else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=30) as resp:
            assert json.load(resp)["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "warmed up in" in (proc.stderr.read() if proc.stderr else "")


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"data": b"hello, not an image", "content_type": "image/jpeg"}, 400, "not an image"),
        ({"data": b"", "content_type": "image/jpeg"}, 400, "empty"),
        ({"data": jpeg_bytes(photo())[:300], "content_type": "image/jpeg"}, 400, "truncated"),
        ({"data": bomb_png(), "content_type": "image/png"}, 400, "too large"),
        ({"data": b"x" * (3 * 1024 * 1024), "content_type": "image/jpeg"}, 413, "too large"),
        ({"data": "{}", "content_type": "application/json"}, 415, "multipart field 'image'"),
        ({"data": {"other": (io.BytesIO(b"x"), "a.jpg")}}, 400, "field 'image'"),
    ],
)
def test_bad_uploads_are_clear_4xx_json(served: dict, kwargs: dict, status: int, words: str) -> None:
    r = served["client"].post("/api/search", **kwargs)
    assert r.status_code == status, r.data[:300]
    assert words in r.get_json()["error"]


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("/api/search?id=123456", 404, "no image with id"),
        ("/api/search?id=abc", 400, "whole number"),
        ("/api/search?id=1&index=nope", 404, "no index named"),
        ("/api/search?id=1&k=0", 400, "k must be"),
        ("/api/search?id=1&k=-3", 400, "k must be"),
        ("/api/search?id=1&k=ten", 400, "k must be"),
        ("/api/search?id=1&k=100000", 400, "k must be"),
        ("/api/search", 400, "needs ?id=N"),
        ("/api/nothing", 404, "Not Found"),
    ],
)
def test_bad_parameters(served: dict, url: str, status: int, words: str) -> None:
    r = served["client"].get(url)
    assert r.status_code == status and words in r.get_json()["error"]


def test_images_and_thumbnails_by_id_only(served: dict) -> None:
    c = served["client"]
    body = c.post("/api/search?k=1", data=chelsea(served), content_type="image/jpeg").get_json()
    r = body["results"][0]
    img = c.get(r["image_url"])
    assert img.status_code == 200 and img.data == chelsea(served)
    thumb = c.get(r["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg" and len(thumb.data) < len(img.data)
    assert c.get(r["thumbnail_url"]).data == thumb.data  # cached
    for url in ["/image/sample/999999", "/image/nope/1", "/image/sample/..%2F..%2Fetc%2Fpasswd",
                "/image/sample/-1", "/image/../../etc/passwd", "/thumb/sample/%2Fetc%2Fpasswd",
                "/image//etc/passwd"]:
        assert c.get(url).status_code == 404, url


def test_symlink_out_of_the_root_is_not_served(served: dict) -> None:
    c = served["client"]
    index = served["app"].extensions["cbir"].get("sample")
    id_ = int(index.rows().ids[index.rows().paths.index("cat/zz_link_out.jpg")])
    assert c.get(f"/image/sample/{id_}").status_code == 404
    assert c.get(f"/thumb/sample/{id_}").status_code == 404


def test_page_works_without_javascript(served: dict) -> None:
    c = served["client"]
    page = c.get("/")
    assert page.status_code == 200 and b'enctype="multipart/form-data"' in page.data and b"<select" in page.data
    r = c.post("/", data={"image": (io.BytesIO(chelsea(served)), "q.jpg"), "k": "5", "index": "sample"})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and html.count('class="card') == 5 and "cat/chelsea.jpg" in html
    assert "data:image/jpeg;base64," in html  # the query is shown
    more = c.get("/?id=1&k=5&index=sample")
    assert more.status_code == 200 and more.get_data(as_text=True).count('class="card') == 5
    bad = c.post("/", data={"image": (io.BytesIO(b"plain text"), "q.png")})
    assert bad.status_code == 400 and "not a usable image" in bad.get_data(as_text=True)
    big = c.post("/", data={"image": (io.BytesIO(b"x" * (3 * 1024 * 1024)), "q.jpg")})
    assert big.status_code == 413 and "too large" in big.get_data(as_text=True)


def test_rebuilt_index_is_picked_up_without_restart(served: dict) -> None:
    c = served["client"]
    before = c.get("/api/indexes").get_json()["indexes"][1]
    assert before["name"] == "cats" and before["images"] == 5
    Index.build(served["root"] / "coffee", out=served["base"] / "idx" / "cats", device="cpu", rebuild=True)
    time.sleep(0.01)
    after = {i["name"]: i for i in c.get("/api/indexes").get_json()["indexes"]}["cats"]
    assert after["images"] == 4
    first = int(Index.open(served["base"] / "idx" / "cats").ids()[0])
    assert first >= 5  # a rebuild numbers on: the cats' ids are never given to the coffee pictures
    assert c.get("/api/search?index=cats&id=0&k=1").status_code == 404
    r = c.get(f"/api/search?index=cats&id={first}&k=1").get_json()
    assert r["results"][0]["path"].startswith("coffee")
    assert c.post("/api/reload?force=1").get_json()["reloaded"] == ["sample", "cats"]


def test_app_factory_loads_nothing_at_import() -> None:
    import subprocess
    import sys

    code = "import webui, sys; assert 'torch' not in sys.modules, 'torch at import'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/api/search?id=1&box=0,0,0,10", "no area"),
        ("/api/search?id=1&box=10,10,5,20", "no area"),
        ("/api/search?id=1&box=-5,0,20,20", "outside the image"),
        ("/api/search?id=1&box=0,0,100000,20", "outside the image"),
        ("/api/search?id=1&box=1,2,3", "four numbers"),
        ("/api/search?id=1&box=a,b,c,d", "four numbers"),
        ("/api/search?id=1&box=nan,0,5,5", "four numbers"),
    ],
)
def test_bad_boxes_are_plain_400s(served: dict, url: str, words: str) -> None:
    r = served["client"].get(url)
    assert r.status_code == 400 and words in r.get_json()["error"], r.get_json()


def test_box_searches_a_region_of_an_upload_and_of_an_indexed_image(served: dict) -> None:
    from PIL import Image

    c = served["client"]
    data = chelsea(served)
    w, h = Image.open(io.BytesIO(data)).size
    whole = c.post("/api/search?k=5", data=data, content_type="image/jpeg").get_json()
    part = c.post(f"/api/search?k=5&box=0,0,{w // 3},{h // 3}", data=data, content_type="image/jpeg").get_json()
    assert part["box"] == [0, 0, w // 3, h // 3] and [r["score"] for r in part["results"]] != \
        [r["score"] for r in whole["results"]]
    assert c.post(f"/api/search?box=0,0,{w + 1},{h}", data=data, content_type="image/jpeg").status_code == 400
    by_id = c.get(f"/api/search?id={whole['results'][0]['id']}&k=5&box=0,0,40,40").get_json()
    assert by_id["box"] == [0, 0, 40, 40] and len(by_id["results"]) == 5
    assert whole["results"][0]["id"] not in [r["id"] for r in by_id["results"]]


def test_one_query_in_several_indexes(served: dict) -> None:
    c = served["client"]
    first = int(Index.open(served["base"] / "idx" / "cats").ids()[0])
    cat_id = c.get(f"/api/search?index=cats&id={first}&k=1").get_json()["results"][0]["id"]
    body = c.get(f"/api/search?id={cat_id}&index=cats,sample&k=3").get_json()
    assert [col["index"] for col in body["columns"]] == ["cats", "sample"] and body["k"] == 3
    assert all(len(col["results"]) == 3 for col in body["columns"])
    assert body["query"]["path"] not in [r["path"] for col in body["columns"] for r in col["results"]]
    assert c.get("/api/search?id=0&index=cats,nope").status_code == 404


def test_serve_on_a_network_address_needs_a_token() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cbir", "serve", "/no/such/index", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "CBIR_TOKEN": ""})
    assert proc.returncode == 2 and "CBIR_TOKEN" in proc.stderr and "--public" in proc.stderr
    assert "serving" not in proc.stdout


def test_the_shuffled_grid_is_a_permutation_computed_page_by_page() -> None:
    import numpy as np

    from webui.pages import shuffled

    n, page = 1003, 48
    seen = np.concatenate([shuffled(np.arange(s, min(s + page, n)), n, seed=7) for s in range(0, n, page)])
    assert sorted(seen.tolist()) == list(range(n))  # every image once
    assert not np.array_equal(seen, np.arange(n))
    np.testing.assert_array_equal(shuffled(np.arange(5), n, 7), seen[:5])  # the same seed, the same order
    assert not np.array_equal(shuffled(np.arange(5), n, 8), seen[:5])
    big = shuffled(np.arange(10), 10_000_000, 3)
    assert len(set(big.tolist())) == 10 and big.max() < 10_000_000
