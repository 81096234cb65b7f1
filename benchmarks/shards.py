"""Reading speed of WebDataset shards against the manifest of the same files: one epoch of `digits` train
(PNG images resized to 32, WAV clips to 64-band log-mels, char-tokenized captions; no feature cache, so both sides
decode every sample), through `make_loader` with 0 and 2 worker processes, samples per second as the median of
repeated epochs; JSON out. Both read the same bytes and run the same transforms, so the ratio is the cost of many
small files against a few sequential tar streams (plus the tar parsing); on a local disk with a warm page cache that
cost is small, on object storage it is the whole point of shards.

    python benchmarks/shards.py [--smoke] [--workers 0,2] [--repeats 5] [--samples-per-shard 100] [--out F.json]
"""
import argparse, json, os, platform, statistics, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import Subset

from mmlab.data import CharTokenizer, LogMel, ManifestDataset, ShardDataset, make_loader, manifest_samples, write_shards
from mmlab.recipes import export_manifest

KW = dict(modalities=["image", "audio", "text"], image_size=32, audio_features=LogMel(), transforms={"text": CharTokenizer()}, cache=False)


def epoch(loader):
    "Wall seconds of one pass over `loader` and the samples it gave."
    t0, n = time.perf_counter(), 0
    for b in loader: n += len(b["image"])
    return time.perf_counter() - t0, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="64 samples, 1 repeat (CI)")
    ap.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=5, help="epochs per configuration (median reported)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    n, repeats = (64, 1) if a.smoke else (None, a.repeats)
    workers = [int(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as d:
        manifest = export_manifest("digits", "train", Path(d) / "files", n=n)
        info = write_shards(manifest_samples(manifest), Path(d) / "shards", "train", 16 if a.smoke else a.samples_per_shard)
        make = {"manifest": lambda w: make_loader(ManifestDataset(manifest, **KW), a.batch_size, seed=0, num_workers=w),
                "shards": lambda w: make_loader(ShardDataset(info["pattern"], batch_size=a.batch_size, seed=0, **KW), num_workers=w)}
        runs = {(s, w): [] for w in workers for s in make}
        for _ in range(repeats):                 # interleaved, so that a change of the machine's load hits every side alike
            for (s, w), times in runs.items(): times.append(epoch(make[s](w)))
        rows = []
        for (source, w), rs in runs.items():
            med = statistics.median(t for t, _ in rs)
            rows.append(dict(source=source, workers=w, samples=rs[0][1], times_s=[t for t, _ in rs], median_s=med,
                             samples_per_s=rs[0][1] / med))
    by = {(r["source"], r["workers"]): r for r in rows}
    res = dict(benchmark="shards", dataset="digits/train", samples=info["samples"], shards=info["shards"], shard_bytes=info["bytes"],
               batch_size=a.batch_size, repeats=repeats, smoke=a.smoke, threads=1, cpu=platform.processor() or platform.machine(),
               cpus_visible=os.cpu_count(), load_average_1min=os.getloadavg()[0], rows=rows,
               shards_over_manifest={str(w): by[("shards", w)]["samples_per_s"] / by[("manifest", w)]["samples_per_s"] for w in workers})
    print(json.dumps(res, indent=1))
    if a.out: a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
