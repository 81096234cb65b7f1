"""Every benchmark runs once at its smoke size so that none of them rots.

The real measurements are taken by running the scripts by hand (see each script's docstring); the
smoke run only proves the script works end to end and writes its JSON.
"""
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / f"{script.stem}.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{script.name} --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    assert out.is_file(), f"{script.name} wrote no JSON to {out}"
    assert json.loads(out.read_text()), f"{script.name} wrote an empty result"
