"""Image-text matching with hard negatives (ALBEF / BLIP) and CLIP distillation (CLIP-KD / TinyCLIP): the losses against
float64 references and finite differences, the sampler's distribution, the model piece, and the clip recipe's switches
(`itm_weight`, `teacher`, `kd_weight`, `feature_kd_weight`): off is today's loss bit for bit, on trains, errors are clear,
resume is bit-identical."""
import math, shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmlab.core import ConfigError, InputError, ShapeError
from mmlab.losses import feature_kd_loss, itm_loss, logit_kd_loss, sample_hard_negatives
from mmlab.models import ITMHead, MultiModalModel, create_model, load_model, save_model
from mmlab.recipes import (ClipRecipe, build_model, contrastive_loss_fn, itm_rerank_eval, load_run, load_split,
                           matching_loss_fn, run_recipe)
from mmlab.data import take

torch.set_num_threads(1)
SMALL = dict(modalities=("image", "text"), batch_size=16, warmup_steps=1, device="cpu", lr=2e-3)

# ---- itm_loss -------------------------------------------------------------------------------------------------------
def loop_itm(pos, neg):
    "float64 loop: -log softmax(row)[y], y = 1 for the matched rows and 0 for the unmatched ones, averaged."
    rows = [(r, 1) for r in pos.tolist()] + [(r, 0) for r in neg.tolist()]
    return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in rows) / len(rows)

@pytest.mark.parametrize("B", [1, 5])
def test_itm_loss_matches_float64_loop_and_gradcheck(B):
    g = torch.Generator().manual_seed(B)
    pos, neg = torch.randn(B, 2, generator=g, dtype=torch.float64), torch.randn(2 * B, 2, generator=g, dtype=torch.float64)
    assert itm_loss(pos, neg).item() == pytest.approx(loop_itm(pos, neg), abs=1e-12)
    assert torch.autograd.gradcheck(itm_loss, (pos.clone().requires_grad_(), neg.clone().requires_grad_()))

def test_itm_loss_closed_forms_and_errors():
    # a head that cannot tell (equal logits) pays log 2 per pair, whatever the mix of matched and unmatched pairs
    assert itm_loss(torch.zeros(3, 2), torch.zeros(6, 2)).item() == pytest.approx(math.log(2), abs=1e-7)
    # the best constant predictor of 1 matched : 2 unmatched pays the entropy of (1/3, 2/3), the ITM loss's "learnt nothing" level
    prior = torch.tensor([[math.log(2 / 3), math.log(1 / 3)]])
    h = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert itm_loss(prior.expand(4, 2), prior.expand(8, 2)).item() == pytest.approx(h, abs=1e-6)
    with pytest.raises(ShapeError, match="itm_loss: pos"): itm_loss(torch.zeros(3, 3), torch.zeros(6, 2))
    with pytest.raises(ShapeError, match="itm_loss: neg"): itm_loss(torch.zeros(3, 2), torch.zeros(6))

# ---- sample_hard_negatives ------------------------------------------------------------------------------------------
def test_sampler_never_draws_the_positive_and_follows_exp_similarity():
    "Frequencies of 40 000 seeded draws per row against exp(s_ij) over j != i: a chi-square test at a fixed seed."
    B, n = 7, 40_000
    g = torch.Generator().manual_seed(0)
    sim = 2 * torch.randn(B, B, generator=g)
    idx = sample_hard_negatives(sim, generator=g, num_samples=n)
    assert idx.shape == (B, n) and idx.dtype == torch.long
    counts = F.one_hot(idx, B).sum(1).double()
    assert counts.diagonal().sum() == 0
    p = torch.exp(sim.double()) * (1 - torch.eye(B, dtype=torch.float64))         # written from the formula, no softmax call
    expected = n * p / p.sum(1, keepdim=True)
    off = ~torch.eye(B, dtype=torch.bool)
    chi2 = ((counts - expected)[off] ** 2 / expected[off]).sum().item()
    dof = B * (B - 2)
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2
    assert (counts[off] / n - expected[off] / n).abs().max() < 0.01                 # each frequency within 1 point

def test_sampler_excludes_same_label_and_is_seeded_and_gradient_free():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(8, 8, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    hits = sample_hard_negatives(sim, y, generator=g, num_samples=300)
    assert (y[hits] != y[:, None]).all()
    assert set(hits[5].tolist()) == {0, 1, 2, 3, 4, 6, 7}                           # every other class can be drawn
    one = lambda: sample_hard_negatives(sim, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one(), one()) and one().shape == (8,) and not one().requires_grad
    torch.manual_seed(3); a = sample_hard_negatives(sim); torch.manual_seed(3)
    assert torch.equal(a, sample_hard_negatives(sim))                               # None: torch's global generator

def test_sampler_errors():
    with pytest.raises(InputError, match="query 0 has no candidate outside its own pair and class"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="no candidate"): sample_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ShapeError, match="logits"): sample_hard_negatives(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="labels"): sample_hard_negatives(torch.zeros(3, 3), torch.zeros(4, dtype=torch.long))

# ---- logit_kd_loss, feature_kd_loss ---------------------------------------------------------------------------------
def loop_kd(s, t):
    "float64 loops: KL(p_t || p_s) of each row and of each column, averaged over the rows, then over the two directions."
    def kl_rows(S, T):
        out = 0.0
        for sr, tr in zip(S, T):
            ls, lt = [math.log(sum(math.exp(v) for v in r)) for r in (sr, tr)]
            out += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(sr, tr))
        return out / len(S)
    s, t = s.tolist(), t.tolist()
    cols = lambda M: [list(c) for c in zip(*M)]
    return 0.5 * (kl_rows(s, t) + kl_rows(cols(s), cols(t)))

@pytest.mark.parametrize("B", [2, 6])
def test_logit_kd_matches_float64_loop_gradcheck_and_is_zero_at_equal_logits(B):
    g = torch.Generator().manual_seed(B)
    s, t = torch.randn(B, B, generator=g, dtype=torch.float64), 5 * torch.randn(B, B, generator=g, dtype=torch.float64)
    assert logit_kd_loss(s, t).item() == pytest.approx(loop_kd(s, t), abs=1e-12)
    assert torch.autograd.gradcheck(lambda x: logit_kd_loss(x, t), (s.clone().requires_grad_(),))
    assert logit_kd_loss(t, t).item() == 0.0 and logit_kd_loss(t.float(), t.float()).item() == 0.0   # exactly
    assert logit_kd_loss(s, t) > 0
    tt = t.clone().requires_grad_(); logit_kd_loss(s.clone().requires_grad_(), tt).backward()
    assert tt.grad is None                                                          # the teacher is a constant

def test_logit_kd_is_not_symmetric_in_its_arguments_but_in_its_directions():
    "Transposing both matrices swaps the two directions: the loss is the same (image->text and text->image weigh equally)."
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert logit_kd_loss(s.T, t.T).item() == pytest.approx(logit_kd_loss(s, t).item(), abs=1e-12)
    assert abs(logit_kd_loss(s, t).item() - logit_kd_loss(t, s).item()) > 1e-3      # KL is not symmetric

def test_feature_kd_closed_forms_gradcheck_and_errors():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert feature_kd_loss(s, t).item() == pytest.approx(sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / 24, abs=1e-12)
    cos = [float(a @ b) / float(a.norm() * b.norm()) for a, b in zip(s, t)]
    assert feature_kd_loss(s, t, "cosine").item() == pytest.approx(sum(1 - c for c in cos) / 4, abs=1e-12)
    assert feature_kd_loss(t, t, "cosine").item() == pytest.approx(0.0, abs=1e-12) and feature_kd_loss(t, t).item() == 0.0
    for kind in ("mse", "cosine"):
        assert torch.autograd.gradcheck(lambda x: feature_kd_loss(x, t, kind), (s.clone().requires_grad_(),))
    with pytest.raises(InputError, match="kind='l1'; expected one of mse, cosine"): feature_kd_loss(s, t, "l1")
    with pytest.raises(ShapeError, match="teacher"): feature_kd_loss(s, t[:, :5])

# ---- ITMHead and the model's extras ---------------------------------------------------------------------------------
def test_itm_head_reads_the_context_ignores_padding_and_saves_with_the_model(tmp_path):
    torch.manual_seed(0)
    head = ITMHead(64, 32).eval()
    x = head.example_inputs(3)
    out = head(**x)
    assert out.shape == (3, 2)
    assert (head(x["text"], x["context"].flip(0), context_valid=x["context_valid"].flip(0)) - out).abs().max() > 1e-4
    tv = torch.ones(3, 7, dtype=torch.bool); tv[1, 4:] = False
    changed = x["text"].clone(); changed[1, 4:] = 50.0
    torch.testing.assert_close(head(changed, x["context"], tv, x["context_valid"])[1], head(x["text"], x["context"], tv, x["context_valid"])[1])
    clip = create_model("clip_tiny")
    model = MultiModalModel(dict(clip.towers), proj_dim=clip.proj_dim, extras={"itm_image": ITMHead(64, 64)})
    back = load_model(save_model(model, tmp_path / "m"))
    for k, v in model.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    assert "extras" not in clip.get_config()                                        # a model without extras: as before

# ---- the clip recipe's switches -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    "A finished clip run (image and text) to distil from: a few steps are enough for the plumbing."
    out = tmp_path_factory.mktemp("teacher")
    run_recipe(ClipRecipe(**SMALL, steps=2, proj_dim=24), out, n_train=32, evaluate_after=False)
    return str(out)

@pytest.fixture(scope="module")
def batch():
    r = ClipRecipe(**SMALL)
    return take(load_split(r, "train", 64), range(16))

def test_switches_off_is_todays_loss_and_model_bit_for_bit(batch):
    r = ClipRecipe(**SMALL)
    base = contrastive_loss_fn(r)
    assert matching_loss_fn(r, base) is base                                        # the very same function
    a, b = build_model(r), build_model(r)
    assert len(a.extras) == 0 and list(a.state_dict()) == list(build_model(replace(r, itm_weight=0.0)).state_dict())
    assert torch.equal(r.make_loss()(a, batch)["image-text"], base(b, batch)["image-text"])

def test_itm_on_keeps_the_contrastive_term_bit_for_bit(batch):
    "With itm_weight the loss adds a term; the contrastive term is the plain recipe's, from the same model, bit for bit."
    r = ClipRecipe(**SMALL, itm_weight=1.0)
    model = build_model(r)
    torch.manual_seed(0); terms = r.make_loss()(model, batch)
    assert set(terms) == {"image-text", "itm-image"}
    assert torch.equal(terms["image-text"], contrastive_loss_fn(ClipRecipe(**SMALL))(model, batch)["image-text"])
    assert 0.3 < terms["itm-image"].item() < 1.5                                    # near log 2 for an untrained head

def _decreases(res, key, n=3):
    h = [r[key] for r in res.history]
    return sum(h[-n:]) / n < sum(h[:n]) / n, h

def test_itm_switch_trains_with_decreasing_loss():
    res = run_recipe(ClipRecipe(**SMALL, itm_weight=1.0, steps=20), n_train=64, evaluate_after=False)
    ok, h = _decreases(res, "loss"); assert ok, h

@pytest.mark.parametrize("kd, fd", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_distillation_switches_train_with_decreasing_loss(teacher_run, kd, fd):
    r = ClipRecipe(**SMALL, teacher=teacher_run, kd_weight=kd, feature_kd_weight=fd, steps=20, proj_dim=16)
    res = run_recipe(r, n_train=64, evaluate_after=False)
    want = ({"kd-image-text"} if kd else set()) | ({"feature-kd-image", "feature-kd-text"} if fd else set())
    assert {k for k in res.history[-1] if "kd" in k} == want
    ok, h = _decreases(res, "loss"); assert ok, h
    if fd: assert res.model.extras["kd_image"](torch.zeros(1, 16)).shape == (1, 24)   # student width 16 -> teacher width 24
    else: assert len(res.model.extras) == 0                                          # logit KD alone adds no module

def test_student_equal_to_its_teacher_has_zero_distillation_terms(teacher_run, batch):
    "A student that is a copy of the teacher run's model: the logit KD term is 0 exactly."
    t_recipe, t_model = load_run(teacher_run)
    r = replace(t_recipe, teacher=teacher_run, kd_weight=1.0)
    terms = matching_loss_fn(r, contrastive_loss_fn(r))(t_model, batch)
    assert terms["kd-image-text"].item() == 0.0

def test_itm_rerank_eval_reports_both_rankings(batch):
    r = ClipRecipe(**SMALL, itm_weight=1.0)
    m = itm_rerank_eval(build_model(r), r, batch, k=4)
    assert set(m) == {f"itm_rerank/{d}/{k}" for d in ("image_to_text", "text_to_image") for k in ("contrastive_R@1", "itm_R@1")}
    assert all(0 <= v <= 1 for v in m.values())

def test_switch_errors(tmp_path, teacher_run):
    cases = [(dict(itm_weight=-1.0), "itm_weight=-1.0: expected a weight >= 0"),
             (dict(kd_weight=1.0), "expected a teacher run folder together with kd_weight > 0"),
             (dict(teacher=teacher_run), "expected a teacher run folder together with kd_weight > 0"),
             (dict(teacher=str(tmp_path / "nope"), kd_weight=1.0), "it does not exist"),
             (dict(teacher=str(tmp_path), kd_weight=1.0), "it holds no finished run"),
             (dict(itm_weight=1.0, grad_cache=4), "expected grad_cache=0"),
             (dict(itm_weight=1.0, modalities=("image", "audio")), "expected text among the modalities"),
             (dict(teacher=teacher_run, kd_weight=1.0, modalities=("audio", "text")), "the teacher has no audio tower"),
             (dict(teacher=teacher_run, kd_weight=1.0, max_len=48), "max_len 32 (teacher) vs 48"),
             (dict(teacher=teacher_run, kd_weight=1.0, dataset="shapes"), "dataset 'digits' (teacher) vs 'shapes'")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            ClipRecipe(**{**SMALL, **kw})

def test_resume_with_itm_is_bit_identical(tmp_path):
    "The ITM head and the sampler's draws (torch's generator, checkpointed) continue exactly after a resume."
    r = ClipRecipe(**SMALL, itm_weight=1.0, steps=4, ckpt_every=2)
    straight = run_recipe(r, tmp_path / "a", n_train=48, evaluate_after=False).model
    run_recipe(r, tmp_path / "b", n_train=48, evaluate_after=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    resumed = run_recipe(r, tmp_path / "b", n_train=48, evaluate_after=False, resume=True).model
    for k, v in straight.state_dict().items(): assert torch.equal(resumed.state_dict()[k], v), k

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_switches_train_on_cuda_in_bf16(teacher_run):
    "The sampler on CUDA logits (a CUDA generator, or torch's), ITM and distillation terms under bf16 autocast, re-ranking."
    g = torch.Generator(device="cuda").manual_seed(0)
    sim = torch.randn(6, 6, device="cuda")
    idx = sample_hard_negatives(sim, torch.tensor([0, 0, 1, 1, 2, 2], device="cuda"), generator=g, num_samples=100)
    assert idx.device.type == "cuda" and (idx != torch.arange(6, device="cuda")[:, None]).all()
    kw = {**SMALL, "device": "cuda", "precision": "bf16"}
    r = ClipRecipe(**kw, itm_weight=1.0, teacher=teacher_run, kd_weight=1.0, feature_kd_weight=1.0, steps=3)
    res = run_recipe(r, n_train=48, n_eval=32)
    assert all(math.isfinite(h["loss"]) for h in res.history) and "itm_rerank/text_to_image/itm_R@1" in res.metrics
