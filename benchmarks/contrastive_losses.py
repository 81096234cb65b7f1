"""Forward+backward time and peak memory of the full (naive) vs chunked CLIP and SigLIP losses on CPU.

Usage: python benchmarks/contrastive_losses.py [--smoke] [--out results.json] [--repeats N]

What is compared, side by side in one run: `clip_loss(..., impl="naive")` (materialises the B x B
logits; autograd keeps them and their softmax) against `clip_loss(..., impl="chunked")` (the custom
autograd.Function of mmlab.losses.contrastive, blocks of DEFAULT_CHUNK rows, recomputed in
backward), and the same for `siglip_loss`, at B in {1024, 4096, 8192}, D = 256, float32.

How peak memory is measured (tracemalloc does not see torch's CPU allocator, so it is not used):
every (loss, impl, B) configuration runs in a FRESH subprocess, so nothing earlier in the run can
hide or inflate its peak. In that process glibc is told to serve every allocation above 64 KiB with
mmap and to return freed memory at once (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so
the resident set size follows the live tensors instead of keeping freed blocks cached. After the
inputs exist and one warm-up forward+backward has run, the kernel's peak-RSS counter is reset
(`echo 5 > /proc/self/clear_refs` resets VmHWM to the current RSS); one measured forward+backward
follows and peak memory = VmHWM - RSS before the call. A calibration step in the same process
allocates and touches a tensor of known size and reports the measured/true ratio (expect ~1.0), so
the number can be trusted. As a second, allocator-independent view the script also reports the
bytes autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), which is where the
naive form keeps its B x B tensors.

Time: full and chunked run INTERLEAVED in one separate subprocess (full, chunked, full, chunked,
... after one warm-up call of each), `--repeats` calls each, median reported, torch's default
thread count. Interleaving exposes both forms to the same background load: the machine is shared,
so absolute times are noisy and the ratio chunked/full is the number to read. `--threads N` pins
torch's intra-op threads: on an oversubscribed machine OpenMP threads that wait for each other
can make a 1 ms call take 250 ms, and `--threads 1` gives far steadier numbers there.

Targets (issue 5) at B = 8192: chunked peak memory <= 1/8 of full, chunked time <= 1.5x full.
"""
import argparse, json, os, platform, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES, SMOKE_SIZES = (1024, 4096, 8192), (128,)

def _rss_kb(field:str) -> int:
    "A field of /proc/self/status (VmRSS, VmHWM) in KiB."
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"): return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")

def _reset_peak():
    "Reset the kernel's peak-RSS counter (VmHWM) to the current RSS."
    with open("/proc/self/clear_refs", "w") as f: f.write("5")

def _setup(B:int, D:int):
    "Seeded unit-norm inputs (requiring grad) and a learnable scale and bias."
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    b0 = F.normalize(a0 + torch.randn(B, D, generator=g), dim=-1)
    return (a0.clone().requires_grad_(), b0.clone().requires_grad_(),
            torch.tensor(14.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True))

def _loss_fn(loss:str, impl:str, a, b, scale, bias):
    from mmlab.losses.contrastive import clip_loss, siglip_loss
    return clip_loss(a, b, scale, impl=impl) if loss == "clip" else siglip_loss(a, b, scale, bias, impl=impl)

def _step(loss:str, impl:str, xs) -> float:
    "One forward+backward; keeps nothing between calls."
    f = _loss_fn(loss, impl, *xs)
    f.backward()
    for x in xs: x.grad = None
    return f.item()

def mem_worker(loss:str, impl:str, B:int, D:int) -> dict:
    "Run in a fresh process: peak memory (RSS high-water delta) and bytes saved for backward."
    import gc, torch
    from mmlab.losses.contrastive import DEFAULT_CHUNK
    xs = _setup(B, D)
    # calibration: a tensor of known size, touched, must show up fully in the RSS high-water mark
    gc.collect(); _reset_peak(); base = _rss_kb("VmRSS")
    n = 64 * 2**20
    t = torch.ones(n // 4); del t
    calib = (_rss_kb("VmHWM") - base) * 1024 / n
    value = _step(loss, impl, xs)                       # warm-up (lazy init, thread pools)
    gc.collect(); _reset_peak(); base = _rss_kb("VmRSS")
    _step(loss, impl, xs)
    peak = (_rss_kb("VmHWM") - base) * 1024
    saved = []
    def pack(x): saved.append(x.numel() * x.element_size()); return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        f = _loss_fn(loss, impl, *xs)
    del f
    return dict(loss=loss, impl=impl, B=B, D=D, chunk=DEFAULT_CHUNK if impl == "chunked" else None,
                value=value, peak_bytes=peak, saved_bytes=sum(saved), calibration=calib)

def time_worker(loss:str, B:int, D:int, repeats:int, threads:int=0) -> dict:
    "Run in a fresh process: full and chunked forward+backward interleaved; per-impl times."
    import torch
    if threads: torch.set_num_threads(threads)
    xs = _setup(B, D)
    impls = ("naive", "chunked")
    for impl in impls: _step(loss, impl, xs)           # warm-up both
    times = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            t0 = time.perf_counter(); _step(loss, impl, xs); times[impl].append(time.perf_counter() - t0)
    return dict(loss=loss, B=B, D=D, times_s=times, threads=torch.get_num_threads(),
                time_s={k: statistics.median(v) for k, v in times.items()})

def _run(args:list) -> dict:
    "Run a worker in a fresh subprocess with an mmap-only glibc malloc; return its JSON result."
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode != 0: raise RuntimeError(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (default 5; smoke 1)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for the timing (0: torch's default)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        w = args.worker
        out = mem_worker(w[1], w[2], int(w[3]), int(w[4])) if w[0] == "mem" else time_worker(w[1], int(w[2]), int(w[3]), int(w[4]), int(w[5]))
        print(json.dumps(out)); return

    sizes, D = (SMOKE_SIZES, 16) if args.smoke else (FULL_SIZES, 256)
    repeats = args.repeats or (1 if args.smoke else 5)
    rows = []
    print(f"{'loss':7s} {'B':>5s} | {'full ms':>9s} {'chunked ms':>10s} {'ratio':>6s} | {'full MiB':>9s} "
          f"{'chunked MiB':>11s} {'ratio':>7s} | {'saved full MiB':>14s} {'saved chunked MiB':>17s} | calib")
    summary = {}
    for loss in ("clip", "siglip"):
        for B in sizes:
            full, chunked = (_run(["mem", loss, impl, B, D]) for impl in ("naive", "chunked"))
            tm = _run(["time", loss, B, D, repeats, args.threads])
            for row, impl in ((full, "naive"), (chunked, "chunked")):
                row.update(time_s=tm["time_s"][impl], times_s=tm["times_s"][impl], threads=tm["threads"])
            rows += [full, chunked]
            rt, rm = chunked["time_s"] / full["time_s"], chunked["peak_bytes"] / max(full["peak_bytes"], 1)
            summary[f"{loss}/B={B}"] = dict(time_ratio=rt, memory_ratio=rm,
                                           value_abs_diff=abs(full["value"] - chunked["value"]))
            M = 2**20
            print(f"{loss:7s} {B:5d} | {1e3 * full['time_s']:9.1f} {1e3 * chunked['time_s']:10.1f} {rt:6.2f} | "
                  f"{full['peak_bytes'] / M:9.1f} {chunked['peak_bytes'] / M:11.1f} {rm:7.3f} | "
                  f"{full['saved_bytes'] / M:14.1f} {chunked['saved_bytes'] / M:17.2f} | "
                  f"{full['calibration']:.2f}/{chunked['calibration']:.2f}", flush=True)
    targets = {}
    if not args.smoke:
        for loss in ("clip", "siglip"):
            s = summary[f"{loss}/B=8192"]
            targets[loss] = dict(memory_ratio=s["memory_ratio"], memory_ok=s["memory_ratio"] <= 1 / 8,
                                 time_ratio=s["time_ratio"], time_ok=s["time_ratio"] <= 1.5)
        print("targets at B=8192 (memory <= 1/8, time <= 1.5x):", json.dumps(targets))
    out = dict(benchmark="contrastive_losses", smoke=args.smoke, D=D, repeats=repeats, threads=rows[0]["threads"],
               machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
               method="peak = VmHWM - VmRSS in a fresh subprocess per config (mmap-only glibc malloc, "
                      "VmHWM reset via /proc/self/clear_refs after a warm-up); time = median of repeats, "
                      "full and chunked interleaved in one process",
               rows=rows, summary=summary, targets=targets)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1)); print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
