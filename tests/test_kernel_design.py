"""The kernels chapter's design model (mmlab.kernels.loss_gemms / loss_flops / loss_memory_bytes / loss_traffic_bytes /
loss_time_floor): FLOPs equal independent GEMM counts, memory equals the peak measured in a fresh process, bad
arguments raise, and the schedules keep the order the chapter's table argues from."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from mmlab import kernels as K
from mmlab.core import InputError
from mmlab.losses.contrastive import clip_loss

ROOT = Path(__file__).resolve().parents[1]


class GemmCounter(TorchDispatchMode):
    "2 m k n for every mm / addmm / addmm_ (torch's FlopCounterMode does not see the in-place addmm_)."
    def __init__(self): super().__init__(); self.total = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            x, y = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.total += 2 * x.shape[0] * x.shape[1] * y.shape[1]
        return func(*args, **(kwargs or {}))

def naive(a, b, s):
    L = s * a @ b.T; y = torch.arange(len(L))
    return 0.5 * (F.cross_entropy(L, y) + F.cross_entropy(L.T, y))

def inputs(B, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = [F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=1).requires_grad_() for _ in range(2)]
    return a, b, torch.tensor(7.0, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("B,E,chunk", [(37, 5, 8), (64, 16, 64), (100, 3, 33)])
def test_flops_equal_counted_gemms(B, E, chunk):
    a, b, s = inputs(B, E)
    with GemmCounter() as mine, FlopCounterMode(display=False) as torchs: naive(a, b, s).backward()
    assert mine.total == torchs.get_total_flops() == K.loss_flops(B, E, "naive")
    with GemmCounter() as mine: clip_loss(a, b, s, impl="chunked", chunk_size=chunk).backward()
    assert mine.total == K.loss_flops(B, E, "chunked")

def test_cuda_gemm_count_from_the_kernel_source():
    sweeps = K.CUDA_SOURCE.count("lse_rows_kernel<T><<<") + 2 * K.CUDA_SOURCE.count("grad_side<T, 0>(")
    assert sweeps == K.loss_gemms("fused_cuda") == 6

def test_design_schedules_trade_gemms_for_memory():
    B, E = 32768, 512
    g = {k: K.loss_gemms("design", *k) for k in [(1, 1), (1, 2), (2, 2)]}
    m = {k: K.loss_memory_bytes(B, E, "design", fwd_sweeps=k[0], bwd_sweeps=k[1]) for k in g}
    assert g[(1, 1)] == 4 < g[(1, 2)] == 5 < g[(2, 2)] == 6
    assert m[(1, 1)] > m[(1, 2)] > m[(2, 2)] == 2 * B * E * 2 + 8 * B   # the gradients and two statistics vectors
    assert K.loss_gemms("design", 1, 1) == K.loss_gemms("chunked") == K.loss_gemms("fused_cpu")   # the floor

def test_design_meets_the_targets_on_paper_and_naive_cannot_fit():
    B1, B2, E = 32768, 262144, 512
    naive_mem, naive_t = K.loss_memory_bytes(B1, E, "naive"), K.loss_time_floor(B1, E, "naive")
    assert K.loss_memory_bytes(B1, E, "design") <= naive_mem / 50
    assert K.loss_time_floor(B1, E, "design") <= 0.7 * naive_t
    assert K.loss_memory_bytes(B2, E, "design") < 4 * 2**30
    assert K.loss_memory_bytes(B2, E, "naive") > 141 * 2**30              # more than an H200 holds
    # the 256-row tile is compute-bound on an H200 (intensity past the ridge), the 64-row tile is not
    ridge = K.GPU_PEAKS["H200 SXM"]["bf16_flops"] / K.GPU_PEAKS["H200 SXM"]["hbm_bytes_per_s"]
    assert K.loss_flops(B1, E, "design") / K.loss_traffic_bytes(B1, E, "design", tile=256) > ridge
    assert K.loss_flops(B1, E, "fused_cuda") / K.loss_traffic_bytes(B1, E, "fused_cuda", tile=64) < ridge

def test_bad_arguments_raise():
    with pytest.raises(InputError, match="impl must be one of"): K.loss_flops(8, 4, "flash")
    with pytest.raises(InputError, match="must be 1 or 2"): K.loss_memory_bytes(8, 4, "design", fwd_sweeps=3)

CHILD = """
import ctypes, gc, json, sys, torch, torch.nn.functional as F
libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 1 << 16); libc.mallopt(-1, 0)
torch.set_num_threads(1)
from mmlab.kernels import fused_clip_loss
from mmlab.losses.contrastive import clip_loss
B, E, chunk = 2048, 64, 256
g = torch.Generator().manual_seed(1)
a, b = [F.normalize(torch.randn(B, E, generator=g), dim=1).requires_grad_() for _ in range(2)]
s = torch.tensor(10.0, requires_grad=True)
def naive(a, b, s):
    L = s * a @ b.T; y = torch.arange(B)
    return 0.5 * (F.cross_entropy(L, y) + F.cross_entropy(L.T, y))
def rss(k): return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(k + ":"))
out = {}
for name, fn in [("naive", naive), ("chunked", lambda a, b, s: clip_loss(a, b, s, impl="chunked", chunk_size=chunk)),
                 ("fused_cpu", fused_clip_loss)]:
    fn(a, b, s).backward(); a.grad = b.grad = s.grad = None
    gc.collect(); libc.malloc_trim(0); base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    fn(a, b, s).backward(); out[name] = rss("VmHWM") - base; a.grad = b.grad = s.grad = None
print(json.dumps(out))
"""

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc/self (Linux)")
def test_memory_model_matches_the_measured_peak():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    for impl, measured in got.items():
        want = K.loss_memory_bytes(2048, 64, impl, elt=4, chunk=256, cpu_threads=1)
        assert 0.85 < measured / want < 1.15, (impl, measured, want)


# --- GPU: bf16 fused against the float32 naive loss, gradients included, odd B, the widths (unrun here) -----
def naive_siglip(a, b, s, t):
    L = s * a @ b.T + t
    z = 2 * torch.eye(len(L), device=L.device, dtype=L.dtype) - 1
    return -F.logsigmoid(z * L).sum() / len(L)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("E", [64, 256, 512, 768])
@pytest.mark.parametrize("B", [1000, 4097])          # not multiples of the 64-row tile
def test_cuda_bf16_within_tolerance_of_fp32_naive(B, E):
    g = torch.Generator().manual_seed(B + E)
    a16, b16 = [F.normalize(torch.randn(B, E, generator=g), dim=1).cuda().bfloat16() for _ in range(2)]
    for loss, fused, ref, extra in [("clip", K.fused_clip_loss, naive, ()), ("siglip", K.fused_siglip_loss, naive_siglip, (-10.0,))]:
        ar, br = a16.float().requires_grad_(), b16.float().requires_grad_()   # float32 naive on the same rounded inputs
        want = ref(ar, br, 20.0, *extra); gw = torch.autograd.grad(want, (ar, br))
        af, bf = a16.clone().requires_grad_(), b16.clone().requires_grad_()
        got = fused(af, bf, 20.0, *extra); gg = torch.autograd.grad(got, (af, bf))
        assert abs(got.item() - want.item()) <= 1e-3 * max(1.0, abs(want.item())), (loss, got.item(), want.item())
        for x, y in zip(gg, gw):
            assert x.dtype == torch.bfloat16 and (x.float() - y).norm() <= 2e-2 * y.norm(), (loss, (x.float() - y).norm() / y.norm())
