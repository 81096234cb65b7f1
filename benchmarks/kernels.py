"""Fused contrastive kernels (mmlab.kernels) against the naive PyTorch losses, side by side.

CPU section: CLIP and SigLIP forward+backward at B=8192, D=256 (fp32): the fused C++/OpenMP kernel,
the naive PyTorch loss (full B x B logits) and, when mmlab.losses.contrastive provides it, its
chunked form. Reports median time and peak extra memory (peak RSS above the pre-call RSS, measured
by resetting the kernel's high-water mark through /proc/self/clear_refs) and the ratios to naive.

GPU section (only when CUDA is available): bf16 CLIP at B=32768, D=512 (fused vs naive vs the PyPI
`inf-cl` Triton kernel when importable; time also as a multiple of the cuBLAS (B,D)x(D,B) matmul),
and the fused kernel alone at B=262144 (peak extra memory).

    python benchmarks/kernels.py [--smoke] [--out results.json] [--repeats N] [--threads T]
"""
from __future__ import annotations
import argparse, gc, json, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmlab import kernels  # noqa: E402


# --- the compared implementations (naive ones written out here, independent of mmlab) -------------
def naive_clip(a, b, s):
    "Full-matrix symmetric InfoNCE: what a typical training script does."
    L = s * a @ b.T
    y = torch.arange(L.shape[0], device=L.device)
    return 0.5 * (F.cross_entropy(L, y) + F.cross_entropy(L.T, y))

def naive_siglip(a, b, s, t):
    "Full-matrix sigmoid loss."
    L = s * a @ b.T + t
    z = 2 * torch.eye(L.shape[0], device=L.device, dtype=L.dtype) - 1
    return -F.logsigmoid(z * L).sum() / L.shape[0]

def chunked_fns():
    "clip/siglip 'chunked' forms from mmlab.losses.contrastive, if that module provides them."
    try:
        from mmlab.losses import contrastive as C
        C.clip_loss  # noqa: B018
        return (lambda a, b, s: C.clip_loss(a, b, s, impl="chunked"),
                lambda a, b, s, t: C.siglip_loss(a, b, s, t, impl="chunked"))
    except Exception as e:  # noqa: BLE001 - the module is optional for this benchmark
        print(f"(no chunked losses: {e})")
        return None, None


# --- measurement helpers ----------------------------------------------------------------------
def _rss_kib(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"): return int(line.split()[1])
    raise RuntimeError(field)

def cpu_peak_extra_mib(fn):
    "Peak resident memory above the pre-call level while `fn()` runs (MiB)."
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f: f.write("5")   # reset VmHWM to the current RSS
    fn()
    return max(0.0, (_rss_kib("VmHWM") - base) / 1024)

def fwd_bwd(loss_fn, *inputs):
    def run():
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.grad is not None: x.grad = None
        loss = loss_fn(*inputs)
        loss.backward()
        return loss.detach()
    return run

def time_median(run, repeats, sync=lambda: None):
    ts = []
    for _ in range(repeats):
        sync(); t0 = time.perf_counter(); run(); sync(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts

def make_inputs(B, D, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(B, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    b = F.normalize(torch.randn(B, D, generator=g), dim=1).to(device, dtype).requires_grad_()
    s = torch.tensor(14.0, device=device, requires_grad=True)
    t = torch.tensor(-10.0, device=device, requires_grad=True)
    return a, b, s, t


# --- sections ---------------------------------------------------------------------------------
def cpu_section(B, D, repeats):
    a, b, s, t = make_inputs(B, D, "cpu", torch.float32)
    kernels.build_extension("cpu")   # compile outside the timings
    chunk_clip, chunk_sig = chunked_fns()
    impls = {"clip": {"naive": fwd_bwd(naive_clip, a, b, s), "fused": fwd_bwd(kernels.fused_clip_loss, a, b, s)},
             "siglip": {"naive": fwd_bwd(naive_siglip, a, b, s, t), "fused": fwd_bwd(kernels.fused_siglip_loss, a, b, s, t)}}
    if chunk_clip: impls["clip"]["chunked"] = fwd_bwd(chunk_clip, a, b, s)
    if chunk_sig: impls["siglip"]["chunked"] = fwd_bwd(chunk_sig, a, b, s, t)
    out = {}
    for loss, fns in impls.items():
        vals = {k: fn().item() for k, fn in fns.items()}          # warm-up + the values, for agreement
        res = {}
        for k, fn in fns.items():                                 # interleave repeats of all impls
            res[k] = {"times_s": []}
        for _ in range(repeats):
            for k, fn in fns.items():
                _, ts = time_median(fn, 1); res[k]["times_s"] += ts
        for k, fn in fns.items():
            res[k]["median_s"] = statistics.median(res[k]["times_s"])
            res[k]["peak_extra_mib"] = cpu_peak_extra_mib(fn)
            res[k]["loss"] = vals[k]
        for k in res:
            res[k]["time_vs_naive"] = res[k]["median_s"] / res["naive"]["median_s"]
            res[k]["memory_vs_naive"] = res[k]["peak_extra_mib"] / max(res["naive"]["peak_extra_mib"], 1e-9)
        out[loss] = res
    return out

def gpu_section(B, D, big_B, repeats):
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    kernels.build_extension("cuda")
    out = {"device": torch.cuda.get_device_name(), "B": B, "D": D, "dtype": "bfloat16"}

    def measure(run):
        run(); sync()                                   # warm-up
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        med, ts = time_median(run, repeats, sync)
        return {"median_s": med, "times_s": ts, "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}

    a, b, s, _ = make_inputs(B, D, dev, torch.bfloat16)
    ad, bd = a.detach(), b.detach()
    res = {"matmul": measure(lambda: ad @ bd.T),
           "fused": measure(fwd_bwd(kernels.fused_clip_loss, a, b, s))}
    try:
        res["naive"] = measure(fwd_bwd(naive_clip, a, b, s))
    except torch.OutOfMemoryError as e:
        res["naive"] = {"error": f"out of memory: {e}"[:200]}
    torch.cuda.empty_cache()
    try:
        from inf_cl import cal_inf_loss
        def infcl(a, b, s):
            return 0.5 * (cal_inf_loss(a, b, scale=s).mean() + cal_inf_loss(b, a, scale=s).mean())
        res["inf_cl"] = measure(fwd_bwd(infcl, a, b, s))
    except ImportError as e:
        res["inf_cl"] = {"error": f"inf-cl not importable: {e}"}
    mm = res["matmul"]["median_s"]
    for k, r in res.items():
        if "median_s" in r:
            r["time_vs_matmul"] = r["median_s"] / mm
            if "median_s" in res.get("naive", {}): r["time_vs_naive"] = r["median_s"] / res["naive"]["median_s"]
            if "peak_extra_mib" in res.get("naive", {}): r["memory_vs_naive"] = r["peak_extra_mib"] / res["naive"]["peak_extra_mib"]
    out["clip"] = res
    del a, b, ad, bd; torch.cuda.empty_cache()
    a, b, s, _ = make_inputs(big_B, D, dev, torch.bfloat16)
    out["big"] = {"B": big_B, "fused": measure(fwd_bwd(kernels.fused_clip_loss, a, b, s))}
    return out


def _exec_with_tight_malloc():
    "Re-run this script with glibc malloc returning large blocks to the OS at once, so RSS tracks allocations."
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the target machine has 2 cores)")
    p.add_argument("--no-gpu", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, D = (512, 64) if args.smoke else (8192, 256)
    reps = args.repeats or (2 if args.smoke else 5)
    result = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
              "smoke": args.smoke, "cpu": {"B": B, "D": D, "dtype": "float32", "repeats": reps}}
    result["cpu"].update(cpu_section(B, D, reps))
    for loss in ("clip", "siglip"):
        print(f"\nCPU {loss} fwd+bwd  B={B} D={D} fp32, {args.threads} threads, median of {reps}")
        print(f"{'impl':>8} {'time (s)':>10} {'x naive':>8} {'peak extra (MiB)':>17} {'x naive':>8} {'loss':>12}")
        for k, r in result["cpu"][loss].items():
            print(f"{k:>8} {r['median_s']:10.3f} {r['time_vs_naive']:8.2f} {r['peak_extra_mib']:17.1f} "
                  f"{r['memory_vs_naive']:8.3f} {r['loss']:12.6f}")
    if torch.cuda.is_available() and not args.no_gpu:
        gB, gD, big = (4096, 128, 16384) if args.smoke else (32768, 512, 262144)
        result["gpu"] = gpu_section(gB, gD, big, 2 if args.smoke else reps)
        print(f"\nGPU {result['gpu']['device']}: bf16 CLIP fwd+bwd B={gB} D={gD}")
        for k, r in result["gpu"]["clip"].items():
            print(f"{k:>8}", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items() if kk != "times_s"})
        print(f"B={big}: fused", {kk: round(v, 4) for kk, v in result["gpu"]["big"]["fused"].items() if kk != "times_s"})
    else:
        result["gpu"] = None
        print("\nGPU section skipped (no CUDA): GPU figures unmeasured")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result

if __name__ == "__main__":
    _exec_with_tight_malloc()
    main()
