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


def test_knn_counts_only_present():
    train_x = tie_features(20, 6, 0); train_y = torch.arange(20) % 3
    test_x = tie_features(9, 6, 1); test_y = torch.arange(9) % 3
    m = torch.tensor([True, False] * 4 + [True])
    full = knn_eval(train_x, train_y, test_x[m], test_y[m], k=3)
    part = knn_eval(train_x, train_y, test_x, test_y, k=3, present=m)
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
        r = retrieval_eval(a, b, present_a=ma, present_b=mb, ks=(1, 2, 5), chunk_size=chunk, **kw)
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
                     present=torch.tensor([True, True, False]))
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
    with pytest.raises(InputTypeError, match="bool tensor"): zero_shot_eval(x, x[:2], y, present=torch.ones(5))
    with pytest.raises(InputError, match="no rows"): knn_eval(torch.randn(0, 3), y[:0], x, y, k=1)
    with pytest.raises(InputError, match="empty class"): class_embeddings([torch.randn(2, 3), torch.randn(0, 3)])
    with pytest.raises(InputError, match="retrieval_eval: b: 1 non-finite"): retrieval_eval(x, x.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(float("nan"))))
    with pytest.raises(InputError, match="ks must be integers"): retrieval_eval(x, x, ks=(0,))
    with pytest.raises(InputError, match="modality 'audio' is not in the batch's present"): present({"image": torch.ones(2, dtype=torch.bool)}, "audio")
    # errors are also the builtin types, so plain-Python handlers keep working
    with pytest.raises(ValueError): knn_eval(x, y, x, y, k=0)


def test_knn_and_probe_monitors_in_trainer_with_missing_modality():
    from mmlab.eval import knn_monitor, probe_monitor
    from mmlab.train import Trainer, TrainConfig
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(6); x = F.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(24, 4, generator=g)
    present = torch.ones(24, dtype=torch.bool); present[::5] = False              # 5 samples lack the modality
    batches = [{"x": x[i:i + 8], "label": y[i:i + 8], "present": {"image": present[i:i + 8]}} for i in range(0, 24, 8)]
    net = torch.nn.Linear(4, 4)
    with torch.no_grad(): net.weight.copy_(torch.eye(4)); net.bias.zero_()
    feat = lambda m, b: m(b["x"])
    ref = knn_eval(x[present], y[present], x[present], y[present], k=5)
    cbs = [knn_monitor(feat, batches, batches, k=5, modality="image"), probe_monitor(feat, batches, batches, modality="image")]
    tr = Trainer(net, lambda m, b: 0.0 * m(b["x"]).sum(), batches, TrainConfig(steps=1, lr=1e-9, device="cpu",
                                                                              clip_grad_norm=None), callbacks=cbs)
    hist = tr.fit()
    rec = [r for r in hist if "knn/accuracy" in r][0]
    assert rec["knn/accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6) and rec["knn/n_missing"] == 5
    probe = [r for r in hist if "probe/accuracy" in r][0]
    assert probe["probe/accuracy"] == 1.0 and probe["probe/n_missing"] == 5
    assert net.training                                                            # eval mode was restored


def tiny_clip(seed=0):
    from mmlab.encoders import TextEncoder, TextConfig, ViTEncoder, ViTConfig
    from mmlab.models import MultiModalModel
    torch.manual_seed(seed)
    return MultiModalModel({"image": ViTEncoder(ViTConfig.preset("tiny", img_size=16)),
                            "text": TextEncoder(TextConfig.preset("tiny", vocab_size=20, max_len=8))}, proj_dim=16)


def clip_batch(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "text": torch.randint(4, 20, (n, 6), generator=g),
            "label": torch.arange(n) % 4, "caption": [f"c{i}" for i in range(n)], "present": {}}


def test_embed_equals_the_models_own_forward_chunked_or_not():
    from mmlab.data import take
    from mmlab.eval import embed
    model, batch = tiny_clip(), clip_batch()
    with torch.no_grad(): ref = model.eval()(batch)                     # the model's own eval-mode forward, all rows
    model.train()
    whole = embed(model, batch, chunk=1000)
    assert set(whole) == {"image", "text"} and model.training             # no logit scale/bias; train mode restored
    for m in ("image", "text"):
        assert whole[m].dtype == torch.float32 and whole[m].device.type == "cpu" and whole[m].shape == (23, 16)
        torch.testing.assert_close(whole[m], ref[m], atol=1e-6, rtol=0)
    parts = [take(batch, range(0, 10)), take(batch, range(10, 23))]
    for out in (embed(model, batch, chunk=5), embed(model, batch, chunk=1), embed(model, parts)):
        for m in ("image", "text"): torch.testing.assert_close(out[m], whole[m], atol=1e-5, rtol=0)
    text_only = embed(model, {"present": {}, "text": batch["text"]}, chunk=4)   # rows counted from any tensor
    assert set(text_only) == {"text"}
    torch.testing.assert_close(text_only["text"], whole["text"], atol=1e-5, rtol=0)


def test_embed_restores_the_mode_after_an_error_and_casts_to_float32():
    from mmlab.eval import embed
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    def broken(m, b):
        seen.append(m.training); raise RuntimeError("forward failed")
    for mode in (True, False):
        net.train(mode)
        with pytest.raises(RuntimeError, match="forward failed"): embed(net, {"x": x}, broken)
        assert net.training is mode and seen[-1] is False                  # ran in eval mode, mode restored
    net.train()
    z = embed(net, {"x": x, "label": torch.arange(10)}, lambda m, b: {"z": m(b["x"]), "y": b["label"]}, chunk=3)
    torch.testing.assert_close(z["z"], net.eval()(x).detach()); net.train()   # dropout off: the eval forward
    assert z["y"].dtype == torch.int64 and torch.equal(z["y"], torch.arange(10))   # labels keep their dtype
    half = torch.nn.Linear(4, 3).to(torch.bfloat16)
    assert embed(half, {"x": x.bfloat16()}, lambda m, b: m(b["x"])).dtype == torch.float32
    with pytest.raises(InputError, match=r"no tensor with rows; keys: \['present'\]"): embed(net, {"present": {}}, broken)
    with pytest.raises(InputError, match="chunk must be an integer >= 1"): embed(net, {"x": x}, broken, chunk=0)
    with pytest.raises(InputError, match="data holds no batch"): embed(net, [], broken)
    with pytest.raises(InputTypeError, match="has no `modalities`, so pass fn"): embed(net, {"x": x})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_embed_moves_inputs_to_the_models_device():
    from mmlab.eval import embed
    model, batch = tiny_clip(), clip_batch()
    with torch.no_grad(): ref = model.eval()(batch)
    out = embed(model.cuda(), batch, chunk=7)                             # CPU batch in, CPU float32 out
    for m in ("image", "text"):
        assert out[m].device.type == "cpu" and out[m].dtype == torch.float32
        torch.testing.assert_close(out[m], ref[m], atol=1e-4, rtol=0)


# ================================================================ behaviour pinned against hand references (issue 14)

from hypothesis import given, settings, strategies as st
from mmlab.eval import build_prompts, zero_shot_classifier

FAST = settings(max_examples=30, deadline=None)


def ensemble_ref(prompts):
    "float64: normalise each prompt embedding, average per class, normalise the mean."
    out = []
    for p in prompts:
        p = torch.as_tensor(p, dtype=torch.float64)
        m = (p / p.norm(dim=1, keepdim=True)).mean(0); out.append(m / m.norm())
    return torch.stack(out)


def test_prompt_ensemble_normalises_each_prompt_before_averaging():
    # within a class one prompt is 100x longer: averaging raw vectors would let it dominate
    prompts = [torch.tensor([[100., 0., 0.], [0., 1., 0.]]), torch.tensor([[0., 0., 3.], [0., 4., 0.], [1., 0., 1.]])]
    got = class_embeddings(prompts)
    want = torch.tensor([[1, 1, 0], [0.5 ** 0.5, 1, 1 + 0.5 ** 0.5]], dtype=torch.float64)   # by hand
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), ensemble_ref(prompts), atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))                   # renormalised after the mean
    # a (C, T, D) tensor is the same as the list of its classes
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 3, 5, generator=g) * torch.tensor([0.1, 1.0, 30.0])[None, :, None]
    torch.testing.assert_close(class_embeddings(e).double(), ensemble_ref(list(e)), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="all zeros"): class_embeddings([torch.tensor([[1., 0.], [-1., 0.]])])


def test_zero_shot_classifier_encodes_every_template_per_class():
    calls, table = [], {}
    g = torch.Generator().manual_seed(1)
    def encode(prompts):                                                    # a fixed random vector per string,
        calls.append(list(prompts))                                         # norms from 0.1 to 10
        for s in prompts:
            if s not in table: table[s] = torch.randn(6, generator=g) * 10 ** (len(table) % 3 - 1)
        return torch.stack([table[s] for s in prompts])
    cls = zero_shot_classifier(encode, ["cat", "dog"], ["a {}.", "a photo of a {}.", "{}!"])
    assert calls == [["a cat.", "a photo of a cat.", "cat!"], ["a dog.", "a photo of a dog.", "dog!"]]
    want = ensemble_ref([[table[s].tolist() for s in c] for c in calls])
    torch.testing.assert_close(cls.double(), want, atol=1e-6, rtol=0)
    assert build_prompts(["x"], ["{}"]) == [["x"]]
    with pytest.raises(InputError, match="exactly one"): build_prompts(["x"], ["{} {}"])
    with pytest.raises(InputError, match="exactly one"): build_prompts(["x"], ["no slot"])
    with pytest.raises(InputError, match="classnames is empty"): build_prompts([], ["{}"])
    with pytest.raises(InputError, match="templates is empty"): build_prompts(["x"], [])


def test_zero_shot_eval_is_cosine_with_present_and_errors():
    # query 0 has the larger dot product with class 1 (long vector) but the larger cosine with class 0
    q = torch.tensor([[1.0, 0.2], [0.0, 1.0], [5.0, 5.0]]); cls = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    r = zero_shot_eval(q, cls, torch.tensor([0, 1, 0]), present=torch.tensor([True, True, False]))
    assert r["predictions"].tolist() == [0, 1] and r["accuracy"] == 1.0 and (r["n"], r["n_missing"]) == (2, 1)
    assert r["chance"] == 0.5 and "top5" not in r
    with pytest.raises(InputError, match="label 2 >= C=2"): zero_shot_eval(q, cls, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="no sample has the modality"):
        zero_shot_eval(q, cls, torch.tensor([0, 1, 0]), present=torch.zeros(3, dtype=torch.bool))


def test_pessimistic_rank_hand_cases():
    s = torch.tensor([[0.5, 0.9, 0.9, 0.1],     # positive 1 ties negative 2: rank 2
                      [0.5, 0.9, 0.9, 0.1],     # positives 1, 2 tie each other: not against the query
                      [0.5, 0.9, 0.9, 0.1],     # positive 3 last: 1 + 3 negatives
                      [0.2, 0.2, 0.2, 0.2]])    # everything tied: 1 + all negatives
    pos = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert pessimistic_rank(s, pos).tolist() == [2, 1, 4, 4]


def test_knn_weighting_temperature_and_k():
    # neighbours of the query [1, 0]: class 0 at cosine 1, class 1 twice at cosine 0.6, class 0 twice at 0.5
    h = math.sqrt(0.75)
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.5, h], [0.5, -h]]); y = torch.tensor([0, 1, 1, 0, 0])
    q, qy = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # tau 0.07: e^(1/0.07) >> 2 e^(0.6/0.07) -> class 0; tau 10: e^0.1 < 2 e^0.06 -> class 1 (majority)
    assert knn_eval(train, y, q, qy, k=3, tau=0.07)["predictions"].tolist() == [0]
    assert knn_eval(train, y, q, qy, k=3, tau=10.0)["predictions"].tolist() == [1]
    # the crossover tau where e^(1/tau) = 2 e^(0.6/tau): tau = 0.4 / ln 2
    t0 = 0.4 / math.log(2)
    assert knn_eval(train, y, q, qy, k=3, tau=t0 * 0.95)["accuracy"] == 1.0
    assert knn_eval(train, y, q, qy, k=3, tau=t0 * 1.05)["accuracy"] == 0.0
    assert knn_eval(train, y, q, qy, k=1, tau=10.0)["predictions"].tolist() == [0]       # k = 1: the nearest only
    # k = 5 adds two class-0 votes at cosine 0.5: e^0.1 + 2 e^0.05 > 2 e^0.06
    assert knn_eval(train, y, q, qy, k=5, tau=10.0)["predictions"].tolist() == [0]
    # cosine, not dot product: scaling training rows changes nothing
    big = train * torch.tensor([1.0, 50.0, 50.0, 0.01, 0.01])[:, None]
    assert knn_eval(big, y, q * 7, qy, k=3, tau=10.0)["predictions"].tolist() == [1]
    assert knn_eval(big, y, q, qy, k=5, tau=10.0)["predictions"].tolist() == [0]


def test_knn_class_count_top5_and_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g); y = torch.arange(12) % 6
    r = knn_eval(x, y, x, y, k=1, num_classes=8)
    assert r["accuracy"] == 1.0 and r["chance"] == 1 / 8 and r["top5"] == 1.0 and r["chance_top5"] == 5 / 8
    assert r["k"] == 1 and r["ties"] == 0 and r["predictions"].tolist() == y.tolist()
    r = knn_eval(x[:, :2], y % 4, x[:, :2], y % 4, k=1)
    assert r["chance"] == 0.25 and "top5" not in r                         # C = 1 + the largest label seen
    r = knn_eval(x, y % 5, x, y % 5, k=1)
    assert r["top5"] == 1.0 and r["chance_top5"] == 1.0                     # 5 classes: top-5 is reported
    with pytest.raises(InputError, match="num_classes=4 but a label 5 occurs"): knn_eval(x, y, x, y, k=1, num_classes=4)
    with pytest.raises(InputError, match="tau must be > 0"): knn_eval(x, y, x, y, k=1, tau=0.0)
    with pytest.raises(InputError, match="row 2 is all zeros"): knn_eval(x.index_fill(0, torch.tensor([2]), 0.0), y, x, y, k=1)
    with pytest.raises(InputTypeError, match="integer tensor"): knn_eval(x, y.float(), x, y, k=1)
    with pytest.raises(InputError, match="labels must be >= 0"): knn_eval(x, y - 1, x, y, k=1)
    with pytest.raises(InputError, match="no sample has the modality"):
        knn_eval(x, y, x, y, k=1, present=torch.zeros(12, dtype=torch.bool))


def lbfgs_probe(X, y, Xt, C, standardize):
    "Independent multinomial logistic regression: float64 torch L-BFGS on sum-CE / C + ||W||^2 / 2 (bias free)."
    X, Xt = X.double(), Xt.double()
    if standardize:
        mu, sd = X.mean(0), X.std(0, unbiased=False); sd[sd == 0] = 1
        X, Xt = (X - mu) / sd, (Xt - mu) / sd
    K = int(y.max()) + 1
    W = torch.zeros(X.shape[1], K, dtype=torch.float64, requires_grad=True); b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); f = C * F.cross_entropy(X @ W + b, y, reduction="sum") + 0.5 * (W ** 2).sum()
        f.backward(); return f
    from mmlab.data import one_thread
    with one_thread(): opt.step(closure)                                     # tiny problem: threads only add overhead
    return (Xt @ W + b).detach()


def test_linear_probe_raw_features_and_constant_column():
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([6.0, 0.2, 1.0])                                    # badly scaled on purpose
    y = torch.arange(3).repeat_interleave(12)
    x = (torch.randn(36, 3, generator=g) + 1.5 * F.one_hot(y, 3)) * scale
    xt = (torch.randn(30, 3, generator=g) + 1.5 * F.one_hot(torch.arange(3).repeat(10), 3)) * scale
    yt = torch.arange(3).repeat(10)
    raw = linear_probe(x, y, xt, yt, C=0.05, standardize=False)
    assert raw["predictions"].tolist() == lbfgs_probe(x, y, xt, 0.05, False).argmax(1).tolist()
    std = linear_probe(x, y, xt, yt, C=0.05)
    assert raw["predictions"].tolist() != std["predictions"].tolist()        # the option is not ignored here
    # a constant feature (std 0) standardises to 0 and changes nothing
    const = lambda z: torch.cat([z, torch.full((len(z), 1), 4.0)], 1)
    assert linear_probe(const(x), y, const(xt), yt, C=0.05)["predictions"].tolist() == std["predictions"].tolist()


def test_linear_probe_label_checks_and_unconverged():
    x = torch.tensor([[-2.], [-1.], [1.], [2.]]); y = torch.tensor([0, 0, 2, 2])   # class 1 never trained
    r = linear_probe(x, y, torch.tensor([[-3.], [3.]]), torch.tensor([0, 2]))
    assert r["accuracy"] == 1.0 and r["chance"] == 0.5 and r["predictions"].tolist() == [0, 2]
    with pytest.raises(InputError, match=r"test label\(s\) \[1\] never occur in train_y"):
        linear_probe(x, y, x, torch.tensor([0, 1, 2, 2]))
    # an unseen label of a masked-out sample does not matter
    assert linear_probe(x, y, x, torch.tensor([0, 1, 2, 2]), present=torch.tensor([True, False, True, True]))["n_missing"] == 1
    with pytest.raises(InputError, match="single class"): linear_probe(x, torch.zeros(4, dtype=torch.long), x, y)
    with pytest.raises(InputError, match="C must be > 0"): linear_probe(x, y, x, y, C=0)
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(40, 5, generator=g); yy = torch.randint(0, 4, (40,), generator=g)
    assert linear_probe(xx, yy, xx, yy, C=1e4, max_iter=1)["converged"] is False


@FAST
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=5), n=st.integers(1, 4), seed=st.integers(0, 1000),
       order=st.randoms(use_true_random=False))
def test_few_shot_subset_counts_per_class(counts, n, seed, order):
    labels = [c * 3 for c, k in enumerate(counts) for _ in range(k)]        # non-contiguous class ids
    order.shuffle(labels)
    if not labels: return
    y = torch.tensor(labels)
    if min(k for k in counts if k) < n:
        with pytest.raises(InputError, match=f"fewer than n_per_class={n}"): few_shot_subset(y, n, seed)
        return
    s = few_shot_subset(y, n, seed)
    assert s.tolist() == sorted(set(s.tolist())) and s.dtype == torch.long
    got = {c: (y[s] == c).sum().item() for c in set(labels)}
    assert got == {c: n for c in set(labels)}
    # nested: the subset for n is inside the subset for n + 1 (same seed)
    if min(k for k in counts if k) > n: assert set(s.tolist()) <= set(few_shot_subset(y, n + 1, seed).tolist())


def test_few_shot_subset_seeds_and_errors():
    y = torch.arange(4).repeat_interleave(25)
    subsets = {tuple(few_shot_subset(y, 3, seed).tolist()) for seed in range(6)}
    assert len(subsets) > 1                                                   # the seed is used
    assert few_shot_subset(y, 3, 2).tolist() == few_shot_subset(y, 3, 2).tolist()
    for bad in (0, -1, 2.0):
        with pytest.raises(InputError, match="n_per_class must be an integer >= 1"): few_shot_subset(y, bad)
    # label errors name the function and argument
    with pytest.raises(InputTypeError, match=r"^few_shot_subset: labels: class labels must be an integer tensor"):
        few_shot_subset(torch.tensor([0.0, 1.0]), 1)
    with pytest.raises(InputTypeError, match=r"^few_shot_subset: labels: expected an int64 tensor"): few_shot_subset([0, 1], 1)
    with pytest.raises(ShapeError, match=r"^few_shot_subset: labels: expected shape \(2,\)"): few_shot_subset(torch.zeros(2, 1, dtype=torch.long), 1)
    with pytest.raises(InputError, match=r"^few_shot_subset: labels: labels must be >= 0, got -1"): few_shot_subset(torch.tensor([0, -1]), 1)


def test_label_efficiency_mean_std_by_hand():
    # 1-NN on these points: accuracies per subset computed with a plain loop
    g = torch.Generator().manual_seed(5)
    y = torch.arange(3).repeat_interleave(8); x = F.one_hot(y, 3).float() + 0.9 * torch.randn(24, 3, generator=g)
    xt = F.one_hot(torch.arange(3).repeat(5), 3).float() + 0.9 * torch.randn(15, 3, generator=g); yt = torch.arange(3).repeat(5)
    out = label_efficiency(x, y, xt, yt, shots=(1, 2), seeds=(0, 4, 7), method="knn", k=1)
    def nn_acc(idx):
        tr = F.normalize(x[idx].double(), dim=1); te = F.normalize(xt.double(), dim=1)
        return float(np.mean([int(y[idx][int((tr @ q).argmax())]) == int(c) for q, c in zip(te, yt)]))
    for i, n in enumerate((1, 2)):
        accs = [nn_acc(few_shot_subset(y, n, s)) for s in (0, 4, 7)]
        assert out["mean"][i] == pytest.approx(np.mean(accs), abs=1e-12)
        assert out["std"][i] == pytest.approx(np.std(accs), abs=1e-12)      # population std over seeds
    assert out["shots"] == [1, 2] and out["chance"] == 1 / 3 and len(out["runs"]) == 6
    assert [(r["shots"], r["seed"], r["n_train"], r["n"]) for r in out["runs"]][:3] == [(1, 0, 3, 15), (1, 4, 3, 15), (1, 7, 3, 15)]
    assert len(set(out["runs"][i]["accuracy"] for i in range(3))) > 1 or out["std"][0] == 0
    lin = label_efficiency(x, y, xt, yt, shots=(2,), seeds=(1,), C=0.3)
    assert lin["runs"][0]["accuracy"] == linear_probe(x[few_shot_subset(y, 2, 1)], y[few_shot_subset(y, 2, 1)], xt, yt, C=0.3)["accuracy"]
    with pytest.raises(InputError, match="non-empty"): label_efficiency(x, y, xt, yt, shots=())


def test_retrieval_duplicate_ids_chunks_and_names_by_hand():
    # a: 3 queries; b: 4 gallery rows, ids [0, 0, 1, 2]; cosines chosen so ranks are known
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); a_ids = torch.tensor([0, 1, 2])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [1.0, 1.0]]); b_ids = torch.tensor([0, 0, 1, 2])
    # a0 (id 0): best positive b1 (cos .995) beats b2 (1.0)? no: b2 is a negative at cos 1 -> rank 2
    # a1 (id 1): positive b2 at cos 0; negatives b0 (1), b1 (.0995), b3 (.707) above -> rank 4
    # a2 (id 2): positive b3 at cos 1 -> rank 1
    for chunk in (1, 2, 3, 100):
        r = retrieval_eval(a, b, a_ids, b_ids, ks=(1, 2), names=("img", "txt"), chunk_size=chunk)
        assert set(r) == {"img_to_txt", "txt_to_img"}
        x = r["img_to_txt"]
        assert (x["R@1"], x["R@2"], x["mean_rank"], x["median_rank"]) == pytest.approx((1 / 3, 2 / 3, 7 / 3, 2.0))
        assert (x["n"], x["gallery"], x["n_missing"]) == (3, 4, 0)
        # b -> a: b0, b1 (id 0) share the positive a0: b0 sees a1 (1) and a2 (.707) above a0 (0) -> rank 3,
        # b1 has a0 on top (.995) -> 1; b2 (id 1): a0 (1), a2 (.707) above a1 (0) -> 3; b3 -> 1
        y = r["txt_to_img"]
        assert (y["n"], y["gallery"], y["R@1"], y["R@2"], y["mean_rank"]) == pytest.approx((4, 3, 0.5, 0.5, 2.0))
    # a gallery row masked out: a query whose only positive is gone is not scored, but counted as missing
    r = retrieval_eval(a, b, a_ids, b_ids, present_b=torch.tensor([True, True, True, False]), ks=(1,))
    assert (r["a_to_b"]["n"], r["a_to_b"]["n_missing"], r["a_to_b"]["gallery"]) == (2, 1, 3)
    with pytest.raises(InputError, match="pass both a_ids and b_ids"): retrieval_eval(a, b, a_ids=a_ids)
    with pytest.raises(ShapeError, match="a has 3 rows and b 4"): retrieval_eval(a, b)


def test_present_is_the_and_of_the_batch_present():
    m = {"image": torch.tensor([True, False, True, True]), "text": torch.tensor([True, True, False, True]),
         "audio": torch.tensor([False, True, True, True])}
    assert present(m, "image").tolist() == [True, False, True, True]
    assert present(m, "image", "text").tolist() == [True, False, False, True]
    assert present(m, "image", "text", "audio").tolist() == [False, False, False, True]
    assert m["image"].tolist() == [True, False, True, True]                 # the batch's present is not modified
    with pytest.raises(InputError, match="name at least one modality"): present(m)
    with pytest.raises(ShapeError, match="'text' has shape"): present({"image": m["image"], "text": m["text"][:2]}, "image", "text")


def test_zero_shot_errors_name_the_function_and_the_argument():
    g = torch.Generator().manual_seed(5)
    q, c, y = F.normalize(torch.randn(4, 3, generator=g), dim=-1), F.normalize(torch.randn(2, 3, generator=g), dim=-1), torch.tensor([0, 1, 0, 1])
    q0, c0 = q.clone(), c.clone(); q0[1] = 0; c0[1] = 0
    with pytest.raises(InputError, match=r"^zero_shot_eval: query: row 1 is all zeros"): zero_shot_eval(q0, c, y)
    with pytest.raises(InputError, match=r"^zero_shot_eval: class_emb: row 1 is all zeros"): zero_shot_eval(q, c0, y)
    with pytest.raises(InputError, match=r"^zero_shot_eval: label 5 >= C=2 classes"): zero_shot_eval(q, c, torch.tensor([0, 5, 0, 1]))


@pytest.mark.parametrize("bad", [[], (), "ab", 3])
def test_class_embeddings_refuses_an_empty_or_foreign_ensemble(bad):
    with pytest.raises(InputError, match=r"^class_embeddings: expected a \(C, T, D\) tensor or a non-empty list"):
        class_embeddings(bad)
