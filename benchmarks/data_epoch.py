"""One epoch of `shapes` train (image + log-mel audio + char-tokenized text, batch 128) through
`make_loader`: without a feature cache (measured on --nocache-items items, scaled to the epoch),
with a cold cache (fresh folder) and with a warm cache,
side by side in one run; repeats, medians and ratios; JSON out. Wall time is what the target is
about; CPU time of this process is also reported because the shared machine's load inflates wall time.

    python benchmarks/data_epoch.py [--smoke] [--threads 2] [--workers 0] [--repeats 3] [--out F.json]
"""
import argparse, json, os, platform, statistics, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import Subset

from mmlab.data import CharTokenizer, FeatureCache, LogMel, load_dataset, make_loader


def epoch(ds, batch_size, workers):
    "Wall seconds and CPU seconds (this process) of one epoch, and the number of items seen."
    t0, c0 = time.perf_counter(), time.process_time(); n = 0
    for b in make_loader(ds, batch_size, seed=0, num_workers=workers):
        n += len(b["index"])
    return time.perf_counter() - t0, time.process_time() - c0, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="64 items, 1 repeat (CI)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the 2-core target)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="warm epochs (median reported)")
    ap.add_argument("--nocache-items", type=int, default=256, help="items of the no-cache pass (scaled to the epoch)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    repeats = 1 if a.smoke else a.repeats
    with tempfile.TemporaryDirectory() as d:
        def make(cache):
            ds = load_dataset("shapes", "train", audio_features=LogMel(), transforms={"text": CharTokenizer()},
                              cache=cache)
            return Subset(ds, range(64)) if a.smoke else ds
        nocache = [epoch(Subset(make(False), range(min(a.nocache_items, len(make(False))))), a.batch_size, a.workers)]
        fc = FeatureCache(Path(d) / "features")
        cold, cold_cpu, n = epoch(make(fc), a.batch_size, a.workers)
        misses = fc.misses
        warm = [epoch(make(FeatureCache(Path(d) / "features")), a.batch_size, a.workers) for _ in range(repeats)]
    load = os.getloadavg()[0]
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    nc_items = nocache[0][2]
    nocache = [(w * n / nc_items, c * n / nc_items, n) for w, c, _ in nocache]     # per-epoch estimate
    res = dict(benchmark="data_epoch", dataset="shapes/train", items=n, batch_size=a.batch_size,
               modalities=["image", "audio(log-mel 64)", "text(char ids)"], threads=a.threads, workers=a.workers,
               smoke=a.smoke, cpu=platform.processor() or platform.machine(), cpus_visible=os.cpu_count(),
               load_average_1min=load,
               nocache_items_measured=nc_items, nocache_s=med(nocache, 0), cold_cache_s=cold, warm_cache_s_median=med(warm, 0),
               warm_cache_s_all=[w[0] for w in warm], cold_cache_misses=misses,
               nocache_cpu_s=med(nocache, 1), cold_cache_cpu_s=cold_cpu, warm_cache_cpu_s_median=med(warm, 1),
               cold_over_warm=cold / med(warm, 0), nocache_over_warm=med(nocache, 0) / med(warm, 0),
               target_warm_s=5.0, warm_within_target=med(warm, 0) <= 5.0)
    print(json.dumps(res, indent=1))
    if a.out: a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
