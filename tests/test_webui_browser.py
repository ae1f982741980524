"""End to end in a real headless Chromium (Debian's package) against the app under waitress on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cbir import Index

ARTIFACTS = Path(__file__).parent / "_artifacts"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, samples: Path, start_server) -> str:
    out = tmp_path_factory.mktemp("browser") / "sample"
    Index.build(samples, out=out, device="cpu")
    return start_server([out])


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test: install Debian's chromium (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def test_upload_see_ten_click_one_see_its_results(server: str, browser, samples: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server + "/")
    page.set_input_files("#file", str(samples / "cat" / "chelsea.jpg"))
    page.wait_for_selector("#results li:nth-child(10)")
    cards = page.locator("#results li")
    assert cards.count() == 10
    assert "cat/chelsea.jpg" in cards.nth(0).locator(".path").inner_text()
    assert "copy" in (cards.nth(0).get_attribute("class") or "")  # "copies first" is on: the photo itself verified
    assert cards.nth(0).locator(".badge").inner_text().startswith("copy of the query")
    assert page.locator("#query").is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "results.png"), full_page=True)

    # every thumbnail really loaded
    widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 10 and all(w > 0 for w in widths)

    # click the 5th result: "more like this", by id, no re-upload: a page of its own (a URL to share)
    fifth_path = cards.nth(4).locator(".path").inner_text()
    with page.expect_navigation() as nav:
        cards.nth(4).locator("a.more").click()
    assert nav.value is not None and nav.value.status == 200
    paths = page.locator("#results .path").all_inner_texts()
    assert len(paths) == 10 and fifth_path not in paths
    folder = fifth_path.split("/")[0]
    assert paths[0].startswith(folder + "/")  # its own variants come first
    assert "id=" in page.url
    page.screenshot(path=str(ARTIFACTS / "more_like_this.png"), full_page=True)


def test_error_is_shown_in_plain_words(server: str, browser, tmp_path: Path) -> None:
    page = browser.new_page()
    page.goto(server + "/")
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "not a usable image" in page.locator("#status").inner_text()


def test_phone_layout_has_two_columns(server: str, browser, samples: Path) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(server + "/")
    page.set_input_files("#file", str(samples / "coffee" / "coffee.jpg"))
    page.wait_for_selector("#results li:nth-child(10)")
    boxes = [page.locator("#results li").nth(i).bounding_box() for i in range(3)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[2]["y"] > boxes[0]["y"]
    assert boxes[1]["x"] + boxes[1]["width"] <= 390
    page.screenshot(path=str(ARTIFACTS / "phone.png"), full_page=True)


def test_the_text_box_searches_by_text_and_shows_for_clip_indexes_only(browser, clip_index: Path, samples: Path,
                                                                       start_server) -> None:
    """Typing a text and pressing Enter opens the text search's own page; a picture plus a text searches both;
    choosing an index without a text tower hides the box (the page served from a CLIP index and another)."""
    plain = clip_index.parent / "plain"
    if not plain.exists():
        Index.build(samples, out=plain, encoder="random_cnn", device="cpu")
    base = start_server([clip_index, plain])
    index = Index.open(clip_index, device="cpu")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(base + "/?index=clip&k=5")
    assert page.locator("#text").is_visible()
    page.fill("#text", "a red bicycle")
    with page.expect_navigation():
        page.press("#text", "Enter")
    assert "text=a+red+bicycle" in page.url
    assert page.locator("#results .path").all_inner_texts() == [r.path for r in index.search_text("a red bicycle", 5)]
    assert "for “a red bicycle”" in page.locator("#results-title").inner_text()
    both = [r.path for r in index.search_text("a red bicycle", 5, image=samples / "coffee" / "coffee.jpg")]
    with page.expect_response(lambda r: "/api/search" in r.url and "text=a+red+bicycle" in r.url):
        page.set_input_files("#file", str(samples / "coffee" / "coffee.jpg"))  # the text stays: picture plus text
    page.wait_for_function("want => [...document.querySelectorAll('#results .path')].map(e => e.textContent)"
                           ".join('|') === want", arg="|".join(both))
    page.screenshot(path=str(ARTIFACTS / "text_search.png"), full_page=True)
    page.select_option("#index", "plain")  # an index without a text tower: the box goes
    assert not page.locator("#text").is_visible()
