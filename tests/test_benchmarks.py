"""Every benchmark runs once at its smoke size so that none of them rots, and its JSON says what it claims.

The real measurements are taken by running the scripts by hand (see each script's docstring). The smoke run
proves the script works end to end, that the implementations it compares compute the same result, and that
every reported ratio is the ratio of the times (or memory) measured side by side in that run.
"""
import json, statistics, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

def ratio(r, num, den): assert r == pytest.approx(num / den, rel=1e-9), (r, num, den)

def check_contrastive_losses(d):
    rows = {(r["loss"], r["impl"], r["B"]): r for r in d["rows"]}
    assert d["summary"], "no configuration summarised"
    for key, s in d["summary"].items():
        loss, B = key.split("/B=")
        naive, chunked = rows[(loss, "naive", int(B))], rows[(loss, "chunked", int(B))]
        assert s["value_abs_diff"] == pytest.approx(abs(naive["value"] - chunked["value"]))
        assert s["value_abs_diff"] < 1e-4 * max(1.0, abs(naive["value"])), key   # the two compute the same loss
        ratio(s["time_ratio"], chunked["time_s"], naive["time_s"])
    for r in d["rows"]: assert 0.9 < r["calibration"] < 1.1, r    # the memory probe measures a known allocation

def check_kernels(d):
    for loss in ("clip", "siglip"):
        impls = d["cpu"][loss]; naive = impls["naive"]
        assert set(impls) >= {"naive", "fused", "chunked"}
        for name, r in impls.items():
            assert r["loss"] == pytest.approx(naive["loss"], rel=1e-5), (loss, name)
            ratio(r["time_vs_naive"], r["median_s"], naive["median_s"])
            ratio(r["memory_vs_naive"], r["peak_extra_mib"], naive["peak_extra_mib"])
            assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))

def check_encoders(d):
    for tower, t in d["towers"].items():
        for mode in ("train_step", "inspect_forward"):
            for impl, r in t[mode].items():
                ratio(r["ratio_to_sdpa"], r["seconds"], t[mode]["sdpa"]["seconds"])
                ratio(r["samples_per_s"], d["batch"], r["seconds"])
    v = d["video"]                                                    # the video tower at 8 and 16 frames, joint vs divided
    assert set(v["frames"]) == {"frames=8", "frames=16"}
    for r in v["frames"].values():
        ratio(r["divided_over_joint"], r["divided"]["seconds"], r["joint"]["seconds"])
        for att in ("joint", "divided"):
            assert r[att]["seconds"] == pytest.approx(statistics.median(r[att]["times_s"]))
            ratio(r[att]["samples_per_s"], v["batch"], r[att]["seconds"])
    assert v["frames"]["frames=16"]["joint"]["tokens"] == 2 * v["frames"]["frames=8"]["joint"]["tokens"]

def check_trainer_overhead(d):
    for r in d["results"]:
        assert r["identical_losses"] is True, r["size"]           # both loops do the same math
        ratio(r["overhead_ratio_wall"], r["trainer_ms_per_step"], r["hand_ms_per_step"])

def check_data_epoch(d):
    assert d["cold_cache_misses"] == d["items"]                  # a cold cache decodes every item once
    ratio(d["cold_over_warm"], d["cold_cache_s"], d["warm_cache_s_median"])
    ratio(d["nocache_over_warm"], d["nocache_s"], d["warm_cache_s_median"])

def check_masking(d):
    masks = [r for r in d["rows"] if r["kind"] == "mask"]
    assert len(masks) >= 6
    for r in masks: ratio(r["loop_over_vectorised"], r["loop_ms"], r["vectorised_ms"])

def check_flip(d):
    for res in d["results"]:
        assert res["same_as_clip_at_zero"] is True, res["size"]    # the switch at 0 is CLIP's loss, bit for bit
        rows = {r["image_mask_ratio"]: r for r in res["rows"]}
        assert set(rows) == {0.0, 0.5, 0.75}
        clip = rows[0.0]
        for r in rows.values():
            ratio(r["time_vs_clip"], r["ms_per_step"], clip["ms_per_step"])
            assert r["ms_per_step"] == pytest.approx(statistics.median(r["ms_all"]))
        assert rows[0.0]["tokens"] > rows[0.5]["tokens"] > rows[0.75]["tokens"]   # the tower sees fewer patches

def check_shards(d):
    by = {(r["source"], r["workers"]): r for r in d["rows"]}
    for r in d["rows"]:
        assert r["samples"] == d["samples"], r                    # both sources give every sample of the epoch
        ratio(r["samples_per_s"], r["samples"], r["median_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
    for w, x in d["shards_over_manifest"].items():
        ratio(x, by[("shards", int(w))]["samples_per_s"], by[("manifest", int(w))]["samples_per_s"])

CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}

def test_every_benchmark_has_a_check():
    assert {s.stem for s in SCRIPTS} == set(CHECKS)

@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / f"{script.stem}.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{script.name} --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    assert out.is_file(), f"{script.name} wrote no JSON to {out}"
    d = json.loads(out.read_text())
    assert d["smoke"] is True
    CHECKS[script.stem](d)
