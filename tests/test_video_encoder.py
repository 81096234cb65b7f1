"""Tests of the video tower (mmlab.encoders: sincos_3d, patchify_video, TubeletEmbed, VideoConfig, DividedBlock,
VideoEncoder) against independent references: float64 closed forms and masked float64 attention, a ViT with
copied weights, permutation equivariance, gradcheck, clear errors, save/load, attention capture.
"""
import contextlib, copy, math, tempfile

import numpy as np
import pytest
import torch

from mmlab.core import ConfigError, InputError, InputTypeError, ShapeError
from mmlab.encoders import (DividedBlock, TubeletEmbed, VideoConfig, VideoEncoder, ViTConfig, ViTEncoder, attention_layers,
                            capture_attention, count_params, gather_tokens, patchify_video, set_fused_attn, sincos_2d,
                            sincos_3d, unpatchify_video)
from mmlab.masking import tube_mask

torch.set_num_threads(1)


GRID_444 = dict(patch_size=8, tubelet=2)   # the checks below hold on any grid; 4 x 4 x 4 = 64 tokens keeps them fast


def tiny(**kw): return VideoEncoder(VideoConfig.preset("tiny", **(GRID_444 | kw))).eval()


# ---------------------------------------------------------------- positions
@pytest.mark.parametrize("D", [6, 64, 96, 192])
def test_sincos_3d_closed_form(D):
    "Every entry against the formula in float64 loops: [time | row | column], 2*floor(D/6) channels per spatial axis."
    Fp, gh, gw = 3, 2, 4
    pe = sincos_3d(Fp, gh, gw, D).double()
    ds = 2 * (D // 6); dt = D - 2 * ds
    def code(pos, d, i):
        w = 10000 ** (-(i % (d // 2)) / (d / 2))
        return math.sin(pos * w) if i < d // 2 else math.cos(pos * w)
    for f in range(Fp):
        for r in range(gh):
            for c in range(gw):
                n = f * gh * gw + r * gw + c                                   # time-major
                ref = [code(f, dt, i) for i in range(dt)] + [code(r, ds, i) for i in range(ds)] + [code(c, ds, i) for i in range(ds)]
                assert torch.allclose(pe[n], torch.tensor(ref, dtype=torch.float64), atol=1e-6)
    if D % 6 == 0 and (D // 3) % 4 == 0:                                       # equal thirds: space part is the 2-D code
        assert torch.equal(sincos_3d(2, gh, gw, D)[:, D // 3:], sincos_2d(gh, gw, 2 * D // 3).repeat(2, 1))


def test_sincos_3d_errors():
    for d in (5, 4, 63):
        with pytest.raises(ConfigError, match="sincos_3d: dim must be even and >= 6"): sincos_3d(2, 2, 2, d)


# ---------------------------------------------------------------- tubelets
def test_patchify_roundtrip_and_layout():
    clip = torch.rand(2, 6, 3, 8, 12)
    tok = patchify_video(clip, 3, (4, 6))
    assert tok.shape == (2, 2 * 2 * 2, 3 * 4 * 6 * 3)
    assert torch.equal(unpatchify_video(tok, 3, (4, 6), (2, 2, 2)), clip)
    # token (step 1, row 0, column 1) of sample 1 holds frames 3..5, rows 0..3, columns 6..11, flattened (q, P, P, C)
    assert torch.equal(tok[1, 1 * 4 + 0 * 2 + 1], clip[1, 3:6, :, 0:4, 6:12].permute(0, 2, 3, 1).flatten())


def test_peer_videomae_base_token_count():
    "transformers' VideoMAE-base test (tests/models/videomae/test_modeling_videomae.py, pretraining on 16x224x224): "
    "logits of shape (1, 1408, 1536), i.e. 1408 hidden of 1568 tubelets of 2x16x16x3 = 1536 pixels at tube ratio 0.9."
    cfg = VideoConfig.preset("base")
    grid = (cfg.num_frames // cfg.tubelet, cfg.img_size[0] // cfg.patch_size[0], cfg.img_size[1] // cfg.patch_size[1])
    tok = patchify_video(torch.zeros(1, cfg.num_frames, 3, *cfg.img_size), cfg.tubelet, cfg.patch_size)
    assert tok.shape == (1, 1568, 1536) and math.prod(grid) == 1568
    assert tube_mask(1, grid[0], grid[1] * grid[2], 0.9).num_masked == 1408


def test_tubelet_embed_is_linear_map_and_gradcheck():
    torch.manual_seed(0)
    te = TubeletEmbed(2, 4, 3, 16)
    clip = torch.rand(2, 4, 3, 8, 8)
    W = te.proj.weight.permute(0, 2, 3, 4, 1).flatten(1).double()
    ref = patchify_video(clip, 2, 4).double() @ W.T + te.proj.bias.double()
    assert torch.allclose(te(clip).flatten(1, 3).double(), ref, atol=1e-5)
    te64 = TubeletEmbed(2, 2, 2, 3).double()
    assert torch.autograd.gradcheck(te64, torch.rand(1, 4, 2, 4, 4, dtype=torch.float64, requires_grad=True))


# ---------------------------------------------------------------- (a) one time step is a ViT
@pytest.mark.parametrize("q,cls", [(1, False), (2, False), (1, True)])
def test_one_time_step_equals_vit(q, cls):
    torch.manual_seed(0)
    kw = dict(class_token=True, pool="cls") if cls else dict(class_token=False, pool="mean")
    vid = tiny(num_frames=q, tubelet=q, **kw)
    vit = ViTEncoder(ViTConfig.preset("tiny", **kw)).eval()
    sd = vid.state_dict(); sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].sum(2)   # still clip: kernel summed over time
    vit.load_state_dict(sd); vit.pos_embed = vid.pos_embed.clone()
    frame = torch.rand(2, 3, 32, 32)
    a, b = vid(frame[:, None].expand(-1, q, -1, -1, -1)), vit(frame)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5) and torch.allclose(a.pooled, b.pooled, atol=1e-5)


# ---------------------------------------------------------------- (b) divided = two masked joint attentions
def masked_reference(model, x, Fp, S, keep=None, maps=None):
    "Float64 explicit path over all tokens: each block's temporal attention under the same-position mask, spatial "
    "under the same-step mask (keys limited to `keep`), MLP; final norm. x: (B, N, D) embedded tokens."
    ref = set_fused_attn(copy.deepcopy(model).double(), False)
    pos, step = torch.arange(Fp * S) % S, torch.arange(Fp * S) // S
    Mt, Ms = (pos[:, None] == pos[None])[None, None], (step[:, None] == step[None])[None, None]
    if keep is not None:                          # hidden keys removed; the diagonal keeps hidden rows finite (they are dropped)
        eye = torch.eye(Fp * S, dtype=torch.bool)
        Mt, Ms = (Mt & keep[:, None, None]) | eye, (Ms & keep[:, None, None]) | eye
    h = x.double()
    with capture_attention(ref) if maps is not None else contextlib.nullcontext() as got:   # maps: filled with its attention maps
        for blk in ref.blocks:
            h = h + blk.temporal_attn(blk.norm_t(h), attn_mask=Mt)
            h = h + blk.attn(blk.norm1(h), attn_mask=Ms)
            h = h + blk.mlp(blk.norm2(h))
    if maps is not None: maps.extend(got.values())
    return ref.norm(h)


def test_divided_block_equals_masked_joint():
    torch.manual_seed(0)
    for Fp, S in ((4, 6), (1, 5), (3, 1)):
        blk = DividedBlock(16, 2, frames=Fp).eval(); x = torch.randn(2, Fp * S, 16)
        wrap = torch.nn.Module(); wrap.blocks = torch.nn.ModuleList([blk]); wrap.norm = torch.nn.Identity()
        assert torch.allclose(blk(x).double(), masked_reference(wrap, x, Fp, S), atol=1e-5)


def test_divided_tower_equals_masked_reference():
    torch.manual_seed(0)
    m = tiny(attention="divided", depth=3)
    clips = torch.rand(2, 8, 3, 32, 32)
    ref = masked_reference(m, m.embed(clips)[0], 4, 16)
    out = m(clips)
    assert torch.allclose(out.tokens.double(), ref, atol=1e-5)
    assert torch.allclose(out.pooled.double(), ref.mean(1), atol=1e-5)


def test_divided_visible_tube_equals_masked_keys():
    "Encoding a tube's visible tokens = the masked float64 reference with hidden keys removed, then gathered."
    torch.manual_seed(0)
    m = tiny(attention="divided")
    clips = torch.rand(2, 8, 3, 32, 32)
    mk = tube_mask(2, 4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    ref = masked_reference(m, m.embed(clips)[0], 4, 16, keep=~mk.mask)
    assert torch.allclose(m(clips, visible_idx=mk.visible).tokens.double(), gather_tokens(ref, mk.visible), atol=1e-5)


# ---------------------------------------------------------------- (c) equivariance, visible tokens
def test_permutation_equivariance():
    torch.manual_seed(0)
    clips = torch.rand(2, 8, 3, 32, 32)
    perm = torch.randperm(64); grid_perm = (torch.arange(4)[:, None] * 16 + torch.randperm(16)[None]).flatten()
    joint, divided = tiny(), tiny(attention="divided")
    for m, p, equal in ((joint, perm, True), (joint, grid_perm, True), (divided, grid_perm, True), (divided, perm, False)):
        t = m.embed_patches(clips)[0]
        d = (m.forward_tokens(t[:, p]) - m.forward_tokens(t)[:, p]).abs().max()
        assert (d < 1e-5) == equal, (m.config.attention, equal, d)


def test_joint_visible_idx():
    torch.manual_seed(0)
    m = tiny()
    clips = torch.rand(2, 8, 3, 32, 32)
    vis = torch.stack([torch.randperm(64)[:10].sort().values for _ in range(2)])   # any pattern, not only tubes
    hidden = torch.ones(2, 64, dtype=torch.bool); hidden[torch.arange(2)[:, None], vis] = False
    out = m(clips, visible_idx=vis)
    full = m.forward_tokens(m.embed(clips)[0], valid=~hidden)
    assert torch.allclose(out.tokens, gather_tokens(full, vis), atol=1e-5)
    noise = m.unpatchify(m.patchify(torch.rand_like(clips)) * hidden[..., None])     # changes hidden tubelets only
    assert torch.equal(m(clips + noise, visible_idx=vis).tokens, out.tokens)
    all_idx = torch.stack([torch.randperm(64) for _ in range(2)])
    assert torch.allclose(m(clips, visible_idx=all_idx).tokens, gather_tokens(m(clips).tokens, all_idx), atol=1e-5)


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_centre_frames_keeps_hidden_pixels_out_only_under_tubes(attention):
    "centre_frames subtracts the mean over all frames: under a tube mask that mean at a visible position uses visible "
    "pixels only, so hidden tubelets cannot change the visible tokens; any other pattern is refused."
    torch.manual_seed(0)
    m = tiny(attention=attention, centre_frames=True)
    clips = torch.rand(2, 8, 3, 32, 32)
    mk = tube_mask(2, 4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    out = m(clips, visible_idx=mk.visible).tokens
    noise = m.unpatchify(m.patchify(torch.rand_like(clips)) * mk.mask[..., None])   # changes hidden tubelets only
    assert torch.allclose(m(clips + noise, visible_idx=mk.visible).tokens, out, atol=1e-6)
    vis = torch.stack([torch.randperm(64)[:16].sort().values for _ in range(2)])     # a random (not tube) pattern
    with pytest.raises(InputError, match="centre_frames subtracts the mean over all frames.*centre_frames=False"
                       if attention == "joint" else "divided attention"):
        m(clips, visible_idx=vis)


# ---------------------------------------------------------------- shapes, other sizes, errors
def test_shapes_and_other_clip_lengths():
    m = tiny()
    assert m.grid_size == (4, 4, 4)
    out = m(**m.example_inputs(3, torch.Generator().manual_seed(0)))
    assert out.tokens.shape == (3, 64, 64) and out.pooled.shape == (3, 64) and out.valid is None
    assert m(torch.rand(1, 16, 3, 32, 48)).tokens.shape == (1, 8 * 4 * 6, 64)   # sin-cos positions for any grid
    cls = tiny(class_token=True, pool="cls")
    assert cls(torch.rand(2, 8, 3, 32, 32)).tokens.shape == (2, 64, 64)
    small = VideoConfig.preset("small")
    assert (small.num_frames, small.img_size, small.embed_dim) == (8, (32, 32), 192)
    for size in ("tiny", "small"):                  # the presets' grid on the motion clips: 2 time steps x 8 x 8
        p = VideoEncoder(VideoConfig.preset(size)).eval()
        assert p.grid_size == (2, 8, 8) and p(torch.rand(1, 8, 3, 32, 32)).tokens.shape == (1, 128, p.config.embed_dim)


def test_bad_inputs_raise_clear_errors():
    m, d = tiny(), tiny(attention="divided")
    with pytest.raises(ShapeError, match="does not divide into tubelets of 2 frames"): m(torch.rand(1, 7, 3, 32, 32))
    with pytest.raises(ShapeError, match="does not divide into tubelets"): m(torch.rand(1, 8, 3, 30, 32))
    with pytest.raises(ShapeError, match="video"): m(torch.rand(8, 3, 32, 32))                 # a rank-4 tensor
    with pytest.raises(ShapeError, match="video"): m(torch.rand(1, 8, 1, 32, 32))              # wrong channels
    with pytest.raises(InputError, match="expected floats in \\[0, 1\\]"): m(torch.randint(0, 255, (1, 8, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ShapeError, match="built for 8 frames"): d(torch.rand(1, 16, 3, 32, 32))
    with pytest.raises(InputError, match="tube patterns"): d(torch.rand(1, 8, 3, 32, 32), visible_idx=torch.arange(16)[None])
    swapped = torch.tensor([1, 3, 19, 17, 33, 35, 49, 51])[None]                                # positions 1, 3 but reordered at step 1
    with pytest.raises(InputError, match="tube patterns"): d(torch.rand(1, 8, 3, 32, 32), visible_idx=swapped)
    unsorted_tube = (torch.tensor([3, 1])[None, :] + 16 * torch.arange(4)[:, None]).flatten()[None]  # same order every step: fine
    x = torch.rand(1, 8, 3, 32, 32)
    assert torch.allclose(d(x, visible_idx=unsorted_tube).tokens, d(x, visible_idx=unsorted_tube.reshape(4, 2).flip(1).flatten()[None]).tokens[:, [1, 0, 3, 2, 5, 4, 7, 6]], atol=1e-5)
    with pytest.raises(InputTypeError): m(torch.rand(1, 8, 3, 32, 32), visible_idx=torch.zeros(1, 4))
    learned = tiny(pos_embed="learned")
    with pytest.raises(ShapeError, match="learned positions cover the grid"): learned(torch.rand(1, 16, 3, 32, 32))
    with pytest.raises(InputError, match="attn_mask is not supported"): DividedBlock(8, 2, frames=2)(torch.rand(1, 4, 8), torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("kw,msg", [(dict(num_frames=7), "does not divide into tubelets"),
                                    (dict(img_size=30), "does not divide into tubelets"),
                                    (dict(attention="axial"), "expected 'joint' or 'divided'"),
                                    (dict(attention="divided", class_token=True, pool="cls"), "use class_token=False"),
                                    (dict(embed_dim=66, num_heads=3, bogus=1), "unknown key")])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg): VideoConfig.preset("tiny", **kw)


# ---------------------------------------------------------------- training pieces
def test_divided_params_and_gradients():
    "Divided adds one attention (4D^2 + 4D) and one LayerNorm (2D) per block; every parameter gets a gradient."
    j, d = tiny(), tiny(attention="divided")
    D, L = 64, 2
    assert count_params(d) - count_params(j) == L * (4 * D * D + 4 * D + 2 * D)
    d.train(); d(torch.rand(2, 8, 3, 32, 32)).pooled.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_capture_attention_divided_in_forward_order():
    m = tiny(attention="divided")
    assert attention_layers(m) == ["blocks.0.temporal_attn", "blocks.0.attn", "blocks.1.temporal_attn", "blocks.1.attn"]
    with capture_attention(m) as maps: m(torch.rand(2, 8, 3, 32, 32))
    assert maps["blocks.0.temporal_attn"].shape == (2 * 16, 2, 4, 4)        # one time sequence per position
    assert maps["blocks.0.attn"].shape == (2 * 4, 2, 16, 16)                # one spatial sequence per time step
    with capture_attention(tiny()) as maps: tiny()(torch.rand(2, 8, 3, 32, 32))


def test_save_load_roundtrip(monkeypatch):
    from mmlab import models
    if "VideoEncoder" not in models.MODEL_CLASSES: monkeypatch.setitem(models.MODEL_CLASSES, "VideoEncoder", VideoEncoder)
    for kw in (dict(), dict(attention="divided", pos_embed="learned")):
        m = tiny(**kw); x = torch.rand(2, 8, 3, 32, 32)
        with tempfile.TemporaryDirectory() as d:
            models.save_model(m, d); m2 = models.load_model(d).eval()
        assert isinstance(m2, VideoEncoder) and m2.config == m.config
        assert torch.equal(m2(x).pooled, m(x).pooled)


# ---------------------------------------------------------------- attention maps per time step (analysis, widget)
@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_attention_map_per_time_step(attention):
    "Rollout over the joint-layout maps, laid out (B, T', gh, gw); divided maps equal the masked explicit path's."
    from mmlab.analysis import attention_map, attention_rollout, divided_as_joint, token_relevance
    torch.manual_seed(0)
    m = tiny(attention=attention); clips = torch.rand(2, 8, 3, 32, 32)
    with capture_attention(m) as maps: m(clips)
    maps = list(maps.values())
    if attention == "divided":
        maps = divided_as_joint(maps, 4)
        pos, step = torch.arange(64) % 16, torch.arange(64) // 16
        masks = {"time": (pos[:, None] == pos[None]), "space": (step[:, None] == step[None])}
        ref_maps = []; masked_reference(m, m.embed(clips)[0], 4, 16, maps=ref_maps)
        assert len(ref_maps) == len(maps) and all(torch.allclose(a, r.double(), atol=1e-6) for a, r in zip(maps, ref_maps))
        for l, (a_t, a_s) in enumerate(zip(maps[::2], maps[1::2])):      # zero outside the allowed blocks, rows sum to 1
            assert (a_t[..., ~masks["time"]] == 0).all() and (a_s[..., ~masks["space"]] == 0).all()
            assert torch.allclose(a_t.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6)
            assert torch.allclose(a_s.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6)
    rel = attention_map(m, {"x": clips})
    assert rel.shape == (2, 4, 4, 4)
    assert torch.allclose(rel.flatten(1), token_relevance(attention_rollout(maps), 0, "mean"), atol=1e-10)
    one = attention_map(m, {"x": clips}, layer=-1, head=1)
    assert one.shape == (2, 4, 4, 4) and torch.allclose(one.sum((1, 2, 3)), torch.ones(2, dtype=torch.float64), atol=1e-6)
    with pytest.raises(InputError, match="pairs"): divided_as_joint(maps[:1], 4)


def test_attention_explorer_shows_video_per_time_step():
    pytest.importorskip("ipywidgets"); pytest.importorskip("plotly")
    from mmlab.analysis import attention_map
    from mmlab.models import MultiModalModel
    from mmlab.widgets import AttentionExplorer
    from mmlab.encoders import ViTEncoder, ViTConfig
    torch.manual_seed(0)
    model = MultiModalModel({"video": tiny(attention="divided"), "image": ViTEncoder(ViTConfig.preset("tiny"))}, proj_dim=16)
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(3, 8, 3, 32, 32, generator=g), "image": torch.rand(3, 3, 32, 32, generator=g),
             "label": torch.tensor([0, 1, 2]), "present": {}}
    ax = AttentionExplorer(model, batch)
    ax.tower.value = "video"
    assert ax.step.max == 3 and ax.step.layout.display is None
    ax.sample.value = 2; ax.step.value = 2
    full = attention_map(model.towers["video"], {"x": batch["video"][2:3]})[0]
    assert np.allclose(np.array(ax.fig.data[1].z), full[2].numpy(), atol=1e-10)                  # relevance of step 2
    assert np.allclose(np.array(ax.fig.data[0].z), batch["video"][2, 4].mean(0).numpy())           # its first frame (2 * q)
    assert "time step 2" in ax.info.value
    ax.layer.value = 1; ax.head.value = 0
    assert np.array(ax.fig.data[1].z).shape == (4, 4) and "layer 1" in ax.info.value
    ax.tower.value = "image"
    assert ax.step.layout.display == "none" and np.array(ax.fig.data[1].z).shape == (4, 4)
