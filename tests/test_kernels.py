"""Fused contrastive kernels (mmlab.kernels) against independent naive float64 references.

CPU tests build the C++/OpenMP extension once (cached in the kernel build dir). GPU tests are marked
`cuda` and skip without CUDA; the nvcc compile check is marked `slow` (run with MMLAB_TEST_FLAGS=slow).
"""
import math, os, warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmlab import kernels as K
from mmlab.core import DeviceError, InputError, InputTypeError, KernelBuildError, MMLabError, ShapeError

FLAGS = os.environ.get("MMLAB_TEST_FLAGS", "").split()
slow = pytest.mark.skipif("slow" not in FLAGS, reason="slow: set MMLAB_TEST_FLAGS=slow")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- independent references: the plain formulas on the full float64 matrix ------------------
def ref_clip(a, b, s, eps=0.0):
    a, b, s = a.double(), b.double(), torch.as_tensor(s).double()
    S = s * a @ b.T
    n = S.shape[0]
    loss = 0.0
    for i in range(n):   # rows: cross-entropy with smoothed one-hot targets, written out
        lse = torch.logsumexp(S[i], 0)
        loss = loss + (1 - eps) * (lse - S[i, i]) + eps * (lse - S[i].mean())
    for j in range(n):   # columns
        lse = torch.logsumexp(S[:, j], 0)
        loss = loss + (1 - eps) * (lse - S[j, j]) + eps * (lse - S[:, j].mean())
    return loss / (2 * n)

def ref_siglip(a, b, s, t):
    a, b = a.double(), b.double()
    s, t = torch.as_tensor(s).double(), torch.as_tensor(t).double()
    L = s * a @ b.T + t
    z = -torch.ones_like(L)
    z.fill_diagonal_(1.0)
    return -torch.log(torch.sigmoid(z * L)).sum() / L.shape[0]

def pair(n, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(device, dtype), b.to(device, dtype)

def leaf(x): return x.detach().clone().requires_grad_()


@pytest.fixture(scope="module", autouse=True)
def cpu_ext():
    return K.build_extension("cpu")


# --- CPU: values and gradients to 1e-10 in float64 ------------------------------------------
SIZES = [(n, d) for n in (1, 2, 7, 33, 130) for d in (3, 16, 65)]

@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("tile", [5, None])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_cpu_matches_reference(n, d, tile, eps):
    a0, b0 = pair(n, d, seed=n * 100 + d)
    a, b = leaf(a0), leaf(b0)
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    got = K.fused_clip_loss(a, b, s, t, label_smoothing=eps, tile=tile)
    ga, gb, gs, gt = torch.autograd.grad(got, (a, b, s, t))
    ra, rb, rs = leaf(a0), leaf(b0), torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    want = ref_clip(ra, rb, rs, eps)
    wa, wb, ws = torch.autograd.grad(want, (ra, rb, rs))
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) < 1e-10
    assert (ga - wa).abs().max() < 1e-10 and (gb - wb).abs().max() < 1e-10
    assert abs(gs.item() - ws.item()) < 1e-10
    assert gt.item() == 0.0   # CLIP is invariant to a logit bias

@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("tile", [5, None])
def test_siglip_cpu_matches_reference(n, d, tile):
    a0, b0 = pair(n, d, seed=n * 100 + d + 1)
    args = [leaf(a0), leaf(b0), torch.tensor(6.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)]
    got = K.fused_siglip_loss(*args, tile=tile)
    gg = torch.autograd.grad(got, args)
    rargs = [leaf(x) for x in args]
    want = ref_siglip(*rargs)
    wg = torch.autograd.grad(want, rargs)
    assert abs(got.item() - want.item()) < 1e-10
    for x, y in zip(gg, wg): assert (x - y).abs().max() < 1e-10

def test_clip_bias_does_not_change_value():
    a, b = pair(9, 4, seed=1)
    assert abs(K.fused_clip_loss(a, b, 5.0).item() - K.fused_clip_loss(a, b, 5.0, logit_bias=37.0).item()) < 1e-13

def test_identical_embeddings_give_log_b():
    x = F.normalize(torch.ones(11, 5, dtype=torch.float64), dim=1)
    assert abs(K.fused_clip_loss(x, x, 42.0).item() - math.log(11)) < 1e-12

@pytest.mark.parametrize("n,d,tile", [(1, 3, None), (7, 5, 3), (13, 4, 4)])
def test_gradcheck(n, d, tile):
    a, b = pair(n, d, seed=7)
    a, b = leaf(a), leaf(b)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: K.fused_clip_loss(a, b, s, label_smoothing=0.15, tile=tile), (a, b, s))
    assert torch.autograd.gradcheck(lambda a, b, s, t: K.fused_siglip_loss(a, b, s, t, tile=tile), (a, b, s, t))

def test_float32_and_noncontiguous_cpu():
    a, b = pair(70, 24, seed=3)
    want_c, want_s = ref_clip(a, b, 20.0).item(), ref_siglip(a, b, 20.0, -5.0).item()
    af, bf = a.float(), b.float()
    assert abs(K.fused_clip_loss(af, bf, 20.0).item() - want_c) < 1e-5
    assert abs(K.fused_siglip_loss(af, bf, 20.0, -5.0).item() - want_s) < 1e-4
    at, bt = a.T.contiguous().T, b[:, :].T.contiguous().T   # transposed storage, same values
    assert not at.is_contiguous()
    assert abs(K.fused_clip_loss(at, bt, 20.0).item() - want_c) < 1e-10
    # 16-bit CPU inputs are promoted to float32
    assert K.fused_clip_loss(a.bfloat16(), b.bfloat16(), 20.0).dtype == torch.float32

def test_large_scale_does_not_underflow_cpu():
    a, b = pair(64, 128, seed=4)   # near-orthogonal: |a_i.b_j| ~ 0.1, so logits span about +-30 at s=100
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-3)):
        got = K.fused_clip_loss(a.to(dt), b.to(dt), 100.0)
        assert torch.isfinite(got)
        assert abs(got.item() - ref_clip(a, b, 100.0).item()) < tol
        got = K.fused_siglip_loss(a.to(dt), b.to(dt), 100.0, -10.0)
        assert abs(got.item() - ref_siglip(a, b, 100.0, -10.0).item()) < tol * 10

def test_threads_give_the_same_result():
    a, b = pair(300, 16, seed=5)
    old = torch.get_num_threads()
    try:
        vals = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            vals.append(K.fused_clip_loss(a, b, 10.0, tile=32).item())
    finally:
        torch.set_num_threads(old)
    assert abs(vals[0] - vals[1]) < 1e-12


# --- input errors -----------------------------------------------------------------------------
def test_input_errors():
    a, b = pair(4, 3)
    with pytest.raises(ShapeError, match="b"): K.fused_clip_loss(a, b[:3], 1.0)
    with pytest.raises(ShapeError): K.fused_siglip_loss(a[0], b[0], 1.0, 0.0)
    with pytest.raises(InputTypeError, match="torch.Tensor"): K.fused_clip_loss(a.numpy(), b, 1.0)
    with pytest.raises(InputTypeError, match="floating-point"): K.fused_clip_loss(a.long(), b, 1.0)
    with pytest.raises(ShapeError, match="logit_scale"): K.fused_clip_loss(a, b, torch.ones(2))
    with pytest.raises(InputError, match="finite"): K.fused_siglip_loss(a, b, 1.0, float("inf"))
    with pytest.raises(InputError, match="label_smoothing"): K.fused_clip_loss(a, b, 1.0, label_smoothing=-0.1)
    with pytest.raises(InputError, match="tile"): K.fused_clip_loss(a, b, 1.0, tile=0)
    with pytest.raises(DeviceError): K.fused_clip_loss(a.to("meta"), b.to("meta"), 1.0)
    with pytest.raises(InputError): K.build_extension("tpu")
    assert issubclass(KernelBuildError, (MMLabError, RuntimeError))


# --- builder: fallback, warning, CUDA_HOME ------------------------------------------------------
@pytest.fixture
def fresh_builder(monkeypatch):
    "An empty builder cache (restored afterwards), so a test can provoke a failed build."
    monkeypatch.setattr(K, "_EXT", {})
    monkeypatch.setattr(K, "_FAILED", {})
    monkeypatch.setattr(K, "_WARNED", set())

def test_no_compiler_falls_back_with_one_warning(fresh_builder, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"): K.build_extension("cpu")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert K.fused_available("cpu") is False
        assert K.fused_available(torch.device("cpu")) is False
    assert len(w) == 1 and "chunked" in str(w[0].message)

def test_unavailable_devices_warn_once(fresh_builder):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert K.fused_available("meta") is False and K.fused_available("meta") is False
        if not torch.cuda.is_available():
            assert K.fused_available("cuda") is False and K.fused_available("cuda:0") is False
    assert len(w) == (1 if torch.cuda.is_available() else 2)

def test_cpu_available_and_no_compile_at_import():
    import subprocess, sys
    code = "import mmlab.kernels as K; print(len(K._EXT))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]
    assert K.fused_available("cpu") is True

def test_cuda_home_from_real_path_of_nvcc(tmp_path, monkeypatch):
    real = Path("/usr/local/cuda/bin/nvcc")
    if not real.exists(): pytest.skip("no CUDA toolkit at /usr/local/cuda")
    monkeypatch.delenv("CUDA_HOME", raising=False); monkeypatch.delenv("CUDA_PATH", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real)           # a symlink elsewhere on PATH
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    home = K.cuda_home()
    assert home == str(real.resolve().parent.parent) and (Path(home) / "include" / "cuda_runtime.h").exists()
    wrapper = tmp_path / "w" / "bin" / "nvcc"                # a wrapper script: the folder is not the toolkit
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {real.resolve()} \"$@\"\n"); wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    assert K.cuda_home() == str(real.resolve().parent.parent)
    monkeypatch.setenv("CUDA_HOME", "/opt/somewhere")
    assert K.cuda_home() == "/opt/somewhere"

def test_cuda_home_finds_the_nvcc_on_path_first(tmp_path, monkeypatch):
    "The nvcc found on PATH wins over the default /usr/local/cuda (a fake toolkit: no CUDA needed)."
    monkeypatch.delenv("CUDA_HOME", raising=False); monkeypatch.delenv("CUDA_PATH", raising=False)
    tk = tmp_path / "toolkit"
    (tk / "bin").mkdir(parents=True); (tk / "include").mkdir()
    (tk / "include" / "cuda_runtime.h").write_text("")
    (tk / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n"); (tk / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tk / 'bin'}:/usr/bin:/bin")
    assert K.cuda_home() == str(tk)

def test_cuda_home_falls_back_to_usr_local_cuda_when_nvcc_is_not_on_path(tmp_path, monkeypatch):
    real = Path("/usr/local/cuda/bin/nvcc")
    if not real.exists(): pytest.skip("no CUDA toolkit at /usr/local/cuda")
    monkeypatch.delenv("CUDA_HOME", raising=False); monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))                 # an empty folder: no nvcc on PATH
    assert K.cuda_home() == str(real.resolve().parent.parent)

@slow
def test_compile_error_raises_kernel_build_error_with_log(fresh_builder, monkeypatch, tmp_path):
    monkeypatch.setenv("MMLAB_KERNEL_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(K, "CPU_SOURCE", K.CPU_SOURCE.replace("check_pair(A, Bm);", "check_pair(A, Bm) mmlab_typo;", 1))
    with pytest.raises(KernelBuildError) as e: K.build_extension("cpu")
    assert "mmlab_typo" in str(e.value) and str(tmp_path) in str(e.value)

@slow
def test_cuda_sources_compile_with_nvcc(fresh_builder):
    "Compiles the CUDA sources for sm_90 with the local nvcc; needs no GPU."
    if K.cuda_home() is None: pytest.skip("nvcc not found")
    arch = os.environ.get("MMLAB_TEST_CUDA_ARCH", "9.0")
    mod = K.build_extension("cuda", arch=arch)   # raises KernelBuildError with the nvcc log on a compile error
    assert all(hasattr(mod, f) for f in K.CUDA_FUNCTIONS)


# --- GPU ------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n,d", [(1, 3), (7, 16), (33, 65), (130, 3), (200, 130)])
def test_cuda_float64_matches_reference(n, d):
    a0, b0 = pair(n, d, seed=n + d)
    dev = "cuda"
    for eps in (0.0, 0.1):
        args = [leaf(a0.to(dev)), leaf(b0.to(dev)), torch.tensor(9.0, dtype=torch.float64, device=dev, requires_grad=True)]
        got = K.fused_clip_loss(*args, label_smoothing=eps)
        gg = torch.autograd.grad(got, args)
        rargs = [leaf(x.detach().cpu()) for x in args]
        want = ref_clip(*rargs, eps=eps)
        wg = torch.autograd.grad(want, rargs)
        assert abs(got.item() - want.item()) < 1e-10
        for x, y in zip(gg, wg): assert (x.cpu() - y).abs().max() < 1e-10
    args = [leaf(a0.to(dev)), leaf(b0.to(dev)), torch.tensor(6.0, dtype=torch.float64, device=dev, requires_grad=True),
            torch.tensor(-4.0, dtype=torch.float64, device=dev, requires_grad=True)]
    got = K.fused_siglip_loss(*args)
    gg = torch.autograd.grad(got, args)
    rargs = [leaf(x.detach().cpu()) for x in args]
    want = ref_siglip(*rargs)
    wg = torch.autograd.grad(want, rargs)
    assert abs(got.item() - want.item()) < 1e-10
    for x, y in zip(gg, wg): assert (x.cpu() - y).abs().max() < 1e-10

def _naive_clip(a, b, s):
    L = s * a @ b.T
    y = torch.arange(L.shape[0], device=L.device)
    return 0.5 * (F.cross_entropy(L, y) + F.cross_entropy(L.T, y))

def _naive_siglip(a, b, s, t):
    L = s * a @ b.T + t
    z = 2 * torch.eye(L.shape[0], device=L.device, dtype=L.dtype) - 1
    return -F.logsigmoid(z * L).sum() / L.shape[0]

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,s", [(1000, 256, 20.0), (2048, 512, 50.0)])
def test_cuda_16bit_error_at_most_twice_naive(dt, n, d, s):
    a0, b0 = pair(n, d, seed=11)
    a16, b16 = a0.to("cuda", dt), b0.to("cuda", dt)
    # the reference for the error is evaluated on the same rounded inputs the kernels see
    want_c = _naive_clip(a16.double(), b16.double(), s).item()
    err_fused = abs(K.fused_clip_loss(a16, b16, s).item() - want_c)
    err_naive = abs(_naive_clip(a16, b16, s).float().item() - want_c)
    assert err_fused <= 2 * err_naive + 1e-6, (err_fused, err_naive)
    want_s = _naive_siglip(a16.double(), b16.double(), s, -10.0).item()
    err_fused = abs(K.fused_siglip_loss(a16, b16, s, -10.0).item() - want_s)
    err_naive = abs(_naive_siglip(a16, b16, s, -10.0).float().item() - want_s)
    assert err_fused <= 2 * err_naive + 1e-6, (err_fused, err_naive)
    # gradients: fused vs float64 no worse than twice the naive 16-bit gradients
    a, b = leaf(a16), leaf(b16)
    ga = torch.autograd.grad(K.fused_clip_loss(a, b, s), a)[0].double()
    a2, b2 = leaf(a16), leaf(b16)
    gn = torch.autograd.grad(_naive_clip(a2, b2, s), a2)[0].double()
    a3 = leaf(a16.double())
    gw = torch.autograd.grad(_naive_clip(a3, b16.double(), s), a3)[0]
    assert (ga - gw).norm() <= 2 * (gn - gw).norm() + 1e-9

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_cuda_16bit_label_smoothing_matches_float64(dt):
    "Label smoothing's row means run in the accumulation dtype (float32) on 16-bit CUDA inputs."
    a0, b0 = pair(256, 64, seed=13)
    a16, b16 = a0.to("cuda", dt), b0.to("cuda", dt)
    L = 20.0 * a16.double() @ b16.double().T
    y = torch.arange(len(L), device=L.device)
    want = (F.cross_entropy(L, y, label_smoothing=0.1) + F.cross_entropy(L.T, y, label_smoothing=0.1)).item() / 2
    got = K.fused_clip_loss(a16, b16, 20.0, label_smoothing=0.1)
    assert got.dtype == torch.float32 and abs(got.item() - want) < 1e-3

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_large_scale_near_orthogonal(dt):
    a0, b0 = pair(512, 256, seed=12)
    a, b = leaf(a0.to("cuda", dt)), leaf(b0.to("cuda", dt))
    got = K.fused_clip_loss(a, b, 100.0)
    want = ref_clip(a.detach().double().cpu(), b.detach().double().cpu(), 100.0).item()
    assert torch.isfinite(got)
    assert abs(got.item() - want) < (1e-10 if dt == torch.float64 else 5e-2)
    ga, gb = torch.autograd.grad(got, (a, b))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    sg = K.fused_siglip_loss(a.detach(), b.detach(), 100.0, -10.0)
    assert torch.isfinite(sg)

@needs_cuda
@pytest.mark.cuda
def test_cuda_noncontiguous_inputs():
    a0, b0 = pair(100, 48, seed=13)
    a, b = a0.cuda(), b0.cuda()
    at, bt = a.T.contiguous().T, b.T.contiguous().T
    assert not at.is_contiguous()
    assert abs(K.fused_clip_loss(at, bt, 10.0).item() - K.fused_clip_loss(a, b, 10.0).item()) < 1e-12
    big = torch.cat([a, torch.zeros_like(a)], 1)[:, :48]      # a strided slice
    assert abs(K.fused_siglip_loss(big, b, 10.0, -3.0).item() - ref_siglip(a0, b0, 10.0, -3.0).item()) < 1e-10


# ================================================================ issue 14: properties no test pinned yet
from hypothesis import given, settings, strategies as st
import types
import mmlab.losses.contrastive as C

# --- the Python-side helpers: row-block loops must visit every block -----------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 23), st.integers(1, 9), st.integers(0, 10 ** 6))
def test_dot_sum_visits_every_block(n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64).float(); y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    got = K._dot_sum(x, y, rows=rows)
    want = sum(float(x[i, d]) * float(y[i, d]) for i in range(n) for d in range(3))   # float64 loop
    assert got.dtype == torch.float64 and got.shape == ()                               # in y's dtype
    assert abs(got.item() - want) < 1e-12

@pytest.mark.parametrize("n,rows", [(7, 3), (6, 2), (5, 16), (1, 1)])
def test_rowdot_blocks_and_gradcheck(n, rows):
    a, b = pair(n, 4, seed=n * 10 + rows)
    got = K._RowDot.apply(a, b, torch.float64, rows)
    want = [sum(float(a[i, d]) * float(b[i, d]) for d in range(4)) for i in range(n)]
    assert got.shape == (n,) and max(abs(g - w) for g, w in zip(got.tolist(), want)) < 1e-15
    assert torch.autograd.gradcheck(lambda a, b: K._RowDot.apply(a, b, torch.float64, rows), (leaf(a), leaf(b)))

def test_rowdot_16bit_accumulates_in_acc_dtype_and_returns_input_dtype_grads():
    a0, b0 = pair(5, 8, seed=60)
    a, b = leaf(a0.bfloat16()), leaf(b0.bfloat16())
    out = K._RowDot.apply(a, b, torch.float32, 2)
    assert out.dtype == torch.float32
    want = (a.detach().double() * b.detach().double()).sum(1)            # exact products of the bf16 values
    assert (out.double() - want).abs().max() < 1e-6
    w = torch.arange(1.0, 6.0)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    assert ga.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16
    torch.testing.assert_close(ga, (w[:, None] * b.detach().float()).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(gb, (w[:, None] * a.detach().float()).bfloat16(), rtol=0, atol=0)

@pytest.mark.parametrize("n,tile", [(5, 2), (3, 3)])
def test_clip_lse_function_values_and_gradcheck(n, tile):
    "Row and column log-sum-exps of s a b^T vs the float64 formula; gradcheck with distinct weights on r and c."
    a, b = pair(n, 3, seed=61 + n)
    s = torch.tensor(3.0, dtype=torch.float64)
    r, c = K._ClipLSE.apply(a, b, s, tile)
    S = 3.0 * a @ b.T
    for i in range(n):
        assert abs(r[i].item() - math.log(sum(math.exp(float(S[i, j])) for j in range(n)))) < 1e-12
        assert abs(c[i].item() - math.log(sum(math.exp(float(S[j, i])) for j in range(n)))) < 1e-12
    w = torch.linspace(0.5, 2.0, 2 * n, dtype=torch.float64)
    f = lambda a, b, s: (torch.cat(K._ClipLSE.apply(a, b, s, tile)) * w).sum()
    assert torch.autograd.gradcheck(f, (leaf(a), leaf(b), leaf(s)), fast_mode=True)

def test_siglip_sums_without_grad_and_only_bias_grad():
    a, b = pair(6, 4, seed=62)
    L = 5.0 * a @ b.T - 2.0
    want = sum(math.log1p(math.exp(float(v))) for v in L.flatten())          # sum of softplus, float64 loop
    s, t = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert abs(K._SigLIPSums.apply(a, b, s, t, 4).item() - want) < 1e-12     # no input needs a gradient
    t = leaf(t)
    sp = K._SigLIPSums.apply(a, b, s, t, 4)
    gt, = torch.autograd.grad(3.0 * sp, t)                                   # a non-unit upstream gradient
    assert abs(gt.item() - 3.0 * float(torch.sigmoid(L).sum())) < 1e-12      # d/dt sum softplus = sum sigmoid

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12))
def test_wavefront_schedule_closed_form_and_latin(nb):
    W = K.wavefront_schedule(nb)
    assert W.shape == (nb, nb)
    for I in range(nb):
        for k in range(nb): assert W[I, (I + k) % nb].item() == k           # row block I meets (I + k) mod nb at step k
    for k in range(nb):                                                      # each step: distinct rows AND distinct columns
        I, J = (W == k).nonzero(as_tuple=True)
        assert sorted(I.tolist()) == list(range(nb)) and sorted(J.tolist()) == list(range(nb))

# --- the real fused CPU extension behind clip_loss / siglip_loss (built once by the fixture) -----
def test_clip_and_siglip_impl_fused_on_cpu_match_reference(monkeypatch):
    "impl='fused' on CPU runs the compiled kernels (not a fallback) and matches the float64 formulas."
    calls = []
    for name in ("fused_clip_loss", "fused_siglip_loss"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    a0, b0 = pair(11, 6, seed=63)
    a, b, s = leaf(a0), leaf(b0), torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    got = C.clip_loss(a, b, s, -2.0, 0.1, impl="fused")
    ra, rb, rs = leaf(a0), leaf(b0), leaf(s)
    want = ref_clip(ra, rb, rs, 0.1)
    assert abs(got.item() - want.item()) < 1e-10
    for x, y in zip(torch.autograd.grad(got, (a, b, s)), torch.autograd.grad(want, (ra, rb, rs))):
        assert (x - y).abs().max() < 1e-10
    t = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    got = C.siglip_loss(a, b, s, t, impl="fused")
    rt = leaf(t); want = ref_siglip(ra, rb, rs, rt)
    assert abs(got.item() - want.item()) < 1e-10
    for x, y in zip(torch.autograd.grad(got, (a, b, s, t)), torch.autograd.grad(want, (ra, rb, rs, rt))):
        assert (x - y).abs().max() < 1e-10
    assert calls == ["fused_clip_loss", "fused_siglip_loss"]

def test_fused_label_smoothing_closed_form_and_range():
    # one-hot rows at s = 100: every row and column costs eps * (100 - 100/4)
    e = torch.eye(4, dtype=torch.float64)
    for eps in (0.0, 0.1, 0.5):
        assert abs(K.fused_clip_loss(e, e, 100.0, label_smoothing=eps, tile=3).item() - 75 * eps) < 1e-10
    assert torch.isfinite(K.fused_clip_loss(e, e, 1.0, label_smoothing=0.999))
    with pytest.raises(InputError, match=r"label_smoothing.*\[0, 1\)"): K.fused_clip_loss(e, e, 1.0, label_smoothing=1.0)

def test_prepare_boundaries_dtypes_and_scalars():
    a, b = pair(5, 3, seed=64)
    with pytest.raises(ShapeError, match="B >= 1 and D >= 1"): K.fused_clip_loss(a[:0], b[:0], 1.0)
    with pytest.raises(ShapeError, match="B >= 1 and D >= 1"): K.fused_siglip_loss(a[:, :0], b[:, :0], 1.0, 0.0)
    with pytest.raises(InputError, match="tile"): K.fused_clip_loss(a, b, 1.0, tile=2.0)
    with pytest.raises(InputError, match="tile"): K.fused_siglip_loss(a, b, 1.0, 0.0, tile=-1)
    assert abs(K.fused_clip_loss(a, b, 4.0, tile=1).item() - ref_clip(a, b, 4.0).item()) < 1e-12   # tile = 1 is valid
    with pytest.raises(DeviceError, match="is on"): K.fused_clip_loss(a, b.to("meta"), 1.0)
    with pytest.raises(InputTypeError, match="logit_scale"): K.fused_clip_loss(a, b, "x")
    with pytest.raises(InputError, match="logit_bias.*finite"): K.fused_clip_loss(a, b, 1.0, logit_bias=float("nan"))
    mixed = K.fused_clip_loss(a.float(), b, 4.0)                              # float32 with float64 -> float64
    assert mixed.dtype == torch.float64
    assert abs(mixed.item() - ref_clip(a.float().double(), b, 4.0).item()) < 1e-12
    v32 = K.fused_siglip_loss(a.float(), b.float(), 4.0, -1.0)               # a Python float scale follows the inputs
    assert v32.dtype == torch.float32 and abs(v32.item() - ref_siglip(a, b, 4.0, -1.0).item()) < 1e-5
    assert torch.tensor(4.0).dtype == K._as_scalar(4.0, "s", "f", a.float()).dtype
    assert K._as_scalar(4, "s", "f", a).dtype == torch.float64
    assert K._kind(torch.zeros(1)) == "cpu" and K._kind("meta") is None and K._kind(torch.device("cuda", 0)) == "cuda"

def test_log_tail_keeps_the_end():
    assert K._log_tail(ValueError("short")) == "short"
    msg = "x" * 10 + "END"
    assert K._log_tail(ValueError(msg), n=5) == "...\nxxEND"                   # the last n characters
    assert K._log_tail(ValueError("a" * 13), n=13) == "a" * 13                # exactly n: unchanged

# --- builder: cuda_home precedence, arch, caching and env restore (load_inline faked) ---------------
def test_cuda_home_env_precedence_and_local_arch(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUDA_PATH", "/opt/cuda-path")
    assert K.cuda_home() == "/opt/cuda-path"
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda-home")
    assert K.cuda_home() == "/opt/cuda-home"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert K.local_cuda_arch() == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available(): assert K.local_cuda_arch() is None

def _fake_load_inline(monkeypatch, calls, fail=False):
    from torch.utils import cpp_extension as ce
    def load_inline(name, build_directory, verbose=False, **kw):
        calls.append(dict(name=name, build_directory=build_directory, env=dict(os.environ), **kw))
        if fail: raise RuntimeError("fake compiler says no")
        return types.SimpleNamespace(name=name)
    monkeypatch.setattr(ce, "load_inline", load_inline)

def test_build_extension_cuda_env_name_cache_and_restore(fresh_builder, monkeypatch, tmp_path):
    monkeypatch.setenv("MMLAB_KERNEL_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False); monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(K, "cuda_home", lambda: "/fake/cuda")
    calls = []; _fake_load_inline(monkeypatch, calls)
    mod = K.build_extension("cuda", arch="9.0")
    assert K.build_extension("cuda", arch="9.0") is mod and len(calls) == 1      # cached: built once
    c = calls[0]
    assert c["env"]["CUDA_HOME"] == "/fake/cuda" and c["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert c["name"].startswith("mmlab_kernels_cuda_") and c["name"].endswith("_9_0")
    assert Path(c["build_directory"]) == tmp_path / c["name"] and Path(c["build_directory"]).is_dir()
    assert c["functions"] == K.CUDA_FUNCTIONS and c["cuda_sources"] == K.CUDA_SOURCE
    assert c["cpp_sources"] == K.CUDA_DECLS and c["extra_cflags"] == ["-O3"]
    assert c["extra_cuda_cflags"] == ["-O3", "-std=c++17"]
    assert "CUDA_HOME" not in os.environ and "TORCH_CUDA_ARCH_LIST" not in os.environ   # the environment is restored
    K.build_extension("cuda", arch="8.0"); assert len(calls) == 2 and calls[1]["name"].endswith("_8_0")
    monkeypatch.setattr(K, "local_cuda_arch", lambda: "8.9")              # no arch given: the local GPU's
    K.build_extension("cuda")
    assert calls[2]["name"].endswith("_8_9") and calls[2]["env"]["TORCH_CUDA_ARCH_LIST"] == "8.9"

def test_a_tensor_picks_the_extension_of_its_device(monkeypatch):
    kinds = []
    monkeypatch.setattr(K, "build_extension", lambda kind: kinds.append(kind) or kind)
    assert K._ext_for(torch.zeros(1)) == "cpu"
    assert K._ext_for(types.SimpleNamespace(is_cuda=True)) == "cuda" and kinds == ["cpu", "cuda"]

def test_build_extension_failure_cached_and_reported(fresh_builder, monkeypatch, tmp_path):
    monkeypatch.setenv("MMLAB_KERNEL_BUILD_DIR", str(tmp_path))
    calls = []; _fake_load_inline(monkeypatch, calls, fail=True)
    with pytest.raises(KernelBuildError, match="fake compiler says no") as e1: K.build_extension("cpu")
    assert str(tmp_path) in str(e1.value) and calls[0]["functions"] == K.CPU_FUNCTIONS
    assert "-fopenmp" in calls[0]["extra_cflags"] and "-fopenmp" in calls[0]["extra_ldflags"]
    with pytest.raises(KernelBuildError) as e2: K.build_extension("cpu")       # not retried in this process
    assert e2.value is e1.value and len(calls) == 1

def test_build_extension_cuda_without_toolkit_or_gpu(fresh_builder, monkeypatch):
    monkeypatch.setattr(K, "cuda_home", lambda: None)
    with pytest.raises(KernelBuildError, match="nvcc not found"): K.build_extension("cuda")
    monkeypatch.setattr(K, "_FAILED", {})                                  # (the failure above is cached)
    monkeypatch.setattr(K, "cuda_home", lambda: "/fake/cuda")
    monkeypatch.setattr(K, "local_cuda_arch", lambda: None)
    with pytest.raises(KernelBuildError, match="no GPU to target"): K.build_extension("cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert K.fused_available(torch.zeros(1)) is True                  # a tensor names its device; cpu still builds
