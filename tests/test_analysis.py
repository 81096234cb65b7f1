"""mmlab.analysis against independent references: plain float64 loops, closed forms, scikit-learn."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from mmlab.analysis import (attention_map, attention_rollout, effective_rank, fit_pca, gap_metrics, gap_vector,
                            mean_pairwise_cosine, pca_transform, reduce_embeddings, relative_gap, separability,
                            shift_embeddings, shift_experiment, token_relevance, uniformity,
                            clip_trainer)
from mmlab.core import InputError, ShapeError
from mmlab.data import take


def unit(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + shift, dim=-1)


def loop_metrics(x, y, t=2.0):
    "Plain-loop transcription of every gap metric (float64 python floats)."
    x, y = x.tolist(), y.tolist(); n, d = len(x), len(x[0])
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    sq = lambda a, b: sum((p - q) ** 2 for p, q in zip(a, b))
    cx = [sum(r[k] for r in x) / n for k in range(d)]; cy = [sum(r[k] for r in y) / n for k in range(d)]
    out = {"gap_norm": math.sqrt(sq(cx, cy)),
           "centroid_cosine": dot(cx, cy) / math.sqrt(dot(cx, cx) * dot(cy, cy)),
           "instance_gap": sum(math.sqrt(sq(x[i], y[i])) for i in range(n)) / n,
           "alignment": sum(sq(x[i], y[i]) for i in range(n)) / n}
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    out["uniformity_x"] = math.log(sum(math.exp(-t * sq(x[i], x[j])) for i, j in pairs) / len(pairs))
    out["uniformity_y"] = math.log(sum(math.exp(-t * sq(y[i], y[j])) for i, j in pairs) / len(pairs))
    out["uniformity_xy"] = math.log(sum(math.exp(-t * sq(x[i], y[j])) for i, j in pairs) / len(pairs))
    out["cone_x"] = sum(dot(x[i], x[j]) for i, j in pairs) / len(pairs)
    out["cone_y"] = sum(dot(y[i], y[j]) for i, j in pairs) / len(pairs)
    dd = lambda a, b: (1 - dot(a, b)) / 2
    pair = sum(dd(x[i], y[i]) for i in range(n)) / n
    intra = sum(dd(x[i], x[j]) + dd(y[i], y[j]) for i, j in pairs) / (2 * len(pairs))
    out["relative_gap"] = pair / (intra + pair)
    return out


@pytest.mark.parametrize("n,d", [(2, 1), (3, 2), (7, 5), (12, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gap_metrics_vs_loops(n, d, seed):
    x, y = unit(n, d, seed, 0.5), unit(n, d, seed + 100, -0.5)
    if d == 1: x, y = x.abs(), -y.abs()          # avoid zero centroids on the line
    m, ref = gap_metrics(x, y, separability_probe=False), loop_metrics(x, y)
    for k, v in ref.items(): assert m[k] == pytest.approx(v, abs=1e-10, rel=1e-10), k


def test_float32_input_same_as_float64():
    x, y = unit(20, 8, 0, 1.0), unit(20, 8, 1, -1.0)
    a = gap_metrics(x.float(), y.float(), separability_probe=False)
    b = gap_metrics(x, y, separability_probe=False)
    for k in a: assert a[k] == pytest.approx(b[k], abs=1e-5), k


def test_identical_modalities():
    x = unit(50, 6, 3)
    m = gap_metrics(x, x)
    assert m["gap_norm"] == 0 and m["instance_gap"] == 0 and m["alignment"] == 0
    assert m["relative_gap"] == pytest.approx(0, abs=1e-12)
    assert m["centroid_cosine"] == pytest.approx(1.0)
    assert m["uniformity_xy"] == pytest.approx(m["uniformity_x"])
    assert m["separability"] == 0.5                                 # each held-out pair: one point, both labels


def test_antipodal_clusters():
    e = torch.zeros(8, 3); e[:, 2] = 1
    m = gap_metrics(e, -e)
    want = dict(gap_norm=2, centroid_cosine=-1, instance_gap=2, alignment=4, uniformity_x=0, uniformity_y=0,
                uniformity_xy=-8, relative_gap=1, cone_x=1, cone_y=1, erank_x=0, erank_y=0, separability=1)
    for k, v in want.items(): assert m[k] == pytest.approx(v, abs=1e-12), k


def test_orthogonal_one_hots():
    # x_i = e_1, y_i = e_2: |u| = sqrt 2, cos = 0, every partner at distance sqrt 2, uniformity_xy = -2*2
    x = torch.zeros(5, 4); x[:, 0] = 1; y = torch.zeros(5, 4); y[:, 1] = 1
    m = gap_metrics(x, y)
    assert m["gap_norm"] == pytest.approx(math.sqrt(2)) and m["centroid_cosine"] == pytest.approx(0, abs=1e-12)
    assert m["instance_gap"] == pytest.approx(math.sqrt(2)) and m["uniformity_xy"] == pytest.approx(-4)
    assert m["relative_gap"] == pytest.approx(1.0) and m["separability"] == 1.0


def test_uniform_sphere_cone_and_uniformity():
    # antipodal symmetric set: pairwise cosines average to -1/(N-1); the regular simplex in R^{N-1} too
    N = 6; v = torch.eye(N, dtype=torch.float64) - 1 / N; v = F.normalize(v, dim=-1)   # simplex vertices
    assert mean_pairwise_cosine(v) == pytest.approx(-1 / (N - 1))
    # all pairwise squared distances of a regular simplex: 2 - 2 * (-1/(N-1))
    assert uniformity(v) == pytest.approx(-2 * (2 + 2 / (N - 1)))


@pytest.mark.parametrize("D", [1, 3, 8])
def test_effective_rank_closed_forms(D):
    assert effective_rank(torch.eye(D), center=False) == pytest.approx(D)
    assert effective_rank(torch.ones(4, D), center=False) == pytest.approx(1.0)
    assert effective_rank(torch.ones(4, D)) == 0.0                    # centred: nothing left
    # singular values (3, 1): p = (3/4, 1/4), erank = exp(H)
    a = torch.diag(torch.tensor([3.0, 1.0]))
    H = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(a, center=False) == pytest.approx(math.exp(H))


def test_effective_rank_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert effective_rank(x @ q) == pytest.approx(effective_rank(x), rel=1e-10)


def test_separability_known():
    x = unit(60, 8, 0)
    e = torch.zeros(8, dtype=torch.float64); e[0] = 5
    assert separability(F.normalize(x + e, dim=-1), F.normalize(x - e, dim=-1)) == 1.0
    # deterministic given the seed
    a, b = unit(60, 8, 1, 0.2), unit(60, 8, 2, -0.2)
    assert separability(a, b, seed=3) == separability(a, b, seed=3)
    with pytest.raises(InputError, match="held-out"): separability(a[:1], b[:1])


def test_bad_input():
    x = unit(5, 3, 0)
    with pytest.raises(ShapeError, match="N=5"): gap_metrics(x, x[:4])
    with pytest.raises(InputError, match="L2-normalised"): gap_metrics(2 * x, x)
    with pytest.raises(InputError, match="N >= 2"): gap_metrics(x[:1], x[:1])
    bad = x.clone(); bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"): gap_metrics(bad, x)
    with pytest.raises(InputError, match="t must be"): uniformity(x, t=0)


def test_shift_closed_form_and_centroids():
    x, y = unit(40, 5, 0, 1.0), unit(40, 5, 1, -1.0)
    u = gap_vector(x, y)
    assert torch.allclose(u, x.mean(0) - y.mean(0))
    for lam in (-0.5, 0.0, 0.7, 1.0):
        xs, ys = shift_embeddings(x, y, lam)
        ref_x = (x - lam / 2 * u) / (x - lam / 2 * u).norm(dim=1, keepdim=True)
        ref_y = (y + lam / 2 * u) / (y + lam / 2 * u).norm(dim=1, keepdim=True)
        assert torch.allclose(xs, ref_x, atol=1e-12) and torch.allclose(ys, ref_y, atol=1e-12)
    # lambda = 1 makes the pre-normalisation centroids coincide, and closes most of the gap
    assert torch.allclose((x - u / 2).mean(0), (y + u / 2).mean(0), atol=1e-12)
    assert gap_metrics(*shift_embeddings(x, y, 1.0), separability_probe=False)["gap_norm"] < 0.5 * u.norm()   # renormalising leaves a residual


def test_shift_experiment_rows():
    x, y = unit(30, 6, 0, 1.0), unit(30, 6, 1, -1.0)
    labels = torch.arange(30) % 3
    cls = F.normalize(torch.stack([y[labels == c].mean(0) for c in range(3)]), dim=-1)
    rows = shift_experiment(x, y, [0.0, 1.0], class_emb=cls, labels=labels, ids=labels)
    assert [r["lam"] for r in rows] == [0.0, 1.0]
    # lambda = 0: plain zero-shot accuracy by cosine argmax, computed directly
    acc = ((x @ cls.T).argmax(1) == labels).double().mean().item()
    assert rows[0]["zero_shot"] == pytest.approx(acc)
    assert rows[0]["gap_norm"] == pytest.approx(gap_vector(x, y).norm().item())
    # retrieval x->y at lambda=1 by class groups, pessimistic: best same-class y beats every other-class y
    xs, ys = shift_embeddings(x, y, 1.0)
    s = xs @ ys.T; same = labels[:, None] == labels[None]
    best = s.masked_fill(~same, -9).amax(1, keepdim=True)
    r1 = (((s >= best) & ~same).sum(1) == 0).double().mean().item()
    assert rows[1]["x_to_y_R@1"] == pytest.approx(r1)


def rollout_loop(maps, residual=True):
    B, H, N, _ = maps[0].shape
    R = np.stack([np.eye(N)] * B)
    for A in maps:
        A = A.double().numpy(); nxt = np.zeros_like(R)
        for b in range(B):
            Ab = np.zeros((N, N))
            for i in range(N):
                for j in range(N):
                    Ab[i, j] = sum(A[b, h, i, j] for h in range(H)) / H + (1.0 if residual and i == j else 0.0)
                Ab[i] /= Ab[i].sum()
            for i in range(N):
                for j in range(N): nxt[b, i, j] = sum(Ab[i, k] * R[b, k, j] for k in range(N))
        R = nxt
    return torch.from_numpy(R)


@pytest.mark.parametrize("B,H,N,L", [(1, 1, 2, 1), (2, 2, 5, 3), (3, 4, 3, 4)])
def test_rollout_vs_loop(B, H, N, L):
    g = torch.Generator().manual_seed(B * 100 + N)
    maps = [torch.softmax(torch.randn(B, H, N, N, generator=g), -1) for _ in range(L)]
    for res in (True, False):
        assert torch.allclose(attention_rollout(maps, residual=res), rollout_loop(maps, res), atol=1e-12)
    assert torch.allclose(attention_rollout({f"l{i}": m for i, m in enumerate(maps)}), rollout_loop(maps), atol=1e-12)
    # max fusion differs from mean when heads differ, and rows still sum to 1
    R = attention_rollout(maps, head_fusion="max")
    assert torch.allclose(R.sum(-1), torch.ones(B, N, dtype=torch.float64))


def test_rollout_bad_input():
    with pytest.raises(InputError, match="no attention maps"): attention_rollout([])
    with pytest.raises(InputError, match="head_fusion"): attention_rollout([torch.ones(1, 1, 2, 2) / 2], head_fusion="median")


def test_token_relevance_pools():
    R = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    cls = token_relevance(R, 1, "cls", valid)
    assert torch.equal(cls, R[:, 0, 1:] * valid)
    mean = token_relevance(R, 1, "mean", valid)
    assert torch.allclose(mean[0], R[0, 1:3, 1:].mean(0) * valid[0]) and torch.allclose(mean[1], R[1, 1:, 1:].mean(0))
    last = token_relevance(R, 1, "last", valid)
    assert torch.equal(last[0], R[0, 2, 1:] * valid[0]) and torch.equal(last[1], R[1, 3, 1:])
    with pytest.raises(InputError, match="prefix"): token_relevance(R, 0, "cls")


def test_attention_map_layouts():
    from mmlab.encoders import AudioEncoder, AudioConfig, TextEncoder, TextConfig, ViTEncoder, ViTConfig, capture_attention
    torch.manual_seed(0)
    vit = ViTEncoder(ViTConfig.preset("tiny", img_size=32))
    img = torch.rand(2, 3, 32, 32)
    m = attention_map(vit, {"x": img})
    assert m.shape == (2, 4, 4)
    with capture_attention(vit) as maps: vit(img)
    assert torch.allclose(m.flatten(1), attention_rollout(maps)[:, 0, 1:])
    one = attention_map(vit, {"x": img}, layer=1, head=1)
    assert torch.allclose(one.flatten(1), list(maps.values())[1][:, 1, 0, 1:].double())
    # audio: mean-pooled, no [CLS]; tokens time-major (T', F') -> laid out (F', T'); padded patches get 0
    aud = AudioEncoder(AudioConfig.preset("tiny"))
    spec = torch.randn(2, 32, 64); lengths = torch.tensor([64, 30])
    a = attention_map(aud, {"x": spec, "lengths": lengths})
    Fp, Tp = 32 // 16, 64 // 16
    assert a.shape == (2, Fp, Tp)
    with capture_attention(aud) as maps: aud(spec, lengths)
    _, valid = aud.embed(spec, lengths)
    R = attention_rollout(maps)
    ref = (R * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True)
    assert torch.allclose(a, (ref * valid).reshape(2, Tp, Fp).transpose(1, 2))
    assert (a[1, :, 2:] == 0).all()                                # frames 30..63 are padding: time patches 2, 3
    txt = TextEncoder(TextConfig.preset("tiny"))
    ids = torch.randint(4, 100, (2, 9)); pad = torch.zeros(2, 9, dtype=torch.bool); pad[1, 5:] = True
    t = attention_map(txt, {"x": ids, "padding_mask": pad})
    assert t.shape == (2, 9) and (t[1, 5:] == 0).all()


def test_pca_vs_sklearn():
    from sklearn.decomposition import PCA
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8)
    ours = pca_transform(X, *fit_pca(X, 3))
    ref = PCA(3).fit_transform(X.numpy())
    assert np.allclose(np.abs(ours), np.abs(ref), atol=1e-9)
    for j in range(3): assert np.allclose(ours[:, j], ref[:, j]) or np.allclose(ours[:, j], -ref[:, j])


@pytest.mark.parametrize("method", ["pca", "tsne", pytest.param("umap", marks=pytest.mark.mutation_heavy)])
def test_reduce_embeddings_split(method):
    x, y = unit(25, 6, 0, 1.0), unit(20, 6, 1, -1.0)
    fast = {"max_iter": 250} if method == "tsne" else {}                    # sklearn's fewest iterations
    with threadpool_limits(1):                  # OpenMP threads only slow t-SNE down on a few points (10x on a busy box)
        out = reduce_embeddings({"image": x, "text": y}, method, dim=2, seed=0, **fast)
    assert out["image"].shape == (25, 2) and out["text"].shape == (20, 2)
    if method == "pca":   # fitted jointly: the same map as PCA of the concatenation
        Z = torch.cat([x, y]); ref = pca_transform(Z, *fit_pca(Z, 2))
        assert np.allclose(np.concatenate([out["image"], out["text"]]), ref)
    with pytest.raises(InputError, match="method"): reduce_embeddings({"a": x}, "lda")


def test_clip_trainer_fixed_temperature_and_first_loss():
    import copy
    from mmlab.encoders import TextEncoder, TextConfig, ViTEncoder, ViTConfig
    from mmlab.losses import clip_loss
    from mmlab.models import MultiModalModel
    from mmlab.data import InMemoryBatches
    from mmlab.train import Callback
    torch.manual_seed(0)
    model = MultiModalModel({"image": ViTEncoder(ViTConfig.preset("tiny", img_size=16)),
                             "text": TextEncoder(TextConfig.preset("tiny", vocab_size=20, max_len=8))}, proj_dim=16)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(24, 3, 16, 16, generator=g), "text": torch.randint(4, 20, (24, 6), generator=g),
             "label": torch.arange(24) % 4, "present": {}}
    start = copy.deepcopy(model)
    seen = []
    class Seen(Callback):                                                # records what the trainer logs
        def on_log(self, trainer, record): seen.append(record)
    trainer = clip_trainer(model, batch, 3, batch_size=8, tau=0.5, seed=0, callbacks=[Seen()])
    hist = trainer.fit()
    assert len(hist) == 3 and seen == hist
    assert model.logit_scale.item() == pytest.approx(2.0) and not model.log_scale.requires_grad   # 1 / tau, frozen
    assert all(p is not model.log_scale for grp in trainer.opt.param_groups for p in grp["params"])
    first = next(iter(InMemoryBatches(batch, 8, seed=0)))                 # the trainer's first mini-batch
    with torch.no_grad(): out = start.train()(first)
    assert hist[0]["loss"] == pytest.approx(clip_loss(out["image"], out["text"], torch.tensor(2.0)).item(), abs=1e-5)
    assert not torch.equal(model.towers["image"].blocks[0].attn.qkv.weight, start.towers["image"].blocks[0].attn.qkv.weight)
    with pytest.raises(InputError, match="tau must be > 0"): clip_trainer(model, batch, 1, tau=0.0)


# ================================================================ behaviour pinned against hand references (issue 14)

def test_separability_scores_only_held_out_pairs():
    # x and y drawn from the SAME distribution in 60 dims: nothing separates the modalities, but with 2 x 28
    # training points and weak regularisation the probe fits its training set perfectly. Scored on the
    # held-out pairs it must sit near chance; scored on rows it trained on it would be ~1.
    from sklearn.linear_model import LogisticRegression
    accs = []
    for seed in range(4):
        x, y = unit(40, 60, 10 + seed), unit(40, 60, 50 + seed)
        acc = separability(x, y, test_size=0.3, seed=seed, C=1e4)
        assert acc * 24 == round(acc * 24)                                   # 12 held-out pairs -> 24 points
        accs.append(acc)
        tr = np.random.default_rng(seed).permutation(40)[12:]
        X = np.concatenate([x[tr].numpy(), y[tr].numpy()]); lab = np.r_[np.zeros(28), np.ones(28)]
        assert LogisticRegression(C=1e4, max_iter=2000).fit(X, lab).score(X, lab) == 1.0   # training rows: all right
    assert 0.3 <= np.mean(accs) <= 0.7, accs


def test_separability_split_sizes_and_options():
    x = unit(10, 4, 0, 0.3); y = unit(10, 4, 1, -0.3)
    for ts, n_test in ((0.3, 3), (0.5, 5), (0.15, 2), (0.9, 9)):
        acc = separability(x, y, test_size=ts)
        assert round(acc * 2 * n_test, 9) == round(acc * 2 * n_test)         # a multiple of 1 / (2 n_test)
    with pytest.raises(InputError, match="N=10, test_size=0.96"): separability(x, y, test_size=0.96)   # no training pair
    with pytest.raises(InputError, match="test_size=0.04"): separability(x, y, test_size=0.04)        # no held-out pair
    with pytest.raises(InputError, match="test_size=1"): separability(x, y, test_size=1)
    # the split seed is used: different seeds hold out different pairs
    a, b = unit(30, 3, 5), unit(30, 3, 6)
    assert len({separability(a, b, seed=s) for s in range(6)}) > 1
    # C is the regularisation: tiny C on overlapping clouds predicts one class -> exactly 0.5
    assert separability(unit(30, 3, 7, 0.2), unit(30, 3, 8, -0.2), C=1e-6) == 0.5


def test_gap_vector_uniformity_cone_closed_forms():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]); y = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    assert torch.equal(gap_vector(x, y), torch.tensor([2 / 3 + 0.5, 1 / 3 + 0.5], dtype=torch.float64))   # N != M
    assert gap_vector(x.float(), y).dtype == torch.float64
    # x: squared distances 2, 0, 2 among the off-diagonal pairs (each twice): mean exp(-t d)
    for t in (0.5, 2.0, 3.0):
        assert uniformity(x, t=t) == pytest.approx(math.log((4 * math.exp(-2 * t) + 2) / 6))
    assert mean_pairwise_cosine(x) == pytest.approx(2 / 6)                  # cosines 0, 1, 0 (each twice)
    # cross-modal: pairs i != j of x and y (same N): x = e1, e2; y = -e1, -e2 -> |x0 - y1|^2 = |x1 - y0|^2 = 2
    assert uniformity(x[:2], y, t=1.5) == pytest.approx(-3.0)
    with pytest.raises(InputError, match="needs N >= 2"): uniformity(x[:1])
    with pytest.raises(InputError, match="needs N >= 2"): mean_pairwise_cosine(x[:1])


def test_relative_gap_and_effective_rank_closed_forms():
    # x = e1, e2; y = e2, e1: partners orthogonal d = 1/2; intra: x0.x1 = 0 -> 1/2 as well -> 0.5
    e = torch.eye(2, dtype=torch.float64)
    assert relative_gap(e, e.flip(0)) == pytest.approx(0.5)
    # y = -x: partners d = 1, intra 1/2 -> 1 / (1/2 + 1) = 2/3
    assert relative_gap(e, -e) == pytest.approx(2 / 3)
    assert relative_gap(e, e) == 0.0
    with pytest.raises(InputError, match="needs N >= 2 pairs"): relative_gap(e[:1], e[:1])
    # centring: rows (1, 0), (3, 0): uncentred rank 1; centred (-1, 0), (1, 0): rank 1 as well, but
    # rows (1, 1), (1, -1) are rank 2 uncentred (sv sqrt2, sqrt2) and rank 1 centred
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert effective_rank(z, center=False) == pytest.approx(2.0) and effective_rank(z) == pytest.approx(1.0)
    # singular values (2, 1, 1): p = (1/2, 1/4, 1/4), H = 1.5 ln 2
    d = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert effective_rank(d, center=False) == pytest.approx(math.exp(1.5 * math.log(2)))
    assert effective_rank(np.zeros((3, 2))) == 0.0


def test_shift_embeddings_explicit_direction_and_dtype():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]]); y = torch.tensor([[0.0, 1.0]])
    u = torch.tensor([0.0, 2.0])
    xs, ys = shift_embeddings(x, y, 1.0, u)                                  # x - u/2, y + u/2, renormalised
    ref_x = torch.tensor([[1.0, -1.0], [0.6, -0.2]]); ref_x = ref_x / ref_x.norm(dim=1, keepdim=True)
    assert torch.allclose(xs, ref_x) and torch.allclose(ys, torch.tensor([[0.0, 1.0]]))
    assert xs.dtype == torch.float32 and ys.dtype == torch.float32
    xs, ys = shift_embeddings(x, y, -2.0, u)                                 # lambda < 0 widens: x + u, y - u
    assert torch.allclose(xs, F.normalize(x + u, dim=-1)) and torch.allclose(ys, torch.tensor([[0.0, -1.0]]))
    # default direction: the gap vector; lambda 0 leaves both unchanged
    xs, ys = shift_embeddings(x, y, 0.0)
    assert torch.allclose(xs, x) and torch.allclose(ys, y)
    with pytest.raises(ShapeError): shift_embeddings(x, y, 1.0, torch.ones(3))


def test_rollout_two_layer_hand_example():
    # layer 1 (two heads), layer 2 (one head), N = 2, by hand:
    A1 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]]])
    A2 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    # A1' = rownorm(A1 + I) = [[1, 0], [.25, .75]]; A2' = [[.5, .5], [.5, .5]]; R = A2' A1'
    R = attention_rollout([A1, A2])
    assert torch.allclose(R, torch.tensor([[[0.625, 0.375], [0.625, 0.375]]], dtype=torch.float64), atol=1e-12)
    # without the residual: A2 A1 = [[.5, .5], [1, 0]]
    assert torch.allclose(attention_rollout([A1, A2], residual=False),
                          torch.tensor([[[0.5, 0.5], [1.0, 0.0]]], dtype=torch.float64), atol=1e-12)
    # head fusion: heads [[.2, .8]] and [[.6, .4]] (row 0); mean (.4, .6), max (.6, .8), min (.2, .4)
    H = torch.tensor([[[[0.2, 0.8], [0.5, 0.5]], [[0.6, 0.4], [0.5, 0.5]]]])
    for fusion, row in (("mean", [1.4, 0.6]), ("max", [1.6, 0.8]), ("min", [1.2, 0.4])):
        got = attention_rollout([H], head_fusion=fusion)[0, 0]
        assert torch.allclose(got, torch.tensor(row, dtype=torch.float64) / sum(row), atol=1e-12), fusion
    with pytest.raises(ShapeError): attention_rollout([A1, torch.ones(1, 1, 3, 3) / 3])


def test_fit_pca_matches_numpy_svd_with_sign_rule():
    g = np.random.default_rng(0)
    X = g.standard_normal((40, 5)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5]) + 7.0
    mu, V = fit_pca(X, 3)
    _, s, Vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    ref = Vt[:3] * np.sign(Vt[:3][np.arange(3), np.abs(Vt[:3]).argmax(1)])[:, None]   # largest loading positive
    np.testing.assert_allclose(mu.numpy(), X.mean(0), atol=1e-12)
    np.testing.assert_allclose(V.numpy(), ref, atol=1e-10)
    Z = pca_transform(torch.from_numpy(X), mu, V)
    np.testing.assert_allclose(Z, (X - X.mean(0)) @ ref.T, atol=1e-10)
    np.testing.assert_allclose(Z.var(0) * 40, s[:3] ** 2, rtol=1e-10)        # variance along each axis
    assert V.dtype == torch.float64 and Z.shape == (40, 3)
    assert fit_pca(torch.from_numpy(X).float(), 5)[1].shape == (5, 5)
    with pytest.raises(InputError, match=r"dim must be in \[1, 5\], got 6"): fit_pca(X, 6)
    with pytest.raises(InputError, match="got 0"): fit_pca(X, 0)


def test_uniformity_and_relative_gap_check_y_against_x():
    x = unit(5, 3, 0)
    for bad, what in ((unit(4, 3, 1), "N=5"), (unit(5, 4, 1), "D=3")):
        with pytest.raises(ShapeError, match=rf"^y: .*{what}"): uniformity(x, bad)
        with pytest.raises(ShapeError, match=rf"^y: .*{what}"): relative_gap(x, bad)
    # each message names the offending argument
    with pytest.raises(InputError, match=r"^x: rows must be L2-normalised"): relative_gap(2 * x, x)
    with pytest.raises(InputError, match=r"^y: rows must be L2-normalised"): relative_gap(x, 2 * x)
    with pytest.raises(ShapeError, match=r"^x: expected 2-D"): relative_gap(x[0], x)
    with pytest.raises(InputError, match=r"^y: rows must be L2-normalised"): uniformity(x, 2 * x)


def test_separability_single_held_out_pair():
    # N=10, test_size=0.1: exactly one held-out pair (two points) is allowed -> accuracy in {0, 0.5, 1}
    x = unit(10, 4, 0, 0.3); y = unit(10, 4, 1, -0.3)
    assert separability(x, y, test_size=0.1) in (0.0, 0.5, 1.0)
    assert separability(x, y, test_size=0.9) in {i / 18 for i in range(19)}   # one training pair


def test_token_relevance_mean_pool_one_or_no_real_token():
    g = torch.Generator().manual_seed(0)
    R = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([[False, True, False], [False, False, False]])
    mean = token_relevance(R, 1, "mean", valid)
    assert torch.allclose(mean[0], R[0, 2, 1:] * valid[0])                # the mean over one row is that row
    assert torch.equal(mean[1], torch.zeros(3, dtype=torch.float64))      # nothing real: all zero, no NaN


def test_tsne_defaults_match_sklearn_directly():
    from sklearn.manifold import TSNE
    x, y = unit(6, 30, 0, 1.0), unit(6, 30, 1, -1.0); Z = torch.cat([x, y]).numpy()
    # default perplexity (n - 1) / 3 over all n = 12 rows; seed -> random_state; dim -> n_components; kwargs passed on
    with threadpool_limits(1):
        out = reduce_embeddings({"image": x, "text": y}, "tsne", dim=3, seed=3, max_iter=250)
        ref = TSNE(n_components=3, perplexity=11 / 3, init="pca", random_state=3, max_iter=250).fit_transform(Z)
    assert out["image"].shape == (6, 3)
    np.testing.assert_allclose(np.concatenate([out["image"], out["text"]]), ref, atol=1e-6)


def test_umap_arguments(monkeypatch):
    # the UMAP class replaced by a recorder (the real fit is the slow, mutation_heavy case above)
    import sys, types
    seen = []
    class FakeUMAP:
        def __init__(self, **kw): seen.append(kw)
        def fit_transform(self, Z): return Z[:, :seen[-1]["n_components"]] * 2
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    x, y = unit(4, 20, 0), unit(3, 20, 1)
    out = reduce_embeddings({"image": x, "text": y}, "umap", dim=3, seed=5)
    # n_neighbors is capped by the 7 rows; n_jobs=1 because a seeded UMAP runs single-threaded (else it warns)
    assert seen[-1] == dict(n_components=3, n_neighbors=6, random_state=5, n_jobs=1)
    assert np.array_equal(out["image"], 2 * x[:, :3].numpy()) and np.array_equal(out["text"], 2 * y[:, :3].numpy())
    reduce_embeddings({"image": unit(40, 4, 2)}, "umap", n_neighbors=5, metric="cosine")
    assert seen[-1] == dict(n_components=2, n_neighbors=5, random_state=0, n_jobs=1, metric="cosine")
    reduce_embeddings({"image": unit(40, 4, 2)}, "umap")
    assert seen[-1]["n_neighbors"] == 15


def test_tiny_image_text_model_arguments():
    from mmlab.analysis import tiny_image_text_model
    m = tiny_image_text_model(vocab_size=37, img_size=16, proj_dim=24, seed=1, max_len=11)
    txt, img = m.towers["text"], m.towers["image"]
    assert txt.config.vocab_size == 37 and txt.config.max_len == 11 and img.config.img_size == (16, 16)
    ids = torch.tensor([[36, 5, 2]]); out = m({"image": torch.rand(1, 3, 16, 16), "text": ids})
    assert out["image"].shape == (1, 24) and out["text"].shape == (1, 24)
    with pytest.raises(InputError, match=r"\[0, 37\)"): m({"text": torch.tensor([[37]])})   # past the vocabulary
    same = tiny_image_text_model(vocab_size=37, img_size=16, proj_dim=24, seed=1, max_len=11)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), same.state_dict().values()))


def test_clip_trainer_default_batch_of_64_pairs():
    from mmlab.core import ConfigError
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.a = torch.nn.Linear(4, 3); self.b = torch.nn.Linear(4, 3)
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0))); self.rows = []
        def forward(self, batch):
            self.rows.append(len(batch["image"]))
            return {"image": F.normalize(self.a(batch["image"]), dim=-1), "text": F.normalize(self.b(batch["text"]), dim=-1),
                    "logit_scale": self.log_scale.exp()}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(100, 4, generator=g), "text": torch.randn(100, 4, generator=g), "label": torch.arange(100),
             "present": {}}
    model = Recorder()
    hist = clip_trainer(model, batch, 3).fit()
    assert model.rows == [64, 64, 64] and [r["step"] for r in hist] == [1, 2, 3]
    with pytest.raises(ConfigError, match="batch_size=64 exceeds the 40 training examples"):   # fewer rows than a batch
        clip_trainer(model, take(batch, range(40)), 2)
