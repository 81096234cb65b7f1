"""One epoch of `shapes` train (image + log-mel audio + char-tokenized text, batch 128) through
`make_loader`: without a feature cache, with a cold cache (fresh folder) and with a warm cache,
side by side in one run; repeats, medians and ratios; JSON out.

    python benchmarks/data_epoch.py [--smoke] [--threads 2] [--workers 0] [--repeats 3] [--out F.json]
"""
import argparse, json, os, platform, statistics, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import Subset

from mmlab.data import CharTokenizer, FeatureCache, LogMel, load_dataset, make_loader


def epoch(ds, batch_size, workers):
    "Seconds to iterate one epoch, and the number of items seen."
    t0 = time.perf_counter(); n = 0
    for b in make_loader(ds, batch_size, seed=0, num_workers=workers):
        n += len(b["index"])
    return time.perf_counter() - t0, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="256 items, 1 repeat (CI)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the 2-core target)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="warm epochs (median reported)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    repeats = 1 if a.smoke else a.repeats
    with tempfile.TemporaryDirectory() as d:
        def make(cache):
            ds = load_dataset("shapes", "train", audio_features=LogMel(), transforms={"text": CharTokenizer()},
                              cache=cache)
            return Subset(ds, range(256)) if a.smoke else ds
        nocache = [epoch(make(False), a.batch_size, a.workers)[0] for _ in range(1 if a.smoke else 2)]
        fc = FeatureCache(Path(d) / "features")
        ds = make(fc)
        cold, n = epoch(ds, a.batch_size, a.workers)
        misses = fc.misses
        warm = [epoch(make(FeatureCache(Path(d) / "features")), a.batch_size, a.workers)[0] for _ in range(repeats)]
    res = dict(benchmark="data_epoch", dataset="shapes/train", items=n, batch_size=a.batch_size,
               modalities=["image", "audio(log-mel 64)", "text(char ids)"], threads=a.threads, workers=a.workers,
               smoke=a.smoke, cpu=platform.processor() or platform.machine(), cpus_visible=os.cpu_count(),
               nocache_s=statistics.median(nocache), cold_cache_s=cold, cold_cache_misses=misses,
               warm_cache_s_median=statistics.median(warm), warm_cache_s_all=warm,
               cold_over_warm=cold / statistics.median(warm), nocache_over_warm=statistics.median(nocache) / statistics.median(warm),
               target_warm_s=5.0, warm_within_target=statistics.median(warm) <= 5.0)
    print(json.dumps(res, indent=1))
    if a.out: a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
