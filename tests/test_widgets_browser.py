"""Real browser: JupyterLab 4 on 127.0.0.1 runs a small GapExplorer notebook in headless Chromium
(Playwright, Debian's /usr/bin/chromium); moving the shift slider must change the plot and the gap label.
Screenshots go to tests/artifacts/. Everything is offline; the server is stopped by its process group."""
import contextlib, json, os, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")]

# A small notebook: synthetic paired embeddings with a gap (no data, no training: the browser is under test).
CELLS = [
    "import torch, torch.nn.functional as F\nfrom mmlab.widgets import GapExplorer",
    "g = torch.Generator().manual_seed(0)\n"
    "labels = torch.arange(120) % 4\n"
    "centres = torch.randn(4, 16, generator=g)\n"
    "x = F.normalize(centres[labels] + 0.6 * torch.randn(120, 16, generator=g) + 2.0, dim=-1)\n"
    "y = F.normalize(centres[labels] + 0.6 * torch.randn(120, 16, generator=g) - 2.0, dim=-1)\n"
    "cls = F.normalize(torch.stack([y[labels == c].mean(0) for c in range(4)]), dim=-1)\n"
    "gx = GapExplorer({'demo': (x, y, cls)}, labels=labels)\ngx",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path):
    "JupyterLab on 127.0.0.1 with a token, serving `root`; yields the base URL and token; stopped by process group."
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".jcfg"), "JUPYTER_RUNTIME_DIR": str(root / ".jrt"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / ".jset"), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".jws")}
    env.pop("IN_TEST", None)
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
                             "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
                             "--ServerApp.open_browser=False", "--LabApp.expose_app_in_browser=True",
                             f"--ServerApp.root_dir={root}", "--ServerApp.disable_check_xsrf=True",
                             "--LabApp.news_url="],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None: raise RuntimeError(f"jupyterlab exited:\n{(root / 'jupyterlab.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1) as r:
                    if r.status == 200: break
            time.sleep(0.2)
        else: raise RuntimeError("jupyterlab did not start in 60 s")
        yield url, token
    finally:
        with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


def plot_state(page):
    "The rendered plotly graph's image-trace x coordinates and the gap label text."
    return page.evaluate("""() => {
        const gd = [...document.querySelectorAll('.js-plotly-plot')].pop();
        const lab = document.querySelector('.mmlab-gap-readout');
        return {x: gd && gd.data ? Array.from(gd.data[0].x) : null,
                svg_points: gd ? gd.querySelectorAll('.scatterlayer .point').length : 0,
                label: lab ? lab.textContent : null};
    }""")


def test_gap_explorer_slider_in_jupyterlab(tmp_path):
    import nbformat
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nbformat.write(nb, tmp_path / "gap_widget.ipynb")
    with jupyterlab(tmp_path) as (url, token), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/lab/tree/gap_widget.ipynb?token={token}", wait_until="domcontentloaded")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            # wait for the kernel, then run every cell
            page.wait_for_function("""() => { const w = window.jupyterapp.shell.currentWidget;
                return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
                       && w.sessionContext.session.kernel.status === 'idle'; }""", timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector(".mmlab-gap-readout", timeout=180_000)
            page.wait_for_selector(".js-plotly-plot .scatterlayer .point", timeout=120_000)
            page.wait_for_selector(".widget-slider .noUi-handle", timeout=60_000)
            time.sleep(1.0)
            before = plot_state(page)
            assert before["x"] and len(before["x"]) == 120 and before["svg_points"] >= 240, before
            assert "gap ‖u‖" in before["label"]
            page.locator(".jp-OutputArea-output").last.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "gap_explorer_before.png"))
            # drag the slider handle to the right, as a user would
            handle = page.locator(".widget-slider .noUi-handle").first
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 120, box["y"] + box["height"] / 2, steps=12)
            page.mouse.up()
            page.wait_for_function(f"""() => {{ const l = document.querySelector('.mmlab-gap-readout');
                return l && l.textContent !== {json.dumps(before['label'])}; }}""", timeout=60_000)
            page.wait_for_function(f"""() => {{ const gd = [...document.querySelectorAll('.js-plotly-plot')].pop();
                return gd && gd.data && gd.data[0].x[0] !== {before['x'][0]!r}; }}""", timeout=60_000)
            time.sleep(1.0)
            after = plot_state(page)
            page.screenshot(path=str(ARTIFACTS / "gap_explorer_after.png"))
            lam = page.locator(".widget-slider .widget-readout").first.text_content()
            assert float(lam) > 0, lam
            assert after["label"] != before["label"] and after["x"] != before["x"]
            g0 = float(before["label"].split("gap ‖u‖ = ")[1].split()[0])
            g1 = float(after["label"].split("gap ‖u‖ = ")[1].split()[0])
            assert g1 < g0, (g0, g1)                                   # moving right (lambda > 0) closes the gap
            assert not [e for e in errors if "plotly" in e.lower() or "widget" in e.lower()], errors
        finally:
            browser.close()
