"""The page for people who browse, point and share, in a real headless Chromium: the collection, "more like
this" with its own URL and the back button, region search, side by side, the token, a phone, a keyboard."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cbir import Index
from tests.test_webui_browser import ARTIFACTS, browser  # noqa: F401  (the shared Chromium fixture)

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("browse")
    a, b = root / "lite0", root / "colours"
    Index.build(samples, out=a, device="cpu")
    Index.build(samples, out=b, device="cpu", encoder="colour_histogram")
    return [a, b]


@pytest.fixture(scope="module")
def site(two_indexes: list[Path], start_server) -> str:
    return start_server(two_indexes)


@pytest.fixture(scope="module")
def private(two_indexes: list[Path], start_server) -> str:
    return start_server(two_indexes[:1], TOKEN=TOKEN)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_browse_click_a_thumbnail_then_back(site: str, browser) -> None:  # noqa: F811
    page = browser.new_page()
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(site + "/")
    tiles = page.locator("#collection .tile a")
    assert tiles.count() == 36  # the bundled samples, one page
    widths = page.eval_on_selector_all("#collection img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    third = tiles.nth(2).get_attribute("href")
    with page.expect_navigation():
        tiles.nth(2).click()
    assert third is not None and "id=" in third and page.url.endswith(third)
    assert page.locator("#results .card").count() == 10 and page.locator("#collection").count() == 0
    page.go_back()
    page.wait_for_selector("#collection .tile")
    assert "id=" not in page.url
    assert not missing, f"404s while browsing: {missing}"  # the favicon among them
    assert len(widths) == 36


def test_shuffle_reorders_and_keeps_its_url(site: str, browser) -> None:  # noqa: F811
    page = browser.new_page()
    page.goto(site + "/")
    before = page.eval_on_selector_all("#collection .tile img", "imgs => imgs.map(i => i.alt)")
    with page.expect_navigation():
        page.click("#shuffle")
    after = page.eval_on_selector_all("#collection .tile img", "imgs => imgs.map(i => i.alt)")
    assert "shuffle=" in page.url and sorted(after) == sorted(before) and after != before
    page.reload()
    assert page.eval_on_selector_all("#collection .tile img", "imgs => imgs.map(i => i.alt)") == after


def test_region_search_draws_the_box_and_changes_the_results(site: str, browser) -> None:  # noqa: F811
    page = browser.new_page()
    page.goto(site + "/?id=5&k=10")
    whole = page.locator("#results .path").all_inner_texts()
    img = page.locator("#query-img").bounding_box()
    assert img is not None
    with page.expect_navigation():
        page.mouse.move(img["x"] + img["width"] * 0.05, img["y"] + img["height"] * 0.05)
        page.mouse.down()
        page.mouse.move(img["x"] + img["width"] * 0.3, img["y"] + img["height"] * 0.3, steps=5)
        page.mouse.move(img["x"] + img["width"] * 0.45, img["y"] + img["height"] * 0.4, steps=5)
        page.mouse.up()
    assert "box=" in page.url
    box = page.locator("#box")
    assert box.is_visible()
    drawn = box.bounding_box()
    assert drawn is not None and drawn["width"] > 0.3 * img["width"] and drawn["height"] > 0.25 * img["height"]
    region = page.locator("#results .path").all_inner_texts()
    assert len(region) == 10 and region != whole
    page.screenshot(path=str(ARTIFACTS / "region.png"), full_page=True)


def test_compare_shows_one_column_per_index_with_the_overlap_marked(site: str, browser) -> None:  # noqa: F811
    status, body = _get(site + "/api/search?id=5&index=lite0,colours&k=10")
    found = json.loads(body)
    assert status == 200 and [c["index"] for c in found["columns"]] == ["lite0", "colours"]
    page = browser.new_page()
    page.goto(site + "/?id=5&index=lite0")
    with page.expect_navigation():
        page.click("#compare-link")
    assert page.locator(".column").count() == 2
    assert page.locator(".column").nth(0).locator(".card").count() == 10
    assert page.locator(".column").nth(0).locator(".card.shared").count() == found["overlap"]
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def test_every_route_needs_the_token(private: str, browser) -> None:  # noqa: F811
    routes = ["/", "/compare?id=0", "/api/search?id=0", "/api/indexes", "/api/health", "/image/lite0/0",
              "/thumb/lite0/0"]
    for route in routes:
        assert _get(private + route)[0] == 401, route
        assert _get(private + route, {"Authorization": "Bearer wrong"})[0] == 401, route
        assert _get(private + route, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, route
    page = browser.new_page()
    page.goto(private + "/")
    page.fill("#token", "not it")
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "not right" in page.locator("#status").inner_text()
    page.fill("#token", TOKEN)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector("#collection .tile")
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert TOKEN not in page.url


def test_phone_width_and_keyboard(site: str, browser) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(site + "/")
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "phone_collection.png"), full_page=True)
    assert all(page.eval_on_selector_all("img", "imgs => imgs.map(i => i.alt.length > 0)"))
    for _ in range(16):  # Tab through the form to the first thumbnail, then open it with Enter
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('.tile') !== null"):
            break
    else:
        pytest.fail("the thumbnails cannot be reached with the keyboard")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "id=" in page.url and page.locator("#results .card").count() == 10
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "phone_results.png"), full_page=True)


OVERFLOWS = """() => {
  const width = document.documentElement.clientWidth, out = [];
  for (const el of document.querySelectorAll("body *")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    const card = el.closest(".search, .card, .tile");
    const c = card && card !== el ? card.getBoundingClientRect() : null;
    if (r.left < -0.5 || r.right > width + 0.5 || (c && (r.left < c.left - 0.5 || r.right > c.right + 0.5)))
      out.push(`${el.tagName.toLowerCase()}#${el.id}.${el.className}: ${Math.round(r.left)}-${Math.round(r.right)}`);
  }
  return {scrollWidth: document.scrollingElement.scrollWidth, outside: out};
}"""


@pytest.fixture(scope="module")
def long_names(two_indexes: list[Path], tmp_path_factory: pytest.TempPathFactory, start_server) -> str:
    """Two indexes with long names (the selector shows "name (encoder, N images)"), and one that cannot be opened."""
    root = tmp_path_factory.mktemp("long")
    first = shutil.copytree(two_indexes[0], root / "holiday-photos-of-the-whole-family-2019-2024")
    second = shutil.copytree(two_indexes[1], root / "holiday-photos-of-the-whole-family-colours")
    return start_server([first, second, root / "an-index-folder-that-is-not-there"])


@pytest.mark.parametrize("route", ["/", "/?id=5&k=10", "/compare?id=5"])
def test_every_box_fits_a_phone(long_names: str, browser, route: str) -> None:  # noqa: F811
    """At 390 px nothing runs past the screen or out of its card (the index selector did), and nothing scrolls
    sideways."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(long_names + route)
    page.wait_for_load_state("networkidle")
    found = page.evaluate(OVERFLOWS)
    assert found == {"scrollWidth": 390, "outside": []}
    if route == "/":
        assert page.locator("#index option").count() == 2
        assert "an-index-folder-that-is-not-there is not served" in page.locator(".unavailable").inner_text()
        page.screenshot(path=str(ARTIFACTS / "phone_long_names.png"), full_page=True)
    page.close()
