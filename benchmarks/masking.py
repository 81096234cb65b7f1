"""Mask generators and MAE gather/scatter: vectorised (mmlab) vs a per-sample loop vs MAE's argsort-gather.

Usage: python benchmarks/masking.py [--smoke] [--out results.json] [--repeats N]

What is compared, side by side in one run, on CPU (default torch thread count), float32,
B = 256 samples, L = 196 tokens (a 14x14 grid), D = 192 (ViT-Tiny width), mask ratio 0.75:

1. **Mask generation** (`mask`): each mmlab generator called once for the whole batch against
   the same generator called B times with B = 1 (the per-sample loop every generator replaces);
   for random masking also against MAE's reference `random_masking` (argsort of noise, argsort
   again for `ids_restore`, gather of a 0/1 template), which returns the same information.
2. **Gather + scatter** (`tokens`): selecting the visible tokens (B, L, D) -> (B, L/4, D) for the
   encoder and putting decoder tokens back with mask tokens (B, L/4, D) -> (B, L, D), forward only
   and forward + backward: mmlab's `gather_tokens` + `scatter_tokens` (sorted indices, one gather
   and one scatter) vs MAE's argsort formulation (gather with ids_keep, concatenate mask tokens,
   gather with ids_restore) vs a Python loop over samples with boolean indexing and `torch.stack`.
   All three give identical outputs (checked in this script before timing).

Times are medians over `--repeats` calls after one warm-up; ratios are loop/vectorised and
argsort/mmlab from the same run. The machine is shared, so absolute times are noisy; read ratios.
Threads: `--threads 1` by default. On the shared, oversubscribed 2-core development machine
(load average > 10) torch's intra-op thread pool makes every batched op 5-10x slower than with one
thread (the two workers wait for each other), while the per-sample loops, whose ops are too small
to be parallelised, are unaffected; one thread is the fair and reproducible setting there. Pass
`--threads 0` to keep torch's default.
"""
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmlab.masking import random_mask, block_mask, tube_mask, span_mask, noise_mask   # noqa: E402
from mmlab.encoders import gather_tokens                                              # noqa: E402
from mmlab.models import scatter_tokens                                               # noqa: E402

def median_time(fn, repeats:int) -> float:
    "Median wall time of `fn()` in seconds over `repeats` calls after one warm-up call."
    fn(); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def mae_random_masking(B, L, ratio, g):
    "MAE's reference (models_mae.random_masking), returning ids_keep, ids_restore and the 0/1 mask."
    keep = int(L * (1 - ratio))
    noise = torch.rand(B, L, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L); mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

def argsort_gather_scatter(x, ids_keep, ids_restore, tok):
    "MAE's formulation: gather visible with ids_keep; append mask tokens; unshuffle with ids_restore."
    B, L, D = x.shape
    vis = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    full = torch.cat([vis, tok.expand(B, L - vis.shape[1], D)], 1)
    return vis, torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, D))

def mmlab_gather_scatter(x, m, tok):
    vis = gather_tokens(x, m.visible)
    return vis, scatter_tokens(vis, m, tok)

def loop_gather_scatter(x, mask, tok):
    "Per-sample Python loop with boolean indexing."
    vis = torch.stack([x[b][~mask[b]] for b in range(x.shape[0])])
    outs = []
    for b in range(x.shape[0]):
        full = tok.expand(x.shape[1], -1).clone(); full[~mask[b]] = vis[b]; outs.append(full)
    return vis, torch.stack(outs)

def bench_masks(B, grid, ratio, repeats):
    L = grid[0] * grid[1]; g = torch.Generator().manual_seed(0)
    gens = {
        "random (MAE)": lambda n: random_mask(n, L, ratio, generator=g),
        "block (BEiT)": lambda n: block_mask(n, grid, 0.4, generator=g),
        "block (SimMIM s=2)": lambda n: block_mask(n, grid, 0.6, block_size=2, generator=g),
        "tube (T=4)": lambda n: tube_mask(n, 4, L // 4 if L >= 8 else L, ratio, generator=g),
        "span (M=10)": lambda n: span_mask(n, L, 0.5, span=min(10, L), generator=g),
        "noise (ColorMAE green)": lambda n: noise_mask(n, grid, ratio, "green", generator=g),
    }
    rows = []
    for name, f in gens.items():
        t_vec = median_time(lambda: f(B), repeats)
        t_loop = median_time(lambda: [f(1) for _ in range(B)], max(1, repeats // 4))
        row = dict(kind="mask", name=name, vectorised_ms=1e3 * t_vec, loop_ms=1e3 * t_loop, loop_over_vectorised=t_loop / t_vec)
        if name.startswith("random"):
            t_ref = median_time(lambda: mae_random_masking(B, L, ratio, g), repeats)
            row.update(argsort_ms=1e3 * t_ref, argsort_over_vectorised=t_ref / t_vec)
        rows.append(row)
        extra = f"  argsort {row['argsort_ms']:8.3f} ms ({row['argsort_over_vectorised']:.2f}x)" if "argsort_ms" in row else ""
        print(f"mask   {name:24s} vectorised {row['vectorised_ms']:8.3f} ms  loop {row['loop_ms']:9.2f} ms "
              f"({row['loop_over_vectorised']:6.1f}x){extra}", flush=True)
    return rows

def bench_tokens(B, L, D, ratio, repeats):
    g = torch.Generator().manual_seed(0)
    m = random_mask(B, L, ratio, generator=g)
    ids_keep = m.visible; ids_restore = torch.argsort(torch.cat([m.visible, m.masked], 1), 1)
    x0 = torch.randn(B, L, D, generator=g); tok0 = torch.randn(D, generator=g)
    # identical results before timing
    ref = argsort_gather_scatter(x0, ids_keep, ids_restore, tok0)
    for got in (mmlab_gather_scatter(x0, m, tok0), loop_gather_scatter(x0, m.mask, tok0)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), "implementations disagree"
    impls = {"mmlab (sorted gather + scatter)": lambda x, t: mmlab_gather_scatter(x, m, t),
             "argsort-gather (MAE reference)": lambda x, t: argsort_gather_scatter(x, ids_keep, ids_restore, t),
             "per-sample loop": lambda x, t: loop_gather_scatter(x, m.mask, t)}
    rows = []
    for mode in ("forward", "forward+backward"):
        res = {}
        for name, f in impls.items():
            x = x0.clone().requires_grad_(mode != "forward"); t = tok0.clone().requires_grad_(mode != "forward")
            def run():
                vis, full = f(x, t)
                if mode != "forward": (vis.sum() + full.sum()).backward(); x.grad = t.grad = None
            reps = repeats if "loop" not in name else max(1, repeats // 4)
            res[name] = median_time(run, reps)
        base = res["mmlab (sorted gather + scatter)"]
        for name, t in res.items():
            rows.append(dict(kind="tokens", mode=mode, name=name, ms=1e3 * t, over_mmlab=t / base))
            print(f"tokens {mode:16s} {name:32s} {1e3 * t:9.3f} ms ({t / base:6.2f}x mmlab)", flush=True)
    return rows

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats (CI)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; smoke 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0: torch.set_num_threads(args.threads)
    B, grid, D = (8, (4, 4), 8) if args.smoke else (256, (14, 14), 192)
    L = grid[0] * grid[1]; ratio = 0.75
    repeats = args.repeats or (2 if args.smoke else 20)
    print(f"B={B} L={L} D={D} ratio={ratio} repeats={repeats} threads={torch.get_num_threads()}")
    rows = bench_masks(B, grid, ratio, repeats) + bench_tokens(B, L, D, ratio, repeats)
    out = dict(benchmark="masking", smoke=args.smoke, B=B, L=L, D=D, ratio=ratio, repeats=repeats,
               threads=torch.get_num_threads(), torch=torch.__version__,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
               method="median wall time over repeats after one warm-up (per-sample loops: repeats//4)", rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1)); print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
