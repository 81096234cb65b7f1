"""iBOT's masked patch-token loss and DINOv2's KoLeo regulariser: float64 references, gradient checks, the values of
lightly's tests (computed there with DINOv2's original code), the DINO model's switches and the dino recipe's."""
import math, shutil

import pytest
import torch
import torch.nn.functional as F

from mmlab.core import ConfigError, InputError, ShapeError
from mmlab.encoders import ViTConfig, ViTEncoder
from mmlab.losses import DINOLoss, IBOTPatchLoss, dino_loss, ibot_patch_loss, koleo_loss
from mmlab.masking import block_mask
from mmlab.models import DINOModel, load_model, save_model
from mmlab.recipes import DinoRecipe, get_recipe, run_recipe

torch.set_num_threads(1)

# ---- references (float64, plain loops, written from the papers' formulas) ----------------------------------------
def ibot_reference(s, t, mask, c, ts=0.1, tt=0.04):
    "iBOT's L_MIM with DINOv2's weights: (1/B) sum_i (1/max(1,|M_i|)) sum_{j in M_i} -q_ij . log p_ij."
    s, t, c = s.double(), t.double(), c.double().reshape(-1)
    total = 0.0
    for i in range(s.shape[0]):
        js = [j for j in range(s.shape[1]) if mask[i, j]]
        for j in js:
            q = [math.exp((t[i, j, k] - c[k]) / tt) for k in range(s.shape[2])]
            lse = math.log(sum(math.exp(s[i, j, k] / ts) for k in range(s.shape[2])))
            total += -sum(qk / sum(q) * (s[i, j, k] / ts - lse) for k, qk in enumerate(q)) / len(js)
    return total / s.shape[0]

def koleo_reference(x, eps=1e-8):
    "Sablayrolles et al. 2019 (KoLeo): -mean_i log(min_{j != i} ||u_i - u_j|| + eps), every pair searched by distance."
    u = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in x.double().tolist()]
    dist = lambda a, b: math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))
    return -sum(math.log(min(dist(u[i], u[j]) for j in range(len(u)) if j != i) + eps) for i in range(len(u))) / len(u)

def _rand(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

# ---- iBOT patch loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.2, 0.07)])
def test_ibot_matches_float64_reference(ts, tt):
    s, t, c = _rand(3, 7, 5, seed=1), _rand(3, 7, 5, seed=2), _rand(5, seed=3)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) < 0.5; mask[1] = False   # an image with none
    assert ibot_patch_loss(s.double(), t.double(), mask, c.double(), ts, tt).item() == pytest.approx(
        ibot_reference(s, t, mask, c, ts, tt), rel=1e-12)

def test_ibot_gradcheck_and_no_teacher_gradient():
    s, t, c = _rand(2, 5, 4, seed=5).double().requires_grad_(), _rand(2, 5, 4, seed=6).double().requires_grad_(), _rand(4).double()
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    assert torch.autograd.gradcheck(lambda x: ibot_patch_loss(x, t, mask, c), (s,))
    ibot_patch_loss(s, t, mask, c).backward()
    assert t.grad is None and s.grad[~mask].abs().max() == 0          # visible patches and the teacher get nothing

def test_ibot_invariances():
    s, t, c = _rand(4, 6, 8, seed=7), _rand(4, 6, 8, seed=8), _rand(8, seed=9)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(10)) < 0.5
    base = ibot_patch_loss(s, t, mask, c)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(11))       # patch order does not matter
    assert torch.allclose(ibot_patch_loss(s[:, perm], t[:, perm], mask[:, perm], c), base, atol=1e-6)
    assert ibot_patch_loss(s, t + 3.0, mask, c + 3.0).item() == pytest.approx(base.item(), abs=1e-5)   # a shifted centre
    assert ibot_patch_loss(s, t, torch.zeros_like(mask), c).item() == 0.0
    # everything hidden: the per-image mean of patch cross-entropies is DINO's loss on the patches as views of one image
    full = torch.ones_like(mask)
    ce = -(F.softmax((t - c) / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert ibot_patch_loss(s, t, full, c).item() == pytest.approx(ce.item(), rel=1e-6)

def test_ibot_reproduces_lightly():
    # lightly tests/loss/test_ibot_loss.py::TestIBOTPatchLoss::test_forward: IBOTPatchLoss(output_dim=2, teacher_temp=0.1,
    # student_temp=0.2, center_momentum=0.9) on these masked rows gives 0.4057 (rel 1e-4), "calculated with the original
    # implementation" of DINOv2's iBOTPatchLoss.forward_masked; its centre is then 0.1 * teacher_out.mean(0).
    t_m = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]); s_m = torch.tensor([[0.7, 0.8], [0.9, 1.0], [1.1, 1.2]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]], [[False, False], [False, False]]])
    m = mask.flatten(1)
    dense = lambda x: torch.zeros(3, 4, 2).masked_scatter(m[..., None].expand(-1, -1, 2), x)
    crit = IBOTPatchLoss(2, student_temp=0.2, teacher_temp=0.1, center_momentum=0.9)
    assert crit(dense(s_m), dense(t_m), m).item() == pytest.approx(0.4057, rel=1e-4)
    # the kit's centre follows iBOT's code (the mean over every teacher patch), lightly's/DINOv2's the masked ones only
    assert torch.allclose(crit.center[0], 0.1 * dense(t_m).mean((0, 1)))

def test_ibot_errors():
    s, c = torch.randn(2, 4, 3), torch.zeros(3)
    with pytest.raises(InputError, match="mask must be a bool tensor"): ibot_patch_loss(s, s, torch.ones(2, 4), c)
    with pytest.raises(ShapeError, match="ibot_patch_loss: teacher"): ibot_patch_loss(s, torch.randn(2, 5, 3), torch.ones(2, 4, dtype=bool), c)
    with pytest.raises(ShapeError, match="center"): ibot_patch_loss(s, s, torch.ones(2, 4, dtype=bool), torch.zeros(4))
    with pytest.raises(ShapeError, match="student"): ibot_patch_loss(torch.randn(2, 3), s, torch.ones(2, 4, dtype=bool), c)

# ---- KoLeo ------------------------------------------------------------------------------------------------------------
def test_koleo_matches_float64_reference_and_gradcheck():
    x = _rand(9, 4, seed=12).double()
    assert koleo_loss(x).item() == pytest.approx(koleo_reference(x), rel=1e-12)
    assert torch.autograd.gradcheck(koleo_loss, (x.clone().requires_grad_(),))

@pytest.mark.parametrize("x,expected", [
    # lightly tests/loss/test_koleo_loss.py::TestKoLeoLoss::test_forward, "generated using the original implementation"
    # of DINOv2's KoLeoLoss (rel 1e-4). Their batch of one (17.7275, DINOv2's epsilons) has no neighbour: refused here.
    (torch.tensor([[0.0, 1.0], [0.0, -1.0]]), -math.log(2)),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), -math.log(2 ** 0.5)),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]]), 0.2674)])
def test_koleo_reproduces_lightly(x, expected):
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-4)

def test_koleo_ties_duplicates_and_scale():
    x = _rand(6, 3, seed=13)
    assert koleo_loss(3.0 * x).item() == pytest.approx(koleo_loss(x).item(), rel=1e-6)   # normalised inside
    square = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])                          # every point has two tied neighbours
    assert koleo_loss(square).item() == pytest.approx(-math.log(2 ** 0.5 + 1e-8), rel=1e-6)
    dup = torch.tensor([[1.0, 0], [1.0, 0], [0, 1]], requires_grad=True)
    loss = koleo_loss(dup); loss.backward()
    assert loss.item() == pytest.approx(-(2 * math.log(1e-8) + math.log(2 ** 0.5 + 1e-8)) / 3, rel=1e-5)
    assert dup.grad.isfinite().all()
    with pytest.raises(ShapeError, match="at least 2 rows"): koleo_loss(torch.randn(1, 4))
    with pytest.raises(ShapeError, match="koleo_loss: x"): koleo_loss(torch.randn(4))

def test_koleo_spreads_points():
    "Gradient descent on KoLeo alone raises the smallest nearest-neighbour distance of a bunched set."
    x = (torch.tensor([1.0, 0, 0]) + 0.05 * _rand(16, 3, seed=14)).requires_grad_()
    opt = torch.optim.SGD([x], lr=0.05)
    nn_dist = lambda: torch.cdist(F.normalize(x, dim=-1), F.normalize(x, dim=-1)).fill_diagonal_(9).min(1).values
    before = nn_dist().min().item()
    for _ in range(50): opt.zero_grad(); koleo_loss(x).backward(); opt.step()
    assert nn_dist().min().item() > 2 * before

# ---- the model's switches --------------------------------------------------------------------------------------------
def _views(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, 32, 32, generator=g) for _ in range(2)], [torch.rand(B, 3, 32, 32, generator=g) for _ in range(2)]

def test_model_weight_zero_is_plain_dino():
    torch.manual_seed(0); plain = DINOModel(ViTEncoder(ViTConfig.preset("tiny")), head_bn=True)
    torch.manual_seed(0); zero = DINOModel(ViTEncoder(ViTConfig.preset("tiny")), head_bn=True, ibot_weight=0.0, koleo_weight=0.0)
    assert plain.state_dict().keys() == zero.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    g, l = _views()
    terms = zero.loss_terms(g, l)
    assert list(terms) == ["dino"] and torch.equal(terms["dino"], plain(g, l))

def test_model_ibot_term_is_the_loss_on_hand_computed_logits():
    torch.manual_seed(0); m = DINOModel(ViTEncoder(ViTConfig.preset("tiny")), ibot_weight=0.5, mask_ratio=0.4).eval()
    g, l = _views(); B = 4
    with torch.no_grad():
        torch.manual_seed(3); terms = m.loss_terms(g, l)
        torch.manual_seed(3); mask = block_mask(2 * B, m.online["encoder"].grid_size, 0.4).mask
        enc, head, t = m.online["encoder"], m.online["head"], m.teacher.module
        tok, grid = enc.embed_patches(torch.cat(g))
        feats = enc.forward_tokens(enc.add_pos(torch.where(mask[..., None], m.mask_token, tok), grid))
        s_p = head(feats[:, 1:].reshape(-1, enc.embed_dim)).view(2 * B, -1, 256)
        t_p = t["head"](t["encoder"](torch.cat(g)).tokens.reshape(-1, enc.embed_dim)).view(2 * B, -1, 256)
        assert mask.sum(1).eq(round(0.4 * 16)).all()
        assert terms["ibot"].item() == pytest.approx(0.5 * ibot_patch_loss(s_p, t_p, mask, torch.zeros(256)).item(), rel=1e-5)
        s_cls = head(torch.cat([enc.forward_head(feats), enc(torch.cat(l)).pooled])).view(4, B, -1)
        t_cls = t["head"](t["encoder"](torch.cat(g)).pooled).view(2, B, -1)
        assert terms["dino"].item() == pytest.approx(dino_loss(s_cls, t_cls, torch.zeros(256)).item(), rel=1e-5)

def test_model_training_moves_the_patch_centre_and_saves(tmp_path):
    torch.manual_seed(0); m = DINOModel(ViTEncoder(ViTConfig.preset("tiny")), ibot_weight=1.0, koleo_weight=0.1)
    terms = m.loss_terms(*_views())
    assert set(terms) == {"dino", "ibot", "koleo"} and m.patch_criterion.center.abs().sum() > 0
    sum(terms.values()).backward(); assert m.mask_token.grad.abs().sum() > 0       # the mask token learns
    loaded = load_model(save_model(m, tmp_path / "m"))
    assert loaded.ibot_weight == 1.0 and loaded.koleo_weight == 0.1
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    assert "patch_criterion.center" in loaded.state_dict() and "mask_token" in loaded.state_dict()

# ---- the recipe's switches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,msg", [("ibot_weight", -1.0, ">= 0"), ("koleo_weight", -0.1, ">= 0"),
                                           ("mask_ratio", 0.0, "a fraction in (0, 1)"), ("mask_ratio", 1.0, "a fraction in (0, 1)")])
def test_recipe_rejects_bad_switches(key, value, msg):
    with pytest.raises(ConfigError, match=rf"dino.{key}={value!r}: expected {msg[:4]}"): get_recipe("dino", **{key: str(value)})

def test_recipe_weight_zero_equals_plain_dino_loss(monkeypatch):
    r = get_recipe("dino", steps="4", batch_size="16", warmup_steps="1", log_to="jsonl")
    res_new = run_recipe(r, None, n_train=32, evaluate_after=False)
    from mmlab import recipes
    def old(self):                                          # the recipe's make_loss before the switches, verbatim
        size = ViTConfig.preset(self.size).img_size[0]
        glob = recipes.image_augment(size=size, scale=(self.global_scale, 1.0))
        local = recipes.image_augment(size=size, scale=(self.local_scale, self.global_scale))
        views = lambda x: (recipes.augment_views(x, glob, 2), recipes.augment_views(x, local, self.local_crops))
        return lambda model, batch: {"dino": model(*views(batch["image"]))}
    monkeypatch.setattr(recipes.DinoRecipe, "make_loss", old)
    res_old = run_recipe(r, None, n_train=32, evaluate_after=False)
    assert [h["loss"] for h in res_new.history if "loss" in h] == [h["loss"] for h in res_old.history if "loss" in h]

def test_recipe_with_ibot_and_koleo_trains():
    r = get_recipe("dino", steps="24", batch_size="32", warmup_steps="2", ibot_weight="1.0", koleo_weight="0.1", lr="2e-3")
    res = run_recipe(r, None, n_train=128, evaluate_after=False)
    hist = [h for h in res.history if "loss" in h]
    assert {"dino", "ibot", "koleo"} <= set(hist[0])
    first, last = sum(h["loss"] for h in hist[:4]) / 4, sum(h["loss"] for h in hist[-4:]) / 4
    assert last < first, (first, last)

def test_recipe_resume_with_ibot_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    r = get_recipe("dino", steps="6", batch_size="16", warmup_steps="1", ibot_weight="1.0", koleo_weight="0.1", ckpt_every="3")
    run = tmp_path / "run"
    run_recipe(r, run, n_train=32, evaluate_after=False)
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    final = load_file(str(last / "tensors.safetensors"))
    assert any("patch_criterion.center" in k for k in final) and any("mask_token" in k for k in final)
    shutil.rmtree(last)                                                        # as if killed after step 3
    run_recipe(r, run, n_train=32, evaluate_after=False, resume=True)
    again = load_file(str(last / "tensors.safetensors"))
    assert sorted(again) == sorted(final) and all(torch.equal(final[k], again[k]) for k in final)

def test_koleo_under_bf16_autocast_runs_in_float32():
    "DINOv2 computes KoLeo outside autocast: bf16 inputs are promoted, so distances near eps keep their precision."
    x = _rand(8, 4, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(x.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(koleo_loss(x.bfloat16().float()).item(), rel=1e-6)

def test_bad_ibot_settings_are_refused_early():
    with pytest.raises(ConfigError, match=r"dino.mask_ratio=0.02: expected a fraction hiding at least 1 and fewer than all 16"):
        get_recipe("dino", ibot_weight="1", mask_ratio="0.02")
    assert get_recipe("dino", mask_ratio="0.02").mask_ratio == 0.02          # iBOT off: the ratio is unused
    with pytest.raises(InputError, match="iBOT's mask_ratio"):
        DINOModel(ViTEncoder(ViTConfig.preset("tiny")), ibot_weight=1.0, mask_ratio=0.01)
    from mmlab.core import InputTypeError
    from mmlab.encoders import AudioConfig, AudioEncoder
    with pytest.raises(InputTypeError, match="needs a ViTEncoder, got AudioEncoder"):
        DINOModel(AudioEncoder(AudioConfig.preset("tiny")), ibot_weight=1.0)

@pytest.mark.parametrize("kw", [dict(centering="sinkhorn"), dict(warmup_teacher_temp_steps=5)])
def test_ibot_refuses_the_switches_its_patch_loss_lacks(kw):
    "iBOT's patch loss keeps DINO's running centre and a fixed temperature: other DINO switches with it are refused."
    with pytest.raises(ConfigError, match="ibot_weight > 0"):
        DINOModel(ViTEncoder(ViTConfig.preset("tiny")), ibot_weight=1.0, **kw)
