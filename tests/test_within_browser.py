"""The "Search within" controls in a real Chromium: the grid filters, the URL keeps the filters, results stay within
them, an upload is searched within them, a bad filter is a plain message."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.test_filtered_search import filtered_index  # noqa: F401  (the indexed collection with metadata)
from tests.test_webui_browser import browser  # noqa: F401  (the Chromium fixture)

HOLIDAYS_2023 = {"Holidays/2023/beach.jpg", "Holidays/2023/sea.jpg"}


def _tiles(page) -> set[str]:
    return set(page.locator("#collection img").evaluate_all("imgs => imgs.map(i => i.alt)"))


def test_filter_controls(browser, filtered_index, start_server, samples: Path) -> None:  # noqa: F811
    base = start_server([filtered_index.directory])
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(base + "/")
    assert len(_tiles(page)) == 8
    page.click("#within summary")  # closed until a filter is set: one tab stop for keyboard users
    page.fill("#f-folder", "Holidays")
    page.fill("#f-after", "2023-01-01")
    page.click("#filter-form button[type=submit]")
    page.wait_for_selector("#matching")
    query = parse_qs(urlsplit(page.url).query)
    assert query["folder"] == ["Holidays"] and query["after"] == ["2023-01-01"]
    assert _tiles(page) == HOLIDAYS_2023
    assert "2 of 8 images match --folder Holidays --after 2023-01-01" in page.locator("#matching").inner_text()

    page.locator("#collection .tile a").first.click()  # "more like this", still within the filters
    page.wait_for_selector("#results li")
    assert parse_qs(urlsplit(page.url).query)["folder"] == ["Holidays"]
    shown = set(page.locator("#results .path").all_inner_texts())
    assert shown and shown <= HOLIDAYS_2023
    assert page.input_value("#f-folder") == "Holidays"

    page.goto(base + "/?tag=product")  # an upload, searched within the filter shown
    page.set_input_files("#file", str(samples / "gravel" / "gravel.jpg"))
    page.wait_for_selector("#results li")
    assert set(page.locator("#results .path").all_inner_texts()) == {"Work/product1.jpg", "Work/product2.jpg"}
    assert "of 2 matching" in page.locator("#results-title").inner_text()

    resp = page.goto(base + "/?folder=Nowhere")
    assert resp.status == 400
    assert "no folder 'Nowhere'" in page.locator("#status").inner_text()
