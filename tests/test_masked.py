"""Mask generators (mmlab.masking) and masked-modeling losses/models (mmlab.losses.masked).

Mask properties are checked for every generator on a grid of sizes and seeds; losses against
plain-loop float64 references; k-means against scikit-learn; gather/scatter against MAE's
argsort formulation and a per-sample loop.
"""
import math
import pytest
import torch
import torch.nn.functional as F

from mmlab.core import MMLabError, InputError, ShapeError
from mmlab.masking import (Mask, mask_from_bool, mask_from_scores, num_masked, random_mask, block_mask, tube_mask,
                           span_mask, noise_mask, filtered_noise, dirichlet_budget, multimodal_mask, check_mask_partition,
                           neighbour_agreement, NOISE_COLORS)
from mmlab.losses.masked import (norm_patches, mae_loss, simmim_loss, hubert_loss, kmeans, kmeans_plusplus,
                                 kmeans_targets)
from mmlab.models import scatter_tokens, MAE, SimMIM, MultiModalMAE, HuBERT
from mmlab.encoders import ViTEncoder, ViTConfig, AudioEncoder, AudioConfig, gather_tokens

def _g(seed): return torch.Generator().manual_seed(seed)

GENERATORS = {
    "random": lambda B, g: (random_mask(B, 48, 0.75, generator=g), 48, 36),
    "block_beit": lambda B, g: (block_mask(B, (6, 8), 0.4, min_area=4, generator=g), 48, round(0.4 * 48)),
    "block_simmim": lambda B, g: (block_mask(B, (6, 8), 0.6, block_size=2, generator=g), 48, round(0.6 * 48)),
    "tube": lambda B, g: (tube_mask(B, 3, 16, 0.75, generator=g), 48, 3 * 12),
    "span": lambda B, g: (span_mask(B, 48, 0.5, span=5, generator=g), 48, 24),
    **{f"noise_{c}": (lambda c: lambda B, g: (noise_mask(B, (6, 8), 0.7, c, generator=g), 48, round(0.7 * 48)))(c)
       for c in NOISE_COLORS},
}

# ---------------------------------------------------------------- properties of every generator
@pytest.mark.parametrize("name", list(GENERATORS))
@pytest.mark.parametrize("B", [1, 3, 17])
def test_generator_properties(name, B):
    m, L, k = GENERATORS[name](B, _g(B))
    assert isinstance(m, Mask) and m.mask.shape == (B, L) and m.mask.dtype == torch.bool
    assert (m.mask.sum(1) == k).all(), "exact count per sample"
    assert m.visible.shape == (B, L - k) and m.masked.shape == (B, k)
    check_mask_partition(m)
    assert (m.visible.diff(dim=1) > 0).all() and (m.masked.diff(dim=1) > 0).all(), "sorted indices"
    m2, _, _ = GENERATORS[name](B, _g(B))
    assert torch.equal(m.mask, m2.mask), "same seed, same mask"

@pytest.mark.parametrize("name", list(GENERATORS))
def test_generator_seed_changes_mask(name):
    a, _, _ = GENERATORS[name](8, _g(0)); b, _, _ = GENERATORS[name](8, _g(1))
    assert not torch.equal(a.mask, b.mask)

def test_random_mask_is_uniform():
    m = random_mask(20000, 10, 0.3, generator=_g(0))
    freq = m.mask.float().mean(0)
    assert (freq - 0.3).abs().max() < 0.015

def test_tube_identical_across_time():
    m = tube_mask(5, T=7, S=20, ratio=0.9, generator=_g(0))
    g = m.mask.view(5, 7, 20)
    assert (g == g[:, :1]).all() and (g[:, 0].sum(1) == 18).all()

def test_span_mask_hides_runs():
    m = span_mask(200, 200, 0.5, span=10, generator=_g(0))
    x = m.mask.int()
    starts = ((x[:, 1:] - x[:, :-1]) == 1).sum() + x[:, 0].sum()
    mean_run = float(m.mask.sum() / starts)
    assert mean_run > 8, mean_run          # random masking at 0.5 would give runs of about 2

def test_block_and_color_structure():
    agree = lambda m, grid: neighbour_agreement(m, grid)
    r = agree(random_mask(256, 196, 0.4, generator=_g(0)), (14, 14))
    assert abs(r - 0.4) < 0.03
    assert agree(block_mask(256, (14, 14), 0.4, generator=_g(0)), (14, 14)) > 0.6
    red = agree(noise_mask(256, (14, 14), 0.5, "red", generator=_g(0)), (14, 14))
    blue = agree(noise_mask(256, (14, 14), 0.5, "blue", generator=_g(0)), (14, 14))
    assert red > 0.6 and blue < 0.48

def test_filtered_noise_spectrum():
    "Red noise has less high-frequency power than white, blue noise less low-frequency power."
    def power(color):
        n = filtered_noise(512, (16, 16), color, generator=_g(0))
        P = torch.fft.fft2(n - n.mean((1, 2), keepdim=True)).abs().pow(2).mean(0)
        f = torch.fft.fftfreq(16).abs(); r = (f[:, None] ** 2 + f[None] ** 2).sqrt()
        return float(P[r < 0.15].mean() / P[r > 0.35].mean())
    assert power("red") > 10 * power("white") and power("blue") < 0.5 * power("white")

def test_mask_from_bool_and_scores():
    m = mask_from_bool(torch.tensor([[True, False, True], [False, True, True]]))
    assert m.visible.tolist() == [[1], [0]] and m.masked.tolist() == [[0, 2], [1, 2]]
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert mask_from_scores(s, 2).masked.tolist() == [[1, 3]]

# ---------------------------------------------------------------- Dirichlet budget
def test_dirichlet_budget_sums_caps_and_mean():
    sizes = {"image": 64, "audio": 32, "text": 8}
    c = dirichlet_budget(20000, sizes, 40, alpha={"image": 2.0, "audio": 1.0, "text": 1.0}, generator=_g(0))
    assert (sum(c.values()) == 40).all()
    for k, L in sizes.items(): assert ((c[k] >= 0) & (c[k] <= L)).all()
    c2 = dirichlet_budget(20000, sizes, 40, alpha={"image": 2.0, "audio": 1.0, "text": 1.0}, generator=_g(0))
    assert all(torch.equal(c[k], c2[k]) for k in sizes)
    # against the Dirichlet draw itself (same seed): uncapped rows are lambda*N rounded (|error| < 1);
    # in rows where lambda_text*N exceeds 8, text gets all 8 and the others at least their share
    from mmlab.masking import _dirichlet
    lam = _dirichlet(20000, [2.0, 1.0, 1.0], _g(0)) * 40
    n = torch.stack([c["image"], c["audio"], c["text"]], 1).double()
    free = (lam <= torch.tensor([64, 32, 8])).all(1)
    assert free.any() and ((n[free] - lam[free]).abs() < 1).all()
    capped = lam[:, 2] > 8
    assert capped.any() and (n[capped, 2] == 8).all() and (n[capped, :2] >= lam[capped, :2].floor()).all()

def test_dirichlet_budget_uncapped_is_unbiased():
    c = dirichlet_budget(20000, {"a": 100, "b": 100}, 50, alpha=1.0, generator=_g(3))
    assert abs(float(c["a"].float().mean()) - 25) < 0.5
    assert (sum(c.values()) == 50).all()

def test_dirichlet_full_budget_and_single_modality():
    c = dirichlet_budget(5, {"a": 3, "b": 2}, 5, generator=_g(0))
    assert (c["a"] == 3).all() and (c["b"] == 2).all()
    c = dirichlet_budget(4, {"a": 10}, 7, generator=_g(0))
    assert (c["a"] == 7).all()

def test_multimodal_mask_consistent():
    sizes = {"image": 16, "audio": 8}
    m, per = multimodal_mask(50, sizes, 10, alpha=0.5, generator=_g(0))
    check_mask_partition(m)
    assert torch.equal(torch.cat([per["image"], per["audio"]], 1), m.mask)
    assert ((~m.mask).sum(1) == 10).all()

# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2, float("nan"), True, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(InputError, match="ratio"): random_mask(2, 10, ratio)

def test_bad_inputs():
    with pytest.raises(InputError, match="cannot hide more tokens"): mask_from_scores(torch.rand(2, 4), 5)
    with pytest.raises(InputError, match="hides k=0"): random_mask(2, 4, 0.05)
    with pytest.raises(InputError, match="hides k=4"): random_mask(2, 4, 0.95)
    with pytest.raises(InputError, match="grid"): block_mask(2, (14,), 0.4)
    with pytest.raises(InputError, match="span"): span_mask(2, 10, 0.5, span=11)
    with pytest.raises(InputError, match="batch size"): random_mask(0, 10, 0.5)
    with pytest.raises(ShapeError): mask_from_scores(torch.rand(2, 3, 4), 1)
    with pytest.raises(InputError, match="budget"): dirichlet_budget(2, {"a": 3}, 4)
    with pytest.raises(MMLabError): noise_mask(2, (4, 4), 0.5, sigma1=2.0, sigma2=1.0)

# ---------------------------------------------------------------- gather / scatter
def _argsort_restore(x_vis, ids_restore, mask_token):
    "MAE reference: append mask tokens to the kept tokens, unshuffle with ids_restore."
    B, Nv, D = x_vis.shape; L = ids_restore.shape[1]
    x_ = torch.cat([x_vis, mask_token.expand(B, L - Nv, D)], 1)
    return torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, D))

def test_scatter_matches_argsort_and_loop():
    B, L, D = 4, 12, 5
    x = torch.randn(B, L, D, generator=_g(0), dtype=torch.float64)
    m = random_mask(B, L, 0.75, generator=_g(1))
    tok = torch.randn(D, generator=_g(2), dtype=torch.float64)
    got = scatter_tokens(gather_tokens(x, m.visible), m, tok)
    # the argsort formulation with a shuffle that keeps exactly m.visible first
    ids_shuffle = torch.cat([m.visible, m.masked], 1); ids_restore = torch.argsort(ids_shuffle, 1)
    x_vis = torch.gather(x, 1, m.visible[..., None].expand(-1, -1, D))
    assert torch.equal(got, _argsort_restore(x_vis, ids_restore, tok))
    for b in range(B):
        for i in range(L):
            assert torch.equal(got[b, i], tok if m.mask[b, i] else x[b, i])

def test_scatter_gradients():
    B, L, D = 3, 8, 4
    m = random_mask(B, L, 0.5, generator=_g(0))
    vis = torch.randn(B, 4, D, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: scatter_tokens(v, m, t), (vis, tok))

# ---------------------------------------------------------------- losses vs loops
def ref_mae(pred, target, mask, norm_pix):
    B, L, P = pred.shape; tot, n = 0.0, 0
    for b in range(B):
        for i in range(L):
            if not mask[b, i]: continue
            t = [float(v) for v in target[b, i]]
            if norm_pix:
                mu = sum(t) / P; var = sum((v - mu) ** 2 for v in t) / (P - 1)
                t = [(v - mu) / math.sqrt(var + 1e-6) for v in t]
            tot += sum((float(pred[b, i, p]) - t[p]) ** 2 for p in range(P)) / P; n += 1
    return tot / n

@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("B,L,P", [(1, 4, 3), (3, 6, 8)])
def test_mae_loss_matches_loop(norm_pix, B, L, P):
    g = _g(B * L + P)
    pred, target = torch.randn(B, L, P, generator=g, dtype=torch.float64), torch.randn(B, L, P, generator=g, dtype=torch.float64)
    mask = random_mask(B, L, 0.5, generator=g).mask
    assert mae_loss(pred, target, mask, norm_pix).item() == pytest.approx(ref_mae(pred, target, mask, norm_pix), rel=1e-10)
    assert torch.autograd.gradcheck(lambda p: mae_loss(p, target, mask, norm_pix), (pred.clone().requires_grad_(),))

def test_simmim_and_hubert_losses_match_loops():
    g = _g(0); B, L, P, K = 2, 6, 4, 5
    pred, target = torch.randn(B, L, P, generator=g, dtype=torch.float64), torch.randn(B, L, P, generator=g, dtype=torch.float64)
    mask = random_mask(B, L, 0.5, generator=g).mask
    ref = sum(sum(abs(float(pred[b, i, p] - target[b, i, p])) for p in range(P)) / P
              for b in range(B) for i in range(L) if mask[b, i]) / int(mask.sum())
    assert simmim_loss(pred, target, mask).item() == pytest.approx(ref, rel=1e-10)
    logits = torch.randn(B, L, K, generator=g, dtype=torch.float64); y = torch.randint(0, K, (B, L), generator=g)
    def ce(b, i):
        row = [float(v) for v in logits[b, i]]; mx = max(row)
        return -(row[int(y[b, i])] - mx - math.log(sum(math.exp(v - mx) for v in row)))
    hid = [(b, i) for b in range(B) for i in range(L) if mask[b, i]]; vis = [(b, i) for b in range(B) for i in range(L) if not mask[b, i]]
    ref_h = sum(ce(*t) for t in hid) / len(hid)
    assert hubert_loss(logits, y, mask).item() == pytest.approx(ref_h, rel=1e-10)
    ref_h2 = ref_h + 0.3 * sum(ce(*t) for t in vis) / len(vis)
    assert hubert_loss(logits, y, mask, unmasked_weight=0.3).item() == pytest.approx(ref_h2, rel=1e-10)
    assert torch.autograd.gradcheck(lambda l: hubert_loss(l, y, mask), (logits.clone().requires_grad_(),))
    with pytest.raises(InputError, match="targets must lie"): hubert_loss(logits, y + K, mask)

def test_norm_patches_matches_loop():
    t = torch.randn(2, 3, 5, generator=_g(0), dtype=torch.float64); out = norm_patches(t)
    for b in range(2):
        for i in range(3):
            v = [float(x) for x in t[b, i]]; mu = sum(v) / 5; var = sum((x - mu) ** 2 for x in v) / 4
            assert [float(x) for x in out[b, i]] == pytest.approx([(x - mu) / math.sqrt(var + 1e-6) for x in v], rel=1e-12)

# ---------------------------------------------------------------- k-means vs scikit-learn
@pytest.mark.parametrize("seed,k", [(0, 3), (1, 8), (2, 16)])
def test_kmeans_matches_sklearn(seed, k):
    from sklearn.cluster import KMeans
    x = torch.randn(300, 5, generator=_g(seed), dtype=torch.float64) + 3 * torch.randn(1, 5, generator=_g(seed + 10), dtype=torch.float64) * (torch.arange(300) % 4)[:, None]
    init = kmeans_plusplus(x, k, generator=_g(seed))
    ours = kmeans(x, k, init=init, iters=300)
    sk = KMeans(k, init=init.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(x.numpy())
    assert ours.labels.tolist() == sk.labels_.tolist()
    assert torch.allclose(ours.centroids, torch.from_numpy(sk.cluster_centers_), atol=1e-9)
    assert ours.inertia == pytest.approx(float(sk.inertia_), rel=1e-9)
    assert torch.equal(kmeans_targets(x[None], ours.centroids)[0], ours.labels)

def test_kmeans_seeded():
    x = torch.randn(200, 3, generator=_g(0))
    a, b = kmeans(x, 5, generator=_g(7)), kmeans(x, 5, generator=_g(7))
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)

# ---------------------------------------------------------------- models
def _tiny_vit(**kw): torch.manual_seed(0); return ViTEncoder(ViTConfig.preset("tiny", **kw))

def test_mae_no_leakage_and_visible_only():
    mae = MAE(_tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    imgs = torch.rand(3, 3, 32, 32, generator=_g(0))
    out = mae(imgs, generator=_g(1))
    assert mae.encode(imgs, out.mask).shape == (3, 1 + 4, 64)
    hidden = F.interpolate(out.mask.mask.view(3, 1, 4, 4).float(), scale_factor=8)
    imgs2 = imgs + 10 * torch.randn(imgs.shape, generator=_g(2)) * hidden
    assert torch.allclose(mae.encode(imgs2, out.mask), mae.encode(imgs, out.mask), atol=1e-6)
    assert torch.allclose(mae(imgs2, mask=out.mask).pred, out.pred, atol=1e-5)
    # the loss still sees the hidden pixels (as targets)
    assert not torch.allclose(mae(imgs2, mask=out.mask).loss, out.loss)

def test_mae_loss_equals_reference_on_model_output():
    mae = MAE(_tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix=True).eval()
    imgs = torch.rand(2, 3, 32, 32, generator=_g(0)); out = mae(imgs, generator=_g(1))
    target = mae.encoder("image").patchify(imgs)
    assert out.loss.item() == pytest.approx(ref_mae(out.pred.detach().double(), target.double(), out.mask.mask, True), rel=1e-5)

def test_simmim_sees_visible_only_through_mask_tokens():
    sm = SimMIM(_tiny_vit(), mask_ratio=0.5, block_size=1).eval()
    imgs = torch.rand(2, 3, 32, 32, generator=_g(0)); out = sm(imgs, generator=_g(1))
    hidden = F.interpolate(out.mask.mask.view(2, 1, 4, 4).float(), scale_factor=8)
    assert torch.allclose(sm(imgs + 5 * hidden * torch.rand(imgs.shape, generator=_g(2)), mask=out.mask).pred, out.pred, atol=1e-5)

def _mmae(**kw):
    torch.manual_seed(0)
    ad = {"image": ViTEncoder(ViTConfig.preset("tiny", depth=0, class_token=False, pool="mean")),
          "audio": AudioEncoder(AudioConfig.preset("tiny", n_mels=32, patch_size=(16, 8), depth=0))}
    return MultiModalMAE(ad, embed_dim=64, visible=6, **kw).eval()

def test_multimodal_mae_budget_and_leakage():
    mm = _mmae(alpha=0.5)
    inp = {"image": torch.rand(4, 3, 32, 32, generator=_g(0)), "audio": torch.randn(4, 32, 32, generator=_g(1))}
    o = mm(inp, generator=_g(2))
    assert ((~o.masks["image"]).sum(1) + (~o.masks["audio"]).sum(1) == 6).all()
    assert o.preds["image"].shape == (4, 16, 192) and o.preds["audio"].shape == (4, 8, 128)
    hid_a = o.masks["audio"].view(4, 4, 2).transpose(1, 2).repeat_interleave(16, 1).repeat_interleave(8, 2)   # (B, F, T)
    o2 = mm({"image": inp["image"], "audio": inp["audio"] + 5 * hid_a * torch.randn(4, 32, 32, generator=_g(3))}, generator=_g(2))
    for k in o.preds: assert torch.allclose(o2.preds[k], o.preds[k], atol=1e-5)
    assert o.loss.item() == pytest.approx(sum(v.item() for v in o.losses.values()), rel=1e-6)

def test_multimodal_mae_contrastive_fixed_ratio():
    mm = _mmae(contrastive_weight=1.0)
    inp = {"image": torch.rand(4, 3, 32, 32, generator=_g(0)), "audio": torch.randn(4, 32, 32, generator=_g(1))}
    o = mm(inp, generator=_g(2))
    assert "contrastive" in o.losses and torch.isfinite(o.loss)
    vis = {k: (~v).sum(1) for k, v in o.masks.items()}
    assert (vis["image"] == vis["image"][0]).all() and (vis["audio"] == vis["audio"][0]).all()

def test_hubert_loss_only_on_hidden_frames():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig.preset("tiny", n_mels=32, patch_size=(32, 2), depth=1))
    h = HuBERT(enc, num_units=7).eval()
    spec = torch.randn(2, 32, 40, generator=_g(0)); y = torch.randint(0, 7, (2, 20), generator=_g(1))
    o = h(spec, y, generator=_g(2))
    assert o.logits.shape == (2, 20, 7) and o.mask.num_masked == 10
    y2 = torch.where(o.mask.mask, y, (y + 1) % 7)
    assert h(spec, y2, mask=o.mask).loss.item() == pytest.approx(o.loss.item(), rel=1e-6)
    spec2 = spec.clone().view(2, 32, 20, 2); spec2[o.mask.mask[:, None, :, None].expand_as(spec2)] += 7
    assert torch.allclose(h(spec2.view(2, 32, 40), y, mask=o.mask).logits, o.logits, atol=1e-5)   # hidden frames unseen

def test_span_mask_matches_broadcast_reference():
    "The sliding-max cover equals the explicit (B, K, L) 'highest covering priority' on the same draws."
    B, L, span, ratio = 6, 50, 7, 0.4
    k = round(ratio * L); K = 3 * math.ceil(k / span) + 4
    g = _g(5); u = torch.rand(B, K, 2, generator=g); rest = 0.5 * torch.rand(B, L, generator=g, dtype=torch.float64)
    start = torch.floor(u[..., 0] * (L - span + 1))
    t = torch.arange(L).view(1, 1, L)
    inside = (t >= start[..., None]) & (t < start[..., None] + span)
    cover = (inside * (1 + u[..., 1].double())[..., None]).amax(1)
    pos = 1e-9 * (1 - torch.arange(L, dtype=torch.float64) / L)
    scores = torch.where(cover > 0, cover + pos, rest)
    ref = torch.zeros(B, L, dtype=torch.bool).scatter_(1, torch.topk(scores, k, 1).indices, True)
    assert torch.equal(span_mask(B, L, ratio, span=span, generator=_g(5)).mask, ref)

# ================================================================ issue 14: tests that notice a wrong change
from hypothesis import given, settings, strategies as st
from mmlab.core import InputTypeError, ConfigError
from mmlab.masking import apply_mask, _largest_remainder
from mmlab.models import MAEOutput

_FAST = settings(max_examples=30, deadline=None, derandomize=True)

def _bool_rows(rows, L):
    "(B, L) bool mask with the given hidden positions per row."
    m = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows): m[b, list(r)] = True
    return m

def _ce64(logits, b, i, y):
    row = [float(v) for v in logits[b, i]]; mx = max(row)
    return -(row[int(y[b, i])] - mx - math.log(sum(math.exp(v - mx) for v in row)))

# ---------------------------------------------------------------- 1. HuBERT loss normalisation
@pytest.mark.parametrize("rows", [[(1, 5), (0, 6)],                       # 1/4 hidden
                                  [(0, 1, 2, 4, 5, 7), (1, 2, 3, 4, 6, 7)],   # 3/4 hidden
                                  [(3,), (0, 2, 5)]])                     # unequal rows: pooled over the batch
@pytest.mark.parametrize("w", [0.0, 0.3, 2.0])
def test_hubert_loss_terms_normalised_by_their_own_counts(rows, w):
    "hidden CE averaged over hidden frames + w x visible CE averaged over visible frames (pooled, float64 loop)."
    g = _g(11); B, N, K = 2, 8, 5
    logits = torch.randn(B, N, K, generator=g, dtype=torch.float64); y = torch.randint(0, K, (B, N), generator=g)
    mask = _bool_rows(rows, N)
    hid = [_ce64(logits, b, i, y) for b in range(B) for i in range(N) if mask[b, i]]
    vis = [_ce64(logits, b, i, y) for b in range(B) for i in range(N) if not mask[b, i]]
    ref = sum(hid) / len(hid) + w * sum(vis) / len(vis)
    assert hubert_loss(logits, y, mask, unmasked_weight=w).item() == pytest.approx(ref, rel=1e-10)

def test_hubert_loss_all_hidden_has_no_visible_term():
    "With no visible frame the visible term is 0 (no 0/0), the hidden term the plain mean CE."
    g = _g(1); logits = torch.randn(1, 4, 3, generator=g, dtype=torch.float64); y = torch.tensor([[0, 2, 1, 2]])
    ref = sum(_ce64(logits, 0, i, y) for i in range(4)) / 4
    assert hubert_loss(logits, y, torch.ones(1, 4, dtype=torch.bool), unmasked_weight=0.5).item() == pytest.approx(ref, rel=1e-12)

def test_hubert_loss_target_range_boundaries():
    logits = torch.zeros(1, 3, 4, dtype=torch.float64); mask = torch.tensor([[True, False, True]])
    assert hubert_loss(logits, torch.tensor([[0, 3, 3]]), mask).item() == pytest.approx(math.log(4), rel=1e-12)
    with pytest.raises(InputError, match="targets must lie"): hubert_loss(logits, torch.tensor([[0, 4, 0]]), mask)
    with pytest.raises(InputError, match="targets must lie"): hubert_loss(logits, torch.tensor([[-1, 0, 0]]), mask)

# ---------------------------------------------------------------- 2. k-means++ and k-means
def test_kmeans_plusplus_first_uniform_then_d_squared():
    """Points 0, 1, 3 on a line. First centre uniform (1/3 each); the second drawn with P ~ D^2: after 0 it is 3 with
    probability 9/10 (D-weighting would give 3/4), after 1 -> 3 with 4/5 (D: 2/3), after 3 -> 0 with 9/13 (D: 3/5)."""
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    n = 1500; first = torch.zeros(3); second = torch.zeros(3, 3)
    for s in range(n):
        c = kmeans_plusplus(x, 2, generator=_g(s))[:, 0].tolist()
        i, j = [0.0, 1.0, 3.0].index(c[0]), [0.0, 1.0, 3.0].index(c[1])
        first[i] += 1; second[i, j] += 1
    assert (first / n - 1 / 3).abs().max() < 0.05                  # sd 0.012
    d2 = torch.tensor([[0.0, 1, 9], [1, 0, 4], [9, 4, 0]], dtype=torch.float64)
    p = second / second.sum(1, keepdim=True)
    assert (second.diagonal() == 0).all(), "a chosen point has D = 0 and is never drawn again"
    # each conditional frequency is within 0.055 of D^2 (sd <= 0.022); D-weighting is >= 0.09 away
    assert (p - d2 / d2.sum(1, keepdim=True)).abs().max() < 0.055, p

def test_kmeans_plusplus_distinct_points_never_repeat():
    "Distances are to the NEAREST chosen centre: with k = N distinct points every point is chosen exactly once."
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    for s in range(40):
        c = kmeans_plusplus(x, 4, generator=_g(s))
        assert sorted(map(tuple, c.tolist())) == sorted(map(tuple, x.tolist()))

def test_kmeans_plusplus_identical_points_fall_back_to_uniform():
    x = torch.ones(5, 2)
    assert torch.equal(kmeans_plusplus(x, 3, generator=_g(0)), torch.ones(3, 2))

def _three_blobs():
    g = _g(4); centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    truth = torch.arange(60) % 3
    return centres[truth] + 0.3 * torch.randn(60, 2, generator=g, dtype=torch.float64), truth

def test_kmeans_recovers_separated_clusters_and_inertia_closed_form():
    x, truth = _three_blobs()
    r = kmeans(x, 3, generator=_g(0))
    # same partition as the truth (up to relabelling), centres = the blob means, inertia = sum of squared distances
    assert len({(int(a), int(b)) for a, b in zip(truth, r.labels)}) == 3
    for j in range(3):
        pts = x[r.labels == j]
        assert torch.allclose(r.centroids[j], pts.mean(0), atol=1e-12)
    inertia = sum(float(((x[i] - r.centroids[r.labels[i]]) ** 2).sum()) for i in range(60))
    assert r.inertia == pytest.approx(inertia, rel=1e-12)
    assert 1 <= r.n_iter < 100

def test_kmeans_converged_init_stops_after_one_iteration():
    "Lloyd stops when the assignment repeats: from the optimum, one iteration is run and n_iter says so."
    x, truth = _three_blobs()
    opt = torch.stack([x[truth == j].mean(0) for j in range(3)])
    r = kmeans(x, 3, init=opt)
    assert r.n_iter == 1 and torch.equal(r.labels, truth) and torch.allclose(r.centroids, opt, atol=1e-12)

def test_kmeans_iters_limits_lloyd_steps():
    "iters=1: one assignment + one centroid update from the init, checked by hand on 1-D points."
    x = torch.tensor([[0.0], [1.0], [9.0], [10.0]], dtype=torch.float64)
    r = kmeans(x, 2, iters=1, init=torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    # step 1: labels [0, 1, 1, 1] -> centres 0 and (1+9+10)/3; final labels with those centres
    assert r.n_iter == 1 and r.centroids[:, 0].tolist() == pytest.approx([0.0, 20 / 3], rel=1e-12)
    assert r.labels.tolist() == [0, 0, 1, 1]
    assert r.inertia == pytest.approx(1 + (9 - 20 / 3) ** 2 + (10 - 20 / 3) ** 2, rel=1e-12)
    # unlimited: a second step moves 1 to the first cluster, the third repeats the assignment and stops (n_iter 2)
    r = kmeans(x, 2, init=torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    assert r.n_iter == 2 and r.centroids[:, 0].tolist() == pytest.approx([0.5, 9.5], rel=1e-12) and r.inertia == pytest.approx(1.0)

def test_kmeans_empty_cluster_keeps_its_centre():
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    r = kmeans(x, 2, init=torch.tensor([[1.0], [100.0]], dtype=torch.float64))
    assert r.centroids[:, 0].tolist() == [1.0, 100.0] and r.labels.tolist() == [0, 0, 0]

def test_kmeans_targets_is_nearest_centre():
    g = _g(8); f = torch.randn(2, 7, 3, generator=g, dtype=torch.float64); c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = kmeans_targets(f, c)
    for b in range(2):
        for n in range(7):
            d = [sum((float(f[b, n, i]) - float(c[j, i])) ** 2 for i in range(3)) for j in range(4)]
            assert int(got[b, n]) == d.index(min(d))

@pytest.mark.parametrize("k", [0, 5, True, 2.0])
def test_kmeans_bad_k(k):
    with pytest.raises(InputError, match="k must be an integer"): kmeans(torch.randn(4, 2), k)

# ---------------------------------------------------------------- 3. MAE de-normalisation (MAE.reconstruct)
def _tiny_mae(norm_pix=True, **kw):
    return MAE(_tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix=norm_pix, **kw).double().eval()

def _patch(imgs, b, n, p=8, gw=4):
    "Pixels of patch n (row-major on the grid) as a flat (ph, pw, C) vector, by slicing (no patchify)."
    r, c = divmod(n, gw)
    return imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)

def _ref_reconstruct(imgs, pred, mask, norm_pix, eps=1e-6, p=8, gw=4):
    out = imgs.clone()
    for b in range(imgs.shape[0]):
        for n in range(mask.shape[1]):
            if not mask[b, n]: continue
            v = pred[b, n]
            if norm_pix:
                t = _patch(imgs, b, n); P = t.numel(); mu = t.sum() / P; var = ((t - mu) ** 2).sum() / (P - 1)
                v = v * math.sqrt(var + eps) + mu
            r, c = divmod(n, gw)
            out[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = v.view(p, p, -1).permute(2, 0, 1)
    return out.clamp(0, 1)

@pytest.mark.parametrize("scale", [1.0, 1e-3])    # 1e-3: patch variance ~1e-7, so eps = 1e-6 dominates
def test_mae_reconstruct_inverts_norm_pix(scale):
    "A prediction equal to the normalised target (float64 loop: per-patch mean, unbiased var + eps) gives back the pixels."
    mae = _tiny_mae(); imgs = 0.5 + scale * (torch.rand(2, 3, 32, 32, generator=_g(0), dtype=torch.float64) - 0.5)
    m = random_mask(2, 16, 0.25, generator=_g(1))
    pred = torch.zeros(2, 16, 192, dtype=torch.float64)
    for b in range(2):
        for n in range(16):
            t = _patch(imgs, b, n); mu = t.sum() / 192; var = ((t - mu) ** 2).sum() / 191
            pred[b, n] = (t - mu) / math.sqrt(var + 1e-6) if m.mask[b, n] else 123.0   # visible preds are ignored
    assert torch.allclose(mae.reconstruct(imgs, MAEOutput(torch.tensor(0.0), pred, m)), imgs, atol=1e-12, rtol=0)

@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_mae_reconstruct_matches_loop(norm_pix, scale):
    "Hidden patches: de-normalised prediction (clamped to [0, 1]); visible patches: the input pixels."
    mae = _tiny_mae(norm_pix); imgs = 0.5 + scale * (torch.rand(2, 3, 32, 32, generator=_g(0), dtype=torch.float64) - 0.5)
    m = random_mask(2, 16, 0.75, generator=_g(1))
    pred = torch.randn(2, 16, 192, generator=_g(2), dtype=torch.float64) * (2.0 if norm_pix else 0.7) + (0 if norm_pix else 0.5)
    got = mae.reconstruct(imgs, MAEOutput(torch.tensor(0.0), pred, m))
    ref = _ref_reconstruct(imgs, pred, m.mask, norm_pix)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    if scale == 1.0: assert (ref == 0).any() and (ref == 1).any()   # the clamp is exercised

# ---------------------------------------------------------------- 4. SimMIM block mask
def _cells(m, grid, s):
    "Per sample, per coarse s x s cell (cropped at the border): (hidden count, cell size, hidden flat indices)."
    H, W = grid; out = []
    for b in range(m.mask.shape[0]):
        g = m.mask[b].view(H, W); row = []
        for r0 in range(0, H, s):
            for c0 in range(0, W, s):
                blk = g[r0:r0 + s, c0:c0 + s]
                idx = [(r0 + i) * W + c0 + j for i in range(blk.shape[0]) for j in range(blk.shape[1])]
                row.append((int(blk.sum()), blk.numel(), [t for t in idx if m.mask[b, t]], idx))
        out.append(row)
    return out

@pytest.mark.parametrize("B,grid,s,ratio", [(64, (8, 8), 2, 0.5), (64, (6, 9), 3, 1 / 3), (64, (12, 12), 4, 2 / 9)])
def test_simmim_block_mask_is_aligned_squares(B, grid, s, ratio):
    "k a multiple of s*s on a grid divisible by s: the mask is exactly k/s^2 whole, aligned s x s squares."
    m = block_mask(B, grid, ratio, block_size=s, generator=_g(0))
    k = round(ratio * grid[0] * grid[1]); assert k % (s * s) == 0
    for row in _cells(m, grid, s):
        assert all(h in (0, n) for h, n, _, _ in row)
        assert sum(h == n for h, n, _, _ in row) == k // (s * s)
    freq = m.mask.float().mean(0)        # every square equally likely: no position favoured
    assert (freq - ratio).abs().max() < 0.25

@settings(max_examples=30, deadline=None, derandomize=True)
@given(H=st.integers(1, 9), W=st.integers(2, 9), s=st.integers(1, 4), r=st.floats(0.05, 0.95), seed=st.integers(0, 10**6))
def test_simmim_block_mask_exact_count_one_cut_block(H, W, s, r, seed):
    """Any grid / block size / ratio: exactly round(r*L) hidden; whole cells (cropped at the border) except at most one,
    and that cut cell is filled in reading order (a prefix of its cells)."""
    L = H * W; k = round(r * L)
    if not 0 < k < L: return
    m = block_mask(3, (H, W), r, block_size=s, generator=_g(seed))
    assert (m.mask.sum(1) == k).all()
    for row in _cells(m, (H, W), s):
        cut = [c for c in row if 0 < c[0] < c[1]]
        assert len(cut) <= 1
        for h, n, hid, idx in cut: assert hid == idx[:h]

def test_simmim_block_size_one_is_uniform():
    m = block_mask(2000, (4, 5), 0.5, block_size=1, generator=_g(0))
    assert (m.mask.float().mean(0) - 0.5).abs().max() < 0.04
    assert abs(neighbour_agreement(m, (4, 5)) - (10 - 1) / (20 - 1)) < 0.03   # sampling without replacement

@pytest.mark.parametrize("bs", [0, -1, 1.5, True])
def test_block_mask_bad_block_size(bs):
    with pytest.raises(InputError, match="block_size must be a positive integer"): block_mask(2, (4, 4), 0.5, block_size=bs)

# ---------------------------------------------------------------- 5. bool mask -> indices
def test_mask_from_bool_refuses_unequal_counts():
    with pytest.raises(InputError, match="same number of tokens"):
        mask_from_bool(torch.tensor([[True, False, False], [True, True, False]]))
    with pytest.raises(InputError, match=r"counts \[1, 1, 2\]"):     # the message names the counts
        mask_from_bool(torch.tensor([[True, False, False], [False, True, False], [True, True, False]]))
    with pytest.raises(InputTypeError, match="bool"): mask_from_bool(torch.tensor([[1, 0], [0, 1]]))

@settings(max_examples=30, deadline=None, derandomize=True)
@given(B=st.integers(1, 6), L=st.integers(1, 12), data=st.data())
def test_mask_from_bool_indices_reproduce_the_mask(B, L, data):
    k = data.draw(st.integers(0, L))
    rows = [sorted(data.draw(st.permutations(range(L)))[:k]) for _ in range(B)]
    mask = _bool_rows(rows, L); m = mask_from_bool(mask)
    assert m.masked.tolist() == rows
    assert m.visible.tolist() == [[i for i in range(L) if i not in r] for r in rows]
    assert m.num_masked == k and m.ratio == pytest.approx(k / L)
    rebuilt = torch.zeros(B, L, dtype=torch.bool).scatter_(1, m.masked, True)
    assert torch.equal(rebuilt, mask)

# ---------------------------------------------------------------- 6. every generator matches its parameters
@pytest.mark.parametrize("L,ratio,k", [(196, 0.75, 147), (10, 0.06, 1), (10, 0.94, 9), (4, 0.375, 2),
                                       (4, 0.625, 2), (2, 0.5, 1), (7, 0.5, 4), (3, 0.5, 2)])
def test_num_masked_rounds_to_nearest(L, ratio, k):
    "k = round(ratio * L), hand-computed (Python rounds exact halves to even: 2.5 -> 2, 3.5 -> 4)."
    assert num_masked(L, ratio) == k

@pytest.mark.parametrize("L,ratio,msg", [(10, 0.05, "hides k=0"), (10, 0.04, "hides k=0"), (10, 0.951, "hides k=10"),
                                         (1, 0.5, "L >= 2"), (True, 0.5, "L >= 2"), (4.0, 0.5, "L >= 2"), (3, 1, "ratio")])
def test_num_masked_refuses_boundaries(L, ratio, msg):
    with pytest.raises(InputError, match=msg): num_masked(L, ratio, "here")

def test_num_masked_message_names_the_caller():
    with pytest.raises(InputError, match="^span_mask:"): num_masked(1, 0.5, "span_mask")
    with pytest.raises(InputError, match="^noise_mask: ratio 0.01"): num_masked(10, 0.01, "noise_mask")

@_FAST
@given(B=st.integers(1, 5), L=st.integers(2, 300), r=st.floats(0.001, 0.999), seed=st.integers(0, 10**6))
def test_random_mask_hides_exactly_round_ratio_L(B, L, r, seed):
    k = round(r * L)                    # Python's round: nearest integer, exact halves to even
    if not 0 < k < L:
        with pytest.raises(InputError, match="expected 0 < k < L"): random_mask(B, L, r)
        return
    assert num_masked(L, r) == k
    m = random_mask(B, L, r, generator=_g(seed))
    assert (m.mask.sum(1) == k).all() and m.masked.shape == (B, k)
    check_mask_partition(m)

def _beit_reference(B, H, W, ratio, min_area, aspect, seed):
    "BEiT block masking by loops on the generator's draws: K rectangles (area, log-aspect, top, left, priority)."
    L = H * W; k = round(ratio * L); min_area = min(max(1, min_area), k); K = 2 * math.ceil(k / min_area) + 4
    g = _g(seed); u = torch.rand(B, K, 5, generator=g); rest = 0.5 * torch.rand(B, L, generator=g, dtype=torch.float64)
    masks, shapes = [], []
    for b in range(B):
        cover = [0.0] * L
        for j in range(K):
            u0, u1, u2, u3, u4 = (float(v) for v in u[b, j])
            area = min_area + u0 * (max(min_area, k) - min_area)
            ar = math.exp(math.log(aspect) + u1 * (math.log(1 / aspect) - math.log(aspect)))
            h = min(max(round(math.sqrt(area * ar)), 1), H); w = min(max(round(math.sqrt(area / ar)), 1), W)
            top, left = math.floor(u2 * (H - h + 1)), math.floor(u3 * (W - w + 1))
            shapes.append((h, w, area))
            for r in range(top, top + h):
                for c in range(left, left + w): cover[r * W + c] = max(cover[r * W + c], 1 + u4)
        score = [cover[t] + 1e-9 * (1 - t / L) if cover[t] > 0 else float(rest[b, t]) for t in range(L)]
        masks.append(sorted(sorted(range(L), key=lambda t: -score[t])[:k]))
    return masks, shapes

@pytest.mark.parametrize("B,grid,ratio,min_area,aspect,seed",
                         [(4, (6, 7), 0.4, 4, 0.3, 0), (3, (14, 14), 0.4, 16, 0.3, 1), (3, (5, 9), 0.6, 3, 0.5, 2),
                          (2, (3, 3), 0.5, 40, 1.0, 3), (6, (2, 12), 0.5, 12, 0.3, 4)])   # wide grid: sides clamp
def test_beit_block_mask_matches_loop_reference(B, grid, ratio, min_area, aspect, seed):
    ref, shapes = _beit_reference(B, *grid, ratio, min_area, aspect, seed)
    m = block_mask(B, grid, ratio, min_area=min_area, aspect=aspect, generator=_g(seed))
    assert m.masked.tolist() == ref
    k = round(ratio * grid[0] * grid[1])
    assert all(min(min_area, k) <= a <= max(min(min_area, k), k) for _, _, a in shapes)

def test_beit_block_mask_area_and_aspect():
    """min_area = k and aspect 1: the first rectangle is a sqrt(k) x sqrt(k) square and it alone is the mask;
    aspect 1/4 (same area 16): both tall and wide rectangles, sides 2..8."""
    m = block_mask(50, (8, 8), 0.25, min_area=16, aspect=1.0, generator=_g(0))
    for row in m.mask.view(50, 8, 8):
        rr, cc = row.nonzero(as_tuple=True)
        assert (rr.max() - rr.min() + 1, cc.max() - cc.min() + 1) == (4, 4)
    m = block_mask(400, (8, 8), 0.25, min_area=16, aspect=0.25, generator=_g(0))
    hs, ws = [], []
    for row in m.mask.view(400, 8, 8):
        rr, cc = row.nonzero(as_tuple=True); hs.append(int(rr.max() - rr.min() + 1)); ws.append(int(cc.max() - cc.min() + 1))
    assert 2 <= min(hs) and max(hs) <= 8 and 2 <= min(ws) and max(ws) <= 8
    tall = sum(h > w for h, w in zip(hs, ws)); wide = sum(w > h for h, w in zip(hs, ws))
    assert tall > 100 and wide > 100, (tall, wide)        # log-uniform aspect: symmetric around square

@pytest.mark.parametrize("aspect", [0.0, -0.5, 1.5])
def test_beit_bad_aspect(aspect):
    with pytest.raises(InputError, match="aspect must be in"): block_mask(2, (6, 6), 0.4, aspect=aspect)

@_FAST
@given(B=st.integers(1, 4), H=st.integers(1, 10), W=st.integers(2, 10), r=st.floats(0.05, 0.95),
       min_area=st.integers(0, 20), seed=st.integers(0, 10**6))
def test_beit_block_mask_exact_count(B, H, W, r, min_area, seed):
    k = round(r * H * W)
    if not 0 < k < H * W: return
    m = block_mask(B, (H, W), r, min_area=min_area, generator=_g(seed))
    assert (m.mask.sum(1) == k).all(); check_mask_partition(m)

@_FAST
@given(B=st.integers(1, 4), T=st.integers(1, 6), S=st.integers(2, 30), r=st.floats(0.02, 0.98), seed=st.integers(0, 10**6))
def test_tube_mask_same_positions_every_frame(B, T, S, r, seed):
    k = round(r * S)
    if not 0 < k < S: return
    m = tube_mask(B, T, S, r, generator=_g(seed))
    g = m.mask.view(B, T, S)                            # tokens are time-major: index t * S + s
    assert (g == g[:, :1]).all() and (g[:, 0].sum(1) == k).all() and m.num_masked == T * k

def test_tube_mask_bad_T():
    for T in (0, True, 2.0):
        with pytest.raises(InputError, match="T must be a positive integer"): tube_mask(2, T, 8, 0.5)

def _runs(row):
    "Lengths of the maximal runs of True in a 1-D bool tensor."
    out, n = [], 0
    for v in row.tolist() + [False]:
        if v: n += 1
        elif n: out.append(n); n = 0
    return out

@pytest.mark.parametrize("span", [3, 10])
def test_span_mask_runs_are_at_least_span_long(span):
    "Hidden frames are unions of spans of `span` frames: every run but (at most) the one cut span is >= span long."
    m = span_mask(100, 200, 0.2, span=span, generator=_g(0))
    short = [sum(r < span for r in _runs(row)) for row in m.mask]
    assert max(short) <= 1

def test_span_mask_span_L_hides_a_prefix():
    "span = L: every span starts at 0, so the hidden frames are the first k (the cut span keeps its start)."
    m = span_mask(4, 9, 0.4, span=9, generator=_g(0))
    assert m.masked.tolist() == [[0, 1, 2, 3]] * 4

def test_span_mask_span_one_is_uniform():
    m = span_mask(3000, 8, 0.5, span=1, generator=_g(0))
    assert (m.mask.float().mean(0) - 0.5).abs().max() < 0.04

@_FAST
@given(B=st.integers(1, 4), L=st.integers(2, 80), r=st.floats(0.02, 0.98), span=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_span_mask_exact_count(B, L, r, span, seed):
    k = round(r * L)
    if not 0 < k < L: return
    if span > L:
        with pytest.raises(InputError, match=r"span must be an integer in \[1, L="): span_mask(B, L, r, span=span)
        return
    m = span_mask(B, L, r, span=span, generator=_g(seed))
    assert (m.mask.sum(1) == k).all(); check_mask_partition(m)

@pytest.mark.parametrize("span", [0, True, 2.0, 11])
def test_span_mask_bad_span(span):
    with pytest.raises(InputError, match="span must be an integer"): span_mask(2, 10, 0.5, span=span)

def _np_filtered(white, color, s1, s2):
    "Reference ColorMAE filter: full 2-D FFT of the white noise times exp(-2 pi^2 sigma^2 |f|^2), frequencies by loops."
    import numpy as np
    B, H, W = white.shape
    fy = [(i if i < (H + 1) // 2 else i - H) / H for i in range(H)]; fx = [(j if j < (W + 1) // 2 else j - W) / W for j in range(W)]
    g = lambda s: np.array([[math.exp(-2 * (math.pi * s) ** 2 * (a * a + b * b)) for b in fx] for a in fy])
    g1, g2 = g(s1), g(s2)
    filt = {"white": np.ones((H, W)), "red": g1, "blue": 1 - g1, "green": g1 - g2, "purple": 1 - (g1 - g2)}[color]
    return np.real(np.fft.ifft2(np.fft.fft2(white.double().numpy()) * filt))

@pytest.mark.parametrize("color", NOISE_COLORS)
@pytest.mark.parametrize("grid,s1,s2", [((6, 8), 1.0, 2.0), ((7, 5), 0.5, 1.5)])
def test_filtered_noise_matches_fft_reference(color, grid, s1, s2):
    white = filtered_noise(3, grid, "white", generator=_g(4))        # the same draw as the coloured call below
    assert white.min() >= 0 and white.max() < 1
    got = filtered_noise(3, grid, color, s1, s2, generator=_g(4))
    assert torch.allclose(got.double(), torch.from_numpy(_np_filtered(white, color, s1, s2)), atol=1e-5)

@pytest.mark.parametrize("color", NOISE_COLORS)
def test_noise_mask_hides_the_top_k_of_the_noise(color):
    n = filtered_noise(5, (6, 7), color, 0.7, 3.0, generator=_g(2)).flatten(1)
    m = noise_mask(5, (6, 7), 0.3, color, 0.7, 3.0, generator=_g(2)); k = round(0.3 * 42)
    for b in range(5):
        assert m.masked[b].tolist() == sorted(sorted(range(42), key=lambda t: -float(n[b, t]))[:k])

@settings(max_examples=20, deadline=None, derandomize=True)
@given(H=st.integers(1, 8), W=st.integers(2, 8), r=st.floats(0.05, 0.95), color=st.sampled_from(NOISE_COLORS), seed=st.integers(0, 10**6))
def test_noise_mask_exact_count(H, W, r, color, seed):
    k = round(r * H * W)
    if not 0 < k < H * W: return
    assert (noise_mask(2, (H, W), r, color, generator=_g(seed)).mask.sum(1) == k).all()

def test_filtered_noise_bad_arguments():
    with pytest.raises(InputError, match="color must be one of"): filtered_noise(1, (4, 4), "pink")
    with pytest.raises(InputError, match="sigma1 < sigma2"): filtered_noise(1, (4, 4), "green", 1.0, 1.0)
    with pytest.raises(InputError, match="sigma1 < sigma2"): filtered_noise(1, (4, 4), "green", 0.0, 1.0)
    with pytest.raises(InputError, match="grid"): noise_mask(1, (4, 0), 0.5)

def test_largest_remainder_by_hand():
    x = torch.tensor([[1.2, 2.5, 0.3], [0.55, 0.65, 0.8], [2.0, 1.0, 0.0]], dtype=torch.float64)
    assert _largest_remainder(x, torch.tensor([4, 2, 3])).tolist() == [[1, 3, 0], [0, 1, 1], [2, 1, 0]]

@_FAST
@given(w=st.lists(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), min_size=1, max_size=5), total=st.integers(1, 60))
def test_largest_remainder_sums_exactly(w, total):
    "Rounded rows sum exactly to the total; each entry is floor or floor + 1; the +1 go to the largest remainders."
    x = torch.tensor(w, dtype=torch.float64) + 1e-3
    x = x / x.sum(1, keepdim=True) * total
    n = _largest_remainder(x, torch.full((x.shape[0],), total))
    assert n.dtype == torch.long and (n.sum(1) == total).all()
    fl = x.floor(); up = n - fl.long()
    assert ((up == 0) | (up == 1)).all()
    rem = x - fl
    for b in range(x.shape[0]):
        got, rest = rem[b][up[b] == 1], rem[b][up[b] == 0]
        if len(got) and len(rest): assert got.min() >= rest.max() - 1e-12

@settings(max_examples=25, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), frac=st.floats(0.0, 1.0),
       alpha=st.sampled_from([0.1, 1.0, 5.0]), seed=st.integers(0, 10**6))
def test_dirichlet_budget_exact_and_capped(sizes, frac, alpha, seed):
    "Whatever the caps: every row's counts sum to the budget and stay within [0, L_m]."
    sz = {f"m{i}": L for i, L in enumerate(sizes)}; tot = sum(sizes)
    budget = max(1, min(tot, round(frac * tot)))
    c = dirichlet_budget(40, sz, budget, alpha=alpha, generator=_g(seed))
    n = torch.stack([c[k] for k in sz], 1)
    assert (n.sum(1) == budget).all()
    assert ((n >= 0) & (n <= torch.tensor(sizes))).all()

def test_dirichlet_budget_cascading_caps():
    """lambda ~ (0.70, 0.25, 0.05), caps (1, 5, 100), budget 12: "a" overflows by ~7, most of it goes to "b", which then
    overflows too; a second round must move that on to "c": the result is (1, 5, 6) in almost every row."""
    c = dirichlet_budget(300, {"a": 1, "b": 5, "c": 100}, 12, alpha={"a": 50.0, "b": 18.0, "c": 3.5}, generator=_g(0))
    n = torch.stack([c["a"], c["b"], c["c"]], 1)
    assert (n.sum(1) == 12).all() and (n <= torch.tensor([1, 5, 100])).all()
    assert (n == torch.tensor([1, 5, 6])).all(1).float().mean() > 0.9

def test_dirichlet_budget_bad_arguments():
    with pytest.raises(InputError, match="non-empty dict"): dirichlet_budget(2, {}, 1)
    with pytest.raises(InputError, match=">= 1 token"): dirichlet_budget(2, {"a": 3, "b": 0}, 1)
    with pytest.raises(InputError, match="alpha must be > 0"): dirichlet_budget(2, {"a": 3, "b": 2}, 2, alpha={"a": 1.0, "b": 0.0})
    with pytest.raises(InputError, match=r"budget must be an integer in \[1, 5\]"): dirichlet_budget(2, {"a": 3, "b": 2}, 0)
    with pytest.raises(InputError, match="budget"): dirichlet_budget(2, {"a": 3, "b": 2}, 6)
    with pytest.raises(InputError, match="budget"): dirichlet_budget(2, {"a": 3, "b": 2}, 2.0)
    assert (dirichlet_budget(2, {"a": 3, "b": 2}, 1, generator=_g(0))["a"] <= 1).all()    # budget 1 is allowed

def test_multimodal_mask_visible_counts_follow_the_budget():
    sizes = {"image": 16, "audio": 8, "text": 4}
    counts = dirichlet_budget(300, sizes, 9, alpha=0.7, generator=_g(5))
    m, per = multimodal_mask(300, sizes, 9, alpha=0.7, generator=_g(5))
    for k, L in sizes.items():
        assert per[k].shape == (300, L) and torch.equal((~per[k]).sum(1), counts[k])
    assert m.num_masked == 28 - 9
    # inside a modality the visible tokens are uniform: image positions each visible with the same frequency
    f = (~per["image"]).float().sum(0) / (~per["image"]).sum()
    assert (f - 1 / 16).abs().max() < 0.03

@pytest.mark.parametrize("patch,fill", [((2, 3), 0.5), (2, -1.0)])
def test_apply_mask_greys_exactly_the_hidden_patches(patch, fill):
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    x = torch.rand(2, 4, 6, generator=_g(0)); gh, gw = 4 // ph, 6 // pw
    mask = torch.rand(gh * gw, generator=_g(1)) < 0.5; mask[0], mask[-1] = True, False
    out = apply_mask(x, mask, patch, fill) if fill != 0.5 else apply_mask(x, mask, patch)
    for c in range(2):
        for i in range(4):
            for j in range(6):
                hidden = bool(mask[(i // ph) * gw + j // pw])
                assert out[c, i, j] == (fill if hidden else x[c, i, j])

def test_apply_mask_bad_shapes():
    with pytest.raises(ShapeError, match="not divisible into 2x4 patches"): apply_mask(torch.rand(1, 4, 6), torch.zeros(3, dtype=torch.bool), (2, 4))
    with pytest.raises(ShapeError): apply_mask(torch.rand(1, 4, 6), torch.zeros(5, dtype=torch.bool), (2, 3))

# ---------------------------------------------------------------- losses and models: hand-built cases and arguments honoured
def test_scatter_tokens_by_hand():
    m = mask_from_bool(torch.tensor([[False, True, True, False, True], [True, True, False, True, False]]))
    vis = torch.tensor([[[1.0, 1.5], [2.0, 2.5]], [[3.0, 3.5], [4.0, 4.5]]]); tok = torch.tensor([-1.0, -2.0])
    t = [-1.0, -2.0]
    assert scatter_tokens(vis, m, tok).tolist() == [[[1.0, 1.5], t, t, [2.0, 2.5], t], [t, t, [3.0, 3.5], t, [4.0, 4.5]]]
    with pytest.raises(ShapeError): scatter_tokens(vis[:, :1], m, tok)
    with pytest.raises(ShapeError): scatter_tokens(vis, m, torch.zeros(3))

def test_norm_patches_closed_form_and_eps():
    t = torch.tensor([[0.0, 2.0], [3.0, 3.0], [0.0, 2e-3]], dtype=torch.float64)   # unbiased var 2, 0, 2e-6
    out = norm_patches(t)
    assert out[0].tolist() == pytest.approx([-1 / math.sqrt(2 + 1e-6), 1 / math.sqrt(2 + 1e-6)], rel=1e-12)
    assert out[1].tolist() == [0.0, 0.0]
    assert out[2].tolist() == pytest.approx([-1e-3 / math.sqrt(3e-6), 1e-3 / math.sqrt(3e-6)], rel=1e-12)
    assert norm_patches(t, eps=2.0)[0].tolist() == pytest.approx([-0.5, 0.5], rel=1e-12)

@pytest.mark.parametrize("rows", [[(1, 5), (0, 6)], [(0, 1, 2, 4, 5, 7), (1, 2, 3, 4, 6, 7)], [(3,), (0, 2, 5)]])
def test_mae_and_simmim_losses_average_over_hidden_patches(rows):
    "1/4, 3/4 and unequal masks (half masks hide a visible-count normaliser): float64 loops over the hidden patches."
    g = _g(3); B, L, P = 2, 8, 4
    pred, target = torch.randn(B, L, P, generator=g, dtype=torch.float64), torch.randn(B, L, P, generator=g, dtype=torch.float64)
    mask = _bool_rows(rows, L); hid = [(b, i) for b in range(B) for i in range(L) if mask[b, i]]
    assert mae_loss(pred, target, mask).item() == pytest.approx(ref_mae(pred, target, mask, False), rel=1e-12)
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(ref_mae(pred, target, mask, True), rel=1e-12)
    l1 = sum(float((pred[b, i] - target[b, i]).abs().sum()) / P for b, i in hid) / len(hid)
    assert simmim_loss(pred, target, mask).item() == pytest.approx(l1, rel=1e-12)
    # only hidden patches count: changing visible predictions changes nothing
    pred2 = torch.where(mask[..., None], pred, pred + 100)
    assert mae_loss(pred2, target, mask).item() == mae_loss(pred, target, mask).item()
    assert simmim_loss(pred2, target, mask).item() == simmim_loss(pred, target, mask).item()

def test_mae_and_simmim_losses_with_nothing_hidden_are_zero():
    x = torch.randn(2, 3, 4, dtype=torch.float64); none = torch.zeros(2, 3, dtype=torch.bool)
    assert mae_loss(x, x + 1, none).item() == 0.0 and simmim_loss(x, x + 1, none).item() == 0.0

def test_mae_model_honours_mask_ratio_and_norm_pix():
    imgs = torch.rand(2, 3, 32, 32, generator=_g(0), dtype=torch.float64)
    for ratio, norm_pix in [(0.25, False), (0.5, True)]:
        mae = _tiny_mae(norm_pix, mask_ratio=ratio); out = mae(imgs, generator=_g(1))
        assert out.mask.num_masked == round(ratio * 16)
        assert torch.equal(out.mask.mask, random_mask(2, 16, ratio, generator=_g(1)).mask)
        target = torch.stack([torch.stack([_patch(imgs, b, n) for n in range(16)]) for b in range(2)])
        assert out.loss.item() == pytest.approx(ref_mae(out.pred.detach(), target, out.mask.mask, norm_pix), rel=1e-9)

def test_simmim_model_honours_ratio_block_size_and_l1():
    torch.manual_seed(0); sm = SimMIM(ViTEncoder(ViTConfig.preset("tiny", img_size=64)), mask_ratio=0.5, block_size=2).double().eval()
    imgs = torch.rand(2, 3, 64, 64, generator=_g(0), dtype=torch.float64); out = sm(imgs, generator=_g(1))
    assert torch.equal(out.mask.mask, block_mask(2, (8, 8), 0.5, block_size=2, generator=_g(1)).mask)
    for row in _cells(out.mask, (8, 8), 2): assert all(h in (0, n) for h, n, _, _ in row)
    hid = [(b, n) for b in range(2) for n in range(64) if out.mask.mask[b, n]]
    l1 = sum(float((out.pred.detach()[b, n] - _patch(imgs, b, n, gw=8)).abs().mean()) for b, n in hid) / len(hid)
    assert out.loss.item() == pytest.approx(l1, rel=1e-9)

def test_hubert_model_honours_ratio_span_and_temperature():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig.preset("tiny", n_mels=32, patch_size=(32, 2), depth=1))
    h = HuBERT(enc, num_units=7, mask_ratio=0.25, span=3, temperature=0.5).double().eval()
    spec = torch.randn(2, 32, 40, generator=_g(0), dtype=torch.float64); y = torch.randint(0, 7, (2, 20), generator=_g(1))
    o = h(spec, y, generator=_g(2))
    assert torch.equal(o.mask.mask, span_mask(2, 20, 0.25, span=3, generator=_g(2)).mask) and o.mask.num_masked == 5
    # logits = cosine(projected frame, unit embedding) / temperature, by a float64 loop
    z = h.proj(h.hidden_states(spec, o.mask.mask)).detach(); e = h.unit_embed.detach()
    for b, n, c in [(0, 0, 0), (1, 7, 3), (0, 19, 6)]:
        cos = float(z[b, n] @ e[c]) / math.sqrt(float(z[b, n] @ z[b, n]) * float(e[c] @ e[c]))
        assert o.logits[b, n, c].item() == pytest.approx(cos / 0.5, rel=1e-9)
    assert o.logits.abs().max() <= 1 / 0.5 + 1e-9
    assert o.loss.item() == pytest.approx(hubert_loss(o.logits, y, o.mask.mask).item(), rel=1e-12)

def _mmae_any(visible, **kw):
    torch.manual_seed(0)
    ad = {"image": ViTEncoder(ViTConfig.preset("tiny", depth=0, class_token=False, pool="mean")),
          "audio": AudioEncoder(AudioConfig.preset("tiny", n_mels=32, patch_size=(16, 8), depth=0))}
    return MultiModalMAE(ad, embed_dim=64, visible=visible, **kw).double().eval()

def test_multimodal_mae_per_modality_losses_and_fractional_budget():
    "visible=0.32 of 16+8 tokens -> round(7.68) = 8 visible; each modality's loss is MAE's loss on its own patches, own norm_pix."
    mm = _mmae_any(0.32, norm_pix={"image": True, "audio": False})
    inp = {"image": torch.rand(3, 3, 32, 32, generator=_g(0), dtype=torch.float64),
           "audio": torch.randn(3, 32, 32, generator=_g(1), dtype=torch.float64)}
    o = mm(inp, generator=_g(2))
    assert ((~o.masks["image"]).sum(1) + (~o.masks["audio"]).sum(1) == 8).all()
    assert torch.equal(torch.cat([o.masks["image"], o.masks["audio"]], 1), o.mask.mask)
    img_t = torch.stack([torch.stack([_patch(inp["image"], b, n) for n in range(16)]) for b in range(3)])
    # audio tokens are time-major: token t' * F' + f' is mel rows f'*16.., frames t'*8.. (2 x 4 patches)
    aud_t = torch.stack([torch.stack([inp["audio"][b, f * 16:(f + 1) * 16, t * 8:(t + 1) * 8].reshape(-1)
                                      for t in range(4) for f in range(2)]) for b in range(3)])
    ref_i = ref_mae(o.preds["image"].detach(), img_t, o.masks["image"], True)
    ref_a = ref_mae(o.preds["audio"].detach(), aud_t, o.masks["audio"], False)
    assert o.losses["image"].item() == pytest.approx(ref_i, rel=1e-9) and o.losses["audio"].item() == pytest.approx(ref_a, rel=1e-9)
    assert o.loss.item() == pytest.approx(ref_i + ref_a, rel=1e-9)

def test_multimodal_mae_contrastive_weight_and_equal_fractions():
    mm = _mmae_any(12, contrastive_weight=0.5)          # 12 of 24 visible: each modality keeps half its tokens
    inp = {"image": torch.rand(4, 3, 32, 32, generator=_g(0), dtype=torch.float64),
           "audio": torch.randn(4, 32, 32, generator=_g(1), dtype=torch.float64)}
    o = mm(inp, generator=_g(2))
    assert ((~o.masks["image"]).sum(1) == 8).all() and ((~o.masks["audio"]).sum(1) == 4).all()
    rec = o.losses["image"].item() + o.losses["audio"].item()
    assert o.loss.item() == pytest.approx(rec + 0.5 * o.losses["contrastive"].item(), rel=1e-9)

@pytest.mark.parametrize("visible", [0, 24, 30, 0.01, 0.99])
def test_multimodal_mae_budget_must_leave_something_hidden_and_visible(visible):
    mm = _mmae_any(visible)
    inp = {"image": torch.rand(2, 3, 32, 32, dtype=torch.float64), "audio": torch.randn(2, 32, 32, dtype=torch.float64)}
    with pytest.raises(ConfigError, match="visible budget"): mm(inp)

def test_kmeans_refuses_fewer_than_one_iteration():
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="iters must be an integer >= 1"): kmeans(x, 2, iters=bad)
    assert kmeans(x, 2, iters=1).n_iter == 1

# ---------------------------------------------------------------- issue 14: shape messages, documented defaults, devices
@pytest.mark.parametrize("loss", [mae_loss, simmim_loss])
def test_mae_and_simmim_shape_errors_name_the_mismatched_argument(loss):
    "Batch or token count disagreeing with `pred` is caught (not broadcast) and the message names the argument and size."
    pred = torch.zeros(2, 4, 3)
    with pytest.raises(ShapeError, match=r"^target: expected shape \(B, L, P\) with B=2 "):
        loss(pred, torch.zeros(3, 4, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^target: expected shape \(B, L, P\) with B=2 "):   # B=1 would broadcast
        loss(pred, torch.zeros(1, 4, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^target: expected shape \(B, L, P\) with L=4 "):   # L=1 would broadcast
        loss(pred, torch.zeros(2, 1, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^mask: expected shape \(B, L\) with L=4 "):        # (2, 1) would broadcast
        loss(pred, torch.zeros(2, 4, 3), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^mask: expected shape \(B, L\) with B=2 "):
        loss(pred, torch.zeros(2, 4, 3), torch.ones(1, 4, dtype=torch.bool))

def test_hubert_loss_shape_errors_name_the_mismatched_argument():
    logits = torch.zeros(2, 4, 3)
    with pytest.raises(ShapeError, match=r"^targets: expected shape \(B, N\) with N=4 "):
        hubert_loss(logits, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^targets: expected shape \(B, N\) with B=2 "):
        hubert_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"^mask: expected shape \(B, N\) with N=4 "):
        hubert_loss(logits, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool))

def test_mae_documented_defaults():
    "MAE(encoder): decoder 128 wide, 2 blocks of 4 heads, mask_ratio 0.75, norm_pix True."
    mae = MAE(_tiny_vit())
    dec = mae.decoder
    assert len(dec.blocks) == 2 and dec.decoder_dim == 128 and dec.mask_token.shape == (128,)
    assert all(b.attn.num_heads == 4 for b in dec.blocks)
    assert mae.mask_ratio == 0.75 and mae.norm_pix is True
    out = mae(torch.rand(2, 3, 32, 32, generator=_g(0)), generator=_g(1))
    assert out.mask.num_masked == 12                                        # round(0.75 * 16)

def test_multimodal_mae_documented_defaults():
    """MultiModalMAE(adapters): 2 shared blocks of 2 heads, one-block decoders 64 wide, norm_pix on for every modality,
    and with the contrastive term a learnable log-scale starting at log(1/0.07) (CLIP's temperature 0.07)."""
    torch.manual_seed(0)
    ad = {"image": ViTEncoder(ViTConfig.preset("tiny", depth=0, class_token=False, pool="mean")),
          "audio": AudioEncoder(AudioConfig.preset("tiny", n_mels=32, patch_size=(16, 8), depth=0))}
    mm = MultiModalMAE(ad).double().eval()
    assert len(mm.blocks) == 2 and all(b.attn.num_heads == 2 for b in mm.blocks)
    for n in ad:
        d = mm.decoders[n]
        assert len(d.blocks) == 1 and d.decoder_dim == 64 and all(b.attn.num_heads == 2 for b in d.blocks)
    assert mm.norm_pix == {"image": True, "audio": True} and mm.visible == 0.25 and mm.contrastive_weight == 0.0
    assert not hasattr(mm, "log_scale")
    # default norm_pix is what the losses use: each modality's loss is MAE's loss on standardised patches
    inp = {"image": torch.rand(2, 3, 32, 32, generator=_g(0), dtype=torch.float64),
           "audio": torch.randn(2, 32, 32, generator=_g(1), dtype=torch.float64)}
    o = mm(inp, generator=_g(2))
    for n in ad:
        want = ref_mae(o.preds[n].detach(), ad[n].patchify(inp[n]).double(), o.masks[n], True)
        assert o.losses[n].item() == pytest.approx(want, rel=1e-9)
    assert MultiModalMAE(ad, norm_pix=False).norm_pix == {"image": False, "audio": False}
    mc = MultiModalMAE(ad, contrastive_weight=0.5)
    assert mc.log_scale.requires_grad and mc.log_scale.shape == ()
    assert mc.log_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert mc.log_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)

def test_apply_mask_wrong_mask_length_names_mask():
    with pytest.raises(ShapeError, match=r"^mask: expected size 6 in dimension 0 of \(6\), got shape \(5\)"):
        apply_mask(torch.rand(1, 4, 6), torch.zeros(5, dtype=torch.bool), (2, 2))

@pytest.mark.parametrize("name,call", [
    ("random_mask", lambda: random_mask(2, 16, 0.01)),
    ("block_mask", lambda: block_mask(2, (4, 4), 0.01)),
    ("block_mask", lambda: block_mask(2, (4, 4), 0.01, block_size=2)),
    ("span_mask", lambda: span_mask(2, 16, 0.01, span=2)),
    ("noise_mask", lambda: noise_mask(2, (4, 4), 0.01)),
])
def test_generator_ratio_errors_name_the_generator(name, call):
    with pytest.raises(InputError, match=rf"^{name}: ratio 0.01 of L=16 tokens hides k=0;"): call()

def test_span_and_tube_mask_documented_default_ratios():
    "span_mask hides half the frames by default (wav2vec 2.0 / HuBERT), tube_mask 90% of each frame (VideoMAE)."
    s = span_mask(3, 40, span=4, generator=_g(0))
    assert (s.mask.sum(1) == 20).all() and torch.equal(s.mask, span_mask(3, 40, 0.5, span=4, generator=_g(0)).mask)
    t = tube_mask(2, 3, 10, generator=_g(0))
    assert (t.mask.view(2, 3, 10).sum(2) == 9).all() and t.num_masked == 27
    assert torch.equal(t.mask, tube_mask(2, 3, 10, 0.9, generator=_g(0)).mask)

_DEVICE_GENERATORS = {
    "random": lambda dev: random_mask(2, 12, 0.5, device=dev),
    "block_beit": lambda dev: block_mask(2, (4, 4), 0.4, min_area=2, device=dev),
    "block_simmim": lambda dev: block_mask(2, (4, 4), 0.5, block_size=2, device=dev),
    "tube": lambda dev: tube_mask(2, 3, 8, 0.5, device=dev),
    "span": lambda dev: span_mask(2, 20, 0.5, span=3, device=dev),
    "noise": lambda dev: noise_mask(2, (4, 4), 0.5, device=dev),
}

@pytest.mark.parametrize("name", list(_DEVICE_GENERATORS))
def test_mask_generators_draw_on_the_requested_device(name, monkeypatch):
    "Every random draw is made on `device` (so GPU masks are built on the GPU): checked on CPU by recording torch.rand's device."
    seen, made, rand, arange = [], [], torch.rand, torch.arange
    def spy(*a, **kw): seen.append(kw.get("device")); return rand(*a, **kw)
    def spy_arange(*a, **kw): made.append(kw.get("device")); return arange(*a, **kw)
    monkeypatch.setattr(torch, "rand", spy); monkeypatch.setattr(torch, "arange", spy_arange)
    for f in ("fftfreq", "rfftfreq"):                                          # the noise mask's frequency grids
        def spy_freq(*a, _f=getattr(torch.fft, f), **kw): made.append(kw.get("device")); return _f(*a, **kw)
        monkeypatch.setattr(torch.fft, f, spy_freq)
    m = _DEVICE_GENERATORS[name](torch.device("cpu"))
    assert seen and all(d is not None and torch.device(d) == torch.device("cpu") for d in seen), seen
    assert all(d is not None and torch.device(d) == torch.device("cpu") for d in made), made   # index grids too
    assert m.mask.device.type == "cpu"

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(_DEVICE_GENERATORS))
def test_mask_generators_honour_cuda_device(name):
    m = _DEVICE_GENERATORS[name]("cuda")
    assert m.mask.is_cuda and m.visible.is_cuda and m.masked.is_cuda


def test_check_mask_partition_refuses_a_map_that_disagrees_with_the_indices():
    from mmlab.masking import check_mask_partition
    idx = dict(masked=torch.tensor([[0, 1]]), visible=torch.tensor([[2, 3]]))
    check_mask_partition(Mask(torch.tensor([[True, True, False, False]]), **idx))
    for bad in ([True, True, True, False], [True, False, False, False]):     # a visible token hidden; a hidden one shown
        with pytest.raises(InputError, match="^Mask: boolean map disagrees with the indices"):
            check_mask_partition(Mask(torch.tensor([bad]), **idx))


def test_scatter_and_mask_from_bool_messages_name_the_argument():
    m = mask_from_bool(torch.tensor([[True, False, False, True]]))
    with pytest.raises(ShapeError, match=r"^visible: expected size 2 in dimension 1"): scatter_tokens(torch.zeros(1, 3, 2), m, torch.zeros(2))
    with pytest.raises(ShapeError, match=r"^mask: expected 2-D"): mask_from_bool(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(InputError, match=r"^mask: ratio must be a float in \(0, 1\)"): num_masked(10, 1.5)   # the default name


def test_mask_from_bool_of_an_empty_batch():
    m = mask_from_bool(torch.zeros(0, 5, dtype=torch.bool))
    assert m.visible.shape == (0, 5) and m.masked.shape == (0, 0)


def test_block_priorities_rank_covered_tokens_by_position_above_the_rest_on_large_grids():
    "The position tie-break stays below 1e-9, so covered tokens keep their order and stay above uncovered ones (0..0.5)."
    from mmlab.masking import _priority_scores
    L = 40_000                                                                 # a 200 x 200 token grid
    s = _priority_scores(torch.ones(1, L), torch.Generator().manual_seed(0), torch.device("cpu"))[0]
    assert (s.diff() < 0).all() and s.min() > 1 - 1e-9 and s.max() <= 1 + 1e-9


def test_tube_mask_errors_name_tube_mask():
    with pytest.raises(InputError, match=r"^tube_mask: ratio must be a float in \(0, 1\)"): tube_mask(2, 3, 10, 1.5)
    with pytest.raises(InputError, match=r"^tube_mask: need an integer number of tokens L >= 2"): tube_mask(2, 3, 1, 0.5)
