"""Tests of mmlab.losses.contrastive against independent, naive float64 references.

The references below are written from the papers' formulas with explicit Python loops over samples
(and torch scalar arithmetic, so autograd gives their gradients); they share no code with the
implementation. Every loss is checked on a seeded grid of sizes and scales (values and gradients to
1e-10), with `torch.autograd.gradcheck`, closed forms, symmetry and bad input. The distributed forms
are checked with two real `gloo` processes on CPU (DistributedDataParallel) against the
single-process loss on the concatenated batch.
"""
import gc, math, os, sys, types, warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmlab
from mmlab.core import ConfigError, InputError, InputTypeError, MMLabError, NonFiniteError, ShapeError
import mmlab.losses.contrastive as C
from mmlab.losses.contrastive import (ChunkedClipLoss, IndividualTemperatureLoss, alignment_loss, clip_loss,
                                      cwcl_loss, cwcl_weights, gather_with_grad, hard_negative_mixing,
                                      isogclr_objective, mixup, mixup_contrastive_loss, mochi_loss, nt_xent_loss,
                                      siglip_loss, symile_loss, uniformity_loss)

DT = torch.float64
GRID = [(B, D, s) for B in (2, 5, 8) for D in (1, 16) for s in (1.0, 10.0, 50.0)]

# ----------------------------------------------------------------------------- naive references
def dot(x, y): return sum(x[d] * y[d] for d in range(len(x)))
def logsumexp(vals):
    m = max(float(v.detach()) if torch.is_tensor(v) else float(v) for v in vals)
    return m + torch.log(sum(torch.exp(v - m) for v in vals))

def ref_clip(a, b, s, t=0.0, eps=0.0):
    B = len(a)
    S = [[s * dot(a[i], b[j]) + t for j in range(B)] for i in range(B)]
    rows = 0.0
    for i in range(B):
        lse = logsumexp(S[i])
        rows = rows + sum(((1 - eps) * (1.0 if j == i else 0.0) + eps / B) * (lse - S[i][j]) for j in range(B))
    cols = 0.0
    for j in range(B):
        col = [S[i][j] for i in range(B)]
        lse = logsumexp(col)
        cols = cols + sum(((1 - eps) * (1.0 if i == j else 0.0) + eps / B) * (lse - col[i]) for i in range(B))
    return (rows / B + cols / B) / 2

def ref_siglip(a, b, s, t):
    B = len(a); tot = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            tot = tot + torch.log1p(torch.exp(-z * (s * dot(a[i], b[j]) + t)))   # -log sigmoid(z x)
    return tot / B

def ref_ntxent(z1, z2, tau, decoupled=False):
    B = len(z1); z = [z1[i] for i in range(B)] + [z2[i] for i in range(B)]
    tot = 0.0
    for k in range(2 * B):
        p = (k + B) % (2 * B)
        den = [dot(z[k], z[l]) / tau for l in range(2 * B) if l != k and not (decoupled and l == p)]
        tot = tot + logsumexp(den) - dot(z[k], z[p]) / tau
    return tot / (2 * B)

def ref_soft_ce(logits_rows, targets_rows):
    tot = 0.0
    for r, q in zip(logits_rows, targets_rows):
        lse = logsumexp(r)
        tot = tot + sum(q[j] * (lse - r[j]) for j in range(len(r))) / sum(q)
    return tot / len(logits_rows)

def ref_cwcl(a, b, w, s):
    B = len(a)
    S = [[s * dot(a[i], b[j]) for j in range(B)] for i in range(B)]
    ST = [[S[j][i] for j in range(B)] for i in range(B)]
    W = [[w[i][j] for j in range(B)] for i in range(B)]
    return (ref_soft_ce(S, W) + ref_soft_ce(ST, W)) / 2

def ref_isogclr_g(a, b, tau, i, image_anchor=True):
    "g_i = 1/(B-1) sum_{j != i} exp((c_ij - c_ii)/tau_i), c = a.b (image anchor) or b.a (text anchor)."
    B = len(a)
    pos = dot(a[i], b[i])
    sims = [dot(a[i], b[j]) if image_anchor else dot(a[j], b[i]) for j in range(B) if j != i]
    return sum(torch.exp((c - pos) / tau[i]) for c in sims) / (B - 1)

def ref_isogclr_objective(a, b, ta, tb, rho):
    B = len(a)
    fa = sum(ta[i] * torch.log(ref_isogclr_g(a, b, ta, i, True)) + ta[i] * rho for i in range(B)) / B
    fb = sum(tb[i] * torch.log(ref_isogclr_g(a, b, tb, i, False)) + tb[i] * rho for i in range(B)) / B
    return (fa + fb) / 2

def ref_symile(xs, s):
    M, B, D = len(xs), len(xs[0]), len(xs[0][0])
    def mip(vecs): return sum(math.prod(v[d] for v in vecs) for d in range(D))
    tot = 0.0
    for m in range(M):
        for i in range(B):
            scores = [s * mip([xs[k][j] if k == m else xs[k][i] for k in range(M)]) for j in range(B)]
            tot = tot + logsumexp(scores) - scores[i]
    return tot / (M * B)

def ref_mixup(a_mix, b, perm, lam, s):
    B = len(a_mix)
    S = [[s * dot(a_mix[i], b[j]) for j in range(B)] for i in range(B)]
    T = [[(lam if j == i else 0.0) + ((1 - lam) if j == int(perm[i]) else 0.0) for j in range(B)] for i in range(B)]
    rows = ref_soft_ce(S, T)
    cols = ref_soft_ce([[S[i][j] for i in range(B)] for j in range(B)], [[T[i][j] for i in range(B)] for j in range(B)])
    return (rows + cols) / 2

def ref_alignment(a, b, alpha):
    return sum(sum((a[i][d] - b[i][d]) ** 2 for d in range(len(a[i]))) ** (alpha / 2) for i in range(len(a))) / len(a)

def ref_uniformity(x, t):
    B = len(x); vals = []
    for i in range(B):
        for j in range(i + 1, B):
            vals.append(torch.exp(-t * sum((x[i][d] - x[j][d]) ** 2 for d in range(len(x[i])))))
    return torch.log(sum(vals) / len(vals))

def ref_mochi_logits(q, k, s, n_hard, n_mix, n_query_mix, beta_max, seed):
    "MoCHi logits with the documented draws (pairs, alpha, picks, beta), per query in loops."
    B, D = q.shape
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(n_hard, (B, n_mix, 2), generator=g)
    alpha = torch.rand(B, n_mix, 1, generator=g, dtype=q.dtype)
    picks = torch.randint(n_hard, (B, n_query_mix), generator=g)
    beta = beta_max * torch.rand(B, n_query_mix, 1, generator=g, dtype=q.dtype)
    rows = []
    for i in range(B):
        negs = [k[j] for j in range(B) if j != i]
        row = [dot(q[i], k[i])] + [dot(q[i], n) for n in negs]
        order = sorted(range(len(negs)), key=lambda j: -float(dot(q[i], negs[j]).detach()))[:n_hard]
        hard = [negs[j].detach() for j in order]
        for m in range(n_mix):
            h = alpha[i, m, 0] * hard[int(pairs[i, m, 0])] + (1 - alpha[i, m, 0]) * hard[int(pairs[i, m, 1])]
            row.append(dot(q[i], h / torch.sqrt(dot(h, h))))
        for m in range(n_query_mix):
            h = beta[i, m, 0] * q[i].detach() + (1 - beta[i, m, 0]) * hard[int(picks[i, m])]
            row.append(dot(q[i], h / torch.sqrt(dot(h, h))))
        rows.append([s * v for v in row])
    return rows

# ----------------------------------------------------------------------------- helpers
def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)

def pair(B, D, seed=0):
    a = unit(B, D, seed=seed)
    b = F.normalize(a + 0.8 * unit(B, D, seed=seed + 1000), dim=-1) if D > 1 else unit(B, D, seed=seed + 1000)
    return a, b

def value_and_grads(f, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = f(*xs)
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]

def assert_match(f, ref, *xs, tol=1e-10):
    v1, g1 = value_and_grads(f, *xs)
    v2, g2 = value_and_grads(ref, *xs)
    assert abs(v1.item() - float(v2)) <= tol * max(1.0, abs(float(v2))), (v1.item(), float(v2))
    for i, (x, y) in enumerate(zip(g1, g2)):
        assert (x - y).abs().max().item() <= tol, f"gradient {i}: max diff {(x - y).abs().max().item():.3e}"

def sc(v): return torch.tensor(v, dtype=DT)

# ----------------------------------------------------------------------------- reference grids
@pytest.mark.parametrize("B,D,s", GRID)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_clip_matches_reference(B, D, s, impl):
    a, b = pair(B, D, seed=B * 100 + D)
    for eps, t in ((0.0, None), (0.1, -2.0)):
        f = lambda a, b, s_, t_: clip_loss(a, b, s_, t_, eps, impl=impl, chunk_size=3)
        r = lambda a, b, s_, t_: ref_clip(a, b, s_, t_, eps)
        assert_match(f, r, a, b, sc(s), sc(0.0 if t is None else t))

@pytest.mark.parametrize("B,D,s", GRID)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_siglip_matches_reference(B, D, s, impl):
    a, b = pair(B, D, seed=B * 100 + D + 1)
    for t in (-10.0, 0.0, 3.0):
        assert_match(lambda a, b, s_, t_: siglip_loss(a, b, s_, t_, impl=impl, chunk_size=3), ref_siglip,
                     a, b, sc(s), sc(t))

@pytest.mark.parametrize("B,D,s", GRID)
@pytest.mark.parametrize("decoupled", [False, True])
def test_ntxent_matches_reference(B, D, s, decoupled):
    z1, z2 = pair(B, D, seed=B + D)
    tau = 1 / s
    if decoupled and B == 2 and D == 1:
        pass  # still well defined: 2 negatives per view
    assert_match(lambda x, y: nt_xent_loss(x, y, tau, decoupled), lambda x, y: ref_ntxent(x, y, tau, decoupled), z1, z2)

@pytest.mark.parametrize("B,D,s", GRID)
def test_cwcl_matches_reference(B, D, s):
    a, b = pair(B, D, seed=7 * B + D)
    w = cwcl_weights(a)
    assert_match(lambda a, b: cwcl_loss(a, b, w, s), lambda a, b: ref_cwcl(a, b, w, s), a, b)
    wr = torch.rand(B, B, generator=torch.Generator().manual_seed(B), dtype=DT)   # asymmetric weights
    assert_match(lambda a, b: cwcl_loss(a, b, wr, s), lambda a, b: ref_cwcl(a, b, wr, s), a, b)

@pytest.mark.parametrize("B,D,s", GRID)
@pytest.mark.parametrize("M", [2, 3, 4])
def test_symile_matches_reference(B, D, s, M):
    xs = [unit(B, D, seed=31 * m + B + D) for m in range(M)]
    assert_match(lambda *xs: symile_loss(list(xs), s), lambda *xs: ref_symile(list(xs), s), *xs)

@pytest.mark.parametrize("B,D,s", GRID)
def test_mixup_matches_reference(B, D, s):
    a, b = pair(B, D, seed=B * 3 + D)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(B))
    for lam in (0.0, 0.3, 1.0):
        assert_match(lambda a, b: mixup_contrastive_loss(a, b, perm, lam, s),
                     lambda a, b: ref_mixup(a, b, perm, lam, s), a, b)

@pytest.mark.parametrize("B,D", [(B, D) for B in (2, 5, 8) for D in (1, 16)])
def test_alignment_uniformity_match_reference(B, D):
    a, b = pair(B, D, seed=B * 5 + D)
    for alpha in (1.0, 2.0, 3.0):
        if alpha < 2 and D == 1: continue   # |a-b| can be 0 for D=1 (non-differentiable point)
        assert_match(lambda a, b: alignment_loss(a, b, alpha), lambda a, b: ref_alignment(a, b, alpha), a, b)
    for t in (0.5, 2.0, 5.0):
        assert_match(lambda x: uniformity_loss(x, t), lambda x: ref_uniformity(x, t), a)

@pytest.mark.parametrize("B,D", [(B, D) for B in (2, 5, 8) for D in (1, 16)])
def test_isogclr_objective_matches_reference(B, D):
    a, b = pair(B, D, seed=B * 11 + D)
    g = torch.Generator().manual_seed(B + D)
    ta, tb = 0.05 + torch.rand(B, generator=g, dtype=DT), 0.05 + torch.rand(B, generator=g, dtype=DT)
    for rho in (0.1, 2.0):
        assert_match(lambda a, b, x, y: isogclr_objective(a, b, x, y, rho),
                     lambda a, b, x, y: ref_isogclr_objective(a, b, x, y, rho), a, b, ta, tb)

@pytest.mark.parametrize("B,D", [(5, 16), (8, 3)])
def test_mochi_matches_reference(B, D):
    q, k = pair(B, D, seed=B + 2 * D)
    kw = dict(n_hard=3, n_mix=4, n_query_mix=2, beta_max=0.5)
    f = lambda q, k: hard_negative_mixing(q, k, 7.0, generator=torch.Generator().manual_seed(3), **kw)
    for col in range(1 + (B - 1) + 6):
        assert_match(lambda q, k: f(q, k)[:, col].sum(),
                     lambda q, k: sum(r[col] for r in ref_mochi_logits(q, k, 7.0, seed=3, **kw)), q, k)
    # the loss is the cross-entropy of these logits with the positive in column 0
    logits = f(q, k)
    torch.testing.assert_close(mochi_loss(q, k, 7.0, generator=torch.Generator().manual_seed(3), **kw),
                               F.cross_entropy(logits, torch.zeros(B, dtype=torch.long)), rtol=0, atol=1e-12)

def test_mochi_shared_negatives_and_hardness():
    q, k = pair(6, 8, seed=1)
    queue = unit(20, 8, seed=2)
    L = hard_negative_mixing(q, k, 1.0, negatives=queue, n_hard=5, n_mix=7, n_query_mix=3,
                             generator=torch.Generator().manual_seed(0))
    assert L.shape == (6, 1 + 20 + 7 + 3)
    torch.testing.assert_close(L[:, 1:21], q @ queue.T)
    hardest5 = (q @ queue.T).topk(5, 1).values
    # a normalised convex mix of two hard negatives is at least as similar as the weaker one of them (<=1 norm)
    assert (L[:, 21:28] >= hardest5[:, -1:] - 1e-12).all()

# ----------------------------------------------------------------------------- iSogCLR estimator
def test_isogclr_module_gradient_estimator():
    "Module gradients = tau/u grad g and log u + rho + tau/u dg/dtau with the moving average u (gamma < 1)."
    B, n, gamma, rho = 5, 9, 0.7, 1.5
    a, b = pair(B, 4, seed=3)
    idx = torch.tensor([1, 3, 4, 6, 8])
    crit = IndividualTemperatureLoss(n, rho=rho, gamma=gamma, tau_init=0.2).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        crit.tau_a.copy_(0.1 + 0.3 * torch.rand(n, generator=g, dtype=DT))
        crit.tau_b.copy_(0.1 + 0.3 * torch.rand(n, generator=g, dtype=DT))
        u_old_a = 0.5 + torch.rand(n, generator=g, dtype=DT); u_old_b = 0.5 + torch.rand(n, generator=g, dtype=DT)
        crit.log_u_a.copy_(u_old_a.log()); crit.log_u_b.copy_(u_old_b.log())
    # implementation
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    val = crit(aa, bb, idx); val.backward()
    # reference: explicit estimator from the paper, with u = (1-gamma) u_old + gamma g (g detached)
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ta = crit.tau_a.detach()[idx].clone().requires_grad_(); tb = crit.tau_b.detach()[idx].clone().requires_grad_()
    surr, value = 0.0, 0.0
    for tau, u_old, image in ((ta, u_old_a[idx], True), (tb, u_old_b[idx], False)):
        for i in range(B):
            gi = ref_isogclr_g(a2, b2, tau, i, image)
            u = (1 - gamma) * u_old[i] + gamma * gi.detach()
            surr = surr + (tau[i].detach() / u) * gi + tau[i] * (torch.log(u) + rho)
            value = value + tau[i].detach() * (torch.log(u) + rho)
            if image: assert abs(crit.log_u_a[idx[i]].item() - math.log(u.item())) < 1e-12
            else: assert abs(crit.log_u_b[idx[i]].item() - math.log(u.item())) < 1e-12
    surr, value = surr / (2 * B), value / (2 * B)
    surr.backward()
    assert abs(val.item() - value.item()) < 1e-12
    for x, y in ((aa.grad, a2.grad), (bb.grad, b2.grad), (crit.tau_a.grad[idx], ta.grad), (crit.tau_b.grad[idx], tb.grad)):
        assert (x - y).abs().max().item() < 1e-10
    # samples outside the batch get no gradient and keep their u
    others = torch.tensor([0, 2, 5, 7])
    assert (crit.tau_a.grad[others] == 0).all() and torch.equal(crit.log_u_a[others], u_old_a[others].log())

def test_isogclr_first_update_and_bad_index():
    crit = IndividualTemperatureLoss(6, gamma=0.5, tau_init=0.1).double()
    a, b = pair(4, 3, seed=4)
    crit(a, b, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(crit.log_u_a[:4]).all() and torch.isinf(crit.log_u_a[4:]).all()
    with pytest.raises(InputError, match="distinct"): crit(a, b, torch.tensor([0, 0, 1, 2]))
    with pytest.raises(InputError, match="distinct"): crit(a, b, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(InputError, match="gamma"): IndividualTemperatureLoss(6, gamma=0.0)

# ----------------------------------------------------------------------------- gradcheck (float64)
def _gc(f, *xs):
    xs = tuple(x.detach().clone().requires_grad_() for x in xs)
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7)

@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_gradcheck_clip_siglip(impl):
    a, b = pair(6, 5, seed=9)
    _gc(lambda a, b, s, t: clip_loss(a, b, s, t, 0.1, impl=impl, chunk_size=4), a, b, sc(4.0), sc(-1.0))
    _gc(lambda a, b, s, t: siglip_loss(a, b, s, t, impl=impl, chunk_size=4), a, b, sc(4.0), sc(-1.0))

def test_gradcheck_others():
    a, b = pair(5, 4, seed=10)
    c = unit(5, 4, seed=11)
    _gc(lambda x, y: nt_xent_loss(x, y, 0.3), a, b)
    _gc(lambda x, y: nt_xent_loss(x, y, 0.3, decoupled=True), a, b)
    _gc(lambda x, y, s: cwcl_loss(x, y, cwcl_weights(a), s), a, b, sc(3.0))
    _gc(lambda x, y, z, s: symile_loss([x, y, z], s), a, b, c, sc(3.0))
    _gc(lambda x, y, s: mixup_contrastive_loss(x, y, torch.tensor([2, 0, 1, 4, 3]), 0.6, s), a, b, sc(3.0))
    _gc(lambda x, y: alignment_loss(x, y, 2.0), a, b)
    _gc(lambda x: uniformity_loss(x, 2.0), a)
    _gc(lambda x, y, ta, tb: isogclr_objective(x, y, ta, tb, 1.0), a, b, 0.2 + torch.rand(5, dtype=DT), 0.2 + torch.rand(5, dtype=DT))
    # MoCHi stops the gradient through its synthetic negatives (as the paper), so finite differences
    # agree only where those points do not depend on the inputs: a fixed queue, no query mixes. The
    # stop-gradient itself is checked against the reference in test_mochi_matches_reference.
    queue = unit(7, 4, seed=12)
    _gc(lambda x, y, s: mochi_loss(x, y, s, negatives=queue, n_hard=3, n_mix=4, n_query_mix=0,
                                   generator=torch.Generator().manual_seed(0)), a, b, sc(3.0))

def test_gradcheck_isogclr_module():
    a, b = pair(4, 3, seed=12)
    def f(x, y):   # fresh state each call: gamma=1 makes u = g of the current batch
        crit = IndividualTemperatureLoss(4, gamma=1.0, tau_init=0.3).double()
        return crit(x, y, torch.arange(4))
    _gc(f, a, b)

# ----------------------------------------------------------------------------- closed forms, symmetry
def test_closed_forms():
    e = torch.eye(4, dtype=DT)
    for impl in ("naive", "chunked"):
        assert 0 <= clip_loss(e, e, 100.0, impl=impl).item() < 1e-40                  # ~ 3 e^-100
        # positives at logit 100 cost ~0; the 12 negatives at logit 0 cost log 2 each; divided by B = 4
        assert abs(siglip_loss(e, e, 100.0, 0.0, impl=impl).item() - 3 * math.log(2)) < 1e-12
    assert siglip_loss(e, e, 100.0, -50.0).item() < 1e-20                        # with the bias both classes are certain
    assert nt_xent_loss(e, e, 0.01).item() < 1e-40
    assert symile_loss([e, e, e], 100.0).item() < 1e-40
    assert mixup_contrastive_loss(e, e, torch.arange(4), 0.5, 100.0).item() < 1e-40
    x = F.normalize(torch.ones(6, 3, dtype=DT), dim=-1)
    for impl in ("naive", "chunked"):
        assert abs(clip_loss(x, x, 13.0, impl=impl, chunk_size=4).item() - math.log(6)) < 1e-12
    assert abs(nt_xent_loss(x, x, 0.5).item() - math.log(11)) < 1e-12
    assert abs(nt_xent_loss(x, x, 0.5, decoupled=True).item() - math.log(10)) < 1e-12
    assert abs(uniformity_loss(x).item()) < 1e-12 and alignment_loss(x, x).item() == 0
    # antipodal pair: ||x - y||^2 = 4
    y = torch.tensor([[1.0, 0], [-1, 0]], dtype=DT)
    assert abs(uniformity_loss(y, 2.0).item() + 8) < 1e-12
    assert abs(alignment_loss(y, y.flip(0), 2.0).item() - 4) < 1e-12

def test_symmetry():
    a, b = pair(7, 6, seed=13)
    for impl in ("naive", "chunked"):
        torch.testing.assert_close(clip_loss(a, b, 8.0, impl=impl, chunk_size=3), clip_loss(b, a, 8.0, impl=impl, chunk_size=3), rtol=0, atol=1e-12)
        torch.testing.assert_close(siglip_loss(a, b, 8.0, -3.0, impl=impl), siglip_loss(b, a, 8.0, -3.0, impl=impl), rtol=0, atol=1e-12)
    torch.testing.assert_close(nt_xent_loss(a, b, 0.2), nt_xent_loss(b, a, 0.2), rtol=0, atol=1e-12)
    torch.testing.assert_close(alignment_loss(a, b), alignment_loss(b, a), rtol=0, atol=1e-12)
    w = cwcl_weights(a)   # symmetric weights -> symmetric loss
    torch.testing.assert_close(cwcl_loss(a, b, w, 5.0), cwcl_loss(b, a, w, 5.0), rtol=0, atol=1e-12)
    c = unit(7, 6, seed=14)
    torch.testing.assert_close(symile_loss([a, b, c], 5.0), symile_loss([c, a, b], 5.0), rtol=0, atol=1e-12)
    # permuting the batch consistently changes nothing
    p = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip_loss(a[p], b[p], 8.0, 0.0, 0.1), clip_loss(a, b, 8.0, 0.0, 0.1), rtol=0, atol=1e-12)

def test_reductions_to_clip():
    a, b = pair(9, 5, seed=15)
    ref = clip_loss(a, b, 6.0, impl="naive")
    torch.testing.assert_close(cwcl_loss(a, b, torch.eye(9, dtype=DT), 6.0), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(symile_loss([a, b], 6.0), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixup_contrastive_loss(a, b, torch.randperm(9), 1.0, 6.0), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixup(a, 1.0, torch.randperm(9)), a)

def test_chunked_large_and_float32():
    "Chunk sizes that do/don't divide B, chunk >= B, float32, bias gradient of CLIP is ~0."
    a, b = pair(50, 8, seed=16)
    for chunk in (1, 7, 50, 64):
        for f in (lambda impl: clip_loss(a32, b32, s, t, 0.05, impl=impl, chunk_size=chunk),
                  lambda impl: siglip_loss(a32, b32, s, t, impl=impl, chunk_size=chunk)):
            a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
            s, t = torch.tensor(20.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
            v0 = f("naive"); g0 = torch.autograd.grad(v0, [a32, b32, s, t])
            v1 = f("chunked"); g1 = torch.autograd.grad(v1, [a32, b32, s, t])
            torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
            for x, y in zip(g1, g0): torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)

def test_chunked_never_materialises_full_logits():
    "Every tensor saved for backward by the chunked forms is O(B*D) or O(B), never B x B."
    B, D = 256, 8
    a, b = (x.requires_grad_() for x in pair(B, D, seed=17))
    sizes = []
    def pack(t): sizes.append(t.numel()); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        clip_loss(a, b, 10.0, impl="chunked", chunk_size=16)
        siglip_loss(a, b, 10.0, -5.0, impl="chunked", chunk_size=16)
    assert max(sizes) <= B * D
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        clip_loss(a, b, 10.0, impl="naive")
    assert max(sizes) >= B * B   # the naive form does keep the logits (the point of the chunked one)

# ----------------------------------------------------------------------------- precision
ALL_LOSSES = {
    "clip_naive": lambda a, b: clip_loss(a, b, 50.0, -1.0, 0.1, impl="naive"),
    "clip_chunked": lambda a, b: clip_loss(a, b, 50.0, -1.0, 0.1, impl="chunked", chunk_size=5),
    "siglip_naive": lambda a, b: siglip_loss(a, b, 50.0, -5.0, impl="naive"),
    "siglip_chunked": lambda a, b: siglip_loss(a, b, 50.0, -5.0, impl="chunked", chunk_size=5),
    "ntxent": lambda a, b: nt_xent_loss(a, b, 0.05, decoupled=True),
    "cwcl": lambda a, b: cwcl_loss(a, b, torch.eye(len(a)), 50.0),
    "symile": lambda a, b: symile_loss([a, b, b], 50.0),
    "mixup": lambda a, b: mixup_contrastive_loss(a, b, torch.arange(len(a)).flip(0), 0.7, 50.0),
    "mochi": lambda a, b: mochi_loss(a, b, 50.0, n_hard=3, n_mix=2, n_query_mix=1, generator=torch.Generator().manual_seed(0)),
    "align": lambda a, b: alignment_loss(a, b), "unif": lambda a, b: uniformity_loss(a),
    "isog": lambda a, b: isogclr_objective(a, b, torch.full((len(a),), 0.1), torch.full((len(a),), 0.2)),
}

@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_autocast_region_computes_in_float32(name):
    "Inside a bf16 autocast region every loss gives its float32 value and float32 gradients."
    a, b = (x.float() for x in pair(24, 16, seed=28))
    f = ALL_LOSSES[name]
    v32, g32 = value_and_grads(f, a, b)
    xs = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):       # forward in the region, backward outside (as recommended)
        v_ac = f(*xs)
    g_ac = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, torch.autograd.grad(v_ac, xs, allow_unused=True))]
    assert v_ac.dtype == torch.float32 and abs(v_ac - v32).item() < 1e-5 * max(1, abs(v32.item()))
    for x, y in zip(g_ac, g32): assert x.dtype == torch.float32 and (x - y).abs().max().item() < 1e-5

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_embeddings_accepted_and_upcast(dtype):
    a, b = pair(24, 16, seed=29)
    # normalising in 16 bits leaves norm errors of ~4e-3: accepted (tolerance 1e-2 for 16-bit inputs)
    assert torch.isfinite(clip_loss(F.normalize(a.to(dtype), dim=-1), F.normalize(b.to(dtype), dim=-1), 5.0))
    g = torch.Generator().manual_seed(30)  # +-1/4 entries in D=16: unit vectors exactly representable in 16 bits
    ah, bh = ((torch.randint(0, 2, (24, 16), generator=g) * 0.5 - 0.25).to(dtype) for _ in range(2))
    for name, f in ALL_LOSSES.items():
        # cwcl/isog take extra float32 tensors; mochi's draws depend on the dtype and +-1/4 vectors tie in top-k
        if name in ("cwcl", "isog", "mochi"): continue
        v = f(ah.requires_grad_(), bh.requires_grad_())
        ref = f(ah.detach().double(), bh.detach().double())
        assert v.dtype == torch.float32, name
        assert abs(v.item() - ref.item()) < 1e-4 * max(1, abs(ref.item())), (name, v.item(), ref.item())
        ga, = torch.autograd.grad(v, ah)
        assert ga.dtype == dtype and torch.isfinite(ga).all(), name
    with pytest.raises(InputError, match="L2-normalised"): clip_loss(1.05 * ah, bh, 5.0)

# ----------------------------------------------------------------------------- dispatch
def _fake_kernels(monkeypatch, available, calls):
    fake = types.ModuleType("mmlab.kernels")
    fake.fused_available = lambda device: available
    def fused_clip_loss(a, b, logit_scale, logit_bias=None, label_smoothing=0.0):
        calls.append("clip"); return C._clip_naive(a, b, logit_scale, logit_bias, label_smoothing)
    def fused_siglip_loss(a, b, logit_scale, logit_bias):
        calls.append("siglip"); return C._siglip_naive(a, b, logit_scale, logit_bias)
    fake.fused_clip_loss, fake.fused_siglip_loss = fused_clip_loss, fused_siglip_loss
    monkeypatch.setitem(sys.modules, "mmlab.kernels", fake)
    monkeypatch.setattr(mmlab, "kernels", fake, raising=False)

def test_dispatch_auto(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, True, calls)
    cuda = torch.device("cuda")        # _pick_impl only inspects the device type; no GPU is needed
    assert C._pick_impl("auto", 8, None, cuda, "t") == "naive"
    assert C._pick_impl("auto", 8, 4, cuda, "t") == "chunked"
    assert C._pick_impl("auto", 4096, None, cuda, "t") == "fused"
    assert C._pick_impl("auto", 4096, None, "cpu", "t") == "chunked"      # never compiles behind the user's back on CPU
    assert C._pick_impl("auto", 4096, 256, cuda, "t") == "chunked"        # an explicit chunk size asks for chunked
    _fake_kernels(monkeypatch, False, calls)
    assert C._pick_impl("auto", 4096, None, cuda, "t") == "chunked"
    big = (unit(4096, 2, seed=19), unit(4096, 2, seed=20))
    monkeypatch.setattr(C, "_clip_naive", lambda *a, **k: pytest.fail("naive used at B=4096"))
    assert torch.isfinite(clip_loss(*big, 10.0)) and calls == []

def test_fused_is_called_when_available(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, True, calls)
    a, b = pair(6, 4, seed=21)
    torch.testing.assert_close(clip_loss(a, b, 5.0, -1.0, 0.1, impl="fused"), clip_loss(a, b, 5.0, -1.0, 0.1, impl="naive"))
    torch.testing.assert_close(siglip_loss(a, b, 5.0, -1.0, impl="fused"), siglip_loss(a, b, 5.0, -1.0, impl="naive"))
    assert calls == ["clip", "siglip"]

def test_fused_unavailable_device_falls_back_without_second_warning(monkeypatch):
    "When mmlab.kernels exists but has no kernel for the device, its fused_available warns; the loss adds nothing."
    calls = []
    _fake_kernels(monkeypatch, False, calls)
    monkeypatch.setattr(C, "_warned_fused", set())
    a, b = pair(6, 4, seed=21)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v = clip_loss(a, b, 5.0, impl="fused")
    assert [x for x in w if "falling back" in str(x.message)] == [] and calls == []
    torch.testing.assert_close(v, clip_loss(a, b, 5.0, impl="naive"), rtol=0, atol=1e-12)

def test_fused_falls_back_without_kernels_module_warning_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmlab.kernels", None)      # import of mmlab.kernels raises ImportError
    monkeypatch.delattr(mmlab, "kernels", raising=False)
    monkeypatch.setattr(C, "_warned_fused", set())
    a, b = pair(6, 4, seed=22)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vals = [clip_loss(a, b, 5.0, impl="fused") for _ in range(3)] + [siglip_loss(a, b, 5.0, -1.0, impl="fused") for _ in range(2)]
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 2 and "clip_loss" in msgs[0] and "siglip_loss" in msgs[1]      # one per loss
    torch.testing.assert_close(vals[0], clip_loss(a, b, 5.0, impl="naive"), rtol=0, atol=1e-12)
    torch.testing.assert_close(vals[-1], siglip_loss(a, b, 5.0, -1.0, impl="naive"), rtol=0, atol=1e-12)

@pytest.mark.slow
@pytest.mark.skipif("slow" not in os.environ.get("MMLAB_TEST_FLAGS", "").split(), reason="builds the C++ kernels; MMLAB_TEST_FLAGS=slow")
def test_real_fused_kernels_match_chunked():
    "With the real mmlab.kernels (C++ build on first use), fused = chunked in value and gradients."
    kernels = pytest.importorskip("mmlab.kernels")
    if not kernels.fused_available("cpu"): pytest.skip("fused CPU kernels unavailable")
    a, b = pair(33, 16, seed=27)
    for f in (lambda impl: lambda a, b, s, t: clip_loss(a, b, s, t, 0.1, impl=impl),
              lambda impl: lambda a, b, s, t: siglip_loss(a, b, s, t, impl=impl)):
        v0, g0 = value_and_grads(f("chunked"), a, b, sc(7.0), sc(-2.0))
        v1, g1 = value_and_grads(f("fused"), a, b, sc(7.0), sc(-2.0))
        assert abs(v0 - v1).item() < 1e-9
        for x, y in zip(g0, g1): assert (x - y).abs().max().item() < 1e-9

# ----------------------------------------------------------------------------- modules
def test_modules_learnable_scale_and_clamp():
    a, b = pair(6, 4, seed=23)
    m = C.ClipLoss(init_scale=100.0).double()
    assert m.logit_scale.item() == pytest.approx(100.0, rel=1e-6)   # the cap itself is a valid start
    m = C.ClipLoss(init_scale=5.0).double()
    m(a, b).backward()
    assert m.log_scale.grad is not None and m.log_scale.grad.abs() > 0
    torch.testing.assert_close(C.ClipLoss(5.0, label_smoothing=0.1).double()(a, b), clip_loss(a, b, 5.0, None, 0.1))
    s = C.SigLipLoss().double()
    torch.testing.assert_close(s(a, b), siglip_loss(a, b, 10.0, -10.0))
    s(a, b).backward()
    assert s.logit_bias.grad.abs() > 0 and s.log_scale.grad.abs() > 0
    assert not C.ClipLoss(learnable=False).log_scale.requires_grad

# ----------------------------------------------------------------------------- bad input
BAD = [
    lambda a, b: clip_loss(a, b[:3], 5.0),
    lambda a, b: siglip_loss(a, b[:3], 5.0, 0.0),
    lambda a, b: nt_xent_loss(a, b[:3]),
    lambda a, b: cwcl_loss(a, b[:3], torch.eye(4, dtype=DT), 5.0),
    lambda a, b: symile_loss([a, b, b[:3]], 5.0),
    lambda a, b: mixup_contrastive_loss(a, b[:3], torch.arange(4), 0.5, 5.0),
    lambda a, b: alignment_loss(a, b[:3]),
    lambda a, b: hard_negative_mixing(a, b[:3], 5.0, n_hard=2),
    lambda a, b: isogclr_objective(a, b[:3], torch.ones(4, dtype=DT), torch.ones(4, dtype=DT)),
]

def test_bad_input_mismatched_batch():
    a, b = pair(4, 3, seed=24)
    for f in BAD:
        with pytest.raises(ShapeError, match="B=4"): f(a, b)

def test_bad_input_not_2d_unnormalised_nonfinite_b1():
    a, b = pair(4, 3, seed=25)
    nan = a.clone(); nan[1, 2] = float("inf")
    fs = {"clip": lambda a, b: clip_loss(a, b, 5.0), "siglip": lambda a, b: siglip_loss(a, b, 5.0, -1.0),
          "ntxent": lambda a, b: nt_xent_loss(a, b), "cwcl": lambda a, b: cwcl_loss(a, b, torch.eye(len(a), dtype=DT), 5.0),
          "symile": lambda a, b: symile_loss([a, b, b], 5.0), "mix": lambda a, b: mixup_contrastive_loss(a, b, torch.arange(len(a)), 0.5, 5.0),
          "mochi": lambda a, b: hard_negative_mixing(a, b, 5.0, n_hard=1),
          "unif": lambda a, b: uniformity_loss(a), "align": lambda a, b: alignment_loss(a, b),
          "isog": lambda a, b: isogclr_objective(a, b, torch.ones(len(a), dtype=DT), torch.ones(len(a), dtype=DT))}
    for name, f in fs.items():
        with pytest.raises(ShapeError, match="2-D"): f(a[0], b[0])
        with pytest.raises(ShapeError, match="2-D"): f(a[None], b[None])
        with pytest.raises(InputError, match="L2-normalised"): f(2 * a, b)
        with pytest.raises(NonFiniteError, match="non-finite"): f(nan, b)
        with pytest.raises(InputTypeError): f(a.numpy(), b)
        if name != "align":   # alignment of a single pair is well defined
            with pytest.raises(InputError, match="at least 2"): f(a[:1], b[:1])
    assert alignment_loss(a[:1], b[:1]).item() >= 0
    with pytest.raises(InputTypeError, match="dtype"): clip_loss(a, b.float(), 5.0)
    with pytest.raises(ShapeError, match="scalar"): clip_loss(a, b, torch.ones(2))
    with pytest.raises(InputError, match="finite"): siglip_loss(a, b, 5.0, float("nan"))
    with pytest.raises(InputError, match="label_smoothing"): clip_loss(a, b, 5.0, label_smoothing=1.0)
    with pytest.raises(InputError, match="chunk_size"): clip_loss(a, b, 5.0, chunk_size=0)
    with pytest.raises(InputError, match="temperature"): nt_xent_loss(a, b, 0.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"): cwcl_loss(a, b, -torch.eye(4, dtype=DT), 5.0)
    with pytest.raises(InputError, match="positive sum"): cwcl_loss(a, b, torch.zeros(4, 4, dtype=DT), 5.0)
    with pytest.raises(ShapeError): cwcl_loss(a, b, torch.eye(3, dtype=DT), 5.0)
    with pytest.raises(InputError, match="permutation"): mixup_contrastive_loss(a, b, torch.tensor([0, 0, 1, 2]), 0.5, 5.0)
    with pytest.raises(InputError, match="lam"): mixup_contrastive_loss(a, b, torch.arange(4), 1.5, 5.0)
    with pytest.raises(InputTypeError, match="list"): symile_loss(a, 5.0)
    with pytest.raises(InputError, match="n_hard"): hard_negative_mixing(a, b, 5.0, n_hard=4)
    for e in (ShapeError, InputError, NonFiniteError, InputTypeError): assert issubclass(e, MMLabError)

# ----------------------------------------------------------------------------- distributed (2 x gloo)
WORLD, B_LOCAL, D_IN, D_OUT = 2, 3, 5, 4

class _Towers(nn.Module):
    "Two linear towers + learnable scale and bias; outputs normalised embeddings."
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pa = nn.Parameter(torch.randn(D_IN, D_OUT, generator=g, dtype=DT))
        self.pb = nn.Parameter(torch.randn(D_IN, D_OUT, generator=g, dtype=DT))
        self.log_scale = nn.Parameter(torch.tensor(math.log(4.0), dtype=DT))
        self.bias = nn.Parameter(torch.tensor(-1.5, dtype=DT))
    def forward(self, xa, xb):
        return F.normalize(xa @ self.pa, dim=-1), F.normalize(xb @ self.pb, dim=-1), self.log_scale.exp(), self.bias

def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=DT), torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=DT)

CASES = [(loss, impl, local) for loss in ("clip", "siglip") for impl in ("naive", "chunked") for local in (False, True)]

def _loss(name, a, b, s, t, **kw):
    if name == "clip": return clip_loss(a, b, s, t, 0.1, chunk_size=2, **kw)
    return siglip_loss(a, b, s, t, chunk_size=2, **kw)

# labels of the whole batch for the label-aware runs: class 0 and 1 repeat within and across the two ranks
LABELS_ALL = torch.tensor([0, 1, 0, 1, 2, 0])

def _dist_worker(rank, store, out, with_labels=False):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)   # a file: no port to race for
    try:
        xa, xb = _data()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        kw = dict(labels=LABELS_ALL[sl]) if with_labels else {}
        res = {}
        for name, impl, local in CASES:
            model = DDP(_Towers())                                   # averages gradients over ranks
            a, b, s, t = model(xa[sl], xb[sl])
            loss = _loss(name, a, b, s, t, impl=impl, distributed=True, local_loss=local, **kw)
            loss.backward()
            mean_loss = loss.detach().clone(); dist.all_reduce(mean_loss); mean_loss /= WORLD
            res[(name, impl, local)] = (loss.item(), mean_loss.item(), {k: p.grad.clone() for k, p in model.module.named_parameters()})
        # unequal shapes are refused with a clear error (embeddings, and labels when given)
        try: gather_with_grad(torch.zeros(rank + 1, 2, dtype=DT)); res["unequal"] = None
        except ShapeError as e: res["unequal"] = str(e)
        if with_labels:
            try: C._gather_labels(torch.zeros(rank + 1, dtype=torch.long), None, "clip_loss"); res["unequal_labels"] = None
            except ShapeError as e: res["unequal_labels"] = str(e)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        del model; gc.collect()        # DDP's reducer goes before the group does
        dist.barrier()                 # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()

def _check_gloo_against_single_process(tmp_path, with_labels):
    "Run the two-process worker; every case's mean loss and DDP gradients equal the single-process loss on the whole batch."
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path), with_labels), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    xa, xb = _data()
    kw = dict(labels=LABELS_ALL) if with_labels else {}
    for case in CASES:
        name, impl, local = case
        model = _Towers()
        a, b, s, t = model(xa, xb)
        ref = _loss(name, a, b, s, t, impl="naive", **kw)         # single process, concatenated batch
        ref.backward()
        for r in range(WORLD):
            loss, mean_loss, grads = res[r][case]
            assert abs(mean_loss - ref.item()) < 1e-12, (case, mean_loss, ref.item())
            if not local: assert abs(loss - ref.item()) < 1e-12, case       # global loss: same on every rank
            for k, p in model.named_parameters():
                assert (grads[k] - p.grad).abs().max().item() < 1e-12, (case, r, k)
    for r in range(WORLD): assert res[r]["unequal"] is not None and "same shape" in res[r]["unequal"]
    return res, xa, xb

def test_distributed_gloo_matches_single_process(tmp_path):
    _check_gloo_against_single_process(tmp_path, with_labels=False)

def test_distributed_gloo_labels_match_single_process(tmp_path):
    "Labels gathered over two real gloo ranks: global and local label-aware losses and gradients = one process on the whole batch."
    res, xa, xb = _check_gloo_against_single_process(tmp_path, with_labels=True)
    for r in range(WORLD):
        assert res[r]["unequal_labels"] is not None and "clip_loss: labels: every rank must pass the same shape" in res[r]["unequal_labels"]
    # the labels matter: the label-aware single-process loss differs from the plain one on this batch
    a, b, s, t = _Towers()(xa, xb)
    assert abs(_loss("clip", a, b, s, t, labels=LABELS_ALL) - _loss("clip", a, b, s, t)).item() > 1e-3

def test_distributed_flag_without_process_group_is_plain_loss():
    a, b = pair(5, 4, seed=26)
    torch.testing.assert_close(clip_loss(a, b, 5.0, distributed=True), clip_loss(a, b, 5.0), rtol=0, atol=0)
    torch.testing.assert_close(siglip_loss(a, b, 5.0, -1.0, distributed=True, local_loss=True), siglip_loss(a, b, 5.0, -1.0), rtol=0, atol=0)
    with pytest.raises(InputError, match="at least 2"): clip_loss(a[:1], b[:1], 5.0, distributed=True)
    assert gather_with_grad(a) is a

# ============================================================================= issue 14: properties no test pinned yet
from hypothesis import given, settings, strategies as st

def ref_clip_rows(a, b, s, t=0.0, eps=0.0, off=0):
    "Rows-only (local) CLIP: row i of a against all rows of b, positive at column i + off."
    Ba, Bb = len(a), len(b); tot = 0.0
    for i in range(Ba):
        S = [s * dot(a[i], b[j]) + t for j in range(Bb)]
        lse = logsumexp(S)
        tot = tot + sum(((1 - eps) * (1.0 if j == i + off else 0.0) + eps / Bb) * (lse - S[j]) for j in range(Bb))
    return tot / Ba

def ref_siglip_rows(a, b, s, t, off=0):
    tot = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if j == i + off else -1.0
            tot = tot + torch.log1p(torch.exp(-z * (s * dot(a[i], b[j]) + t)))
    return tot / len(a)

# ----------------------------------------------------------------------------- learnable scale: the cap
def test_clip_module_scale_cap_value_and_where_applied():
    "logit_scale = exp(log_scale), unclamped in forward; clamp_parameters_ clamps log_scale in place to [0, log max_scale]."
    a, b = pair(5, 4, seed=40)
    m = C.ClipLoss().double()                                   # default max_scale = 100 (CLIP)
    with torch.no_grad(): m.log_scale.fill_(math.log(200.0))    # past the cap (e.g. set by hand or loaded)
    assert m.logit_scale.item() == pytest.approx(200.0, rel=1e-12)              # forward reads it unclamped
    v = m(a, b); v.backward()
    assert abs(v.item() - float(ref_clip(a, b, sc(200.0)))) < 1e-10
    assert m.log_scale.grad.item() != 0.0                                       # the gradient never stops
    m.clamp_parameters_()
    assert m.log_scale.item() == math.log(100.0) and m.logit_scale.item() == pytest.approx(100.0, rel=1e-12)
    with torch.no_grad(): m.log_scale.fill_(-0.5)               # below s = 1: the lower bound of CLIP's clamp
    m.clamp_parameters_(); assert m.log_scale.item() == 0.0
    m = C.ClipLoss(init_scale=50.0, max_scale=50.0).double()                    # max_scale is an argument, not a constant
    with torch.no_grad(): m.log_scale.fill_(math.log(60.0))
    m.clamp_parameters_(); assert m.logit_scale.item() == pytest.approx(50.0, abs=1e-12)
    m = C.ClipLoss().double()                                                   # inside the range: clamp is a no-op
    with torch.no_grad(): m.log_scale.fill_(math.log(99.0))                     # exact in float64 (init is float32)
    m.clamp_parameters_()
    assert m.logit_scale.item() == pytest.approx(99.0, abs=1e-12)
    m(a, b).backward()
    s = sc(99.0).requires_grad_(); ref_clip(a, b, s).backward()
    assert m.log_scale.grad.item() == pytest.approx(99.0 * s.grad.item(), rel=1e-9)   # d/dlog s = s d/ds
    assert C.ClipLoss().logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)       # CLIP's initial temperature 0.07

def test_siglip_module_scale_cap_bias_and_frozen():
    a, b = pair(5, 4, seed=41)
    m = C.SigLipLoss(init_scale=100.0, init_bias=-3.0).double()
    assert m.logit_scale.item() == pytest.approx(100.0, rel=1e-6) and m.logit_bias.item() == -3.0
    with torch.no_grad(): m.log_scale.fill_(math.log(300.0))
    v = m(a, b); v.backward()
    assert abs(v.item() - float(ref_siglip(a, b, sc(300.0), sc(-3.0)))) < 1e-10
    assert m.log_scale.grad.item() != 0.0
    m.clamp_parameters_(); assert m.logit_scale.item() == pytest.approx(100.0, rel=1e-12)
    assert m.logit_bias.item() == -3.0                                          # the bias is never clamped
    m = C.SigLipLoss(init_scale=20.0, max_scale=20.0).double()
    with torch.no_grad(): m.log_scale.fill_(math.log(30.0))
    m.clamp_parameters_(); assert m.logit_scale.item() == pytest.approx(20.0, abs=1e-12)
    assert C.SigLipLoss().logit_scale.item() == pytest.approx(10.0, rel=1e-6) and C.SigLipLoss().logit_bias.item() == -10.0
    f = C.SigLipLoss(learnable=False)
    assert not f.log_scale.requires_grad and not f.logit_bias.requires_grad
    assert C.ClipLoss(learnable=True).log_scale.requires_grad

def _rows_wanting_a_larger_scale(name):
    "(6, D) unit rows whose loss against themselves still falls as s grows past 100 (no saturated gradient)."
    if name == "clip":    # nearly parallel rows: logit gaps far below 1/s, the softmax is far from one-hot
        g = torch.Generator().manual_seed(45)
        return F.normalize(torch.ones(6, 3, dtype=DT) + 0.05 * torch.randn(6, 3, generator=g, dtype=DT), dim=-1)
    return F.normalize(torch.eye(6, dtype=DT) - 1 / 6, dim=-1)   # a simplex: every negative at cosine -1/5

@pytest.mark.parametrize("cls,name,lr", [(C.ClipLoss, "clip", 0.5), (C.SigLipLoss, "siglip", 1e-3)])
def test_scale_above_the_cap_is_pulled_back_and_keeps_training(cls, name, lr):
    "Issue 16: a scale past the cap returns to it after the step's clamp, and its gradient there is not zero."
    a = _rows_wanting_a_larger_scale(name)
    m = cls().double()
    with torch.no_grad(): m.log_scale.fill_(math.log(150.0))
    opt = torch.optim.SGD([m.log_scale], lr=lr)
    def step(b):
        opt.zero_grad(); m(a, b).backward(); opt.step(); m.clamp_parameters_()
        return m.log_scale.grad.item(), m.log_scale.item()
    for _ in range(3):                                          # aligned pairs: the loss wants a larger scale
        grad, log_s = step(a)
        assert grad < 0 and log_s == math.log(100.0)            # pulled back to the cap, exactly
    moved = [step(a.roll(1, 0)) for _ in range(3)]              # mismatched pairs: the loss wants a smaller scale
    assert all(grad > 0 for grad, _ in moved)                   # non-zero gradient at the cap
    assert moved[0][1] < math.log(100.0) and moved[-1][1] < moved[0][1]   # it leaves the cap and keeps moving

@pytest.mark.parametrize("cls", [C.ClipLoss, C.SigLipLoss])
def test_initial_scale_outside_the_clamp_range_is_a_config_error(cls):
    name = cls.__name__
    for bad in (0.0, -1.0, 0.5, float("nan"), float("inf"), 100.5, True, "10"):
        with pytest.raises(ConfigError, match=rf"^{name}: init_scale must be a finite multiplier in \[1, max_scale=100\]"):
            cls(init_scale=bad)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=rf"^{name}: max_scale must be a finite multiplier >= 1"): cls(max_scale=bad)
    assert cls(init_scale=1.0).logit_scale.item() == 1.0 and cls(init_scale=7.0, max_scale=7.0).logit_scale.item() == pytest.approx(7.0)

def test_clamp_leaves_a_frozen_scale_as_set():
    "A scale fixed on purpose (e.g. a temperature above 1, s < 1) is not the optimiser's: the clamp leaves it alone."
    m = C.ClipLoss(learnable=False).double()
    with torch.no_grad(): m.log_scale.fill_(math.log(0.5))
    m.clamp_parameters_(); assert m.logit_scale.item() == pytest.approx(0.5, rel=1e-12)
    m.log_scale.requires_grad_(True); m.clamp_parameters_(); assert m.logit_scale.item() == 1.0

def test_modules_forward_their_loss_keywords():
    a, b = pair(5, 4, seed=42)
    for m in (C.ClipLoss(impl="bogus"), C.SigLipLoss(impl="bogus")):          # extra keywords reach the loss
        with pytest.raises(InputError, match="impl must be one of"): m.double()(a, b)
    m = C.ClipLoss(5.0, label_smoothing=0.2, impl="chunked", chunk_size=2).double()
    with torch.no_grad(): m.log_scale.fill_(math.log(5.0))
    v = m(a, b)
    assert abs(v.item() - float(ref_clip(a, b, sc(5.0), 0.0, 0.2))) < 1e-10

# ----------------------------------------------------------------------------- label smoothing closed form
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_label_smoothing_closed_form(impl):
    # one-hot embeddings at s = 100: lse = 100 (+3e^-100), S_ii = 100, mean_j S_ij = 25, so each row and
    # column costs (1 - eps) * 0 + eps * (100 - 25)
    e = torch.eye(4, dtype=DT)
    for eps in (0.0, 0.1, 0.5):
        assert abs(clip_loss(e, e, 100.0, None, eps, impl=impl, chunk_size=3).item() - eps * 75) < 1e-10
    assert clip_loss(e, e, 100.0, None, 0.999, impl=impl).item() > 0                  # just below 1 is allowed
    with pytest.raises(InputError, match=r"label_smoothing must be in \[0, 1\)"): clip_loss(e, e, 1.0, None, -0.01)

# ----------------------------------------------------------------------------- local (rows-only) forms with an offset
@pytest.mark.parametrize("Ba,Bb,off,chunk", [(3, 7, 0, 2), (3, 7, 4, 2), (2, 6, 3, 5), (4, 4, 0, 3)])
def test_chunked_local_forms_with_offset_match_reference(Ba, Bb, off, chunk):
    "The rectangular blocks of the distributed path: rows of a vs all b, positive at column i + offset."
    g = torch.Generator().manual_seed(Ba * 10 + Bb + off)
    a = F.normalize(torch.randn(Ba, 5, generator=g, dtype=DT), dim=-1); b = F.normalize(torch.randn(Bb, 5, generator=g, dtype=DT), dim=-1)
    for eps in (0.0, 0.2):
        assert_match(lambda a, b, s, t: C.ChunkedClipLoss.apply(a, b, s, t, eps, chunk, off, False),
                     lambda a, b, s, t: ref_clip_rows(a, b, s, t, eps, off), a, b, sc(6.0), sc(-1.0))
        assert_match(lambda a, b, s, t: C._clip_naive(a, b, s, t, eps, off, both=False),
                     lambda a, b, s, t: ref_clip_rows(a, b, s, t, eps, off), a, b, sc(6.0), sc(-1.0))
    assert_match(lambda a, b, s, t: C.ChunkedSiglipLoss.apply(a, b, s, t, chunk, off),
                 lambda a, b, s, t: ref_siglip_rows(a, b, s, t, off), a, b, sc(6.0), sc(-2.0))
    assert_match(lambda a, b, s, t: C._siglip_naive(a, b, s, t, off),
                 lambda a, b, s, t: ref_siglip_rows(a, b, s, t, off), a, b, sc(6.0), sc(-2.0))

def _fake_rank1_of_2(monkeypatch, a, b, a_other, b_other):
    "Pretend to be rank 1 of 2: gather puts the other rank's rows (constants) first, this rank's after."
    monkeypatch.setattr(C, "dist_info", lambda group=None: (2, 1))
    def gather(x, group=None):
        other = a_other if torch.equal(x.detach(), a) else b_other
        return torch.cat([other, x])
    monkeypatch.setattr(C, "gather_with_grad", gather)

@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_distributed_path_offsets_with_simulated_gather(monkeypatch, impl):
    "Rank 1's positives sit at column rank * B_local of the gathered batch; local and global forms vs references."
    a, b = pair(3, 4, seed=43); ao, bo = pair(3, 4, seed=44)
    _fake_rank1_of_2(monkeypatch, a, b, ao, bo)
    A, B_ = torch.cat([ao, a]), torch.cat([bo, b])
    kw = dict(impl=impl, chunk_size=2, distributed=True)
    # local loss: (rows(a vs all b) + rows(b vs all a)) / 2, both with offset 3
    assert_match(lambda a, b: clip_loss(a, b, 5.0, -1.0, 0.1, local_loss=True, **kw),
                 lambda a_, b_: (ref_clip_rows(a_, torch.cat([bo, b_]), 5.0, -1.0, 0.1, 3)
                                 + ref_clip_rows(b_, torch.cat([ao, a_]), 5.0, -1.0, 0.1, 3)) / 2, a, b)
    assert_match(lambda a, b: siglip_loss(a, b, 5.0, -1.0, local_loss=True, **kw),
                 lambda a_, b_: ref_siglip_rows(a_, torch.cat([bo, b_]), 5.0, -1.0, 3), a, b)
    # global loss: the plain loss of the gathered batch
    assert abs(clip_loss(a, b, 5.0, -1.0, 0.1, **kw).item() - float(ref_clip(A, B_, 5.0, -1.0, 0.1))) < 1e-10
    assert abs(siglip_loss(a, b, 5.0, -1.0, **kw).item() - float(ref_siglip(A, B_, 5.0, -1.0))) < 1e-10

def test_distributed_one_sample_per_rank_is_enough(monkeypatch):
    a, b = pair(1, 3, seed=45); ao, bo = pair(1, 3, seed=46)
    _fake_rank1_of_2(monkeypatch, a, b, ao, bo)                       # B_total = 2 over the ranks
    want = float(ref_clip(torch.cat([ao, a]), torch.cat([bo, b]), 4.0))
    assert abs(clip_loss(a, b, 4.0, distributed=True).item() - want) < 1e-10

# ----------------------------------------------------------------------------- blocks, dispatch, validation boundaries
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 60), st.integers(1, 70))
def test_blocks_cover_every_row_once(n, chunk):
    blocks = C._blocks(n, chunk)
    rows = [i for s in blocks for i in range(s.start, s.stop)]
    assert rows == list(range(n))
    assert all(0 < s.stop - s.start <= chunk for s in blocks) and len(blocks) == -(-n // chunk)

def test_pick_impl_boundaries():
    assert C._pick_impl("auto", C.AUTO_CHUNK_MIN_BATCH - 1, None, "cpu", "t") == "naive"
    assert C._pick_impl("auto", C.AUTO_CHUNK_MIN_BATCH, None, "cpu", "t") == "chunked"
    assert C.AUTO_CHUNK_MIN_BATCH == 4096 and C.DEFAULT_CHUNK == 512
    assert C._pick_impl("naive", 10 ** 6, 8, "cpu", "t") == "naive"               # an explicit impl wins over chunk_size
    assert C._pick_impl("chunked", 4, None, "cpu", "t") == "chunked"
    assert C._pick_impl("auto", 8, 1, "cpu", "t") == "chunked"                      # chunk_size=1 is valid
    for bad in (True, 2.0, -1):
        with pytest.raises(InputError, match="chunk_size must be a positive int"): C._pick_impl("auto", 8, bad, "cpu", "t")
    with pytest.raises(InputError, match="impl must be one of"): C._pick_impl("Naive", 8, None, "cpu", "t")

def test_unit_norm_tolerance_by_dtype_and_scalar_kinds():
    a, b = pair(4, 3, seed=47)
    assert torch.isfinite(clip_loss(a * (1 + 9e-4), b, 5.0))                     # float64: within 1e-3 passes
    with pytest.raises(InputError, match="L2-normalised"): clip_loss(a * (1 + 2e-3), b, 5.0)
    ah, bh = (a * (1 + 5e-3)).bfloat16(), b.bfloat16()                              # 16-bit: 1e-2 tolerance
    assert torch.isfinite(clip_loss(ah, bh, 5.0))
    with pytest.raises(InputError, match="L2-normalised"): clip_loss((a * 1.03).bfloat16(), bh, 5.0)
    assert torch.isfinite(clip_loss(a.float() * (1 + 5e-3), b.float(), 5.0))       # float32: may be upcast bf16 values
    with pytest.raises(InputError, match="L2-normalised"): clip_loss(a.float() * (1 + 2e-2), b.float(), 5.0)
    assert torch.isfinite(clip_loss(a, b, 5))                                       # an int scale is a number
    assert abs(clip_loss(a, b, torch.tensor([5.0])).item() - clip_loss(a, b, 5.0).item()) < 1e-15   # 1-element tensor
    with pytest.raises(InputTypeError, match="logit_scale must be a float"): clip_loss(a, b, True)
    with pytest.raises(InputTypeError, match="logit_scale must be a float"): clip_loss(a, b, "5")
    assert torch.isfinite(clip_loss(a[:2], b[:2], 5.0))                             # B = 2: the smallest batch

def test_defaults_nt_xent_temperature_and_isogclr_rho():
    z1, z2 = pair(4, 3, seed=48)
    assert abs(nt_xent_loss(z1, z2).item() - float(ref_ntxent(z1, z2, 0.5))) < 1e-10     # SimCLR tau = 0.5
    ta, tb = torch.full((4,), 0.3, dtype=DT), torch.full((4,), 0.2, dtype=DT)
    assert abs(isogclr_objective(z1, z2, ta, tb).item() - float(ref_isogclr_objective(z1, z2, ta, tb, 6.0))) < 1e-10
    with pytest.raises(InputError, match="tau_b must be > 0"): isogclr_objective(z1, z2, ta, torch.zeros(4, dtype=DT))
    with pytest.raises(InputError, match="temperature must be > 0"): nt_xent_loss(z1, z2, -0.1)

# ----------------------------------------------------------------------------- iSogCLR module: clamp, first update, boundaries
def test_isogclr_module_uses_clamped_temperatures():
    "Raw temperatures outside [tau_min, tau_max] enter the loss clamped (and then get no gradient)."
    B = 4
    a, b = pair(B, 3, seed=49)
    crit = IndividualTemperatureLoss(6, rho=1.5, gamma=1.0, tau_init=0.1, tau_min=0.05, tau_max=0.5).double()
    with torch.no_grad():
        crit.tau_a.copy_(torch.tensor([0.001, 0.2, 3.0, 0.05, 0.4, 0.4], dtype=DT))
        crit.tau_b.copy_(torch.tensor([0.3, -1.0, 0.5, 7.0, 0.4, 0.4], dtype=DT))
    idx = torch.tensor([0, 1, 2, 3])
    v = crit(a, b, idx); v.backward()
    ta = torch.tensor([0.05, 0.2, 0.5, 0.05], dtype=DT); tb = torch.tensor([0.3, 0.05, 0.5, 0.5], dtype=DT)
    # gamma = 1 and a first visit: u = g of this batch, so the value is the exact objective
    assert abs(v.item() - float(ref_isogclr_objective(a, b, ta, tb, 1.5))) < 1e-10
    assert crit.tau_a.grad[0] == 0 and crit.tau_a.grad[2] == 0 and crit.tau_b.grad[1] == 0 and crit.tau_b.grad[3] == 0
    assert crit.tau_a.grad[1] != 0 and crit.tau_b.grad[0] != 0                      # inside the box: a gradient

def test_isogclr_module_first_update_closed_form_and_defaults():
    a, b = pair(4, 3, seed=50)
    crit = IndividualTemperatureLoss(5).double()                 # rho 6, gamma 0.9, tau 0.07 in [0.005, 1]
    t07 = float(torch.tensor(0.07))                              # the parameters are created in float32
    assert crit.rho == 6.0 and crit.gamma == 0.9 and (crit.tau_a == t07).all() and (crit.tau_b == t07).all()
    assert (crit.tau_min, crit.tau_max) == (0.005, 1.0)
    idx = torch.tensor([4, 0, 2, 1])
    v = crit(a, b, idx)
    tau = torch.full((4,), t07, dtype=DT)
    # first visit: u = gamma * g (the -inf initial log u contributes nothing)
    for i in range(4):
        ga, gb = ref_isogclr_g(a, b, tau, i, True), ref_isogclr_g(a, b, tau, i, False)
        assert abs(crit.log_u_a[idx[i]].item() - math.log(0.9 * float(ga))) < 1e-10
        assert abs(crit.log_u_b[idx[i]].item() - math.log(0.9 * float(gb))) < 1e-10
    assert torch.isinf(crit.log_u_a[3]) and torch.isinf(crit.log_u_b[3])              # sample 3 not seen
    want = sum(t07 * (math.log(0.9 * float(ref_isogclr_g(a, b, tau, i, img))) + 6.0) for i in range(4) for img in (True, False)) / 8
    assert abs(v.item() - want) < 1e-10

def test_isogclr_module_argument_boundaries():
    I = IndividualTemperatureLoss
    I(2); I(3, gamma=1.0); I(3, tau_init=0.005); I(3, tau_init=1.0); I(3, tau_min=0.1, tau_init=0.1, tau_max=0.1)
    with pytest.raises(InputError, match="num_samples must be >= 2"): I(1)
    with pytest.raises(InputError, match="gamma"): I(3, gamma=1.01)
    with pytest.raises(InputError, match="tau_min <= tau_init <= tau_max"): I(3, tau_init=1.01)
    with pytest.raises(InputError, match="tau_min <= tau_init <= tau_max"): I(3, tau_init=0.004)
    with pytest.raises(InputError, match="tau_min <= tau_init <= tau_max"): I(3, tau_min=0.0, tau_init=0.1)
    crit = I(5).double(); a, b = pair(3, 3, seed=51)
    assert torch.isfinite(crit(a, b, torch.tensor([4, 0, 2])))                         # n - 1 is a valid index
    for bad in (torch.tensor([5, 0, 2]), torch.tensor([-1, 0, 2]), torch.tensor([1, 0, 2], dtype=torch.int32)):
        with pytest.raises(InputError, match="distinct int64 dataset indices"): crit(a, b, bad)

# ----------------------------------------------------------------------------- CWCL weights
def test_cwcl_weights_closed_form_clamped_and_detached():
    x = unit(5, 4, seed=52).requires_grad_()
    w = cwcl_weights(x)
    for i in range(5):
        for j in range(5):
            assert abs(w[i, j].item() - (1 + float(dot(x[i].detach(), x[j].detach()))) / 2) < 1e-15
    assert not w.requires_grad and torch.allclose(w.diagonal(), torch.ones(5, dtype=DT))
    # antipodal rows round to (1 + (-1 - 1e-16)) / 2 < 0 without the clamp: weights stay in [0, 1]
    g = torch.Generator().manual_seed(0)
    y = F.normalize(torch.randn(3, 5, generator=g, dtype=DT), dim=1); Y = torch.cat([y, -y])
    wy = cwcl_weights(Y)
    assert (wy >= 0).all() and (wy <= 1).all()
    assert torch.isfinite(cwcl_loss(Y, Y, wy, 5.0))

def test_cwcl_weight_range_boundaries():
    a, b = pair(3, 4, seed=53)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.0, 0.0]], dtype=DT)    # 0 and 1 allowed
    assert abs(cwcl_loss(a, b, w, 4.0).item() - float(ref_cwcl(a, b, w, 4.0))) < 1e-10
    with pytest.raises(InputError, match=r"lie in \[0, 1\]"): cwcl_loss(a, b, w * 1.001, 4.0)
    w2 = w.clone(); w2[2] = 0
    with pytest.raises(InputError, match=r"rows \[2\] are all zero"): cwcl_loss(a, b, w2, 4.0)

# ----------------------------------------------------------------------------- MoCHi: counts, hardness, draws
def ref_mochi_queue(q, queue, s, n_hard, n_mix, n_query_mix, beta_max, seed):
    "Synthetic logits of MoCHi with a shared queue, per query in loops (same documented draws)."
    B = q.shape[0]
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(n_hard, (B, n_mix, 2), generator=g); alpha = torch.rand(B, n_mix, 1, generator=g, dtype=q.dtype)
    picks = torch.randint(n_hard, (B, n_query_mix), generator=g); beta = beta_max * torch.rand(B, n_query_mix, 1, generator=g, dtype=q.dtype)
    out = []
    for i in range(B):
        sims = [float(dot(q[i], n)) for n in queue]
        hard = [queue[j] for j in sorted(range(len(queue)), key=lambda j: -sims[j])[:n_hard]]
        row = []
        for m in range(n_mix):
            h = alpha[i, m, 0] * hard[int(pairs[i, m, 0])] + (1 - alpha[i, m, 0]) * hard[int(pairs[i, m, 1])]
            row.append(s * float(dot(q[i], h)) / math.sqrt(float(dot(h, h))))
        for m in range(n_query_mix):
            h = beta[i, m, 0] * q[i] + (1 - beta[i, m, 0]) * hard[int(picks[i, m])]
            row.append(s * float(dot(q[i], h)) / math.sqrt(float(dot(h, h))))
        out.append(row)
    return torch.tensor(out, dtype=q.dtype)

@pytest.mark.parametrize("n_hard,n_mix,n_query_mix,beta_max", [(4, 3, 2, 1.0), (9, 2, 3, 0.3), (1, 2, 1, 0.0)])
def test_mochi_queue_synthetic_negatives_match_reference(n_hard, n_mix, n_query_mix, beta_max):
    q, k = pair(4, 5, seed=54); queue = unit(9, 5, seed=55)
    L = hard_negative_mixing(q, k, 3.0, negatives=queue, n_hard=n_hard, n_mix=n_mix, n_query_mix=n_query_mix,
                             beta_max=beta_max, generator=torch.Generator().manual_seed(7))
    assert L.shape == (4, 1 + 9 + n_mix + n_query_mix)                      # positive, K negatives, s + s' synthetic
    torch.testing.assert_close(L[:, 0], 3.0 * (q * k).sum(1), rtol=0, atol=1e-14)
    torch.testing.assert_close(L[:, 10:], ref_mochi_queue(q, queue, 3.0, n_hard, n_mix, n_query_mix, beta_max, 7), rtol=0, atol=1e-12)

def test_mochi_in_batch_never_mixes_the_positive_and_counts():
    q = unit(5, 6, seed=56)                                                 # k = q: the positive is the most similar
    L = hard_negative_mixing(q, q, 1.0, n_hard=1, n_mix=2, n_query_mix=0, generator=torch.Generator().manual_seed(0))
    S = q @ q.T; S.fill_diagonal_(-math.inf)
    assert L.shape == (5, 1 + 4 + 2)
    torch.testing.assert_close(L[:, 5:], S.max(1).values[:, None].expand(5, 2), rtol=0, atol=1e-12)   # the hardest true negative
    assert hard_negative_mixing(q, q, 1.0, n_hard=4, n_mix=0, n_query_mix=0).shape == (5, 5)          # n_hard = K allowed
    assert hard_negative_mixing(q, q, 1.0, n_hard=1, n_mix=0, n_query_mix=3).shape == (5, 8)

def test_mochi_uses_its_generator_and_validates():
    q, k = pair(5, 6, seed=57)
    f = lambda: hard_negative_mixing(q, k, 2.0, n_hard=3, n_mix=4, n_query_mix=2, generator=torch.Generator().manual_seed(1))
    L1 = f(); torch.rand(10); L2 = f()                                     # the global RNG moved in between
    assert torch.equal(L1, L2)
    for kw, msg in ((dict(n_hard=0), "n_hard"), (dict(n_hard=5), "n_hard"), (dict(n_mix=-1), "n_mix"),
                    (dict(n_query_mix=-1), "n_query_mix"), (dict(beta_max=1.01), "beta_max"), (dict(beta_max=-0.01), "beta_max")):
        with pytest.raises(InputError, match=msg): hard_negative_mixing(q, k, 2.0, **{"n_hard": 2, **kw})
    with pytest.raises(ShapeError, match="width D=6"): hard_negative_mixing(q, k, 2.0, negatives=unit(4, 5, seed=1), n_hard=2)

# ----------------------------------------------------------------------------- mixup
@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(1, 6), st.integers(0, 1000))
def test_mixup_is_the_convex_combination(lam, B, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 3, generator=g, dtype=DT); perm = torch.randperm(B, generator=g)
    out = mixup(x, lam, perm)
    for i in range(B):
        torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[int(perm[i])], rtol=0, atol=1e-15)

def test_mixup_loss_validation_boundaries():
    a, b = pair(4, 3, seed=58)
    for lam in (0.0, 1.0): assert torch.isfinite(mixup_contrastive_loss(a, b, torch.arange(4), lam, 5.0))
    with pytest.raises(InputError, match="lam"): mixup_contrastive_loss(a, b, torch.arange(4), -0.01, 5.0)
    with pytest.raises(InputError, match="permutation"): mixup_contrastive_loss(a, b, torch.arange(4, dtype=torch.int32), 0.5, 5.0)
    with pytest.raises(InputError, match="permutation"): mixup_contrastive_loss(a, b, torch.tensor([1, 2, 3, 4]), 0.5, 5.0)

# ----------------------------------------------------------------------------- alignment / uniformity closed forms
def test_alignment_uniformity_closed_forms_and_ranges():
    e = torch.eye(3, dtype=DT)
    f = e[[1, 2, 0]]                                                         # every pair orthogonal: ||a - b||^2 = 2
    for alpha in (1.0, 2.0, 3.0, 0.5):
        assert abs(alignment_loss(e, f, alpha).item() - 2 ** (alpha / 2)) < 1e-14
    assert alignment_loss(e, e, 1.0).item() < 1e-14                          # identical pairs: 0 for any alpha
    # three orthonormal points: every pair at squared distance 2, so log mean exp(-2t) = -2t
    for t in (0.5, 2.0, 3.0): assert abs(uniformity_loss(e, t).item() + 2 * t) < 1e-13
    assert abs(uniformity_loss(e).item() + 4.0) < 1e-13                       # default t = 2
    assert abs(alignment_loss(e, f).item() - 2.0) < 1e-14                      # default alpha = 2
    with pytest.raises(InputError, match="alpha must be > 0"): alignment_loss(e, f, 0.0)
    with pytest.raises(InputError, match="t must be > 0"): uniformity_loss(e, 0.0)
    assert torch.isfinite(alignment_loss(e, f, 1e-3)) and torch.isfinite(uniformity_loss(e, 1e-3))

def test_symile_needs_two_modalities():
    a, _ = pair(3, 4, seed=59)
    with pytest.raises(InputTypeError, match="at least 2"): symile_loss([a], 5.0)
    assert torch.isfinite(symile_loss((a, a), 5.0))                           # a tuple works too

# ============================================================================= label-aware targets (labels=)
# References written from the formulas with plain loops (no library code): with labels y, every pair
# (i, j) with y_i = y_j is a positive. CLIP rows: targets (1 - eps) 1[ya_i = yb_j] / n_i + eps / Bb with
# n_i = #{j: yb_j = ya_i}; the columns of S are the rows of S^T, i.e. the same rows with a and b swapped.
def ref_label_rows(a, b, s, t, eps, ya, yb):
    "Rows-only label-aware CLIP: mean over rows i of a of sum_j T_ij (lse_i - S_ij) against all rows of b."
    Ba, Bb = len(a), len(b); tot = 0.0
    for i in range(Ba):
        S = [s * dot(a[i], b[j]) + t for j in range(Bb)]
        lse = logsumexp(S)
        same = [1.0 if int(yb[j]) == int(ya[i]) else 0.0 for j in range(Bb)]
        n = sum(same)
        tot = tot + sum(((1 - eps) * same[j] / n + eps / Bb) * (lse - S[j]) for j in range(Bb))
    return tot / Ba

def ref_label_clip(a, b, s, t, eps, y):
    "Label-aware CLIP: (row cross-entropies of S + those of S^T) / 2, targets 1[y_i = y_j] / n_i."
    return (ref_label_rows(a, b, s, t, eps, y, y) + ref_label_rows(b, a, s, t, eps, y, y)) / 2

def ref_label_siglip_rows(a, b, s, t, ya, yb):
    "Label-aware SigLIP: 1/Ba sum_ij log(1 + exp(-z_ij S_ij)), z_ij = +1 iff ya_i = yb_j."
    tot = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if int(ya[i]) == int(yb[j]) else -1.0
            tot = tot + torch.log1p(torch.exp(-z * (s * dot(a[i], b[j]) + t)))
    return tot / len(a)

YS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1])          # repeated labels: classes of size 3, 3, 1, 1
LABEL_GRID = [(5, 16, 10.0), (8, 3, 50.0), (7, 1, 1.0)]

@pytest.mark.parametrize("B,D,s", LABEL_GRID)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_clip_labels_match_reference(B, D, s, impl):
    "Value and gradients (a, b, scale, bias) against the loop reference, with/without smoothing and bias; chunk 3 does not divide B."
    a, b = pair(B, D, seed=B * 100 + D + 7)
    y = YS[:B]
    for eps, t in ((0.0, None), (0.1, -2.0), (0.3, 1.5)):
        f = lambda a, b, s_, t_: clip_loss(a, b, s_, None if t is None else t_, eps, labels=y, impl=impl, chunk_size=3)
        r = lambda a, b, s_, t_: ref_label_clip(a, b, s_, t_, eps, y)
        assert_match(f, r, a, b, sc(s), sc(0.0 if t is None else t))

@pytest.mark.parametrize("B,D,s", LABEL_GRID)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_siglip_labels_match_reference(B, D, s, impl):
    a, b = pair(B, D, seed=B * 100 + D + 8)
    y = YS[:B]
    for t in (-10.0, 0.0, 3.0):
        assert_match(lambda a, b, s_, t_: siglip_loss(a, b, s_, t_, labels=y, impl=impl, chunk_size=3),
                     lambda a, b, s_, t_: ref_label_siglip_rows(a, b, s_, t_, y, y), a, b, sc(s), sc(t))

@settings(max_examples=15, deadline=None)
@given(st.integers(2, 9), st.integers(1, 4), st.integers(1, 10), st.integers(0, 10 ** 6))
def test_labels_repeated_any_chunk_match_reference(B, n_classes, chunk, seed):
    "Random repeated labels (one class is allowed: every pair positive) and chunk sizes that need not divide B."
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, 3, generator=g, dtype=DT), dim=-1)
    b = F.normalize(torch.randn(B, 3, generator=g, dtype=DT), dim=-1)
    y = torch.randint(0, n_classes, (B,), generator=g)
    for impl in ("naive", "chunked"):
        assert_match(lambda a, b, s, t: clip_loss(a, b, s, t, 0.2, labels=y, impl=impl, chunk_size=chunk),
                     lambda a, b, s, t: ref_label_clip(a, b, s, t, 0.2, y), a, b, sc(7.0), sc(-1.0))
        assert_match(lambda a, b, s, t: siglip_loss(a, b, s, t, labels=y, impl=impl, chunk_size=chunk),
                     lambda a, b, s, t: ref_label_siglip_rows(a, b, s, t, y, y), a, b, sc(7.0), sc(-1.0))

@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_distinct_labels_equal_the_plain_loss(impl):
    a, b = pair(9, 4, seed=60)
    y = torch.randperm(9, generator=torch.Generator().manual_seed(1)) * 7 - 20     # distinct, some negative
    for lab in (y, y.int()):
        for f in (lambda a, b, s, t, **kw: clip_loss(a, b, s, t, 0.1, impl=impl, chunk_size=4, **kw),
                  lambda a, b, s, t, **kw: siglip_loss(a, b, s, t, impl=impl, chunk_size=4, **kw)):
            v0, g0 = value_and_grads(f, a, b, sc(6.0), sc(-1.0))
            v1, g1 = value_and_grads(lambda *xs: f(*xs, labels=lab), a, b, sc(6.0), sc(-1.0))
            assert abs(v0 - v1).item() < 1e-12
            for x, z in zip(g0, g1): assert (x - z).abs().max().item() < 1e-12

@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_label_targets_closed_forms(impl):
    "All embeddings equal: every softmax is uniform, so label-aware CLIP is log B exactly (only if each row of P sums to 1)."
    x = F.normalize(torch.ones(6, 3, dtype=DT), dim=-1)
    y = torch.tensor([0, 0, 0, 1, 1, 2])                       # same-label (ordered) pairs: 9 + 4 + 1 = 14 of 36
    for eps in (0.0, 0.3):
        assert abs(clip_loss(x, x, 7.0, None, eps, labels=y, impl=impl, chunk_size=4).item() - math.log(6)) < 1e-12
    S = 7.0 - 2.0                                              # every logit s a.b + t
    want = (14 * math.log1p(math.exp(-S)) + 22 * math.log1p(math.exp(S))) / 6
    assert abs(siglip_loss(x, x, 7.0, -2.0, labels=y, impl=impl, chunk_size=4).item() - want) < 1e-12
    # one class: every pair is a positive
    assert abs(siglip_loss(x, x, 7.0, -2.0, labels=torch.zeros(6, dtype=torch.long), impl=impl, chunk_size=4).item()
               - 6 * math.log1p(math.exp(-S))) < 1e-12

def test_labels_never_use_the_fused_kernels(monkeypatch):
    calls = []
    a, b = pair(6, 4, seed=61); y = torch.tensor([0, 1, 0, 1, 2, 2])
    for available in (True, False):                        # refused whether or not the kernels exist: never a silent swap
        _fake_kernels(monkeypatch, available, calls)
        with pytest.raises(InputError, match=r"clip_loss: impl='fused' does not support labels.*impl='chunked'"):
            clip_loss(a, b, 5.0, labels=y, impl="fused")
        with pytest.raises(InputError, match=r"siglip_loss: impl='fused' does not support labels.*impl='chunked'"):
            siglip_loss(a, b, 5.0, -1.0, labels=y, impl="fused")
    _fake_kernels(monkeypatch, True, calls)
    cuda = torch.device("cuda")                            # _pick_impl only inspects the device type
    assert C._pick_impl("auto", 4096, None, cuda, "t") == "fused"                 # without labels auto takes it ...
    assert C._pick_impl("auto", 4096, None, cuda, "t", labels=True) == "chunked"  # ... with labels never
    assert C._pick_impl("auto", 8, None, cuda, "t", labels=True) == "naive"
    assert C._pick_impl("chunked", 8, None, cuda, "t", labels=True) == "chunked"
    assert calls == []

@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_bad_labels_refused_naming_labels(name):
    a, b = pair(6, 3, seed=62)
    f = (lambda y: clip_loss(a, b, 5.0, labels=y)) if name == "clip_loss" else (lambda y: siglip_loss(a, b, 5.0, -1.0, labels=y))
    want = rf"{name}: labels must be a \(B,\) = \(6,\) tensor of integer class ids"
    with pytest.raises(ShapeError, match=want + r".*got shape \(5,\)"): f(torch.arange(5))                 # wrong length
    with pytest.raises(ShapeError, match=want + r".*got shape \(6, 1\)"): f(torch.arange(6)[:, None])     # 2-D
    with pytest.raises(ShapeError, match=want + r".*got shape \(\)"): f(torch.tensor(3))                  # 0-D
    with pytest.raises(InputError, match=want + r".*dtype torch.float32 with shape \(6,\)"): f(torch.zeros(6))
    with pytest.raises(InputError, match=want + r".*dtype torch.bool with shape \(6,\)"): f(torch.ones(6, dtype=torch.bool))
    with pytest.raises(InputTypeError, match=want + r".*got list"): f([0, 1, 0, 1, 2, 2])
    for dt in (torch.int32, torch.int16, torch.uint8):                                                   # any integer dtype
        assert torch.isfinite(f(torch.tensor([0, 1, 0, 1, 2, 2], dtype=dt)))

@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_distributed_labels_with_simulated_gather(monkeypatch, impl):
    "Rank 1 of 2: labels are gathered too; local rows use n_i counted over both ranks; global = the gathered batch's loss."
    a, b = pair(3, 4, seed=63); ao, bo = pair(3, 4, seed=64)
    y, yo = torch.tensor([2, 0, 2]), torch.tensor([0, 1, 2])          # class 2 on both ranks, class 1 only on the other
    _fake_rank1_of_2(monkeypatch, a, b, ao, bo)
    monkeypatch.setattr(C, "_gather_labels", lambda x, group, where: torch.cat([yo, x]))
    Y, A, B_ = torch.cat([yo, y]), torch.cat([ao, a]), torch.cat([bo, b])
    kw = dict(impl=impl, chunk_size=2, distributed=True, labels=y)
    assert_match(lambda a, b: clip_loss(a, b, 5.0, -1.0, 0.1, local_loss=True, **kw),
                 lambda a_, b_: (ref_label_rows(a_, torch.cat([bo, b_]), 5.0, -1.0, 0.1, y, Y)
                                 + ref_label_rows(b_, torch.cat([ao, a_]), 5.0, -1.0, 0.1, y, Y)) / 2, a, b)
    assert_match(lambda a, b: siglip_loss(a, b, 5.0, -1.0, local_loss=True, **kw),
                 lambda a_, b_: ref_label_siglip_rows(a_, torch.cat([bo, b_]), 5.0, -1.0, y, Y), a, b)
    assert abs(clip_loss(a, b, 5.0, -1.0, 0.1, **kw).item() - float(ref_label_clip(A, B_, 5.0, -1.0, 0.1, Y))) < 1e-10
    assert abs(siglip_loss(a, b, 5.0, -1.0, **kw).item() - float(ref_label_siglip_rows(A, B_, 5.0, -1.0, Y, Y))) < 1e-10

def test_chunked_labels_build_targets_per_block(monkeypatch):
    "With labels the chunked forms save only O(B*D) tensors and build every target block with at most chunk rows."
    B, D, chunk = 256, 8, 16
    a, b = (x.requires_grad_() for x in pair(B, D, seed=65))
    y = torch.arange(B) % 10
    rows, sizes = [], []
    for name in ("_same_label", "_label_targets"):
        f = getattr(C, name)
        monkeypatch.setattr(C, name, lambda ya, yb, dtype, f=f: rows.append(len(ya)) or f(ya, yb, dtype))
    def pack(t): sizes.append(t.numel()); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (clip_loss(a, b, 10.0, labels=y, impl="chunked", chunk_size=chunk)
         + siglip_loss(a, b, 10.0, -5.0, labels=y, impl="chunked", chunk_size=chunk)).backward()
    assert max(sizes) <= B * D
    assert rows and max(rows) <= chunk                         # forward and backward: one block of rows at a time
    assert len(rows) == 6 * (B // chunk)                       # clip fw + bw (P and its 1[.] inside), siglip fw + bw


# ----------------------------------------------------------------------------- names in messages, quiet dispatch, dtypes
@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_shape_errors_name_the_loss_and_the_argument(name):
    f = {"clip_loss": lambda x, y: clip_loss(x, y, 5.0), "siglip_loss": lambda x, y: siglip_loss(x, y, 5.0, -1.0)}[name]
    a, b = pair(4, 3, seed=31)
    with pytest.raises(ShapeError, match=rf"^{name}: a: expected 2-D"): f(a[0], b)
    with pytest.raises(ShapeError, match=rf"^{name}: b: expected 2-D"): f(a, b[0])
    with pytest.raises(ShapeError, match=rf"^{name}: b: expected shape \(B, D\) with B=4"): f(a, b[:3])

def test_auto_dispatch_never_warns_when_the_kernels_cannot_be_imported(monkeypatch):
    "impl='auto' is a silent choice: only an explicit impl='fused' warns that it falls back."
    monkeypatch.setitem(sys.modules, "mmlab.kernels", None)           # `import mmlab.kernels` fails
    monkeypatch.delattr(mmlab, "kernels", raising=False)
    monkeypatch.setattr(C, "_warned_fused", set())
    cuda = torch.device("cuda")                                        # only the device type is inspected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C._pick_impl("auto", 4096, None, cuda, "clip_loss") == "chunked"
    with pytest.warns(UserWarning, match="clip_loss: impl='fused' needs mmlab.kernels"):
        assert C._pick_impl("fused", 8, None, cuda, "clip_loss") == "chunked"

def test_isogclr_returns_the_embeddings_dtype_whatever_its_buffers_hold():
    a, b = pair(4, 3, seed=32); a, b = a.float(), b.float()
    idx = torch.tensor([0, 1, 2, 3])
    ref = IndividualTemperatureLoss(6, gamma=0.5, tau_init=0.1)
    wide = IndividualTemperatureLoss(6, gamma=0.5, tau_init=0.1).double()    # float64 state, float32 inputs
    for _ in range(2): want, got = ref(a, b, idx), wide(a, b, idx)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()

def test_gather_with_grad_in_a_one_rank_group(one_rank_group):
    "The gather autograd function itself (the 2-process tests run it in subprocesses): identity forward, summed backward."
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = C._GatherWithGrad.apply(x, None)
    assert torch.equal(y, x.detach())
    w = torch.randn(3, 2, dtype=torch.float64)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)                                      # all-reduce over one rank leaves the gradient

def test_dist_info_outside_a_process_group_is_one_rank_of_index_0():
    assert C.dist_info() == (1, 0)

def test_label_gather_and_shape_check_with_a_simulated_second_rank(monkeypatch):
    "The gathering logic in-process (the real collectives run in the 2-process gloo tests)."
    import torch.distributed as dist
    other = {"labels": torch.tensor([7, 8, 9])}
    def all_gather_object(out, obj, group=None): out[0], out[1] = obj, tuple(other["labels"].shape)
    def all_gather(parts, x, group=None): parts[0].copy_(x); parts[1].copy_(other["labels"])
    monkeypatch.setattr(C, "dist_info", lambda group=None: (2, 0))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    assert torch.equal(C._gather_labels(torch.tensor([1, 2, 3]), None, "clip_loss"), torch.tensor([1, 2, 3, 7, 8, 9]))
    other["labels"] = torch.tensor([7, 8, 9, 10])
    with pytest.raises(ShapeError, match=r"^clip_loss: labels: every rank must pass the same shape, got \[\(3,\), \(4,\)\]"):
        C._gather_labels(torch.tensor([1, 2, 3]), None, "clip_loss")

def test_unknown_impl_lists_the_choices():
    a, b = pair(4, 3, seed=33)
    with pytest.raises(InputError, match=r"^clip_loss: impl must be one of auto, naive, chunked, fused, got 'fast'$"):
        clip_loss(a, b, 5.0, impl="fast")
