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

# What a reader must never see: a figure, image or formula wider than the text column, or anything else sticking out
# of it that cannot be scrolled inside its own box (code, wide tables and outputs scroll; figures must fit).
OVERFLOW_JS = """() => {
  const col = document.querySelector('.md-content__inner');
  const right = col.getBoundingClientRect().right + 1;
  const scrolls = el => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
  const figure = el => el.matches('.mmlab-plot, .mmlab-plot .main-svg, img, .MathJax_Display, .MJXc-display');
  const name = el => el.tagName.toLowerCase() + (typeof el.className === 'string' && el.className ? '.' + el.className.split(' ')[0] : '');
  const bad = [];
  for (const el of col.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= right) continue;
    let a = el.parentElement, boxed = false;
    while (!figure(el) && a && a !== col) {
      if (scrolls(a) && a.getBoundingClientRect().right <= right) { boxed = true; break; }
      a = a.parentElement;
    }
    if (!boxed) bad.push(`${name(el)} ends at ${Math.round(r.right)} px, the column at ${Math.round(right)} px`);
  }
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const mathErrors = document.querySelectorAll('.MathJax_Error, .mjx-merror, merror').length;
  return {bad: bad.slice(0, 8), pageWidth: document.documentElement.scrollWidth, broken, mathErrors,
          math: document.querySelectorAll('.MathJax_CHTML').length};
}"""

def typeset(page):
    "Wait until MathJax has typeset the page (it queues its work), if the page uses it."
    page.wait_for_function("() => !window.MathJax || !MathJax.Hub || (MathJax.Hub.queue.pending === 0 && !MathJax.Hub.queue.running)",
                           timeout=30000)

SHOTS = {("index.html", 1280): "docs_index_1280.png", ("03_contrastive.html", 1280): "docs_contrastive_1280.png",
         ("09_analysis.html", 390): "docs_analysis_390.png"}

WIDTHS = (1280, 390)   # desktop, then phone: each page is loaded once and its viewport narrowed (CSS and plotly relayout)

def test_every_page_fits_its_column(site, browser):
    "At desktop and phone width, no figure, image, formula or code block overflows; images and formulas load."
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems = []
    with serve(site) as url:
        for html in sorted(p.name for p in site.glob("*.html") if p.name != "404.html"):
            page = browser.new_page(viewport={"width": WIDTHS[0], "height": 900})
            failed = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(f"{url}/{html}", wait_until="networkidle")
            typeset(page)
            for width in WIDTHS:
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(400)                      # layout, then plotly's resize
                r = page.evaluate(OVERFLOW_JS)
                links = page.evaluate("() => [...document.querySelectorAll('.md-content a[href]')].map(a => a.href)")
                tex = page.evaluate("() => [...document.querySelectorAll('.jp-RenderedMarkdown')].some(e => /\\$[^$\\s][^$]*\\$/.test(e.innerText))")
                if (html, width) in SHOTS: page.screenshot(path=str(ARTIFACTS / SHOTS[html, width]))
                where = f"{html} at {width} px"
                problems += [f"{where}: {b}" for b in r["bad"]]
                if r["pageWidth"] > width: problems.append(f"{where}: the page scrolls sideways ({r['pageWidth']} px)")
                problems += [f"{where}: image did not load: {s}" for s in r["broken"]]
                local = {l.split("#")[0].removeprefix(url + "/") for l in links if l.startswith(url)}
                problems += [f"{where}: link to a missing page: {l}" for l in sorted(local) if l and not (site / l).exists()]
                if r["mathErrors"]: problems.append(f"{where}: {r['mathErrors']} formulas failed to typeset")
                if tex: problems.append(f"{where}: a formula was left as TeX source")
            page.close()
            problems += [f"{html}: request failed: {u}" for u in failed if u.startswith(url)]
    assert not problems, "\n".join(problems)
