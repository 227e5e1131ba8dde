"""Real-browser tests: Playwright drives Debian's chromium (no browser download).

1. The executed book opens from disk with the network blocked, and every plotly figure draws.
2. JupyterLab on a free localhost port with a token: open coupled-adam (smoke parameters), run all
   cells, move the explorer's step slider, and check that the figure's data changes. A screenshot
   goes to data/screens/. Then the server shuts down cleanly.

Skipped, with the reason, where chromium is missing (`.ci/run` installs it with apt).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from companion.paths import NOTEBOOK_DIR, REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                                "the real-browser tests were skipped"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
SCREENS = REPO_ROOT / "data" / "screens"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _offline_page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
               else route.abort())  # offline: only files from disk may load
    return page, errors


FIGURE_STATE = """() => Array.from(document.querySelectorAll('.lab-plot')).map(el => ({
    svg: el.querySelectorAll('svg.main-svg').length,
    traces: el.querySelectorAll('svg .trace').length + el.querySelectorAll('.gl-container canvas').length,
    data: (el.data || []).length }))"""


def test_book_pages_render_plotly_figures_offline(browser, tmp_path):
    env = dict(os.environ, LAB_DATA=str(tmp_path), LAB_CLAIMS=str(tmp_path / "claims.jsonl"))
    built = subprocess.run([sys.executable, "-m", "ci.book", "--smoke", "--only", "coupled-adam", "--jobs", "1",
                            "--scoreboard", str(tmp_path / "scoreboard.json")], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert built.returncode == 0, f"ci.book failed:\n{built.stdout[-4000:]}\n{built.stderr[-2000:]}"
    book = tmp_path / "book"
    page, errors = _offline_page(browser)
    page.goto((book / "index.html").as_uri())
    link = page.locator("a[href='coupled-adam.html']")
    assert link.count() == 1
    assert "5/5" in page.locator("tr", has=link).inner_text()

    page.goto((book / "coupled-adam.html").as_uri())
    page.wait_for_function("document.querySelectorAll('.lab-plot svg.main-svg').length >= 3", timeout=30_000)
    figures = page.evaluate(FIGURE_STATE)
    assert len(figures) >= 3, figures
    for fig in figures:
        assert fig["svg"] >= 1 and fig["data"] >= 1 and fig["traces"] >= 1, figures
    assert not errors, errors
    page.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _smoke_copy(dest: Path) -> Path:
    """coupled-adam.ipynb with papermill's smoke parameters injected (not executed)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(NOTEBOOK_DIR / "coupled-adam.ipynb"))
    nb = parameterize_notebook(nb, {"SMOKE": True, "SEED": 0})
    path = dest / "coupled-adam.ipynb"
    nbformat.write(nb, path)
    return path


NOTEBOOK_OUTPUTS = """() => Array.from(document.querySelectorAll('.jp-CodeCell')).map((c, i) =>
    `[${i}] ${(c.querySelector('.jp-InputPrompt') || {}).innerText || ''} `
    + Array.from(c.querySelectorAll('.jp-OutputArea-output')).map(o => o.innerText.slice(0, 300)).join(' | ')
).join('\\n')"""

CLOUD = """() => { const gd = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(g => g.layout && g.layout.title && String(g.layout.title.text || '').startsWith('Embedding cloud'));
    // _fullData holds decoded arrays; gd.data may keep plotly.py's base64 {dtype, bdata} form
    return gd ? {x: Array.from(gd._fullData[0].x).slice(0, 8), title: gd.layout.annotations[0].text} : null; }"""


def test_jupyterlab_runs_the_notebook_and_the_slider_redraws_the_figure(browser, tmp_path):
    root = tmp_path / "lab"
    root.mkdir()
    _smoke_copy(root)
    port, token = _free_port(), "browser-test-token"
    env = dict(os.environ, JUPYTER_TOKEN=token, LAB_DATA=str(tmp_path / "data"), LAB_PROGRESS="0",
               LAB_CLAIMS=str(tmp_path / "claims.jsonl"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    env.pop("LAB_HEADLESS", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--no-browser", "--allow-root"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while _status(f"{base}/api/status?token={token}") != 200:
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "JupyterLab did not start"
            time.sleep(0.5)

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/lab/tree/coupled-adam.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                               ".jp-mod-idle, .jp-Toolbar", timeout=60_000)
        # JupyterLab sometimes asks which kernel to start (a race with loading the kernelspecs):
        # answer the dialog with the default, python3, whenever it shows up before an action.
        kernel_dialog = page.locator(".jp-Dialog").filter(has_text="Select Kernel")
        page.add_locator_handler(kernel_dialog, lambda d: d.get_by_role("button", name="Select", exact=True).click())
        page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=60_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.wait_for_timeout(2_000)
        if kernel_dialog.is_visible():
            kernel_dialog.get_by_role("button", name="Select", exact=True).click()

        try:
            page.wait_for_function(f"({CLOUD})() !== null", timeout=150_000)
        except Exception:
            SCREENS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENS / "coupled-adam-jupyterlab-FAILED.png"), full_page=True)
            outputs = page.evaluate(NOTEBOOK_OUTPUTS)
            pytest.fail(f"the explorer figure never appeared; notebook outputs so far:\n{outputs}")
        slider = page.locator(".widget-slider").first
        slider.scroll_into_view_if_needed()
        before = page.evaluate(CLOUD)
        assert len(before["x"]) == 8, f"the cloud figure must carry its points, got {before}"
        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(3):
            handle.press("ArrowLeft")  # three snapshots back
        page.wait_for_function(f"({CLOUD})().title !== {json.dumps(before['title'])}", timeout=30_000)
        after = page.evaluate(CLOUD)
        assert after["title"] != before["title"], (before, after)
        assert after["x"] != before["x"], "the figure's data must change with the slider"
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / "coupled-adam-jupyterlab.png"))
        page.close()
    finally:
        if server.poll() is None:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            try:
                urllib.request.urlopen(req, timeout=10)
            except OSError:
                pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            pytest.fail("JupyterLab did not shut down within 30 s of /api/shutdown")
    assert server.returncode == 0, f"JupyterLab exited with {server.returncode}"
    assert _status(f"{base}/api/status") is None, "the port must be closed after shutdown"
