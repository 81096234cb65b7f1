"""Memory queues (MoCo, ALBEF) and nearest-neighbour positives (NNCLR): the loss against float64 loops and gradcheck,
K = 0 is `clip_loss` bit for bit, FIFO order, the same queue on two gloo ranks as on one process given the whole batch,
the clip recipe's `queue_size` switch (trains, checks its fields, resumes bit for bit from a checkpoint)."""
import gc, math, os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmlab.core import ConfigError, InputError, InputTypeError, ShapeError
from mmlab.losses import MemoryQueue, clip_loss, negclip_loss, nearest_neighbours, nnclr_loss, queue_clip_loss

torch.set_num_threads(1)
DT = torch.float64

def unit(g, *shape): return F.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)

def ref_queue(a, b, qa, qb, s, ka=None, kb=None, y=None, yq=None):
    "Plain loops: rows of a over [kb; qb], rows of b over [ka; qa]; label-aware targets on the batch; same-class queued keys dropped."
    B = len(a); ka = a if ka is None else ka; kb = b if kb is None else kb
    def direction(x, keys, queue):
        tot = 0.0
        for i in range(B):
            yi = i if y is None else int(y[i])
            cols = [keys[j] for j in range(B)] + [queue[k] for k in range(len(queue)) if y is None or yq is None or int(yq[k]) != yi]
            lse = math.log(sum(math.exp(s * float(x[i] @ c)) for c in cols))
            pos = [i] if y is None else [j for j in range(B) if int(y[j]) == yi]
            tot += sum(lse - s * float(x[i] @ keys[j]) for j in pos) / len(pos)
        return tot / B
    return (direction(a, kb, qb) + direction(b, ka, qa)) / 2

@pytest.fixture
def emb():
    g = torch.Generator().manual_seed(0)
    a = unit(g, 6, 5); b = F.normalize(a + 0.5 * unit(g, 6, 5), dim=-1)
    return dict(a=a, b=b, qa=unit(g, 9, 5), qb=unit(g, 9, 5), ka=F.normalize(a + 0.1 * unit(g, 6, 5), dim=-1),
                kb=F.normalize(b + 0.1 * unit(g, 6, 5), dim=-1), y=torch.tensor([0, 1, 0, 2, 1, 3]),
                yq=torch.tensor([2, 0, 4, 4, 1, 0, 3, 3, 5]))

# ---- the loss ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_queue_loss_matches_float64_loops(emb, keys, labels):
    e = emb
    kw = dict(key_a=e["ka"], key_b=e["kb"]) if keys else {}
    lab = dict(labels=e["y"], queue_labels=e["yq"]) if labels else {}
    got = queue_clip_loss(e["a"], e["b"], 6.0, e["qa"], e["qb"], **kw, **lab)
    want = ref_queue(e["a"], e["b"], e["qa"], e["qb"], 6.0, e["ka"] if keys else None, e["kb"] if keys else None,
                     e["y"] if labels else None, e["yq"] if labels else None)
    assert abs(got.item() - want) < 1e-12

def test_labels_without_queue_labels_make_every_queued_key_a_negative(emb):
    e = emb
    got = queue_clip_loss(e["a"], e["b"], 6.0, e["qa"], e["qb"], labels=e["y"])
    never = torch.full((9,), 99)                       # a label no anchor has: nothing is left out
    assert abs(got.item() - ref_queue(e["a"], e["b"], e["qa"], e["qb"], 6.0, y=e["y"], yq=never)) < 1e-12

@pytest.mark.parametrize("labels", [False, True])
def test_empty_queue_is_clip_loss_bit_for_bit(emb, labels):
    "K = 0 (None or a (0, E) tensor) gives `clip_loss`'s value and gradients exactly, with or without labels."
    kw = dict(labels=emb["y"]) if labels else {}
    for dtype in (torch.float32, DT):
        a1, b1, s1 = (emb["a"].to(dtype).requires_grad_(), emb["b"].to(dtype).requires_grad_(),
                      torch.tensor(6.0, dtype=dtype, requires_grad=True))
        a2, b2, s2 = (t.detach().clone().requires_grad_() for t in (a1, b1, s1))
        l1 = queue_clip_loss(a1, b1, s1, a1.new_zeros(0, 5), None, **kw); l1.backward()
        l2 = clip_loss(a2, b2, s2, **kw); l2.backward()
        assert torch.equal(l1, l2)
        for x, y in ((a1, a2), (b1, b2), (s1, s2)): assert torch.equal(x.grad, y.grad)

def test_one_queue_is_negclip(emb):
    e = emb
    assert abs(queue_clip_loss(e["a"], e["b"], 6.0, None, e["qb"]) - negclip_loss(e["a"], e["b"], e["qb"], 6.0)).item() < 1e-12

def test_queue_loss_gradcheck(emb):
    e = emb
    f = lambda x, z, s: queue_clip_loss(F.normalize(x, dim=-1), F.normalize(z, dim=-1), s, e["qa"], e["qb"], key_a=e["ka"],
                                        key_b=e["kb"], labels=e["y"], queue_labels=e["yq"])
    xs = (e["a"].clone().requires_grad_(), e["b"].clone().requires_grad_(), torch.tensor(6.0, dtype=DT, requires_grad=True))
    assert torch.autograd.gradcheck(f, xs)
    g = lambda x, z: queue_clip_loss(F.normalize(x, dim=-1), F.normalize(z, dim=-1), 6.0, e["qa"], e["qb"])   # online keys
    assert torch.autograd.gradcheck(g, xs[:2])

def test_keys_and_queue_get_no_gradient(emb):
    e = emb
    kb, qb = e["kb"].clone().requires_grad_(), e["qb"].clone().requires_grad_()
    a = e["a"].clone().requires_grad_()
    queue_clip_loss(a, e["b"], 6.0, e["qa"], qb.detach(), key_b=kb).backward()
    assert kb.grad is None and a.grad is not None

def test_queued_keys_raise_the_loss_monotonically(emb):
    e = emb
    vals = [queue_clip_loss(e["a"], e["b"], 6.0, e["qa"][:k], e["qb"][:k]).item() for k in range(10)]
    assert all(x < y for x, y in zip(vals, vals[1:]))

def test_queue_loss_errors(emb):
    e = emb
    with pytest.raises(ShapeError, match=r"queue_clip_loss: queue_b must be a \(K, E\) = \(K, 5\)"):
        queue_clip_loss(e["a"], e["b"], 6.0, None, e["qb"][:, :4])
    with pytest.raises(InputError, match="queue_clip_loss: queue_a: rows must be L2-normalised"):
        queue_clip_loss(e["a"], e["b"], 6.0, 2 * e["qa"])
    with pytest.raises(ShapeError, match=r"queue_labels must be a \(K,\) = \(9,\) integer tensor"):
        queue_clip_loss(e["a"], e["b"], 6.0, e["qa"], e["qb"], labels=e["y"], queue_labels=e["yq"][:4])
    with pytest.raises(ShapeError, match="key_b"):
        queue_clip_loss(e["a"], e["b"], 6.0, key_b=e["kb"][:3])

# ---- the queue ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 5, 7, 16])
def test_fifo_holds_the_newest_keys_in_order(K):
    "Batches of varying size (K not a multiple of B, B > K): the queue is the last K keys written, oldest first."
    stream = torch.eye(40, dtype=DT)
    q = MemoryQueue(K, 40, modalities=("image", "text"), dtype=DT)
    written, g = 0, torch.Generator().manual_seed(K)
    while written < 40:
        n = min(int(torch.randint(1, 10, (1,), generator=g)), 40 - written)
        before = q.keys("image").argmax(1).tolist() if len(q.keys("image")) else []
        q.enqueue({"image": stream[written:written + n], "text": stream[written:written + n]}, labels=torch.arange(written, written + n))
        written += n
        want = list(range(max(0, written - K), written))
        assert q.keys("image").argmax(1).tolist() == want == q.keys("text").argmax(1).tolist()
        assert q.queued_labels().tolist() == want and int(q.ptr) == written % K and int(q.filled) == min(written, K)
        assert before == list(range(max(0, written - n - K), written - n))     # what the loss saw: the keys before this batch

def test_lightly_memory_bank_behaviour():
    """lightly's tests/models/modules/test_memory_bank.py::TestMemoryBank::test_forward (size (5, 2), batches of 3):
    the bank used for a batch does not hold that batch yet; after x0, slots 0..2 hold x0; after x1, slots 3..4 hold
    x1[:2]. lightly then drops x1[2] and restarts at slot 0, so x2 lands in slots 0..2. The kit writes x1[2] to slot 0
    (FIFO: no key is lost), so x2 lands in slots 1..3 and the queue is x1[1:], x2 in order."""
    torch.manual_seed(0)
    q = MemoryQueue(5, 2, modalities=("x",))
    xs = [F.normalize(torch.randn(3, 2), dim=-1) for _ in range(3)]
    q.enqueue({"x": xs[0]})
    assert q.keys_x[:3].tolist() == xs[0].tolist()
    seen = q.keys("x")
    q.enqueue({"x": xs[1]})
    assert seen.tolist() == xs[0].tolist()                                  # the queue a batch sees: before its enqueue
    assert q.keys_x[:3].tolist() == [xs[1][2].tolist()] + xs[0][1:].tolist() and q.keys_x[3:].tolist() == xs[1][:2].tolist()
    q.enqueue({"x": xs[2]})
    assert q.keys_x[1:4].tolist() == xs[2].tolist()
    assert q.keys("x").tolist() == xs[1][1:].tolist() + xs[2].tolist()

def test_queue_errors():
    with pytest.raises(InputError, match="MemoryQueue: size must be an integer >= 0, got -1"): MemoryQueue(-1, 4)
    with pytest.raises(InputError, match="size must be an integer"): MemoryQueue(True, 4)
    with pytest.raises(InputError, match="dim must be an integer >= 1"): MemoryQueue(4, 0)
    with pytest.raises(InputError, match="modalities must be distinct names"): MemoryQueue(4, 2, modalities=("image", "image"))
    with pytest.raises(InputError, match="modalities must be distinct names"): MemoryQueue(4, 2, modalities="image")
    q = MemoryQueue(4, 3)
    x = F.normalize(torch.randn(2, 3), dim=-1)
    with pytest.raises(InputError, match=r"one \(B, E\) tensor per modality \['image', 'text'\], got \['image'\]"):
        q.enqueue({"image": x})                                              # a modality the batch lacks
    with pytest.raises(ShapeError, match="keys must have width E=3"): x2 = F.normalize(x[:, :2], dim=-1); q.enqueue({"image": x2, "text": x2})
    with pytest.raises(InputError, match="rows must be L2-normalised"): q.enqueue({"image": 2 * x, "text": x})
    with pytest.raises(InputError, match="labels must be >= 0"): q.enqueue({"image": x, "text": x}, labels=torch.tensor([0, -1]))
    with pytest.raises(InputError, match=r"keys: no queue for 'audio'; this queue holds image, text"): q.keys("audio")
    with pytest.raises(InputTypeError, match="must be a floating-point tensor"): q.enqueue({"image": x.long(), "text": x.long()})
    empty = MemoryQueue(0, 3); empty.enqueue({"image": x, "text": x})
    assert empty.keys("image").shape == (0, 3) and int(empty.ptr) == 0

def test_keys_are_copies():
    "A later enqueue must not change the keys a loss already used (autograd saved them)."
    q = MemoryQueue(4, 2, modalities=("x",))
    q.enqueue({"x": F.normalize(torch.ones(2, 2), dim=-1)})
    k = q.keys("x"); before = k.clone()
    q.enqueue({"x": F.normalize(-torch.ones(2, 2), dim=-1)})
    assert torch.equal(k, before)

# ---- NNCLR -------------------------------------------------------------------------------------------------------
def ref_nnclr(z1, z2, sup, s):
    def nn(x): return sup[max(range(len(sup)), key=lambda k: float(x @ sup[k]))]
    def term(x, z):
        tot = 0.0
        for i in range(len(x)):
            q = nn(x[i]); lg = [s * float(q @ z[j]) for j in range(len(z))]
            tot += math.log(sum(math.exp(v) for v in lg)) - lg[i]
        return tot / len(x)
    return (term(z1, z2) + term(z2, z1)) / 2

def test_nnclr_matches_float64_loop_and_gradcheck(emb):
    g = torch.Generator().manual_seed(3)
    sup = unit(g, 30, 5)
    assert abs(nnclr_loss(emb["a"], emb["b"], sup, 5.0).item() - ref_nnclr(emb["a"], emb["b"], sup, 5.0)) < 1e-12
    # the lookup is constant under small perturbations: gradcheck sees the gradient through the columns only
    f = lambda x, z: nnclr_loss(F.normalize(x, dim=-1), F.normalize(z, dim=-1), sup, 5.0)
    assert torch.autograd.gradcheck(f, (emb["a"].clone().requires_grad_(), emb["b"].clone().requires_grad_()))

def test_nnclr_with_own_embeddings_is_clip(emb):
    "Support = the batch's own embeddings: NN(u_i) = u_i and NN(v_i) = v_i, so the loss is CLIP's."
    a, b = emb["a"], emb["b"]
    assert torch.equal(nearest_neighbours(a, a), a)
    assert abs(nnclr_loss(a, b, torch.cat([a, b]), 5.0) - clip_loss(a, b, 5.0)).item() < 1e-12

def test_nearest_neighbours_from_a_queue_and_errors(emb):
    q = MemoryQueue(8, 5, modalities=("image",), dtype=DT)
    q.enqueue({"image": emb["qa"]}, labels=emb["yq"])
    nb = nearest_neighbours(emb["a"], q.keys("image"))
    idx = (emb["a"] @ q.keys("image").T).argmax(1)
    assert torch.equal(nb, q.keys("image")[idx]) and not nb.requires_grad
    with pytest.raises(ShapeError, match=r"support must be a non-empty \(K, E\) = \(K, 5\)"): nearest_neighbours(emb["a"], MemoryQueue(4, 5).keys("image"))
    with pytest.raises(ShapeError, match="support must be"): nnclr_loss(emb["a"], emb["b"], emb["qa"][:, :3], 5.0)

# ---- distributed: two gloo ranks enqueue what one process enqueues -------------------------------------------------
WORLD, B_LOCAL, K, E = 2, 3, 10, 4

def _batches():
    g = torch.Generator().manual_seed(5)
    return [(unit(g, WORLD * B_LOCAL, E), unit(g, WORLD * B_LOCAL, E), torch.randint(0, 4, (WORLD * B_LOCAL,), generator=g))
            for _ in range(4)]

def _queue_worker(rank, store, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        q = MemoryQueue(K, E, dtype=DT)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for xi, xt, y in _batches(): q.enqueue({"image": xi[sl], "text": xt[sl]}, labels=y[sl], distributed=True)
        res = {"state": {k: v.clone() for k, v in q.state_dict().items()}}
        try: q.enqueue({"image": xi[:rank + 1], "text": xt[:rank + 1]}, distributed=True); res["unequal"] = None
        except ShapeError as e: res["unequal"] = str(e)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

def test_gloo_enqueue_equals_one_process_on_the_whole_batch(tmp_path):
    "Every rank enqueues the gathered global batch in rank order: both ranks hold the single-process queue (K = 10, 6 keys a step)."
    import torch.multiprocessing as mp
    mp.spawn(_queue_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ref = MemoryQueue(K, E, dtype=DT)
    for xi, xt, y in _batches(): ref.enqueue({"image": xi, "text": xt}, labels=y)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert res["state"].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items(): assert torch.equal(res["state"][k], v), (r, k)
        assert res["unequal"] is not None and "every rank must pass the same shape" in res["unequal"]

# ---- the clip recipe's queue switch --------------------------------------------------------------------------------
def test_recipe_switch_checks():
    from mmlab.recipes import ClipRecipe, build_model
    from mmlab.models import MomentumQueueModel, MultiModalModel
    with pytest.raises(ConfigError, match="clip.queue_size=-2: expected an integer >= 0"): ClipRecipe(queue_size=-2)
    with pytest.raises(ConfigError, match="queue_momentum=2: expected a momentum in"): ClipRecipe(queue_size=8, queue_momentum=2)
    for bad in (dict(loss="siglip"), dict(grad_cache=4), dict(label_smoothing=0.1), dict(hard_negatives="swap-colours")):
        with pytest.raises(ConfigError, match="adds queued keys to the plain clip loss"): ClipRecipe(queue_size=8, **bad)
    r = ClipRecipe(modalities=("image", "text"), queue_size=8)
    m = build_model(r)
    assert isinstance(m, MomentumQueueModel) and m.queue.modalities == ("image", "text") and m.queue.size == 8
    assert type(build_model(replace(r, queue_size=0))) is MultiModalModel
    with pytest.raises(InputError, match="no queue for 'audio'"): m.queue.keys("audio")   # a modality the model lacks

def test_recipe_with_queue_trains_and_the_loss_falls():
    from mmlab.recipes import ClipRecipe, run_recipe
    r = ClipRecipe(modalities=("image", "text"), batch_size=16, steps=30, warmup_steps=3, queue_size=32, device="cpu",
                   precision="fp32")
    res = run_recipe(r, n_train=64, evaluate_after=False)
    loss = [h["loss"] for h in res.history]
    assert sum(loss[-5:]) / 5 < sum(loss[2:7]) / 5, loss      # from step 3 on, the queue is full (32 = 2 batches)
    q = res.model.queue
    assert len(q.keys("image")) == 32 and int(q.ptr) == (30 * 16) % 32
    s, t = res.model.towers["image"], res.model.teacher.module["towers"]["image"]
    assert any(not torch.equal(p, pt) for p, pt in zip(s.parameters(), t.parameters()))   # the key encoder lags

def test_kill_and_resume_with_a_queue_is_bit_identical(tmp_path):
    "A run killed after its step-3 checkpoint and resumed ends with the same parameters, teacher and queue, bit for bit."
    from mmlab.recipes import ClipRecipe
    from resume_check import assert_resume_bit_identical
    r = ClipRecipe(modalities=("image", "text"), batch_size=16, steps=6, ckpt_every=3, queue_size=24, device="cpu",
                   precision="fp32")                          # 24 slots, 16 keys a step: the pointer wraps mid-batch
    def holds_the_queue(final):
        held = {f"/model/queue.{n}" for n in ("keys_image", "keys_text", "labels", "ptr", "filled")}
        assert held <= set(final), sorted(k for k in final if "queue" in k)   # the checkpoint holds the queue
        assert int(final["/model/queue.ptr"]) == (6 * 16) % 24 and int(final["/model/queue.filled"]) == 24
    full, resumed = assert_resume_bit_identical(r, tmp_path, 64, holds_the_queue)   # killed after the step-3 checkpoint
    for k, v in full.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k

def test_lit_with_a_queue_starts_its_key_encoder_from_the_pretrained_tower(tmp_path):
    from mmlab.recipes import ClipRecipe, LitRecipe, run_recipe
    tiny = dict(modalities=("image", "text"), batch_size=16, steps=2, device="cpu", precision="fp32")
    run_recipe(ClipRecipe(**tiny), tmp_path / "pre", n_train=32, evaluate_after=False)
    m = LitRecipe(**tiny, init_from=str(tmp_path / "pre"), queue_size=8).make_model()
    for p, pt in zip(m.towers["image"].parameters(), m.teacher.module["towers"]["image"].parameters()): assert torch.equal(p, pt)
