"""Text queries served: GET/POST /api/search?text=..., a picture plus a text, the page's text search by URL, and plain
errors for an index without a text tower (the app under waitress on 127.0.0.1, a tiny CLIP index)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from cbir import Index
from cbir.index import joint
from tests.tiny_models import VIT, VIT_KWARGS, VIT_TAG


@pytest.fixture(scope="module")
def timm_index(tiny, samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample photos indexed with the tiny ViT, its weights from a safetensors file."""
    out = tmp_path_factory.mktemp("timm_index") / "vit"
    Index.build(samples, out=out, encoder=f"timm:{VIT}", weights=str(tiny.vit_safetensors), device="cpu",
                model_kwargs=VIT_KWARGS)
    return out


@pytest.fixture(scope="module")
def server(clip_index: Path, sample_index, timm_index: Path, start_server) -> str:
    return start_server([clip_index, sample_index.directory, timm_index])


def _paths(body: dict) -> list[str]:
    return [r["path"] for r in body["results"]]


def test_text_and_picture_plus_text_through_the_api(server: str, clip_index: Path, samples: Path) -> None:
    index = Index.open(clip_index, device="cpu")
    r = requests.get(f"{server}/api/search", params={"text": "a red bicycle", "k": 5, "index": "clip"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "a red bicycle" and _paths(body) == [x.path for x in index.search_text("a red bicycle", 5)]
    assert all(x["similarity"] is None for x in body["results"])  # no picture-to-picture words for a text
    picture = (samples / "coffee" / "coffee.jpg").read_bytes()
    r = requests.post(f"{server}/api/search", params={"text": "at night", "k": 5, "index": "clip"}, data=picture,
                      headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    want = index.search_vector(joint(index.embed(picture), index.embed_text("at night")), k=5)
    assert _paths(r.json()) == [x.path for x in want]
    r = requests.get(f"{server}/api/search", params={"text": "at night", "id": 12, "k": 5, "index": "clip"},
                     timeout=60)  # an indexed picture plus a text
    want = index.search_vector(joint(index.vector_of(12), index.embed_text("at night")), k=5, exclude_ids=(12,))
    assert r.status_code == 200 and _paths(r.json()) == [x.path for x in want]
    listed = {i["name"]: i["text"] for i in requests.get(f"{server}/api/indexes", timeout=10).json()["indexes"]}
    assert listed == {"clip": True, "sample": False, "vit": False}


def test_an_index_of_a_timm_model_is_served(server: str, samples: Path) -> None:
    picture = (samples / "rocket" / "rocket.jpg").read_bytes()
    r = requests.post(f"{server}/api/search", params={"index": "vit", "k": 4}, data=picture,
                      headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["encoder"] == f"timm:{VIT}.{VIT_TAG}" and body["results"][0]["path"] == "rocket/rocket.jpg"
    assert body["results"][0]["similarity"] == "near-duplicate"


@pytest.mark.parametrize(("params", "words"), [
    ({"text": "a cat", "index": "sample"}, "has no text tower: text search needs an index of a CLIP model"),
    ({"text": "a cat", "index": "vit"}, "has no text tower"),
    ({"text": "   ", "index": "clip"}, "the text query is empty"),
    ({"text": "x" * 1001, "index": "clip"}, "at most 1000"),
    ({"text": "a cat", "index": "clip", "box": "0,0,10,10"}, "box is a region of a picture"),
    ({"text": "a cat", "index": "clip,sample", "id": "1"}, "comparing indexes takes ?id=N alone"),
    ({"index": "clip"}, "needs ?id=N (an indexed image) or ?text="),
])
def test_bad_text_queries_are_plain_400s(server: str, params: dict, words: str) -> None:
    r = requests.get(f"{server}/api/search", params=params, timeout=60)
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_the_page_searches_by_text_without_javascript(server: str, clip_index: Path) -> None:
    page = requests.get(f"{server}/", params={"index": "clip", "text": "a red bicycle", "k": 5}, timeout=60)
    assert page.status_code == 200 and "Top 5 for “a red bicycle” in clip" in page.text
    index = Index.open(clip_index, device="cpu")
    first = index.search_text("a red bicycle", k=5)[0].path
    assert first in page.text and 'value="a red bicycle"' in page.text
    form = requests.post(f"{server}/", data={"index": "clip", "text": "a red bicycle", "k": "5"},
                         files={"image": ("", b"", "application/octet-stream")}, timeout=60)  # no file chosen
    assert form.status_code == 200 and first in form.text
    plain = requests.get(f"{server}/", params={"index": "sample"}, timeout=60).text
    assert 'id="text-label" class="text" hidden' in plain  # no text box for an index without a text tower
