"""The dashboard in a real browser: `streamlit run` headless on a free localhost port, driven with
playwright on Debian's chromium (/usr/bin/chromium; playwright's own browser download is not used).
Changes a control, checks results and no error box, saves a screenshot of every page (into a
temporary folder; with MOESIM_UPDATE_SCREENSHOTS=1 into docs/screenshots/, the README's pictures).
Skips, with the reason shown, where chromium or playwright is missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MOESIM_CHROMIUM", "/usr/bin/chromium")
DOC_SHOTS = ROOT / "docs" / "screenshots"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = [("Timeline", "timeline"), ("Curves", "curves"), ("Compare", "compare"),
         ("Trace explorer", "trace"), ("Calibration", "calibration"), ("Cluster", "cluster"), ("Serving", "serving")]
CHARTS = {"timeline": 1, "curves": 3, "compare": 5, "trace": 3, "calibration": 0, "cluster": 4,
          "serving": 5}  # plotly figures per page

if not Path(CHROMIUM).exists():
    pytest.skip(f"browser test skipped: {CHROMIUM} not found (install Debian's chromium: apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test skipped: playwright not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                pytest.fail(f"streamlit did not become healthy on {url}: {out[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _idle(page, timeout_s: float = 90) -> None:
    """Wait until the script has finished (Streamlit's running indicator gone) and settle."""
    page.wait_for_timeout(500)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = page.locator('[data-testid="stStatusWidget"]')
        running = status.filter(has_text="Running").count() + status.filter(has_text="Stop").count()
        if not running:
            break
        page.wait_for_timeout(250)
    page.wait_for_timeout(800)


def _no_errors(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0, page.locator(
        '[data-testid="stAlertContentError"]').first.inner_text()


def test_dashboard_in_chromium(server, tmp_path):
    SHOTS = DOC_SHOTS if os.environ.get("MOESIM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(90_000)
            page.goto(server)
            page.wait_for_selector('[data-testid="stMetric"]')
            _idle(page)
            _no_errors(page)
            hit0 = page.locator('[data-testid="stMetric"]').filter(has_text="hit rate").inner_text()
            # change a control: the cache capacity
            box = page.get_by_label("cache capacity (expert slots)")
            box.fill("192")
            box.press("Enter")
            page.wait_for_selector('[data-testid="stMetricDelta"]')
            _idle(page)
            _no_errors(page)
            hit1 = page.locator('[data-testid="stMetric"]').filter(has_text="hit rate").inner_text()
            assert hit1 != hit0
            page.screenshot(path=str(SHOTS / "whatif.png"), full_page=True)
            for label, name in PAGES:
                page.locator('[data-testid="stSidebar"]').get_by_text(label, exact=True).click()
                page.wait_for_selector(f'h2:has-text("{label}")')
                _idle(page)
                if CHARTS[name]:
                    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {CHARTS[name]}")
                    _idle(page)
                _no_errors(page)
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
            # the Serving page (shown last): a higher arrival rate moves the TTFT
            ttft0 = page.locator('[data-testid="stMetric"]').filter(has_text="TTFT p50").inner_text()
            box = page.get_by_label("arrival rate (requests/s, poisson)")
            box.fill("40")
            box.press("Enter")
            page.wait_for_selector('[data-testid="stMetricDelta"]')
            _idle(page)
            _no_errors(page)
            assert page.locator('[data-testid="stMetric"]').filter(has_text="TTFT p50").inner_text() != ttft0
        finally:
            browser.close()
    for _, name in [("", "whatif")] + PAGES:
        f = SHOTS / f"{name}.png"
        assert f.is_file() and 5_000 < f.stat().st_size < 1_500_000, f
