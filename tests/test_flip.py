"""FLIP (the clip recipe's image/audio mask ratios) and the flip-mae hybrid (FlipMAE + FlipMaeRecipe).

Each test pins a property a wrong change would break: the exact reduction to plain CLIP at ratio 0 (against the
independent reference in tests/clip_reference.py), the masked embedding against a float64 hand computation, seeded
and resumable masks, the hybrid's exact reduction to FLIP at mae_weight 0, its terms, and clear errors.
"""
import math, shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from clip_reference import every_pair_loss_fn
from mmlab.core import ConfigError, InputError, InputTypeError
from mmlab.encoders import TextConfig, TextEncoder, ViTConfig, ViTEncoder, gather_tokens
from mmlab.losses import mae_loss
from mmlab.masking import random_mask
from mmlab.models import FlipMAE, MultiModalModel, check_model_contract, create_model, load_model, save_model
from mmlab.recipes import (ClipRecipe, FlipMaeRecipe, RECIPES, build_model, contrastive_loss_fn, flip_masks, get_recipe,
                           load_split, run_recipe)
from mmlab.train import latest_checkpoint, load_checkpoint
from resume_check import assert_resume_bit_identical

torch.set_num_threads(1)
IT = dict(modalities=("image", "text"), batch_size=16, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def batch():
    return load_split(ClipRecipe(**IT), "train", 16)


def test_ratio_zero_is_plain_clip_and_draws_nothing(batch):
    r = ClipRecipe(**IT)
    assert r.image_mask_ratio == 0 and flip_masks(r, build_model(r), batch) is None
    model = build_model(r)
    before = torch.get_rng_state()
    got = contrastive_loss_fn(r)(model, batch)
    assert torch.equal(before, torch.get_rng_state())                  # no mask drawn: the run's RNG stream is CLIP's
    want = every_pair_loss_fn(r)(model, batch)                         # the loss before the switches (independent code)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_flip_loss_equals_float64_hand_computation(batch):
    "The FLIP loss = InfoNCE (float64, written out) of head(pool(tower(visible tokens))) and the text embeddings."
    r = ClipRecipe(**IT, targets="diagonal", image_mask_ratio=0.75)
    model = build_model(r).eval()
    torch.manual_seed(5); got = contrastive_loss_fn(r)(model, batch)["image-text"]
    torch.manual_seed(5); m = random_mask(16, 16, 0.75)               # the same draw: 16 patches of 8x8, 12 hidden
    assert m.visible.shape == (16, 4)
    with torch.no_grad():
        vit = model.towers["image"]
        tok = vit.embed(batch["image"])[0]
        pooled = vit.forward_head(vit.forward_tokens(gather_tokens(tok, m.visible)))
        img = F.normalize(model.heads["image"](pooled).double(), dim=-1)
        txt = model(batch)["text"].double()
        s = float(model.logit_scale) * img @ txt.T
        ref = 0.5 * (-(torch.diag(s) - torch.logsumexp(s, 1)).mean() - (torch.diag(s) - torch.logsumexp(s, 0)).mean())
    assert abs(got.item() - ref.item()) < 1e-5
    with torch.no_grad(): full = contrastive_loss_fn(replace(r, image_mask_ratio=0.0))(model, batch)["image-text"]
    assert abs(full.item() - got.item()) > 1e-4                       # the masked loss is a different number


def test_hidden_patches_are_never_read(batch):
    r = ClipRecipe(**IT, image_mask_ratio=0.5)
    model = build_model(r).eval()
    torch.manual_seed(1); m = flip_masks(r, model, batch)["image"]
    hidden = m.mask.view(16, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)      # 8x8 patches of 32x32 images
    noisy = {**batch, "image": batch["image"] + 3 * torch.randn_like(batch["image"]) * hidden[:, None]}
    with torch.no_grad(): assert torch.equal(model(batch, {"image": m})["image"], model(noisy, {"image": m})["image"])


def test_masks_seeded_exact_counts_and_audio_padding_first():
    r = ClipRecipe(modalities=("image", "audio", "text"), image_mask_ratio=0.75, audio_mask_ratio=0.5, device="cpu")
    b = load_split(r, "train", 12); model = build_model(r)
    draw = lambda s: (torch.manual_seed(s), flip_masks(r, model, b))[1]
    a, a2, c = draw(0), draw(0), draw(1)
    for k in ("image", "audio"): assert torch.equal(a[k].mask, a2[k].mask)         # same seed, same masks
    assert not torch.equal(a["image"].mask, c["image"].mask)
    assert (a["image"].mask.sum(1) == 12).all()                                     # round(0.75 * 16) hidden per row
    L = a["audio"].mask.shape[1]; assert (a["audio"].mask.sum(1) == round(0.5 * L)).all()
    valid = model.towers["audio"].valid_tokens(b["audio_lengths"], b["audio"].shape[-1])
    n_pad = (~valid).sum(1)
    assert n_pad.max() > 0, "the fixture needs clips of different lengths"
    for row, p in enumerate(n_pad.tolist()):            # padding is hidden first; real tokens only when padding runs out
        assert a["audio"].mask[row][~valid[row]].all() if p <= round(0.5 * L) else (~a["audio"].mask[row][valid[row]]).all()
    g = lambda: torch.Generator().manual_seed(3)                                     # an explicit generator: no global draw
    before = torch.get_rng_state()
    assert torch.equal(flip_masks(r, model, b, g())["image"].mask, flip_masks(r, model, b, g())["image"].mask)
    assert torch.equal(before, torch.get_rng_state())


def test_kept_patch_count_matches_open_clip_patch_dropout():
    # open_clip's PatchDropout (src/open_clip/transformer.py, "https://arxiv.org/abs/2212.00794") keeps
    # max(1, int(num_tokens * (1 - prob))) patch tokens and always the CLS token. At FLIP's ratios on ViT-B/16 at 224
    # (196 patches) and on the kit's tiny 64x64 grid (64 patches) the kit keeps as many, plus [CLS] in front.
    for N, side in ((196, 14), (64, 8)):
        for p in (0.5, 0.75):
            m = random_mask(2, N, p, generator=torch.Generator().manual_seed(0))
            assert m.visible.shape[1] == max(1, int(N * (1 - p))), (N, p)
    vit = ViTEncoder(ViTConfig.preset("tiny", img_size=64))
    m = random_mask(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert vit.forward_features(torch.rand(2, 3, 64, 64), visible_idx=m.visible).shape[1] == 1 + 16


def test_clip_recipe_with_flip_trains_and_resumes_bit_identically(tmp_path):
    r = ClipRecipe(**IT, steps=6, ckpt_every=3, image_mask_ratio=0.5, warmup_steps=1)
    assert_resume_bit_identical(r, tmp_path / "run", 64)                               # killed after step 3


def test_flip_recipe_loss_decreases():
    res = run_recipe(ClipRecipe(**IT, steps=20, warmup_steps=2, image_mask_ratio=0.75), n_train=64, n_eval=64)
    h = [x["loss"] for x in res.history]
    assert sum(h[-4:]) / 4 < sum(h[:4]) / 4
    assert "zero_shot/text_to_image/accuracy" in res.metrics             # evaluation on every patch works


def test_flip_with_grad_cache_runs_and_matches_one_chunk(batch):
    "GradCache replays each chunk's RNG state, so the masks drawn inside its embedding are the same in both passes."
    r = ClipRecipe(**IT, image_mask_ratio=0.5, grad_cache=16)            # one chunk: the plain FLIP gradient
    model = build_model(r)
    torch.manual_seed(2); terms = contrastive_loss_fn(r)(model, batch)
    g1 = [p.grad.clone() for p in model.parameters() if p.grad is not None]; model.zero_grad()
    torch.manual_seed(2); plain = contrastive_loss_fn(replace(r, grad_cache=0))(model, batch)
    sum(plain.values()).backward()
    g2 = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert abs(sum(terms.values()).item() - sum(plain.values()).item()) < 1e-6
    assert len(g1) == len(g2) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


@pytest.mark.parametrize("kw,msg", [
    (dict(image_mask_ratio=1.0), "clip.image_mask_ratio=1.0: expected 0 (off), or with image among the modalities a fraction in (0, 1)"),
    (dict(image_mask_ratio=-0.25), "clip.image_mask_ratio=-0.25"),
    (dict(modalities=("audio", "text"), image_mask_ratio=0.5), "with image among the modalities"),
    (dict(modalities=("image", "text"), audio_mask_ratio=0.5), "clip.audio_mask_ratio=0.5: expected 0 (off), or with audio"),
])
def test_bad_ratios_raise(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")): ClipRecipe(**kw)


def test_bad_ratios_from_the_command_line_vocabulary():
    with pytest.raises(ConfigError, match="flip-mae.image_mask_ratio=0.0: expected a fraction in"):
        get_recipe("flip-mae", image_mask_ratio="0")
    with pytest.raises(ConfigError, match="flip-mae.mae_weight=-1.0"): get_recipe("flip-mae", mae_weight="-1")
    with pytest.raises(ConfigError, match="flip-mae.grad_cache=8"): FlipMaeRecipe(grad_cache=8)
    with pytest.raises(ConfigError, match="with image among the modalities"): FlipMaeRecipe(modalities=("audio", "text"))


def test_model_masks_errors(batch):
    model = build_model(ClipRecipe(**IT))
    m = random_mask(16, 16, 0.5)
    with pytest.raises(InputError, match=r"masks for \['audio'\], which have no tower"): model(batch, {"audio": m})
    with pytest.raises(InputTypeError, match="masks must be a dict modality -> Mask"): model(batch, {"image": m.mask})
    with pytest.raises(InputTypeError, match="FlipMAE: needs an 'image' ViTEncoder and another tower"):
        FlipMAE({"image": ViTEncoder(ViTConfig.preset("tiny"))})


# ---------------------------------------------------------------- the hybrid
def test_flip_mae_terms_are_one_pass_of_the_tower(batch):
    "The 'mae' term is MAE's loss on the decoder output of the same visible tokens whose pooled vector is the embedding."
    r = FlipMaeRecipe(**IT, image_mask_ratio=0.75)
    model = r.make_model().eval()
    torch.manual_seed(4); terms = r.make_loss()(model, batch)
    assert list(terms) == ["image-text", "mae"]
    torch.manual_seed(4); m = random_mask(16, 16, 0.75)
    with torch.no_grad():
        vit = model.towers["image"]
        feats = vit.forward_tokens(gather_tokens(vit.embed(batch["image"])[0], m.visible))
        rec = mae_loss(model.decoder(feats[:, 1:], m, vit.grid_size, prefix=feats[:, :1]), vit.patchify(batch["image"]),
                       m.mask, norm_pix=True)
    assert torch.allclose(terms["mae"], r.mae_weight * rec, atol=1e-6)
    torch.manual_seed(4); flip = contrastive_loss_fn(ClipRecipe(**IT, image_mask_ratio=0.75))(model, batch)
    assert torch.equal(terms["image-text"], flip["image-text"])           # the contrastive term is FLIP's on that pass


def test_flip_mae_at_weight_zero_trains_exactly_as_flip():
    kw = dict(**IT, steps=5, warmup_steps=1, image_mask_ratio=0.5)
    flip = run_recipe(ClipRecipe(**kw), n_train=48, evaluate_after=False)
    hyb = run_recipe(FlipMaeRecipe(**kw, mae_weight=0.0), n_train=48, evaluate_after=False)
    assert [h["loss"] for h in hyb.history] == [h["loss"] for h in flip.history]
    sd = hyb.model.state_dict()
    for k, v in flip.model.state_dict().items(): assert torch.equal(v, sd[k]), k   # same towers, heads and scale


def test_flip_mae_trains_logs_terms_and_resumes(tmp_path):
    r = FlipMaeRecipe(**IT, steps=16, warmup_steps=2, ckpt_every=8)
    res = run_recipe(r, tmp_path / "run", n_train=64, n_eval=48)
    first, last = res.history[0], res.history[-1]
    assert set(first) >= {"image-text", "mae"} and math.isclose(first["loss"], first["image-text"] + first["mae"], rel_tol=1e-6)
    mean = lambda k, s: sum(h[k] for h in s) / len(s)
    assert mean("loss", res.history[-4:]) < mean("loss", res.history[:4])
    assert mean("mae", res.history[-4:]) < mean("mae", res.history[:4])
    assert 0 < res.metrics["flip-mae/image/masked_mse"] < 2 and "zero_shot/text_to_image/accuracy" in res.metrics
    final = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))[0]
    shutil.rmtree(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    resumed = run_recipe(r, tmp_path / "run", n_train=64, evaluate_after=False, resume=True)
    again = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))[0]
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in res.history]


def test_flip_mae_registered_saves_loads_and_hands_back_towers(tmp_path, batch):
    assert RECIPES["flip-mae"] is FlipMaeRecipe and get_recipe("flip-mae").modalities == ClipRecipe().modalities
    torch.manual_seed(0); m = create_model("flip_mae_tiny").eval()
    check_model_contract(m)
    loaded = load_model(save_model(m, tmp_path / "fm"))
    assert type(loaded) is FlipMAE and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    assert m.encoder("image") is m.towers["image"] and isinstance(m, MultiModalModel)

@pytest.mark.parametrize("recipe, kw, why", [
    ("clip", dict(queue_size="8", image_mask_ratio="0.5"), "no FLIP masking"),           # the key encoder sees whole inputs
    ("flip-mae", dict(queue_size="8"), "no FLIP masking"),
    ("clip", dict(itm_weight="1", image_mask_ratio="0.5"), "without image_mask_ratio=0.5"),
    ("clip", dict(itm_weight="1", queue_size="8"), "without queue_size=8"),
    ("flip-mae", dict(itm_weight="1"), "without image_mask_ratio=0.5"),
])
def test_switches_that_would_drop_each_other_are_refused(recipe, kw, why):
    "Two switches whose losses replace each other raise a ConfigError naming both, instead of one silently winning."
    from mmlab.recipes import get_recipe
    with pytest.raises(ConfigError, match=why): get_recipe(recipe, **kw)
