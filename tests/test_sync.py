"""The generated files (library, README, clean notebooks) must agree with the notebooks."""
import filecmp, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _checkout_files():
    "Files git tracks plus untracked ones it does not ignore (what a commit would contain)."
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]

def test_export_and_clean_change_nothing(tmp_path):
    "Running nbdev-export and nbdev-clean on a copy of the checkout must leave every file as it is."
    files = _checkout_files()
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    for cmd in (["nbdev-export"], ["nbdev-clean"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}"
    changed = [rel for rel in files if not filecmp.cmp(ROOT / rel, tmp_path / rel, shallow=False)]
    created = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "mmlab").rglob("*.py")
                     if str(p.relative_to(tmp_path)) not in files)
    assert not changed and not created, (
        f"the checkout is out of sync with its notebooks: nbdev-export/nbdev-clean would change {changed} "
        f"and create {created}. Run `nbdev-export && nbdev-clean` and commit.")

def test_readme_matches_index_notebook():
    from mmlab.docsite import readme_markdown
    want = readme_markdown(ROOT / "nbs" / "index.ipynb")
    assert (ROOT / "README.md").read_text(encoding="utf-8") == want, \
        "README.md differs from nbs/index.ipynb: run `mmlab-docs --readme-only` and commit"

def test_import_core_is_light():
    "`import mmlab.core` (and `import mmlab`) must not pull in the heavy optional libraries."
    heavy = ["plotly", "transformers", "umap", "sklearn", "ipywidgets", "matplotlib"]
    code = f"import sys, mmlab, mmlab.core; print([m for m in {heavy!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", f"import mmlab.core imported {r.stdout.strip()}"
