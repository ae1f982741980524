"""The duplicate review page in a real Chromium: three tiers, evidence drawn, "not duplicates" survives a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cbir import Index
from tests.test_review import make_collection
from tests.test_webui_browser import ARTIFACTS, browser  # noqa: F401  (the Chromium fixture)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    root = make_collection(tmp_path_factory.mktemp("review_page") / "collection", samples)
    out = tmp_path_factory.mktemp("review_page_idx") / "idx"
    Index.build(root, out=out, device="cpu")
    return out


def _open_review(browser, server: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server + "/duplicates")
    page.wait_for_selector("#tier-same_scene", timeout=120_000)  # the page reloads itself until the search is done
    return page


def test_review_page_tiers_evidence_and_not_duplicates(browser, index_dir: Path, start_server,  # noqa: F811
                                                       tmp_path: Path) -> None:
    directory = tmp_path / "idx"
    shutil.copytree(index_dir, directory)
    page = _open_review(browser, start_server([directory]))
    for tier, paths in (("identical", {"backup/coffee.jpg", "photos/coffee.jpg"}),
                        ("near", {"photos/astronaut.jpg", "photos/astronaut_small.jpg"}),
                        ("same_scene", {"burst/shot1.jpg", "burst/shot2.jpg"})):
        groups = page.locator(f"#tier-{tier} form.group")
        assert groups.count() == 1, tier
        shown = set(groups.first.locator("li.card").evaluate_all("cards => cards.map(c => c.dataset.path)"))
        assert shown == paths, tier
    kept = page.locator("#tier-near li.card.keep").get_attribute("data-path")
    assert kept == "photos/astronaut.jpg"
    assert page.locator("#tier-near li.card.keep input[type=radio]").is_checked()
    evidence = page.locator("#tier-near .evidence img")
    evidence.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=evidence.element_handle())
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "duplicates.png"), full_page=True)

    page.locator("#tier-same_scene button[value=not-duplicates]").click()
    page.wait_for_selector("#status:has-text('not duplicates')")
    assert page.locator("#tier-same_scene form.group").count() == 0
    assert page.locator("#tier-near form.group").count() == 1

    again = _open_review(browser, start_server([directory]))  # a new server: a restart
    assert again.locator("#tier-same_scene form.group").count() == 0
    assert again.locator("#tier-identical form.group").count() == 1


def test_review_page_moves_the_others_and_refuses_other_sites(browser, index_dir: Path, start_server,  # noqa: F811
                                                              tmp_path: Path) -> None:
    import requests

    from cbir import Index
    from cbir.cli import main

    dest = tmp_path / "moved"
    base = start_server([index_dir], MOVE_TO=str(dest))
    index = Index.open(index_dir, device="cpu")
    members = [str(index.id_of(p)) for p in ("backup/coffee.jpg", "photos/coffee.jpg")]
    forged = requests.post(f"{base}/duplicates/decide", headers={"Origin": "http://evil.example"}, timeout=60,
                           data={"index": "idx", "member": members, "keep": members[0], "action": "move"})
    assert forged.status_code == 403 and not dest.exists()

    page = _open_review(browser, base)
    group = page.locator("#tier-identical form.group")
    group.locator("input[type=radio]").nth(1).check()  # keep photos/coffee.jpg, not the default (the older backup)
    group.locator("button[value=move]").click()
    page.wait_for_selector("#status:has-text('moved 1 pictures')")
    assert page.locator("#tier-identical form.group").count() == 0
    assert (dest / "backup/coffee.jpg").is_file() and not (index.root / "backup/coffee.jpg").exists()
    assert Index.open(index_dir, device="cpu").id_of("backup/coffee.jpg") is None  # out of the index
    assert main(["duplicates", str(index_dir), "--undo"]) == 0
    assert (index.root / "backup/coffee.jpg").is_file()
