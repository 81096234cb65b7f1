"""`python -m mmlab.gpu_check`: the command runs its CPU parts, every part reports pass / fail / skipped with a reason,
a part that raises or overruns is a `fail` row and the others still run, and the report (JSON + Markdown) has one shape.
The nvcc compile of every kernel variant for sm_90 is `slow` (about a minute of nvcc; MMLAB_TEST_FLAGS=slow)."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from mmlab import gpu_check as G
from mmlab.core import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
FLAGS = os.environ.get("MMLAB_TEST_FLAGS", "").split()
slow = pytest.mark.skipif("slow" not in FLAGS, reason="slow: set MMLAB_TEST_FLAGS=slow")
ROW_KEYS = {"name", "status", "reason", "seconds", "limit_s", "doc", "data"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    "The real command as CI runs it (--smoke, a CPU-sized subset), with CUDA hidden: the CPU machine's report, anywhere."
    out = tmp_path_factory.mktemp("gpu_check")
    env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "mmlab.gpu_check", str(out), "--smoke",
                        "--parts", "environment,cuda_tests,cuda_cells,train_masked,compile_sm90"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return r, out


def test_command_writes_json_and_markdown(smoke_run):
    r, out = smoke_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert {"command", "started", "smoke", "cuda", "budget_s", "seconds", "counts", "parts"} <= rep.keys()
    assert [p["name"] for p in rep["parts"]] == ["environment", "cuda_tests", "cuda_cells", "train_masked", "compile_sm90"]
    for p in rep["parts"]:
        assert p.keys() == ROW_KEYS and p["status"] in G.STATUSES and p["seconds"] <= p["limit_s"] + 5, p
    assert sum(rep["counts"].values()) == len(rep["parts"])
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and all(f"| {p['name']} | {p['status']} |" in md for p in rep["parts"])


def test_skipped_parts_give_reasons(smoke_run):
    _, out = smoke_run
    rep = json.loads((out / "gpu_check.json").read_text())
    rows = {p["name"]: p for p in rep["parts"]}
    assert all(p["reason"].strip() for p in rep["parts"] if p["status"] != "pass")
    assert rows["compile_sm90"]["status"] == "skipped" and "--smoke" in rows["compile_sm90"]["reason"]
    assert rows["cuda_tests"]["status"] == rows["cuda_cells"]["status"] == "skipped"
    assert "CUDA" in rows["cuda_tests"]["reason"]
    md = (out / "gpu_check.md").read_text()
    assert "## Not measured in this run" in md and "- cuda_tests: needs a CUDA GPU" in md


def test_training_part_reports_a_decreasing_bf16_loss(smoke_run):
    _, out = smoke_run
    row = next(p for p in json.loads((out / "gpu_check.json").read_text())["parts"] if p["name"] == "train_masked")
    d = row["data"]
    assert row["status"] == "pass" and d["precision"] == "bf16" and d["recipe"] == "mae" and len(d["losses"]) == d["steps"]
    assert G.loss_went_down(d["losses"]) and (out / "runs" / "mae" / "metrics.jsonl").is_file()


# --- the runner's guarantees, in process ------------------------------------------------------------------------
def ok(ctx, limit_s): return G.Outcome("pass", "fine")
def boom(ctx, limit_s): raise ZeroDivisionError("injected failure")

def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path):
    parts = [G.Part("a", ok, 5), G.Part("boom", boom, 5), G.Part("b", ok, 5), G.Part("g", ok, 5, needs_cuda=True)]
    rep = G.run_check(tmp_path, parts, cuda=False)
    assert [p["status"] for p in rep["parts"]] == ["pass", "fail", "pass", "skipped"]
    bad = rep["parts"][1]
    assert bad["reason"] == "ZeroDivisionError: injected failure" and "ZeroDivisionError" in bad["data"]["traceback"]
    assert rep["counts"] == {"pass": 2, "fail": 1, "skipped": 1}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["counts"] == rep["counts"]

def test_a_part_over_its_limit_is_killed_with_its_children(tmp_path):
    def sleepy(ctx, limit_s):   # a shell that starts a grandchild: the whole process group must go
        G.run_logged(["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & wait"], ctx.log("sleepy"), limit_s)
        return G.Outcome("pass", "woke")
    t0 = time.monotonic()
    row = G.run_check(tmp_path, [G.Part("sleepy", sleepy, 1.0), G.Part("after", ok, 5)], cuda=False)["parts"]
    assert time.monotonic() - t0 < 15
    assert row[0]["status"] == "fail" and "time limit of 1 s" in row[0]["reason"] and row[1]["status"] == "pass"

def test_budget_skips_with_a_reason_and_bad_outcomes_fail(tmp_path):
    rep = G.run_check(tmp_path, [G.Part("a", ok, 5)], budget_s=1.0, cuda=False)
    assert rep["parts"][0]["status"] == "skipped" and "no time left" in rep["parts"][0]["reason"]
    ctx = G.Context(tmp_path, ROOT)
    assert G.run_part(G.Part("q", lambda c, l: G.Outcome("skipped"), 5), ctx)["status"] == "fail"       # no reason
    assert G.run_part(G.Part("w", lambda c, l: G.Outcome("maybe", "?"), 5), ctx)["status"] == "fail"    # unknown status
    assert G.run_part(G.Part("n", lambda c, l: None, 5), ctx)["status"] == "fail"                       # not an Outcome
    assert G.run_part(G.Part("s", lambda c, l: (_ for _ in ()).throw(G.Skip("not here")), 5), ctx)["reason"] == "not here"

def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unique"): G.run_check(tmp_path, [G.Part("a", ok, 5), G.Part("a", ok, 5)])
    with pytest.raises(ConfigError, match="unknown part"): G.main([str(tmp_path), "--parts", "environment,nope"])

def test_default_parts_cover_the_issue_and_fit_the_budget():
    names = [p.name for p in G.default_parts()]
    assert names[:2] == ["environment", "build_kernels"]          # the build first: later parts load it from the cache
    assert {"cuda_tests", "cuda_cells", "kernel_benchmark", "compile_sm90"} <= set(names)
    assert {f"train_{f}" for f in ("contrastive", "masked", "distillation")} <= set(names)
    # every part but the last (the compile, which a GPU run's tests have already done) fits in the 450 s budget
    assert sum(p.limit_s for p in G.default_parts()[:-1]) <= 450

def test_cuda_notebooks_and_junit_counts(tmp_path):
    assert "06_kernels" in G.cuda_notebooks(ROOT / "nbs") and "01_data" not in G.cuda_notebooks(ROOT / "nbs")
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
                   '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    assert G.junit_counts(xml) == {"tests": 3, "passed": 1, "failed": 1, "skipped": 1, "failed_ids": ["t::b"]}

def test_loss_went_down():
    assert G.loss_went_down([3.0, 2.9, 2.0, 1.0]) and not G.loss_went_down([1.0, 1.0, 1.0, 1.2])
    assert not G.loss_went_down([3.0, float("nan"), 1.0, 0.5])

def test_parse_ptxas_reads_entries():
    log = ("ptxas info    : Compiling entry function '_ZN5mmlab15lse_rows_kernelIfEEvPKT_S3_iiN3CfgIS1_E3accEPS5_' for 'sm_90'\n"
           "ptxas info    : Function properties for x\n    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 33280 bytes smem, 400 bytes cmem[0]\n")
    assert G.parse_ptxas(log) == [{"kernel": "mmlab::lse_rows_kernel<float>", "arch": "sm_90", "spill_stores": 8,
                                   "spill_loads": 4, "registers": 40, "smem_bytes": 33280}]
    assert len(G.expected_variants()) == 16


@slow
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    "nvcc (compile-only, no GPU): all 16 entry points for sm_90, none missing; prints the seconds it took."
    from mmlab.kernels import cuda_home
    if cuda_home() is None: pytest.skip("no nvcc")
    r = G.compile_variants("9.0", tmp_path, limit_s=900)
    print(f"nvcc sm_90: {len(r['variants'])} entry points in {r['seconds']} s")
    assert r["missing"] == [] and {v["kernel"] for v in r["variants"]} == G.expected_variants()
    assert all(v["arch"] == "sm_90" and v["registers"] > 0 for v in r["variants"])


def test_wrapper_script_runs_the_command(tmp_path):
    "benchmarks/gpu_check.sh (installs skipped here: the checkout is already importable) hands its budget on."
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke", "--parts", "environment"],
                       cwd=ROOT, env=os.environ | {"MMLAB_NO_INSTALL": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["status"] for p in rep["parts"]] == ["pass"] and 400 <= rep["budget_s"] <= 460
    assert "installs skipped" in (tmp_path / "install.log").read_text()
