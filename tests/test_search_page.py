"""The search page (GET /, cnclip_kd/deploy/static/search.html) in a real browser: Debian's Chromium driven by
Playwright against the search service on 127.0.0.1 (BackgroundServer: uvicorn in a thread of this process).

Uploads a photo and sees the Top-k grid with titles, scores and timings; types a Chinese query and sees results;
chooses a category and sees only that label; a wrong query key shows the service's error. Needs
``/usr/bin/chromium`` and the ``playwright`` package (never ``playwright install``); skipped with the reason
otherwise.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from badinputs import sample_photo
from demo_fixtures import build_saved_index

from cnclip_kd.deploy.serve import BackgroundServer
from cnclip_kd.retrieval.index import GalleryIndex

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
API_KEY = "page-query-key"
PAGE_MS = 60_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(),
                       reason="/usr/bin/chromium is missing (apt-get install chromium; .ci/run does it)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright package is missing (pip install playwright; in the dev extra)"),
]


@pytest.fixture(scope="module")
def server(checkpoint, data_dir, onnx_towers, tmp_path_factory):
    index_dir = build_saved_index(checkpoint, data_dir, tmp_path_factory.mktemp("page") / "index")
    with BackgroundServer(index_dir, onnx_towers["image"], onnx_towers["text"], api_key=API_KEY, threads=1,
                          pool_size=2) as running:
        yield running, GalleryIndex.load(index_dir)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        tab = browser.new_page()
        tab.set_default_timeout(PAGE_MS)
        tab.goto(server[0].url + "/")
        tab.fill("#key", API_KEY)
        yield tab
        browser.close()


def _cards(page) -> list[dict]:
    page.wait_for_selector("#grid .card")
    return page.eval_on_selector_all("#grid .card", "cards => cards.map(c => ({id: c.dataset.id, "
                                                   "label: c.dataset.label, text: c.innerText}))")


def _search(page) -> None:
    page.evaluate("document.getElementById('grid').replaceChildren()")
    page.click("#go")
    # Selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval that would need.
    page.wait_for_selector("#grid .card, #status.error")


def test_upload_a_photo_and_see_the_grid(page):
    page.select_option("#k", "5")
    page.set_input_files("#photo", str(sample_photo(0)))
    _search(page)
    cards = _cards(page)
    assert len(cards) == 5
    assert all("·" in c["text"] for c in cards)  # rank · label · score under each title
    status = page.inner_text("#status")
    assert "encode" in status and "total" in status and "ms" in status
    # The thumbnails load through /images with the query key (blob URLs).
    deadline, loaded = time.monotonic() + 30, []
    while time.monotonic() < deadline and len(loaded) < 5:
        loaded = [w for w in page.eval_on_selector_all(
            "#grid img", "imgs => imgs.map(i => i.src.startsWith('blob:') && i.complete ? i.naturalWidth : 0)") if w]
        time.sleep(0.1)
    assert len(loaded) == 5


def test_type_a_query_and_see_results(page):
    page.set_input_files("#photo", [])
    page.fill("#q", "白色连衣裙")
    page.select_option("#k", "10")
    _search(page)
    assert len(_cards(page)) == 10


def test_choose_a_category_and_see_only_that_label(page, server):
    labels = sorted({m.get("label") for m in server[1].gallery.meta if m.get("label")})
    label = labels[-1]
    page.fill("#q", "连衣裙")
    page.fill("#category", label)
    page.select_option("#k", "20")
    _search(page)
    cards = _cards(page)
    assert cards and {c["label"] for c in cards} == {label}
    page.fill("#category", "")


def test_a_wrong_key_shows_the_error(page):
    page.fill("#key", "wrong")
    page.fill("#q", "连衣裙")
    _search(page)
    assert "unauthorized" in page.inner_text("#status")
    page.fill("#key", API_KEY)
