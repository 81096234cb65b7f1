"""Build the documentation site offline and open it in a real browser (headless Chromium)."""
import contextlib, shutil, socket, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")]

@contextlib.contextmanager
def serve(folder):
    "A static web server on 127.0.0.1 for `folder`, stopped afterwards."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2): break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill(); proc.wait()

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from mmlab.docsite import build_site
    dest = tmp_path_factory.mktemp("site")
    t0 = time.time()
    home = build_site(dest, force_offline=True)
    print(f"docs built in {time.time() - t0:.1f}s")
    assert home.is_file()
    return dest

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield b
        b.close()

def open_page(browser, url):
    "Open `url`; return the page and the local requests that failed (network errors or HTTP >= 400)."
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    failed = []
    page.on("requestfailed", lambda r: r.url.startswith("http://127.0.0.1") and failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: r.url.startswith("http://127.0.0.1") and r.status >= 400 and failed.append(f"{r.url} ({r.status})"))
    page.goto(url, wait_until="networkidle")
    return page, failed

def test_every_chapter_has_a_page(site):
    nbs = [p for p in (ROOT / "nbs").glob("*.ipynb")]
    for nb in nbs:
        assert (site / nb.with_suffix(".html").name).is_file(), f"no page for {nb.name}"

def test_home_and_chapter_load(site, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serve(site) as url:
        page, failed = open_page(browser, f"{url}/index.html")
        assert "mmlab" in page.title()
        assert page.locator("nav a[href='00_core.html']").count() >= 1, "the navigation lists the chapters"
        page.screenshot(path=str(ARTIFACTS / "docs_home.png"))
        assert not failed, f"home page: failed local requests {failed}"
        page, failed = open_page(browser, f"{url}/00_core.html")
        page.wait_for_selector(".MathJax_CHTML", timeout=15000)      # MathJax typeset the formulas
        page.wait_for_selector(".mmlab-plot .main-svg", timeout=15000) # plotly drew the figure
        assert page.get_by_text("check_shape").count() > 0, "show_doc API docs are on the page"
        page.screenshot(path=str(ARTIFACTS / "docs_core.png"), full_page=False)
        assert not failed, f"chapter page: failed local requests {failed}"

def test_search_finds_a_chapter_word(site, browser):
    with serve(site) as url:
        page, _ = open_page(browser, f"{url}/index.html")
        box = page.locator("input.md-search__input")
        box.click(); box.press_sequentially("precision", delay=30)   # typed, as a reader would
        result = page.locator(".md-search-result__item a[href*='00_core']").first
        result.wait_for(timeout=15000)
        page.screenshot(path=str(ARTIFACTS / "docs_search.png"))
        assert result.count() == 1
