"""Every notebook under nbs/ is a test case: nbdev's runner executes it cell by cell.

Cells flagged `slow` or `cuda` (see `tst_flags` in pyproject.toml) are skipped unless forced with
the environment variable MMLAB_TEST_FLAGS, e.g. `MMLAB_TEST_FLAGS="slow cuda" pytest`.
Each notebook runs in its own process so that one chapter's global state (threads, seeds, compiled
extensions) cannot leak into the next.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
def _is_project(p:Path) -> bool: return p.stem.startswith("p") and p.stem[1:2].isdigit()
# Projects run in full, as a student runs them, in tests/test_course.py; a second, shortened run here would only add time.
NBS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb")
             if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts) and not _is_project(p))
FLAGS = os.environ.get("MMLAB_TEST_FLAGS", "")

RUNNER = """
import sys
from nbdev.test import test_nb
from nbdev.config import get_config
skip = get_config().tst_flags
skip = skip.split() if isinstance(skip, str) else list(skip)
ok, secs = test_nb(sys.argv[1], skip_flags=skip, force_flags=sys.argv[2].split(), basepath=sys.argv[3])
print(f"{sys.argv[1]}: {'passed' if ok else 'FAILED'} in {secs:.1f}s")
sys.exit(0 if ok else 1)
"""

def test_notebooks_found():
    assert len(NBS) >= 2, f"expected the chapter notebooks under {ROOT / 'nbs'}, found {NBS}"

@pytest.mark.parametrize("nb", NBS, ids=[str(p.relative_to(ROOT / "nbs")) for p in NBS])
def test_notebook(nb):
    r = subprocess.run([sys.executable, "-c", RUNNER, str(nb), FLAGS, str(ROOT)], cwd=nb.parent,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"notebook {nb.name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
