"""Notebook 05's query panel in a real browser: JupyterLab + Debian's Chromium driven by Playwright.

The test starts JupyterLab on 127.0.0.1 (free port, token, throw-away
JUPYTER_* dirs) in a temp dir holding a copy of notebook 05 parametrised to
read a prepared index, opens it in headless Chromium, runs all cells, uploads
a photo through the file chooser, clicks Search and checks that the grid shows
k thumbnails; then uploads a text file and checks the message; then types a
description in the text box, clicks Search and checks the k results of the text
query, and presses Enter on a blank text and checks the message. Screenshots
stay in the test's tmp dir (``panel.png``, ``page.png``); set
``CNCLIP_KD_SCREENSHOT=/some/file.png`` to get a copy of the panel's.

Needs ``/usr/bin/chromium`` (apt package ``chromium``) and the ``playwright``
Python package (no ``playwright install``: the browser is Debian's); skipped
with the reason when either is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from cnclip_kd import SAMPLE_DATA
from demo_fixtures import build_saved_index, demo_output, prepare_sample
from notebook_harness import NOTEBOOKS_DIR, kernel_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
MODEL = "tiny-kd-cosine"
K = 6
PHOTO = sorted((SAMPLE_DATA / "images").glob("*/*.jpg"))[0]
IDLE = "#jp-main-statusbar .jp-StatusBar-TextItem"  # holds "Python 3 (ipykernel) | Idle"
# Every wait is bounded (milliseconds for Playwright).
SERVER_START_S = 90
PAGE_MS = 90_000
RUN_ALL_MS = 300_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(),
                       reason="/usr/bin/chromium is missing (apt-get install chromium; .ci/run does it)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright package is missing (pip install playwright; in the dev extra)"),
]


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """runs/ of the demo students (shared, read-only) plus index/<MODEL> built here."""
    data_dir = prepare_sample(tmp_path_factory)
    runs = demo_output(tmp_path_factory)
    out = tmp_path_factory.mktemp("browser-out")
    build_saved_index(runs / "runs" / MODEL / "checkpoints" / "epoch_latest.pt", data_dir, out / "index" / MODEL)
    return out


def _browser_env(tmp_path: Path) -> dict:
    """Chromium's environment: fontconfig also sees the pip-installed Noto Sans SC, so Chinese is legible in
    the screenshots on a machine without CJK system fonts."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("pylopdf_fonts_zh_cn")
    if spec is None or not spec.submodule_search_locations:
        return env
    dirs = "".join(f"<dir>{d}</dir>" for d in spec.submodule_search_locations)
    conf = tmp_path / "fonts.conf"
    conf.write_text('<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
                    '<include ignore_missing="yes">/etc/fonts/fonts.conf</include>'
                    f'{dirs}<cachedir>{tmp_path / "fontconfig-cache"}</cachedir></fontconfig>', encoding="utf-8")
    env["FONTCONFIG_FILE"] = str(conf)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(config_dir: Path) -> None:
    """User settings: no news / update pop-up over the page; render every cell (no windowing)."""
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    files = {"apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
             "notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"}}
    for name, values in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


class _Lab:
    """A JupyterLab server in its own process group, always stopped by :meth:`stop`."""

    def __init__(self, root: Path, env: dict, log: Path):
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
               f"--port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
        self._log_fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-n:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        url = f"{self.base}/api/status?token={self.token}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{self.log_tail()}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The whole group: the server and the kernels it started.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_fh.close()


@pytest.fixture
def lab(tmp_path, output_dir):
    """JupyterLab serving tmp_path/work, which holds notebook 05 parametrised to read ``output_dir``."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    work = tmp_path / "work"
    work.mkdir()
    nb = load_notebook_node(str(NOTEBOOKS_DIR / "05_query_demo.ipynb"))  # papermill's reader adds the tags it needs
    nb = parameterize_notebook(nb, {"OUTPUT_DIR": str(output_dir), "K": K, "QUERY": 0, "DEVICE": "cpu"},
                               kernel_name="python3", language="python")
    nb.metadata.pop("papermill", None)
    nbformat.write(nb, work / "05_query_demo.ipynb")
    env = {**os.environ, **kernel_env(tmp_path)}
    _write_settings(Path(env["JUPYTER_CONFIG_DIR"]))
    server = _Lab(work, env, tmp_path / "jupyterlab.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_query_panel_in_chromium(lab, tmp_path):
    from playwright import sync_api

    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo\n", encoding="utf-8")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                     timeout=PAGE_MS, env=_browser_env(tmp_path))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_MS)
            try:
                _drive(page, lab, bad, tmp_path)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                raise
        finally:
            browser.close()


def _drive(page, lab: _Lab, bad: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=PAGE_MS)
    page.goto(f"{lab.base}/lab/tree/05_query_demo.ipynb?token={lab.token}", wait_until="domcontentloaded")
    idle = page.locator(IDLE).filter(has_text="| Idle").first
    idle.wait_for(timeout=PAGE_MS)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.hasCommand('notebook:run-all-cells')")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # The last cell's record(...) output appears when every cell has run.
    page.locator("table caption", has_text="recorded").wait_for(timeout=RUN_ALL_MS)
    idle.wait_for(timeout=PAGE_MS)

    panel = page.locator(".cnclip-demo").first
    expect(panel).to_be_visible()
    hits = page.locator(".cnclip-demo .cnclip-hit")
    expect(hits).to_have_count(K)  # the notebook's example query

    with page.expect_file_chooser(timeout=PAGE_MS) as chooser:
        page.locator(".cnclip-demo .cnclip-upload").first.click()
    chooser.value.set_files(str(PHOTO))
    status = page.locator(".cnclip-demo .cnclip-status").first
    expect(status).to_contain_text(f"uploaded {PHOTO.name}", timeout=PAGE_MS)

    page.locator(".cnclip-demo .cnclip-search").first.click()
    expect(page.locator(".cnclip-demo .cnclip-header").first).to_contain_text(PHOTO.name, timeout=PAGE_MS)
    expect(hits).to_have_count(K)
    expect(status).to_contain_text(f"{MODEL}: {K} ")
    expect(page.locator(".cnclip-demo .cnclip-time").first).to_contain_text("ms")
    # Every thumbnail decoded in the browser.
    widths = hits.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == K and min(widths) > 0, widths
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(tmp_path / "panel.png"))
    page.screenshot(path=str(tmp_path / "page.png"))
    if os.environ.get("CNCLIP_KD_SCREENSHOT"):
        shutil.copyfile(tmp_path / "panel.png", os.environ["CNCLIP_KD_SCREENSHOT"])

    # A file that is not an image: a message in the panel, no results, no traceback.
    with page.expect_file_chooser(timeout=PAGE_MS) as chooser:
        page.locator(".cnclip-demo .cnclip-upload").first.click()
    chooser.value.set_files(str(bad))
    expect(status).to_contain_text("notes.txt: 不是可用的图片 not a usable image", timeout=PAGE_MS)
    expect(hits).to_have_count(0)

    # A text query: typing selects the text source; Search encodes it with the model's text tower.
    # (The notebook's own example searched "连衣裙"; this text differs, so the status shows the new search.)
    text_box = page.locator(".cnclip-demo .cnclip-text input").first
    text_box.fill("白色连衣裙")
    page.locator(".cnclip-demo .cnclip-search").first.click()
    expect(status).to_contain_text(f"{MODEL}: {K} 个结果 results for 文本 text “白色连衣裙”", timeout=PAGE_MS)
    expect(hits).to_have_count(K)
    expect(page.locator(".cnclip-demo .cnclip-header").first).to_contain_text("白色连衣裙")
    widths = hits.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == K and min(widths) > 0, widths
    panel.screenshot(path=str(tmp_path / "panel-text.png"))
    # Enter in the box searches as well: a blank text gets a message and no results.
    text_box.fill("   ")
    text_box.press("Enter")
    expect(status).to_contain_text("文本查询无效 invalid text query", timeout=PAGE_MS)
    expect(hits).to_have_count(0)
    tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback")
    assert tracebacks.count() == 0, tracebacks.all_inner_texts()
    assert (tmp_path / "panel.png").stat().st_size > 10_000
