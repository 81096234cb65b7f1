"""DINO's teacher-temperature warm-up, Sinkhorn-Knopp centering (DINOv2) and SwAV, against independent references.

The references transcribe the papers' code with plain Python loops in float64 (DINO's main_dino.py schedule,
SwAV's main_swav.py `distributed_sinkhorn` and swapped-prediction loop); they share no code with the kit.
"""
import json, math, os
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlab.core import ConfigError, InputError, ShapeError
from mmlab.losses.distill import (CENTERINGS, DINOLoss, dino_loss, sinkhorn_knopp, swav_loss, teacher_temp_schedule)

DT = torch.float64
def _g(seed): return torch.Generator().manual_seed(seed)

# ---------------------------------------------------------------- references (plain loops, float64)
def ref_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    "DINO's main_dino.py DINOLoss.teacher_temp_schedule (also lightly's tests/loss/test_dino_loss.py OriginalDINOLoss)."
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))

def ref_sinkhorn(S, n_iters, eps):
    "SwAV's distributed_sinkhorn on one process, as loops: Q = exp(S/eps)^T, Q /= sum; rows (prototypes) 1/K, columns 1/B."
    B, K = len(S), len(S[0])
    Q = [[math.exp(S[b][k] / eps) for b in range(B)] for k in range(K)]            # (K, B)
    tot = sum(map(sum, Q)); Q = [[x / tot for x in row] for row in Q]
    for _ in range(n_iters):
        for k in range(K):
            r = sum(Q[k]); Q[k] = [x / r / K for x in Q[k]]
        for b in range(B):
            c = sum(Q[k][b] for k in range(K))
            for k in range(K): Q[k][b] = Q[k][b] / c / B
    return [[Q[k][b] * B for k in range(K)] for b in range(B)]                   # (B, K)

def ref_swav(scores, n_global, temp, eps, n_iters):
    "SwAV's main_swav.py training loss (no queue), as loops: codes of each assigned crop, predicted by every other crop."
    V, B, K = len(scores), len(scores[0]), len(scores[0][0])
    loss = 0.0
    for w in range(n_global):
        q = ref_sinkhorn(scores[w], n_iters, eps)
        sub = 0.0
        for v in range(V):
            if v == w: continue
            tot = 0.0
            for b in range(B):
                x = [scores[v][b][k] / temp for k in range(K)]
                m = max(x); lse = m + math.log(sum(math.exp(z - m) for z in x))
                tot += sum(q[b][k] * (x[k] - lse) for k in range(K))
            sub -= tot / B
        loss += sub / (V - 1)
    return loss / n_global

# ---------------------------------------------------------------- teacher temperature warm-up
@pytest.mark.parametrize("start", [0.01, 0.04, 0.07])
@pytest.mark.parametrize("final", [0.01, 0.04, 0.07])
@pytest.mark.parametrize("W", [0, 1, 10, 30])
def test_teacher_temp_schedule_is_dinos(start, final, W):
    "The grid of lightly's test_teacher_temperature_warmup (warm-up 0/1/10 epochs, epochs 0/1/10/20, temperatures 0.01-0.07)."
    ref = ref_temp_schedule(start, final, W, 100)
    for n in range(100): assert abs(teacher_temp_schedule(n, W, start, final) - ref[n]) < 1e-15, (n, W)

def test_teacher_temp_schedule_closed_form_and_errors():
    # DINO's paper schedule: 0.04 -> 0.07 linearly over W updates, both ends exact, constant after
    assert teacher_temp_schedule(0, 30) == 0.04 and teacher_temp_schedule(29, 30) == 0.07 and teacher_temp_schedule(500, 30) == 0.07
    assert abs(teacher_temp_schedule(10, 21) - 0.055) < 1e-15
    with pytest.raises(InputError, match="teacher_temp_schedule: step and warmup_steps must be >= 0"): teacher_temp_schedule(-1, 3)
    with pytest.raises(InputError, match="temperatures must be > 0"): teacher_temp_schedule(0, 3, 0.0, 0.07)

def test_dino_loss_module_follows_the_schedule():
    g = _g(0); s, t = torch.randn(4, 3, 8, generator=g, dtype=DT), torch.randn(2, 3, 8, generator=g, dtype=DT)
    crit = DINOLoss(8, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=11)
    for n in (0, 5, 10, 11, 40):
        crit.set_step(n); crit.center.zero_()
        want = dino_loss(s, t, torch.zeros(8, dtype=DT), 0.1, teacher_temp_schedule(n, 11, 0.04, 0.07))
        assert torch.allclose(crit(s, t), want, atol=1e-12, rtol=0), n
    plain = DINOLoss(8, teacher_temp=0.05); plain.set_step(3)
    assert plain.current_teacher_temp() == 0.05                               # no warm-up: the constant, whatever the step

# ---------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("B,K", [(1, 3), (5, 1), (6, 4), (9, 13)])
@pytest.mark.parametrize("n_iters", [0, 1, 3, 7])
def test_sinkhorn_equals_float64_loops(B, K, n_iters):
    S = torch.randn(B, K, generator=_g(B * K + n_iters), dtype=DT)
    ours = sinkhorn_knopp(S, n_iters, 0.3)
    ref = torch.tensor(ref_sinkhorn(S.tolist(), n_iters, 0.3), dtype=DT)
    assert ours.dtype == DT and (ours - ref).abs().max() < 1e-12

def test_sinkhorn_marginals_closed_form_and_invariances():
    g = _g(1); B, K = 16, 6
    S = torch.randn(B, K, generator=g, dtype=DT)
    q = sinkhorn_knopp(S, 200, 0.5)                                           # converged: both marginals uniform
    assert (q.sum(1) - 1).abs().max() < 1e-12 and (q.sum(0) - B / K).abs().max() < 1e-10
    err = [(sinkhorn_knopp(S, it, 0.5).sum(0) - B / K).abs().max().item() for it in (1, 3, 10, 30)]
    assert all(a > b for a, b in zip(err, err[1:]))                          # the column error shrinks with iterations
    f, c = torch.randn(B, 1, generator=g, dtype=DT), torch.randn(1, K, generator=g, dtype=DT)
    assert (sinkhorn_knopp(f + c, 1, 0.5) - 1 / K).abs().max() < 1e-12       # rank-one plan: uniform after one iteration
    # a constant added to a prototype's scores is removed by the first rescaling; one added to a sample's scores
    # changes only the diagonal scalings, so the converged plan is the same
    assert torch.allclose(sinkhorn_knopp(S + c, 3, 0.5), sinkhorn_knopp(S, 3, 0.5), atol=1e-12)
    assert torch.allclose(sinkhorn_knopp(S + f, 300, 0.5), sinkhorn_knopp(S, 300, 0.5), atol=1e-10)
    big = sinkhorn_knopp(500 * S, 3, 0.05)                                    # logits far beyond exp's range: still finite
    assert torch.isfinite(big).all() and (big.sum(1) - 1).abs().max() < 1e-9
    half = sinkhorn_knopp(S.half(), 3, 0.5); assert half.dtype == torch.float32   # low precision is computed in float32
    x = S.clone().requires_grad_(); assert not sinkhorn_knopp(x, 3, 0.5).requires_grad   # targets carry no gradient

def test_sinkhorn_errors():
    S = torch.randn(4, 3)
    with pytest.raises(ShapeError, match="sinkhorn_knopp: scores"): sinkhorn_knopp(S[0])
    with pytest.raises(InputError, match="temperature must be > 0"): sinkhorn_knopp(S, 3, -0.1)
    with pytest.raises(InputError, match="n_iters must be an integer >= 0"): sinkhorn_knopp(S, -1)
    with pytest.raises(InputError, match="n_iters must be an integer >= 0"): sinkhorn_knopp(S, 2.5)

def test_dino_loss_with_sinkhorn_centering():
    "DINOv2: the targets of all global crops together are the Sinkhorn codes at the teacher temperature; the centre is unused."
    g = _g(2); s, t = torch.randn(5, 4, 7, generator=g, dtype=DT), torch.randn(2, 4, 7, generator=g, dtype=DT)
    q = torch.tensor(ref_sinkhorn(t.reshape(8, 7).tolist(), 3, 0.04), dtype=DT).view(2, 4, 7)
    lp = F.log_softmax(s / 0.1, -1)
    want = np.mean([-(q[w] * lp[v]).sum(-1).mean().item() for w in range(2) for v in range(5) if v != w])
    for center in (torch.zeros(7, dtype=DT), torch.randn(7, generator=g, dtype=DT)):
        assert abs(dino_loss(s, t, center, 0.1, 0.04, centering="sinkhorn").item() - want) < 1e-12
    assert CENTERINGS == ("center", "sinkhorn")
    with pytest.raises(InputError, match="dino_loss: centering='mean'"): dino_loss(s, t, torch.zeros(7), centering="mean")
    with pytest.raises(InputError, match="DINOLoss: centering='mean'; expected one of center, sinkhorn"): DINOLoss(7, centering="mean")

# ---------------------------------------------------------------- SwAV loss
@pytest.mark.parametrize("V,n_global", [(2, 2), (2, 1), (4, 2), (6, 2), (3, 3)])
def test_swav_loss_equals_main_swav_loops(V, n_global):
    scores = F.normalize(torch.randn(V, 5, 8, generator=_g(V * 10 + n_global), dtype=DT), dim=-1)
    ref = ref_swav(scores.tolist(), n_global, 0.1, 0.05, 3)
    assert abs(swav_loss(scores, n_global, 0.1, 0.05, 3).item() - ref) < 1e-12
    assert abs(swav_loss(list(scores), n_global, 0.1, 0.05, 3).item() - ref) < 1e-12   # a list of views works too

def test_swav_loss_gradients():
    "The gradient is that of the cross-entropy with the codes held constant (no gradient through Sinkhorn)."
    g = _g(3); V, B, K = 4, 5, 6
    x = torch.randn(V, B, K, generator=g, dtype=DT, requires_grad=True)
    swav_loss(x).backward()
    codes = [sinkhorn_knopp(x.detach()[w], 3, 0.05) for w in range(2)]       # constants
    y = x.detach().clone().requires_grad_()
    ref = sum(-(codes[w] * F.log_softmax(y[v] / 0.1, -1)).sum(-1).mean() / (V - 1) for w in range(2) for v in range(V) if v != w) / 2
    ref.backward()
    assert (x.grad - y.grad).abs().max() < 1e-12
    glob = torch.randn(2, 3, 4, generator=g, dtype=DT)
    loc = torch.randn(1, 3, 4, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: swav_loss(torch.cat([glob, l])), (loc,))

@pytest.mark.parametrize("n_low_res", range(6))
@pytest.mark.parametrize("iters", range(3))
def test_swav_loss_identity_scores_like_lightly(n_low_res, iters):
    "lightly's tests/loss/test_swav_loss.py test_forward_pass: identity scores (32 x 32), 2 high-res crops, loss < 0.5."
    eye = torch.eye(32).expand(2 + n_low_res, 32, 32)
    assert swav_loss(eye, sinkhorn_iters=iters) < 0.5

def test_swav_loss_errors_and_ablation():
    s = torch.randn(3, 4, 5)
    with pytest.raises(ShapeError, match="1 <= n_global <= V"): swav_loss(s, n_global=4)
    with pytest.raises(ShapeError, match="1 <= n_global <= V"): swav_loss(s, n_global=0)
    with pytest.raises(ShapeError, match="scores"): swav_loss(s[0])
    with pytest.raises(ShapeError): swav_loss(s[:1], n_global=1)                 # one crop: nothing to predict from
    # the ablation: plain softmax codes = DINO's loss with a zero centre and the student as its own teacher
    want = np.mean([dino_loss(s[[w] + [v for v in range(3) if v != w]], s[w:w + 1], torch.zeros(5), 0.1, 0.05).item() for w in range(2)])
    assert abs(swav_loss(s, centering="center").item() - want) < 1e-6

# ---------------------------------------------------------------- distributed: 2 gloo processes = one process on the whole batch
WORLD, B_LOCAL, K_PROTO = 2, 3, 5

def _sinkhorn_worker(rank, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        S = torch.randn(WORLD * B_LOCAL, K_PROTO, generator=_g(7), dtype=DT)
        mine = S[rank * B_LOCAL:(rank + 1) * B_LOCAL]
        res = {"q": sinkhorn_knopp(mine, 3, 0.3), "q50": sinkhorn_knopp(mine, 50, 0.3)}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

def test_sinkhorn_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_sinkhorn_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    S = torch.randn(WORLD * B_LOCAL, K_PROTO, generator=_g(7), dtype=DT)
    for key, it in (("q", 3), ("q50", 50)):
        whole = sinkhorn_knopp(S, it, 0.3)
        assert (torch.cat([r[key] for r in res]) - whole).abs().max() < 1e-12, key
    local_only = torch.cat([sinkhorn_knopp(S[r * B_LOCAL:(r + 1) * B_LOCAL], 50, 0.3) for r in range(WORLD)])
    assert (local_only - sinkhorn_knopp(S, 50, 0.3)).abs().max() > 1e-3      # the gather matters on this batch
    q50 = torch.cat([r["q50"] for r in res])
    assert (q50.sum(0) - WORLD * B_LOCAL / K_PROTO).abs().max() < 1e-6       # equipartition over the global batch

# ---------------------------------------------------------------- SwavModel and the swav recipe
def test_swav_model_contract_save_load_and_unit_prototypes(tmp_path):
    from mmlab.models import SwavModel, check_model_contract, create_model, load_model, model_config, save_model
    torch.manual_seed(0); m = create_model("swav_tiny")
    assert isinstance(m, SwavModel) and check_model_contract(m) == {"out": ()}
    proto = m.online["head"].prototypes
    assert torch.allclose(proto.norm(dim=-1), torch.ones(len(proto)), atol=1e-6)
    with torch.no_grad(): proto.mul_(2.5)
    m.clamp_parameters_(); assert torch.allclose(proto.norm(dim=-1), torch.ones(len(proto)), atol=1e-6)
    back = load_model(save_model(m, tmp_path / "swav"))
    assert model_config(back) == model_config(m)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    assert m.encoder("image") is m.online["encoder"]
    with pytest.raises(InputError, match="no 'audio' tower"): m.encoder("audio")

def test_swav_recipe_is_its_preset_and_checks_its_fields():
    from mmlab.models import create_model, model_config
    from mmlab.recipes import RECIPES, get_recipe
    assert RECIPES["swav"] is type(get_recipe("swav"))
    torch.manual_seed(0)
    assert model_config(get_recipe("swav").make_model()) == model_config(create_model("swav_tiny"))
    for key, value, msg in [("epsilon", "0", "swav.epsilon=0.0: expected a temperature > 0"),
                            ("temperature", "-1", "swav.temperature=-1.0"), ("prototypes", "0", "swav.prototypes=0"),
                            ("sinkhorn_iters", "-1", "swav.sinkhorn_iters=-1"), ("local_scale", "0.6", "local_scale < global_scale")]:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.").replace("(", r"\(")): get_recipe("swav", **{key: value})

def test_swav_recipe_learns_freezes_prototypes_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file
    from mmlab.recipes import get_recipe, run_recipe
    torch.set_num_threads(1)
    r = get_recipe("swav", steps="24", batch_size="32", warmup_steps="3", lr="3e-3", freeze_prototypes_steps="4", ckpt_every="12")
    res = run_recipe(r, tmp_path / "swav", n_train=64, n_eval=40)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert res.metrics["knn/image/accuracy"] > res.metrics["knn/image/chance"]
    proto = res.model.online["head"].prototypes
    assert torch.allclose(proto.norm(dim=-1), torch.ones(len(proto)), atol=1e-5)  # renormalised after every update
    # frozen start: after 4 updates the prototypes are the initial ones (up to the renormalisation's rounding); unfrozen, they move
    init = get_recipe("swav").make_model().online["head"].prototypes.detach()
    moved = {}
    for freeze in ("4", "0"):
        short = run_recipe(get_recipe("swav", steps="4", batch_size="32", warmup_steps="3", lr="3e-3", freeze_prototypes_steps=freeze),
                           None, n_train=64, evaluate_after=False)
        moved[freeze] = (short.model.online["head"].prototypes.detach() - init).abs().max().item()
    assert moved["4"] < 1e-6 and moved["0"] > 1e-3, moved
    # kill after update 12 and resume: the final checkpoint is bit-identical
    final = load_file(str(tmp_path / "swav" / "checkpoints" / "step-00000024" / "tensors.safetensors"))
    import shutil; shutil.rmtree(tmp_path / "swav" / "checkpoints" / "step-00000024")
    run_recipe(r, tmp_path / "swav", n_train=64, evaluate_after=False, resume=True)
    again = load_file(str(tmp_path / "swav" / "checkpoints" / "step-00000024" / "tensors.safetensors"))
    assert sorted(again) == sorted(final) and all(torch.equal(final[k], again[k]) for k in final)

# ---------------------------------------------------------------- DINO recipe switches
def test_dino_recipe_warmup_and_sinkhorn_switches(tmp_path):
    "Each update uses the warm-up's temperature (set before it), also after a resume, which stays bit-identical."
    from safetensors.torch import load_file
    from mmlab.recipes import get_recipe, run_recipe
    from mmlab.train import Callback
    torch.set_num_threads(1)
    class Record(Callback):
        def __init__(self): self.seen = {}
        def on_step_end(self, trainer): self.seen[trainer.step - 1] = trainer.model.criterion.current_teacher_temp()
    r = get_recipe("dino", steps="6", batch_size="16", warmup_steps="2", warmup_teacher_temp_steps="4", teacher_temp="0.07",
                   centering="sinkhorn", ckpt_every="3")
    first, again = Record(), Record()
    res = run_recipe(r, tmp_path / "dino", n_train=32, evaluate_after=False, callbacks=[first])
    want = {n: teacher_temp_schedule(n, 4, 0.04, 0.07) for n in range(6)}   # 0.04 -> 0.07 over 4 updates, then 0.07
    assert first.seen == want
    assert res.model.criterion.centering == "sinkhorn" and all(math.isfinite(h["loss"]) for h in res.history if "loss" in h)
    last = tmp_path / "dino" / "checkpoints" / "step-00000006"
    final = load_file(str(last / "tensors.safetensors"))
    import shutil; shutil.rmtree(last)                                        # as if killed after update 3
    run_recipe(r, tmp_path / "dino", n_train=32, evaluate_after=False, resume=True, callbacks=[again])
    assert again.seen == {n: want[n] for n in (3, 4, 5)}                      # the schedule continues where it stopped
    resumed = load_file(str(last / "tensors.safetensors"))
    assert sorted(resumed) == sorted(final) and all(torch.equal(final[k], resumed[k]) for k in final)
    with pytest.raises(ConfigError, match=r"dino\.centering='mean': expected one of center, sinkhorn"): get_recipe("dino", centering="mean")
    with pytest.raises(ConfigError, match=r"dino\.warmup_teacher_temp_steps=-1"): get_recipe("dino", warmup_teacher_temp_steps="-1")
    with pytest.raises(ConfigError, match=r"dino\.warmup_teacher_temp=0\.0"): get_recipe("dino", warmup_teacher_temp="0")
