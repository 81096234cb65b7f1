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

Time: median over `--repeats` forward+backward calls (after the warm-up) in the same subprocess,
with torch's default thread count. The machine is shared, so absolute times are noisy; the ratio
chunked/full in the same run is the number to read.

Targets (issue 5) at B = 8192: chunked peak memory <= 1/8 of full, chunked time <= 1.5x full.
"""
import argparse, json, os, platform, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES, SMOKE_SIZES = (1024, 4096, 8192), (64, 256)

def _rss_kb(field:str) -> int:
    "A field of /proc/self/status (VmRSS, VmHWM) in KiB."
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"): return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")

def _reset_peak():
    "Reset the kernel's peak-RSS counter (VmHWM) to the current RSS."
    with open("/proc/self/clear_refs", "w") as f: f.write("5")

def worker(loss:str, impl:str, B:int, D:int, repeats:int) -> dict:
    "Run in a fresh process: peak memory (RSS high-water delta), saved-tensor bytes and median time."
    import gc, torch
    import torch.nn.functional as F
    from mmlab.losses.contrastive import DEFAULT_CHUNK, clip_loss, siglip_loss
    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    b0 = F.normalize(a0 + torch.randn(B, D, generator=g), dim=-1)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True); bias = torch.tensor(-10.0, requires_grad=True)

    def step():
        f = clip_loss(a, b, scale, impl=impl) if loss == "clip" else siglip_loss(a, b, scale, bias, impl=impl)
        f.backward()
        a.grad = b.grad = scale.grad = bias.grad = None   # keep nothing between calls
        return f.item()

    # calibration: a tensor of known size, touched, must show up fully in the RSS high-water mark
    gc.collect(); _reset_peak(); base = _rss_kb("VmRSS")
    n = 64 * 2**20
    t = torch.ones(n // 4); del t
    calib = (_rss_kb("VmHWM") - base) * 1024 / n

    value = step()                                      # warm-up (lazy init, thread pools)
    gc.collect(); _reset_peak(); base = _rss_kb("VmRSS")
    step()
    peak = (_rss_kb("VmHWM") - base) * 1024

    saved = []
    def pack(x): saved.append(x.numel() * x.element_size()); return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        f = clip_loss(a, b, scale, impl=impl) if loss == "clip" else siglip_loss(a, b, scale, bias, impl=impl)
    del f

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    return dict(loss=loss, impl=impl, B=B, D=D, chunk=DEFAULT_CHUNK if impl == "chunked" else None,
                value=value, time_s=statistics.median(times), times_s=times, peak_bytes=peak,
                saved_bytes=sum(saved), calibration=calib, threads=torch.get_num_threads())

def run_config(loss, impl, B, D, repeats) -> dict:
    "Run `worker` in a fresh subprocess with an mmap-only glibc malloc; return its JSON row."
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", loss, impl, str(B), str(D), str(repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0: raise RuntimeError(f"worker {loss}/{impl}/B={B} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (default 3; smoke 1)")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        loss, impl, B, D, rep = args.worker
        print(json.dumps(worker(loss, impl, int(B), int(D), int(rep)))); return

    sizes, D = (SMOKE_SIZES, 16) if args.smoke else (FULL_SIZES, 256)
    repeats = args.repeats or (1 if args.smoke else 3)
    rows = []
    print(f"{'loss':7s} {'B':>5s} | {'full ms':>9s} {'chunked ms':>10s} {'ratio':>6s} | {'full MiB':>9s} "
          f"{'chunked MiB':>11s} {'ratio':>7s} | {'saved full MiB':>14s} {'saved chunked MiB':>17s} | calib")
    summary = {}
    for loss in ("clip", "siglip"):
        for B in sizes:
            full, chunked = (run_config(loss, impl, B, D, repeats) for impl in ("naive", "chunked"))
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
    out = dict(benchmark="contrastive_losses", smoke=args.smoke, D=D, repeats=repeats,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
               method="peak = VmHWM - VmRSS in a fresh subprocess per config (mmap-only glibc malloc, "
                      "VmHWM reset via /proc/self/clear_refs after a warm-up); time = median of repeats",
               rows=rows, summary=summary, targets=targets)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1)); print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
