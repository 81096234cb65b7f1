"""Project 4, collapse and its cures (nbs/p4_collapse.ipynb): the switches that ablate SimSiam's stop-gradient, BYOL's
predictor and DINO's centring and sharpening, the collapse read-outs against float64 loops, the trainer's probe along a
run, and the headline comparison on a small run through the same library functions as the notebook."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmlab.analysis import collapse_probe, collapse_stats, distill_stats, embedding_std
from mmlab.core import ConfigError, InputTypeError
from mmlab.encoders import ViTConfig, ViTEncoder
from mmlab.losses.distill import byol_loss, negative_cosine, simsiam_loss
from mmlab.models import BYOLModel
from mmlab.recipes import ByolRecipe, DinoRecipe, load_split, run_recipe
from mmlab.train import Callback, EvalCallback, TrainConfig, Trainer

torch.set_num_threads(1)

# ---- float64 references: plain loops ------------------------------------------------------------------------------
def ref_std(x) -> float:
    rows = [[float(v) for v in r] for r in x]
    unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    n, d = len(unit), len(unit[0])
    stds = []
    for e in range(d):
        mu = sum(r[e] for r in unit) / n
        stds.append(math.sqrt(sum((r[e] - mu) ** 2 for r in unit) / (n - 1)))
    return sum(stds) / d

def ref_erank_cov(x) -> float:
    rows = [[float(v) for v in r] for r in x]
    unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    n, d = len(unit), len(unit[0])
    mu = [sum(r[e] for r in unit) / n for e in range(d)]
    cov = [[sum((r[a] - mu[a]) * (r[b] - mu[b]) for r in unit) / (n - 1) for b in range(d)] for a in range(d)]
    lam = [max(l, 0.0) for l in np.linalg.eigvalsh(np.array(cov))]
    w = [l / sum(lam) for l in lam if l > 0]
    return math.exp(-sum(p * math.log(p) for p in w))

def ref_distill(t, s, c, tt, ts):
    H = KL = 0.0
    for tr, sr in zip(t.tolist(), s.tolist()):
        a = [(v - cv) / tt for v, cv in zip(tr, c)]; b = [v / ts for v in sr]
        za, zb = sum(math.exp(v) for v in a), sum(math.exp(v) for v in b)
        q = [math.exp(v) / za for v in a]; p = [math.exp(v) / zb for v in b]
        H += -sum(qi * math.log(qi) for qi in q if qi > 0); KL += sum(qi * math.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)
    return H / len(t), KL / len(t)

def test_embedding_std_and_erank_match_float64_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g) * torch.tensor([3., 1, 1, .2, .1, 5]) + 0.5     # uneven scales, off-centre
    assert embedding_std(x) == pytest.approx(ref_std(x), rel=1e-9)
    cs = collapse_stats(x)
    assert cs["std"] == pytest.approx(ref_std(x), rel=1e-9) and cs["std_uniform"] == pytest.approx(1 / math.sqrt(6))
    assert cs["erank"] == pytest.approx(ref_erank_cov(x), rel=1e-7)
    assert collapse_stats(torch.ones(10, 4)) == {"std": 0.0, "std_uniform": 0.5, "erank": 0.0}   # one point: collapsed

def test_distill_stats_match_float64_loops():
    g = torch.Generator().manual_seed(1)
    t, s, c = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g), torch.randn(9, generator=g)
    H, KL = ref_distill(t.double(), s.double(), c.tolist(), 0.04, 0.1)
    got = distill_stats(t, s, c, 0.04, 0.1)
    assert got["entropy"] == pytest.approx(H, rel=1e-9, abs=1e-12) and got["kl"] == pytest.approx(KL, rel=1e-9)
    assert got["log_K"] == pytest.approx(math.log(9))

# ---- the switches ---------------------------------------------------------------------------------------------------
def test_negative_cosine_stop_grad_switch():
    g = torch.Generator().manual_seed(2)
    p, z = (torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    negative_cosine(p, z).backward(); assert z.grad is None                            # default: z is a target
    assert torch.autograd.gradcheck(lambda p, z: negative_cosine(p, z, stop_grad=False), (p, z))
    zc = z.detach().clone().requires_grad_()
    (-torch.nn.functional.cosine_similarity(p.detach(), zc).mean()).backward()          # the plain loss's gradient in z
    z2 = z.detach().clone().requires_grad_(); negative_cosine(p.detach(), z2, stop_grad=False).backward()
    assert torch.allclose(z2.grad, zc.grad, atol=1e-12)
    a = [t.detach().clone().requires_grad_() for t in (p, p, z, z)]
    assert byol_loss(*a, stop_grad=False).item() == pytest.approx(4 + 4 * simsiam_loss(*a, stop_grad=False).item(), abs=1e-12)

def test_simsiam_is_byol_with_momentum_zero():
    run = run_recipe(ByolRecipe(base_momentum=0.0, final_momentum=0.0, steps=3, batch_size=16), n_train=64, evaluate_after=False)
    m = run.model.train()
    assert all(torch.equal(a, b) for a, b in zip(m.teacher.module.parameters(), m.online.parameters()))
    v1, v2 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(8)
    loss = m(v1, v2); z1, z2 = m.project(m.online, v1), m.project(m.online, v2)
    ref = simsiam_loss(m.predictor(z1), m.predictor(z2), z1, z2)
    assert loss.item() == pytest.approx(4 + 4 * ref.item(), abs=1e-5)
    w = m.predictor.net[0].weight
    assert torch.allclose(torch.autograd.grad(loss, w)[0], 4 * torch.autograd.grad(ref, w)[0], atol=1e-6)
    byol = run_recipe(ByolRecipe(steps=3, batch_size=16), n_train=64, evaluate_after=False).model   # momentum 0.99: a lagging teacher
    assert not all(torch.equal(a, b) for a, b in zip(byol.teacher.module.parameters(), byol.online.parameters()))

def test_stop_grad_false_keeps_the_loss_changes_the_gradient():
    def model(stop_grad):
        torch.manual_seed(1)
        return BYOLModel(ViTEncoder(ViTConfig.preset("tiny")), 16, 32, base_momentum=0, final_momentum=0, stop_grad=stop_grad)
    v1, v2 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    sg, free = model(True), model(False)
    l_sg, l_free = sg(v1, v2), free(v1, v2)
    assert l_sg.item() == pytest.approx(l_free.item(), abs=1e-5)
    l_sg.backward(); l_free.backward()
    grad = lambda m: m.online["projector"].net[-1].weight.grad
    assert (grad(sg) - grad(free)).abs().max() > 1e-4

def test_predictor_switch_compares_the_projections():
    torch.manual_seed(0)
    m = BYOLModel(ViTEncoder(ViTConfig.preset("tiny")), 16, 32, predictor=False)
    assert isinstance(m.predictor, nn.Identity)
    v1, v2 = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        z1, z2 = m.project(m.online, v1), m.project(m.online, v2)
        t1, t2 = m.project(m.teacher.module, v1), m.project(m.teacher.module, v2)
        assert m(v1, v2).item() == pytest.approx(byol_loss(z1, z2, t1, t2).item(), abs=1e-5)

def test_switch_errors_name_what_was_expected():
    with pytest.raises(ConfigError, match="byol.stop_grad=False: expected True unless base_momentum = final_momentum = 0"):
        ByolRecipe(stop_grad=False)
    with pytest.raises(ConfigError, match="byol.final_momentum=1.5: expected a value in"): ByolRecipe(final_momentum=1.5)
    with pytest.raises(ConfigError, match="stop_grad=False takes the targets from the online network"):
        BYOLModel(ViTEncoder(ViTConfig.preset("tiny")), stop_grad=False, base_momentum=0.0, final_momentum=0.5)
    with pytest.raises(InputTypeError, match="expected a BYOLModel or DINOModel, got Linear"):
        collapse_probe({"image": torch.rand(2, 3, 32, 32)})(nn.Linear(2, 2))

def test_dino_switches_no_centring_and_no_sharpening():
    kw = dict(local_crops=0, steps=3, batch_size=16)
    fixed = run_recipe(DinoRecipe(center_momentum=1.0, **kw), n_train=64, evaluate_after=False).model
    moved = run_recipe(DinoRecipe(**kw), n_train=64, evaluate_after=False).model
    assert fixed.criterion.center.abs().max().item() == 0.0 and moved.criterion.center.abs().max().item() > 0
    test = {"image": load_split(DinoRecipe(), "test", 16)["image"]}
    flat = collapse_probe(test)(DinoRecipe(teacher_temp=0.1).make_model())     # teacher = student, same temperature
    sharp = collapse_probe(test)(DinoRecipe().make_model())
    assert abs(flat["kl"]) < 1e-6 and sharp["kl"] > 0.1

# ---- the probe along a run --------------------------------------------------------------------------------------------
def _tiny_trainer(callbacks, steps=5):
    torch.manual_seed(0)
    data = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    loss = lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean()
    return Trainer(nn.Linear(3, 1), loss, data, TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, device="cpu"), callbacks=callbacks)

def test_eval_callback_at_chosen_updates():
    at = EvalCallback(lambda m: {"w": m.weight.sum(), "train": float(m.training)}, prefix="p", at=(0, 2, 5))
    plain = EvalCallback(lambda m: {"w": m.weight.sum()}, prefix="e")
    hist = _tiny_trainer([at, plain]).fit()
    assert [r["step"] for r in hist if "p/w" in r] == [0, 2, 5]            # before the first update, after the 2nd and 5th
    assert all(r["p/train"] == 0.0 for r in hist if "p/w" in r)          # evaluated in eval mode
    assert [r["step"] for r in hist if "e/w" in r] == [5]                # without `at`: on_eval, once at the end

def test_run_recipe_runs_extra_callbacks_after_the_recipes():
    order = []
    class Spy(Callback):
        def on_step_end(self, trainer): order.append(trainer.model.teacher.module["projector"].net[0].weight.sum().item())
    run = run_recipe(ByolRecipe(steps=2, batch_size=16), n_train=32, evaluate_after=False, callbacks=[Spy()])
    assert len(order) == 2 and order[-1] == run.model.teacher.module["projector"].net[0].weight.sum().item()

# ---- the headline: which ingredient prevents which collapse -----------------------------------------------------------
@pytest.fixture(scope="module")
def headline():
    "The notebook's BYOL/SimSiam and DINO runs (same sizes), and DINO's head without BatchNorm; probed at start and end."
    test, bank = load_split(ByolRecipe(), "test", 300), load_split(ByolRecipe(), "train", 500)
    byol = lambda **kw: ByolRecipe(steps=100, batch_size=32, **kw)
    dino = lambda **kw: DinoRecipe(**{"local_crops": 0, "steps": 80, "batch_size": 32} | kw)
    variants = {"BYOL": byol(), "SimSiam, no stop-gradient": byol(base_momentum=0.0, final_momentum=0.0, stop_grad=False),
                "DINO": dino(), "DINO, no sharpening": dino(teacher_temp=0.1),
                "DINO, no centring, no head BN": dino(center_momentum=1.0, head_bn=False, steps=40),
                "DINO, no sharpening, no head BN": dino(teacher_temp=0.1, head_bn=False, steps=40)}
    out = {}
    for name, r in variants.items():
        probe = EvalCallback(collapse_probe(test, bank if "head BN" not in name else None, 10), prefix="c", at=(0, r.steps))
        hist = run_recipe(r, evaluate_after=False, callbacks=[probe]).history
        out[name] = [{k[2:]: v for k, v in h.items() if k.startswith("c/")} for h in hist if "c/std" in h]
    return out

def test_simsiam_without_stop_gradient_collapses(headline):
    first, last = headline["SimSiam, no stop-gradient"]
    assert last["std"] < 0.3 * last["std_uniform"]                   # near 0: under 30 % of the spread level 1/sqrt(E)
    assert last["knn"] < first["knn"] - 0.1                           # the encoder loses what the random tower knew
    assert headline["BYOL"][-1]["std"] > 2.5 * last["std"]            # BYOL keeps its outputs spread

def test_dino_without_sharpening_loses_its_target(headline):
    full, flat = headline["DINO"][-1], headline["DINO, no sharpening"][-1]
    assert full["kl"] > 3 * flat["kl"]                                # the student has (almost) nothing left to learn
    assert full["erank"] > 1.3 * flat["erank"]                        # fewer directions in the teacher's targets
    assert flat["entropy"] > 0.85 * flat["log_K"] > full["entropy"]   # near uniform, unlike the full method

def test_dino_collapse_modes_without_head_batchnorm(headline):
    one_hot, uniform = headline["DINO, no centring, no head BN"][-1], headline["DINO, no sharpening, no head BN"][-1]
    assert one_hot["entropy"] < 0.1 * one_hot["log_K"] and uniform["entropy"] > 0.95 * uniform["log_K"]
    assert one_hot["kl"] < 0.01 and uniform["kl"] < 0.01              # both: the KL of DINO's Figure 7 falls to ~0

def test_full_sweep_flag_is_not_a_setting():
    from mmlab.core import get_settings
    assert get_settings(env={"MMLAB_FULL_SWEEP": "1"}).seed == get_settings(env={}).seed   # read by the slow cell only
