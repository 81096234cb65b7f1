"""mmlab.eval against naive float64 references (with many exact ties), plus error cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlab.core import InputError, InputTypeError, ShapeError
from mmlab.eval import (class_embeddings, few_shot_subset, knn_eval, label_efficiency, linear_probe,
                        pessimistic_rank, present, retrieval_eval, zero_shot_eval)


def tie_features(n, d, seed):
    "Rows with exactly four entries in {-1, +1}: norm 2, so every cosine is an exact multiple of 1/4 (many ties)."
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d)
    for i in range(n):
        idx = torch.randperm(d, generator=g)[:4]
        x[i, idx] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


def naive_rank(scores, positives):
    "Plain loop: 1 + #negatives scoring >= the best positive."
    best = max(scores[j] for j in positives)
    return 1 + sum(1 for j in range(len(scores)) if j not in positives and scores[j] >= best)


def naive_knn(train_x, train_y, test_x, test_y, k, tau, C):
    "DINO kNN as a float64 loop: stable neighbour order (lower index first on ties), pessimistic class ties."
    tr = F.normalize(train_x.double(), dim=1); te = F.normalize(test_x.double(), dim=1)
    correct, preds = [], []
    for q, y in zip(te, test_y.tolist()):
        s = [(float(q @ tr[j]), j) for j in range(len(tr))]
        s.sort(key=lambda t: (-t[0], t[1]))
        votes = [0.0] * C
        for sim, j in s[:k]: votes[int(train_y[j])] += math.exp(sim / tau)
        correct.append(naive_rank(votes, {y}) == 1)
        preds.append(max(range(C), key=lambda c: (votes[c], -c)))
    return float(np.mean(correct)), preds


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_matches_naive_loop_with_ties(seed, k):
    train_x = tie_features(30, 6, seed); test_x = tie_features(17, 6, seed + 100)
    g = torch.Generator().manual_seed(seed)
    train_y = torch.randint(0, 4, (30,), generator=g); test_y = torch.randint(0, 4, (17,), generator=g)
    acc, preds = naive_knn(train_x, train_y, test_x, test_y, k, 0.5, 4)
    r = knn_eval(train_x, train_y, test_x, test_y, k=k, tau=0.5, num_classes=4, chunk_size=5)
    assert r["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert r["predictions"].tolist() == preds
    assert r["n"] == 17 and r["n_missing"] == 0 and r["chance"] == 0.25
    assert k == 1 or r["ties"] > 0   # the grid really exercises tied class scores


def test_knn_mask_counts_only_present():
    train_x = tie_features(20, 6, 0); train_y = torch.arange(20) % 3
    test_x = tie_features(9, 6, 1); test_y = torch.arange(9) % 3
    m = torch.tensor([True, False] * 4 + [True])
    full = knn_eval(train_x, train_y, test_x[m], test_y[m], k=3)
    part = knn_eval(train_x, train_y, test_x, test_y, k=3, mask=m)
    assert part["accuracy"] == full["accuracy"] and (part["n"], part["n_missing"]) == (5, 4)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_retrieval_matches_naive_loop(seed, chunk):
    a = tie_features(13, 5, seed); b = tie_features(13, 5, seed + 50)
    g = torch.Generator().manual_seed(seed)
    ma = torch.rand(13, generator=g) > 0.2; mb = torch.rand(13, generator=g) > 0.2
    a_ids = torch.randint(0, 9, (13,), generator=g); b_ids = torch.randint(0, 9, (13,), generator=g)
    for ids in (None, (a_ids, b_ids)):
        kw = {} if ids is None else {"a_ids": ids[0], "b_ids": ids[1]}
        r = retrieval_eval(a, b, mask_a=ma, mask_b=mb, ks=(1, 2, 5), chunk_size=chunk, **kw)
        ai, bi = (torch.arange(13), torch.arange(13)) if ids is None else ids
        A, B = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
        for key, Q, G, qi, gi, qm, gm in (("a_to_b", A, B, ai, bi, ma, mb), ("b_to_a", B, A, bi, ai, mb, ma)):
            gal = [j for j in range(13) if gm[j]]
            ranks = []
            for i in range(13):
                pos = {t for t, j in enumerate(gal) if gi[j] == qi[i]}
                if not qm[i] or not pos: continue
                ranks.append(naive_rank([float(Q[i] @ G[j]) for j in gal], pos))
            assert r[key]["n"] == len(ranks) and r[key]["n"] + r[key]["n_missing"] == 13
            for k in (1, 2, 5): assert r[key][f"R@{k}"] == pytest.approx(np.mean([x <= k for x in ranks]), abs=1e-12)
            assert r[key]["mean_rank"] == pytest.approx(np.mean(ranks), abs=1e-12)
            assert r[key]["median_rank"] == float(np.median(ranks))


def test_retrieval_chance_levels_closed_form():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    r = retrieval_eval(x, x.clone(), ks=(1, 5, 10))["a_to_b"]
    for k in (1, 5, 10): assert r[f"chance_R@{k}"] == pytest.approx(k / 20, abs=1e-12)   # one positive: k/M
    assert r["chance_mean_rank"] == pytest.approx(10.5) and r["R@1"] == 1.0
    # two positives among M=4, k=1: 1 - C(2,1)/C(4,1) = 0.5; expected best rank (M+1)/(p+1) = 5/3
    r = retrieval_eval(torch.eye(4), torch.eye(4), a_ids=torch.tensor([0, 0, 1, 1]), b_ids=torch.tensor([0, 0, 1, 1]))
    assert r["a_to_b"]["chance_R@1"] == pytest.approx(0.5) and r["a_to_b"]["chance_mean_rank"] == pytest.approx(5 / 3)
    # Monte Carlo check of the same chance levels with random scores
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 0, 1, 1])
    ranks = [pessimistic_rank(torch.rand(1, 4, generator=g), (ids == 0)[None]).item() for _ in range(20000)]
    assert np.mean([x == 1 for x in ranks]) == pytest.approx(0.5, abs=0.02)
    assert np.mean(ranks) == pytest.approx(5 / 3, abs=0.03)


def test_zero_shot_matches_naive_loop():
    q = tie_features(25, 6, 3); labels = torch.arange(25) % 5
    prompts = [tie_features(3, 6, 10 + c) * (c + 1) for c in range(5)]   # norms differ per class
    cls = class_embeddings(prompts)
    ref = []
    for p in prompts:
        m = sum(F.normalize(p.double(), dim=1)); ref.append(m / m.norm())
    torch.testing.assert_close(cls.double(), torch.stack(ref), atol=1e-6, rtol=0)
    r = zero_shot_eval(q, cls, labels)
    S = F.normalize(q.double(), dim=1) @ torch.stack(ref).T
    ranks = [naive_rank(S[i].tolist(), {int(labels[i])}) for i in range(25)]
    assert r["accuracy"] == pytest.approx(np.mean([x == 1 for x in ranks]))
    assert r["top5"] == 1.0 and r["chance"] == 0.2


def test_linear_probe_matches_independent_lbfgs():
    g = torch.Generator().manual_seed(0)
    C, D = 4, 6
    centres = torch.randn(C, D, generator=g) * 1.5
    ytr = torch.arange(C).repeat_interleave(40); yte = torch.arange(C).repeat_interleave(25)
    xtr = centres[ytr] + torch.randn(len(ytr), D, generator=g); xte = centres[yte] + torch.randn(len(yte), D, generator=g)
    r = linear_probe(xtr, ytr, xte, yte, C=0.5)
    X = xtr.double(); mu, sd = X.mean(0), X.std(0, unbiased=False)
    X, Xt = (X - mu) / sd, (xte.double() - mu) / sd
    W = torch.zeros(D, C, dtype=torch.float64, requires_grad=True); b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); f = 0.5 * F.cross_entropy(X @ W + b, ytr, reduction="sum") + 0.5 * (W ** 2).sum()
        f.backward(); return f
    opt.step(closure)
    pred = (Xt @ W + b).argmax(1)
    assert r["predictions"].tolist() == pred.tolist()
    assert r["accuracy"] == pytest.approx((pred == yte).double().mean().item())
    assert r["converged"] and 0.5 < r["accuracy"] < 1.0   # overlapping classes: a non-trivial case


def test_linear_probe_binary_and_mask():
    x = torch.tensor([[-2.], [-1.], [1.], [2.]]); y = torch.tensor([0, 0, 1, 1])
    r = linear_probe(x, y, torch.tensor([[-3.], [3.], [0.5]]), torch.tensor([0, 1, 0]),
                     mask=torch.tensor([True, True, False]))
    assert (r["accuracy"], r["n"], r["n_missing"], r["chance"]) == (1.0, 2, 1, 0.5)


def test_label_efficiency_deterministic_and_nested():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(10); x = F.one_hot(y, 3).float() + 0.8 * torch.randn(30, 3, generator=g)
    for seed in range(3):
        prev = set()
        for n in (1, 2, 5, 10):
            s = few_shot_subset(y, n, seed)
            assert torch.bincount(y[s]).tolist() == [n] * 3 and prev <= set(s.tolist())
            prev = set(s.tolist())
    a = label_efficiency(x, y, x, y, shots=(1, 3), method="knn", k=5)
    b = label_efficiency(x, y, x, y, shots=(1, 3), method="knn", k=5)
    assert a == b and [r["k"] for r in a["runs"]] == [3, 3, 3, 5, 5, 5]
    with pytest.raises(InputError, match="method 'svm' unknown"): label_efficiency(x, y, x, y, method="svm")


def test_bad_inputs():
    x = torch.randn(5, 3); y = torch.arange(5) % 2
    with pytest.raises(InputError, match=r"k=6 must be an integer in \[1, N\]"): knn_eval(x, y, x, y, k=6)
    with pytest.raises(ShapeError, match="with D=3"): knn_eval(x, y, torch.randn(2, 4), y[:2], k=2)
    with pytest.raises(ShapeError, match=r"expected shape \(5,\)"): zero_shot_eval(x, x[:2], y[:4])
    with pytest.raises(InputTypeError, match="bool tensor"): zero_shot_eval(x, x[:2], y, mask=torch.ones(5))
    with pytest.raises(InputError, match="no rows"): knn_eval(torch.randn(0, 3), y[:0], x, y, k=1)
    with pytest.raises(InputError, match="empty class"): class_embeddings([torch.randn(2, 3), torch.randn(0, 3)])
    with pytest.raises(InputError, match="non-finite"): retrieval_eval(x, x.masked_fill(x > 1, float("nan")))
    with pytest.raises(InputError, match="ks must be integers"): retrieval_eval(x, x, ks=(0,))
    with pytest.raises(InputError, match="no mask for modality"): present({"image": torch.ones(2, dtype=torch.bool)}, "audio")
    # errors are also the builtin types, so plain-Python handlers keep working
    with pytest.raises(ValueError): knn_eval(x, y, x, y, k=0)


def test_knn_and_probe_monitors_in_trainer_with_missing_modality():
    from mmlab.eval import embed_all, knn_monitor, probe_monitor
    from mmlab.train import Trainer, TrainConfig
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(6); x = F.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(24, 4, generator=g)
    present = torch.ones(24, dtype=torch.bool); present[::5] = False              # 5 samples lack the modality
    batches = [{"x": x[i:i + 8], "label": y[i:i + 8], "mask": {"image": present[i:i + 8]}} for i in range(0, 24, 8)]
    net = torch.nn.Linear(4, 4)
    with torch.no_grad(): net.weight.copy_(torch.eye(4)); net.bias.zero_()
    feat = lambda m, b: m(b["x"])
    z, lab, miss = embed_all(net, feat, batches, modality="image")
    assert miss == 5 and len(z) == 19 and torch.equal(lab, y[present])
    ref = knn_eval(x[present], y[present], x[present], y[present], k=5)
    cbs = [knn_monitor(feat, batches, batches, k=5, modality="image"), probe_monitor(feat, batches, batches, modality="image")]
    tr = Trainer(net, lambda m, b: 0.0 * m(b["x"]).sum(), batches, TrainConfig(max_steps=1, lr=1e-9, device="cpu",
                                                                              clip_grad_norm=None), callbacks=cbs)
    hist = tr.fit()
    rec = [r for r in hist if "knn/accuracy" in r][0]
    assert rec["knn/accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6) and rec["knn/n_missing"] == 5
    assert [r for r in hist if "probe/accuracy" in r][0]["probe/accuracy"] == 1.0
    assert net.training                                                            # eval mode was restored
