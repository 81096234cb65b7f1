"""mmlab.train: bit-identical resume across a SIGKILL, atomic checkpoints under kills, no unpickling, loop semantics,
metric files (JSONL, CSV, TensorBoard), the live plot, and torch.compile."""
import hashlib, inspect, json, math, os, pickle, random, signal, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import mmlab.train as train_mod
from mmlab.core import CheckpointError, ConfigError, DeviceError, InputTypeError, NonFiniteError
from mmlab.train import (Callback, CSVLogger, ProgressBar, EvalCallback, JSONLLogger, LivePlot, TensorBoardLogger, Trainer, TrainConfig,
                         history_figure, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, warmup_cosine)

# ---------------------------------------------------------------------------------------------
# A training job run in subprocesses: MLP with dropout, shuffled DataLoader, numpy and python
# randomness inside the loss, gradient accumulation, 5 batches per epoch (resume lands mid-epoch).
JOB = r'''
import json, random, sys, time
import numpy as np, torch, torch.nn as nn
from safetensors.torch import save_file
from mmlab.core import set_seed
from mmlab.train import EMA, Callback, Trainer, TrainConfig
torch.set_num_threads(1)
out, mode, total, pause_event, pause_step = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

def recipe():
    g = set_seed(0)
    x = torch.randn(40, 6, generator=g); y = (x[:, :3] * x[:, 3:]).sum(1, keepdim=True)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 1))
    def loss_fn(model, batch):
        x, y = batch
        x = x + 0.01 * torch.from_numpy(np.random.randn(*x.shape)).float()     # numpy's global RNG
        w = 1.0 + 0.1 * random.random()                                          # python's RNG
        return {"mse": w * ((model(x) - y) ** 2).mean(), "l1": 1e-3 * model[0].weight.abs().mean()}
    return model, loss_fn, data

class Pause(Callback):
    "Announce checkpoints; sleep at the chosen event so the parent can SIGKILL us there."
    def on_checkpoint(self, trainer, path):
        print("CKPT", trainer.step, flush=True)
        if pause_event == "checkpoint" and trainer.step == pause_step: print("PAUSED", flush=True); time.sleep(600)
    def on_log(self, trainer, record):
        if pause_event == "log" and record["step"] == pause_step: print("PAUSED", flush=True); time.sleep(600)

model, loss_fn, data = recipe()
cfg = TrainConfig(steps=total, lr=3e-3, warmup_steps=3, grad_accum=2, device="cpu", out_dir=out,
                  ckpt_every=3, keep_last=2)
ema = EMA(0.9)
tr = Trainer(model, loss_fn, data, cfg, callbacks=[Pause(), ema])
if mode == "resume":
    torch.manual_seed(999); np.random.seed(999); random.seed(999)   # resume must restore every generator
    tr.resume(out)
tr.fit()
opt = {f"opt/{i}/{k}": v for i, s in tr.opt.state_dict()["state"].items() for k, v in s.items()}
ema_t = {f"ema/{k}": v for k, v in ema.shadow.items()}
save_file({f"model/{k}": v.contiguous() for k, v in model.state_dict().items()} | opt | ema_t, f"{out}/final.safetensors")
print("DONE", flush=True)
'''

N = 12


def _start(tmp, out, mode, pause_event="none", pause_step=-1):
    job = tmp / "job.py"
    job.write_text(JOB)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(job), str(out), mode, str(N), pause_event, str(pause_step)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out


def _kill_when_paused(p):
    for line in p.stdout:
        if line.strip() == "PAUSED":
            os.kill(p.pid, signal.SIGKILL); p.wait(timeout=60)
            assert p.returncode == -signal.SIGKILL
            return
    raise AssertionError(f"job ended without pausing: {p.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    _finish(_start(tmp, tmp / "run", "straight"))
    return tmp / "run"


@pytest.mark.parametrize("pause_event,pause_step,latest", [("checkpoint", N // 2, N // 2),   # killed right after a checkpoint
                                                            ("log", N // 2 + 2, N // 2)])    # killed 2 steps past it
def test_resume_after_sigkill_is_bit_identical(tmp_path, straight, pause_event, pause_step, latest):
    run = tmp_path / "run"
    _kill_when_paused(_start(tmp_path, run, "first", pause_event, pause_step))
    assert not (run / "final.safetensors").exists()
    assert latest_checkpoint(run / "checkpoints").name == f"step-{latest:08d}"
    _finish(_start(tmp_path, run, "resume"))
    a, b = load_file(str(straight / "final.safetensors")), load_file(str(run / "final.safetensors"))
    assert sorted(a) == sorted(b) and any(k.startswith("opt/") for k in a) and any(k.startswith("ema/") for k in a)
    for k in a: assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the metrics log has every step once, with the straight run's values (stale lines were dropped)
    la = [json.loads(l) for l in open(straight / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in lb] == list(range(1, N + 1))
    assert [(r["loss"], r["mse"], r["l1"], r["lr"], r["grad_norm"]) for r in lb] == \
           [(r["loss"], r["mse"], r["l1"], r["lr"], r["grad_norm"]) for r in la]


# ---------------------------------------------------------------------------------------------
SAVER = r'''
import sys, torch
from mmlab.train import save_checkpoint, latest_checkpoint, load_checkpoint
d = sys.argv[1]
last = latest_checkpoint(d)
step = load_checkpoint(last)[1]["step"] if last else 0
while True:
    step += 1
    save_checkpoint(d, step, {"w": torch.full((1_000_000,), float(step)), "v": torch.arange(step)}, {"step": step}, keep_last=2)
    print("SAVED", step, flush=True)
'''


@pytest.mark.mutation_heavy
def test_kill_during_save_never_corrupts_latest(tmp_path):
    (tmp_path / "saver.py").write_text(SAVER)
    d = tmp_path / "ckpts"; rng = random.Random(0); interrupted = 0; steps = []
    for round in range(8):
        p = subprocess.Popen([sys.executable, str(tmp_path / "saver.py"), str(d)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().startswith("SAVED")                 # at least one save completed this round
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(p.pid, signal.SIGKILL); p.wait(timeout=60)
        interrupted += any(x.name.startswith((".tmp-", ".trash-")) for x in d.iterdir())
        ck = list_checkpoints(d)
        assert 1 <= len(ck) <= 3                                       # keep_last=2 (+1 if killed before pruning)
        tensors, state = load_checkpoint(ck[-1])                       # checksum verified inside
        s = state["step"]
        assert ck[-1].name == f"step-{s:08d}" and torch.equal(tensors["w"], torch.full((1_000_000,), float(s)))
        assert torch.equal(tensors["v"], torch.arange(s))
        steps.append(s)
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert interrupted >= 1, "no kill landed during a save; the test did not exercise the case"


def test_failure_inside_save_keeps_previous_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1})
    def boom(*a, **k): raise OSError("disk full (simulated)")
    monkeypatch.setattr(train_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"): save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"step": 1}
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"step": 2})      # the next save cleans the leftovers
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


class _Evil:
    def __reduce__(self): return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/mmlab_unpickled_marker"


def test_loading_never_unpickles(tmp_path):
    if os.path.exists(MARKER): os.remove(MARKER)
    ck = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1})
    evil = ck / "tensors.safetensors"
    evil.write_bytes(pickle.dumps({"w": _Evil()}))
    meta = json.loads((ck / "state.json").read_text())
    meta["tensors_sha256"] = train_mod._sha256(evil)                    # a consistent, malicious checkpoint
    del meta["state_sha256"]; meta["state_sha256"] = hashlib.sha256(json.dumps(meta).encode()).hexdigest()
    (ck / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"): load_checkpoint(ck)
    assert not os.path.exists(MARKER)
    src = inspect.getsource(train_mod)
    assert "torch.load(" not in src and "import pickle" not in src and "pickle.load" not in src


# ---------------------------------------------------------------------------------------------
def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _mse(m, b): return ((m(b[0]) - b[1]) ** 2).mean()


def test_nan_stops_naming_step_and_term():
    calls = []
    def loss(m, b):
        calls.append(1)
        bad = torch.tensor(float("nan")) if len(calls) == 6 else torch.tensor(0.0)
        return {"mse": _mse(m, b), "reg": bad}
    torch.manual_seed(0); m = nn.Linear(3, 1)
    tr = Trainer(m, loss, _data(), TrainConfig(steps=10, grad_accum=2, device="cpu"))
    before = None
    class Snap(Callback):
        def on_step_end(self, t): nonlocal before; before = [p.detach().clone() for p in t.model.parameters()]
    tr.callbacks.append(Snap())
    with pytest.raises(NonFiniteError, match=r"step 3 \(micro-batch 2/2, epoch 1, batch 2\): term 'reg' is nan"):
        tr.fit()
    assert tr.step == 2 and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_nonfinite_gradient_names_parameter():
    m = nn.Linear(3, 1)
    loss = lambda m, b: torch.sqrt(m.weight * 0).sum() + _mse(m, b)   # finite value, NaN gradient
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 1 .first bad parameter 'weight'"):
        Trainer(m, loss, _data(), TrainConfig(steps=2, device="cpu")).fit()


def test_schedule_clipping_events_and_decay_groups():
    events = []
    class Rec(Callback):
        def __getattribute__(self, name):
            if name.startswith("on_"): events.append(name)
            return object.__getattribute__(self, name)
        def on_step_end(self, t):
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in t.model.parameters()))
            assert norm <= 0.01 * (1 + 1e-5)                            # clipped in place before the step
    torch.manual_seed(0); m = nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    cfg = TrainConfig(steps=6, lr=0.1, warmup_steps=2, min_lr_ratio=0.1, clip_grad_norm=0.01, eval_every=3,
                      device="cpu")
    tr = Trainer(m, _mse, _data(), cfg, callbacks=[Rec(), EvalCallback(lambda model: {"w0": model[0].weight[0, 0]})])
    hist = tr.fit()
    steps = [r for r in hist if "loss" in r]
    for r in steps: assert r["lr"] == pytest.approx(0.1 * warmup_cosine(r["step"] - 1, 2, 6, 0.1), rel=1e-12)
    assert all(r["grad_norm"] > 0.01 for r in steps)                   # logged norm is the one before clipping
    assert [r["step"] for r in hist if "eval/w0" in r] == [3, 6]
    assert events[:6] == ["on_fit_start", "on_step_start", "on_after_backward", "on_log", "on_step_end", "on_step_start"]
    assert events[-1] == "on_fit_end" and events.count("on_eval") == 2
    decay = {id(p) for g in tr.opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(m[0].weight), id(m[2].weight)}                 # no decay on biases or LayerNorm


def test_bf16_autocast_and_frozen_parameters():
    dtypes = []
    def loss(m, b):
        out = m(b[0]); dtypes.append(out.dtype); return ((out.float() - b[1]) ** 2).mean()
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)); m[0].requires_grad_(False)
    frozen = m[0].weight.detach().clone()
    tr = Trainer(m, loss, _data(), TrainConfig(steps=2, precision="bf16", device="cpu"))
    tr.fit()
    assert dtypes == [torch.bfloat16] * 2 and torch.equal(m[0].weight, frozen)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert sum(len(g["params"]) for g in tr.opt.param_groups) == 2    # frozen tower left out of the optimiser


def test_resume_refuses_mismatched_model(tmp_path):
    Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=2, device="cpu", out_dir=str(tmp_path))).fit()
    other = Trainer(nn.Linear(3, 2), _mse, _data(), TrainConfig(steps=2, device="cpu"))
    with pytest.raises(CheckpointError, match="model does not match"): other.resume(tmp_path)
    frozen = nn.Linear(3, 1); frozen.bias.requires_grad_(False)          # same weights, one parameter fewer to optimise
    with pytest.raises(CheckpointError, match=r"step-00000002: optimiser state does not match: .*parameter group"):
        Trainer(frozen, _mse, _data(), TrainConfig(steps=2, device="cpu")).resume(tmp_path)
    (latest_checkpoint(tmp_path / "checkpoints") / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(device="cpu")).resume(tmp_path)


# ---------------------------------------------------------------------------------------------
# GradCache: its gradient equals the full-batch gradient
from mmlab.losses.contrastive import clip_loss
from mmlab.train import GradCache, split_batch


class _Towers(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(p), nn.Linear(12, 6))
        self.b = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Dropout(p), nn.Linear(12, 6))
        self.log_scale = nn.Parameter(torch.tensor(2.0))


def _embed(m, c):
    return {"a": nn.functional.normalize(m.a(c["a"]), dim=-1), "b": nn.functional.normalize(m.b(c["b"]), dim=-1)}


def _loss(m, e):   # two named terms, one of them using a parameter of the loss itself
    return {"clip": clip_loss(e["a"], e["b"], m.log_scale.exp()), "scale_reg": 1e-2 * m.log_scale ** 2}


def _batch(B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(B, 5, generator=g, dtype=dtype), "b": torch.randn(B, 3, generator=g, dtype=dtype),
            "present": {"a": torch.ones(B, dtype=torch.bool)}}


@pytest.mark.parametrize("B,chunk", [(2, 1), (7, 1), (7, 3), (12, 5), (12, 12), (9, 20)])
def test_gradcache_gradient_equals_full_batch(B, chunk):
    batch = _batch(B, seed=B)
    torch.manual_seed(0); m = _Towers(0.0).double()
    terms = GradCache(_embed, _loss, chunk)(m, batch)
    g_gc = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = _loss(m, _embed(m, batch)); sum(ref.values()).backward()      # plain full batch, one graph
    for k in ref: assert torch.allclose(terms[k], ref[k].detach(), atol=1e-13, rtol=0)
    for g, p in zip(g_gc, m.parameters()): torch.testing.assert_close(g, p.grad, atol=1e-12, rtol=0)


def test_gradcache_replays_dropout_masks_and_restores_rng():
    batch = _batch(10)
    torch.manual_seed(0); m = _Towers(0.3).double()
    torch.manual_seed(5); GradCache(_embed, _loss, 4)(m, batch); after_gc = torch.rand(3)
    g_gc = [p.grad.clone() for p in m.parameters()]; m.zero_grad()
    torch.manual_seed(5)
    parts = [_embed(m, c) for c in split_batch(batch, 4)]              # same masks: same chunks, same order
    after_ref = torch.rand(3)
    sum(_loss(m, {k: torch.cat([q[k] for q in parts]) for k in parts[0]}).values()).backward()
    for g, p in zip(g_gc, m.parameters()): torch.testing.assert_close(g, p.grad, atol=1e-12, rtol=0)
    assert torch.equal(after_gc, after_ref)                             # RNG stream as after one embedding pass


def test_gradcache_in_trainer_with_accumulation_matches_plain_loss():
    data = [{k: v for k, v in _batch(8, seed=s, dtype=torch.float32).items()} for s in range(4)]
    def run(loss_fn):
        torch.manual_seed(0); m = _Towers(0.0)
        Trainer(m, loss_fn, data, TrainConfig(steps=4, grad_accum=2, lr=1e-2, device="cpu")).fit()
        return torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(run(GradCache(_embed, _loss, 3)), run(lambda m, b: _loss(m, _embed(m, b))),
                               atol=1e-5, rtol=0)


def test_gradcache_in_trainer_embeds_under_the_run_precision():
    "With precision='bf16' the Trainer hands GradCache its autocast: the towers run in bf16, the loss in fp32."
    seen = []
    def embed(m, c):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return _embed(m, c)
    data = [{k: v for k, v in _batch(8, seed=s, dtype=torch.float32).items()} for s in range(2)]
    torch.manual_seed(0)
    Trainer(_Towers(0.0), GradCache(embed, _loss, 4), data, TrainConfig(steps=2, precision="bf16", device="cpu")).fit()
    assert seen and all(on and dt == torch.bfloat16 for on, dt in seen), seen


def test_gradcache_bad_input():
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"): GradCache(_embed, _loss, 0)
    with pytest.raises(TypeError, match="embed_fn must return a dict"):
        GradCache(lambda m, c: m.a(c["a"]), _loss, 2)(_Towers(0.0).double(), _batch(4))


def test_jsonl_drops_torn_and_stale_lines_on_resume(tmp_path):
    cfg = lambda n: TrainConfig(steps=n, device="cpu", out_dir=str(tmp_path), ckpt_every=2)
    torch.manual_seed(0); Trainer(nn.Linear(3, 1), _mse, _data(), cfg(5)).fit()     # checkpoints at 2, 4, 5
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f: f.write('{"step": 6, "loss": 0.1')                       # torn by a kill mid-write
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), cfg(7))
    assert tr.resume(tmp_path / "checkpoints" / "step-00000004").name == "step-00000004"
    tr.fit()
    assert [json.loads(l)["step"] for l in open(log)] == list(range(1, 8))


# ---------------------------------------------------------------------------------------------
# Two gloo processes with a distributed CLIP loss == one process on the full batch
DDP_JOB = r'''
import json, os, sys, torch, torch.nn as nn, torch.nn.functional as F, torch.distributed as dist
from safetensors.torch import save_file
from mmlab.losses.contrastive import clip_loss
from mmlab.train import Callback, Trainer, TrainConfig
torch.set_num_threads(1)
out, world = sys.argv[1], int(sys.argv[2])
if world > 1: dist.init_process_group("gloo", init_method="file://" + os.environ["DDP_STORE"], rank=int(os.environ["RANK"]), world_size=2)
rank = dist.get_rank() if world > 1 else 0

class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 6))
        self.b = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 6))
        self.log_scale = nn.Parameter(torch.tensor(2.0))

torch.manual_seed(100 + rank); model = Towers()       # rank 1 starts elsewhere: the trainer must broadcast rank 0's
g = torch.Generator().manual_seed(0)
glob = [{"a": torch.randn(16, 5, generator=g), "b": torch.randn(16, 3, generator=g)} for _ in range(3)]
shard = slice(8 * rank, 8 * rank + 8) if world > 1 else slice(0, 16)
data = [{k: v[shard] for k, v in b.items()} for b in glob]
def loss_fn(m, b):
    return clip_loss(F.normalize(m.a(b["a"]), dim=-1), F.normalize(m.b(b["b"]), dim=-1), m.log_scale.exp(),
                     distributed=world > 1)
def loss_fn2(m, b):   # plus a rank-local term: its mean over ranks is the full-batch value
    return {"clip": loss_fn(m, b), "size": 1e-2 * (m.a(b["a"]) ** 2).mean()}

class Check(Callback):
    "Before clipping and the step: compare this rank's (all-reduced) gradient with a float64 full-batch reference."
    def __init__(self): self.rows = []
    def on_after_backward(self, t):
        gb = {k: v.double() for k, v in glob[t.step % 3].items()}
        p = {n: q.detach().double().requires_grad_() for n, q in t.model.named_parameters()}
        f = lambda k, x: torch.tanh(x @ p[k + ".0.weight"].T + p[k + ".0.bias"]) @ p[k + ".2.weight"].T + p[k + ".2.bias"]
        ua, ub = f("a", gb["a"]), f("b", gb["b"])
        logits = p["log_scale"].exp() * (ua / ua.norm(dim=1, keepdim=True)) @ (ub / ub.norm(dim=1, keepdim=True)).T
        i = torch.arange(16)
        clip = (F.cross_entropy(logits, i) + F.cross_entropy(logits.T, i)) / 2
        size = 1e-2 * (ua ** 2).mean()
        (clip + size).backward()
        err = max((q.grad.double() - p[n].grad).abs().max().item() for n, q in t.model.named_parameters())
        scale = max(p[n].grad.abs().max().item() for n in p)
        self.rows.append({"err": err, "scale": scale, "clip": clip.item(), "size": size.item()})

check = Check()
tr = Trainer(model, loss_fn2, data, TrainConfig(steps=5, lr=1e-2, device="cpu"), callbacks=[check])
hist = tr.fit()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/w{world}_r{rank}.safetensors")
json.dump([r["loss"] for r in hist], open(f"{out}/loss{world}_r{rank}.json", "w"))
json.dump({"hist": hist, "ref": check.rows}, open(f"{out}/check{world}_r{rank}.json", "w"))
if world > 1: dist.destroy_process_group()
'''


def ddp_env(tmp_path, tag:str) -> dict:
    "Environment of a 2-process gloo job that meets through a fresh file (no free TCP port to race other jobs for)."
    return dict(os.environ, DDP_STORE=str(tmp_path / f"store-{tag}"), WORLD_SIZE="2", OMP_NUM_THREADS="1")

def test_two_gloo_processes_match_one_process_on_the_full_batch(tmp_path):
    (tmp_path / "ddp.py").write_text(DDP_JOB)
    env = ddp_env(tmp_path, "full-batch")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path), "2"],
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    single = subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path), "1"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    for p in procs:
        _, err = p.communicate(timeout=300); assert p.returncode == 0, err[-3000:]
    # each rank's gradient after the all-reduce is the AVERAGE over ranks: the float64 full-batch gradient (a sum
    # would double it; Adam and clipping hide that in the weights); logged terms are averaged over ranks too
    for world, r in ((1, 0), (2, 0), (2, 1)):
        c = json.load(open(tmp_path / f"check{world}_r{r}.json"))
        assert len(c["ref"]) == 5 and len(c["hist"]) == 5
        for rec, ref in zip(c["hist"], c["ref"]):
            assert ref["err"] <= 1e-5 * ref["scale"], (world, r, ref)
            assert rec["clip"] == pytest.approx(ref["clip"], rel=1e-5) and rec["size"] == pytest.approx(ref["size"], rel=1e-5)
            assert rec["loss"] == pytest.approx(ref["clip"] + ref["size"], rel=1e-5)
    l1 = json.load(open(tmp_path / "loss1_r0.json"))
    for r in range(2): assert json.load(open(tmp_path / f"loss2_r{r}.json")) == pytest.approx(l1, abs=1e-5)
    w1 = load_file(str(tmp_path / "w1_r0.safetensors"))
    w20, w21 = (load_file(str(tmp_path / f"w2_r{r}.safetensors")) for r in range(2))
    for k in w1:
        assert torch.equal(w20[k], w21[k])                                 # ranks stay in lockstep
        torch.testing.assert_close(w20[k], w1[k], atol=2e-5, rtol=0)       # and match the full batch
    assert l1[-1] < l1[0]


DDP_RESUME_JOB = r'''
import json, os, sys, torch, torch.nn as nn, torch.nn.functional as F, torch.distributed as dist
from safetensors.torch import save_file
from mmlab.losses.contrastive import clip_loss
from mmlab.train import Trainer, TrainConfig
torch.set_num_threads(1)
out, steps, resume, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + os.environ["DDP_STORE"], rank=int(os.environ["RANK"]), world_size=2)
rank = dist.get_rank()
torch.manual_seed(7 + rank)                      # per-rank random streams (dropout masks differ by rank)
model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 6)),
                       "b": nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 6))})
g = torch.Generator().manual_seed(0)
data = [{"a": torch.randn(6, 5, generator=g), "b": torch.randn(6, 3, generator=g)} for _ in range(5)]
data = [{k: v + rank for k, v in b.items()} for b in data]   # each rank its own shard
loss_fn = lambda m, b: clip_loss(F.normalize(m["a"](b["a"]), dim=-1), F.normalize(m["b"](b["b"]), dim=-1), 10.0,
                                 distributed=True)
tr = Trainer(model, loss_fn, data, TrainConfig(steps=8, lr=1e-2, device="cpu", out_dir=f"{out}/{tag}", ckpt_every=2))
if resume: torch.manual_seed(1000 + rank); tr.resume(f"{out}/{tag}")
tr.cfg.steps = steps
tr.fit()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{tag}_{steps}_r{rank}.safetensors")
dist.destroy_process_group()
'''


@pytest.mark.mutation_heavy
def test_two_process_resume_is_bit_identical(tmp_path):
    (tmp_path / "job.py").write_text(DDP_RESUME_JOB)
    def launch(steps, mode, tag):
        env = ddp_env(tmp_path, f"{tag}-{mode}-{steps}")
        ps = [subprocess.Popen([sys.executable, str(tmp_path / "job.py"), str(tmp_path), str(steps), mode, tag],
                               env=env | {"RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in range(2)]
        for p in ps:
            _, err = p.communicate(timeout=300); assert p.returncode == 0, err[-3000:]
    launch(8, "fresh", "straight")
    launch(4, "fresh", "split"); launch(8, "resume", "split")
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")][-1] == "step-00000008"
    for r in range(2):
        a = load_file(str(tmp_path / f"straight_8_r{r}.safetensors")); b = load_file(str(tmp_path / f"split_8_r{r}.safetensors"))
        for k in a: assert torch.equal(a[k], b[k]), f"rank {r}: {k} differs after a 2-process resume"
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2


# ---------------------------------------------------------------------------------------------
# Metric files (JSONL, CSV, TensorBoard), LivePlot, torch.compile
def test_log_to_compile_and_out_dir_validation():
    assert TrainConfig(log_to="jsonl, csv,jsonl").log_to == ("jsonl", "csv")      # the CLI's string, repeats dropped
    assert TrainConfig(log_to=["tensorboard"]).log_to == ("tensorboard",)
    assert TrainConfig(log_to="").log_to == ()
    with pytest.raises(ConfigError, match=r"TrainConfig.log_to='csv,wandb': expected names from "
                                          r"\('jsonl', 'csv', 'tensorboard'\); 'wandb' is not one"):
        TrainConfig(log_to="csv,wandb")
    with pytest.raises(ConfigError, match="TrainConfig.log_to=3: expected names from"): TrainConfig(log_to=3)
    with pytest.raises(ConfigError, match="TrainConfig.compile='yes': expected True or False"): TrainConfig(compile="yes")
    assert TrainConfig(out_dir=Path("/tmp/x")).out_dir == "/tmp/x"                # a Path would not fit in a checkpoint


def test_csv_logger_widens_its_header_and_round_trips_every_value(tmp_path):
    at = SimpleNamespace(rank=0, step=0)
    recs = [{"step": 1, "loss": 0.1 + 0.2, "lr": 1e-05}, {"step": 1, "eval/acc": 1 / 3},
            {"step": 2, "loss": float("inf"), "note": "a,b"}]
    log = CSVLogger(tmp_path / "m.csv"); log.on_fit_start(at)
    for r in recs: log.on_log(at, r)
    log.on_fit_end(at)
    assert log.read() == recs
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "step,loss,lr,eval/acc,note"
    for cb in (CSVLogger(tmp_path / "r1.csv"), JSONLLogger(tmp_path / "r1.jsonl"), TensorBoardLogger(tmp_path / "tb1")):
        r1 = SimpleNamespace(rank=1, step=0); cb.on_fit_start(r1); cb.on_log(r1, recs[0]); cb.on_fit_end(r1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]                  # rank 1 writes nothing


def test_metric_files_agree_and_a_resume_drops_torn_and_later_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = lambda n: TrainConfig(steps=n, device="cpu", out_dir=str(tmp_path), ckpt_every=2, eval_every=2,
                                log_to="jsonl,csv,tensorboard")
    ev = lambda: EvalCallback(lambda m: {"w": m.weight.sum()})
    torch.manual_seed(0); Trainer(nn.Linear(3, 1), _mse, _data(), cfg(5), callbacks=[ev()]).fit()   # ckpts 2, 4, 5
    with open(tmp_path / "metrics.csv", "a") as f: f.write("6,0,0.12")                 # torn by a kill mid-write
    with open(tmp_path / "metrics.jsonl", "a") as f: f.write('{"step": 6, "lo')
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), cfg(7), callbacks=[ev()])
    tr.resume(tmp_path / "checkpoints" / "step-00000004"); tr.fit()                    # as if killed after step 5
    jsonl = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in jsonl] == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7]
    assert CSVLogger(tmp_path / "metrics.csv").read() == jsonl
    ea = EventAccumulator(str(tmp_path / "tensorboard")); ea.Reload()
    keys = {k for r in jsonl for k in r} - {"step"}
    assert set(ea.Tags()["scalars"]) == keys
    for k in keys:                                                                   # TensorBoard stores float32
        assert [(e.step, e.value) for e in ea.Scalars(k)] == [(r["step"], float(np.float32(r[k]))) for r in jsonl if k in r]


def test_metric_loggers_treat_a_trainer_without_rank_as_rank_0(tmp_path):
    "Callbacks also serve hand-written loops: an object without `rank` is the only process, so it writes."
    bare = SimpleNamespace(step=0)
    for cb in (CSVLogger(tmp_path / "m.csv"), JSONLLogger(tmp_path / "m.jsonl"), TensorBoardLogger(tmp_path / "tb")):
        cb.on_fit_start(bare); cb.on_log(bare, {"step": 1, "loss": 0.5}); cb.on_fit_end(bare)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.jsonl", "tb"]
    assert CSVLogger(tmp_path / "m.csv").read() == JSONLLogger(tmp_path / "m.jsonl").read() == [{"step": 1, "loss": 0.5}]
    assert CSVLogger(tmp_path / "e.csv").render([]) == ""              # no records: an empty file, no header


def test_missing_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)               # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(device="cpu", out_dir=str(tmp_path), log_to="csv,tensorboard"))


def _panels(history):
    "Reference for history_figure, written out plainly: {(panel, key): (xs, ys)} of the finite non-bookkeeping numbers."
    out = {}
    for i, r in enumerate(history):
        for k, v in r.items():
            v = v.item() if isinstance(v, torch.Tensor) else v
            if k in ("step", "epoch", "lr", "grad_norm", "step_time") or type(v) not in (int, float) or not math.isfinite(v): continue
            xs, ys = out.setdefault(("x" if "loss" in r else "x2", k), ([], []))
            xs.append(r["step"] if "step" in r else i + 1); ys.append(v)
    return out


def test_history_figure_draws_each_record_in_its_panel():
    hist = [{"step": 1, "epoch": 0, "loss": 3.0, "mse": 2.5, "lr": 1e-3, "grad_norm": 4.0, "step_time": 0.1},
            {"step": 2, "epoch": 0, "loss": 2.0, "mse": float("inf"), "kl": torch.tensor(0.25), "lr": 1e-3},
            {"step": 2, "eval/acc": 0.4, "eval/ok": True, "note": "best"},
            {"loss": 1.5, "mse": 1.2},                                                  # no step: its position, 4
            {"step": 5, "loss": float("nan"), "mse": 0.9},                              # a NaN loss is no point
            {"step": 6, "eval/acc": 0.6, "knn/top1": 0.3}]
    fig = history_figure(hist)
    got = {(t.xaxis, t.name): (list(t.x), list(t.y)) for t in fig.data}
    assert got == _panels(hist) and len(fig.data) == len(got)
    assert got[("x", "mse")] == ([1, 4, 5], [2.5, 1.2, 0.9]) and got[("x2", "eval/acc")] == ([2, 6], [0.4, 0.6])
    assert [t.name for t in fig.data] == ["loss", "mse", "kl", "eval/acc", "knn/top1"]   # first-seen order
    assert {t.mode for t in fig.data if t.xaxis == "x"} == {"lines"} and {t.mode for t in fig.data if t.xaxis == "x2"} == {"lines+markers"}
    assert fig.layout.yaxis.type == "log" and fig.layout.title.text == "update 4: loss 1.5"   # the last finite loss
    assert history_figure(hist + [{"step": 7, "loss": 1.0, "mse": -0.1}]).layout.yaxis.type == "linear"
    one = history_figure(hist[:2])                                                      # no other record: one panel
    assert {t.xaxis for t in one.data} == {"x"} and "xaxis2" not in one.layout.to_plotly_json()
    with pytest.raises(InputTypeError, match=r"history_figure: history\[1\] is of type list; expected a dict record"):
        history_figure([hist[0], [1, 2]])


def test_liveplot_outside_ipython_only_collects_the_curves(monkeypatch):
    monkeypatch.setattr("IPython.get_ipython", lambda: None)   # an earlier test may have left an IPython shell alive
    live, ev = LivePlot(every=2), EvalCallback(lambda m: {"w": m.weight.sum()})
    hist = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=4, device="cpu", eval_every=2),
                   callbacks=[ev, live]).fit()
    assert live.mode is None and live.handle is None and live.history == hist
    fig = live.figure()
    assert [t.name for t in fig.data] == ["loss", "eval/w"]
    assert list(fig.data[0].y) == [r["loss"] for r in hist if "loss" in r]
    assert list(fig.data[1].x) == [2, 4]
    assert (fig.data[0].xaxis, fig.data[1].xaxis) == ("x", "x2")                     # training left, evaluation right
    assert (fig.data[0].mode, fig.data[1].mode) == ("lines", "lines+markers")
    assert fig.layout.yaxis.type == "log"                                            # positive losses: log scale
    signed = LivePlot(); signed.on_log(None, {"step": 1, "loss": -0.5}); signed.on_log(None, {"step": 2, "loss": 0.5})
    assert signed.figure().layout.yaxis.type != "log"                                 # a negative loss: linear
    assert (fig.data[0].line.color, fig.data[0].line.width, fig.data[0].line.dash) == ("black", 1, "dot")   # the sum
    last = [r for r in hist if "loss" in r][-1]
    assert fig.layout.title.text == f"update {last['step']}: loss {last['loss']:.4g}" and last['step'] == 4
    assert LivePlot().figure().layout.title.text == "no training record yet"
    with pytest.raises(ConfigError, match="LivePlot: every=0"): LivePlot(every=0)


def test_liveplot_updates_one_output_in_place_and_draws_once_when_captured():
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    class Recorder(DisplayPublisher):
        def __init__(self): super().__init__(); self.calls = []
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False):
            self.calls.append(((transient or {}).get("display_id"), update, data))
    shell = InteractiveShell.instance()
    try:
        shell.display_pub = rec = Recorder()                                        # a live front end
        hist = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=7, device="cpu"),
                       callbacks=[LivePlot(every=3)]).fit()
        assert len({c[0] for c in rec.calls}) == 1 and rec.calls[0][0] is not None   # one output ...
        assert [c[1] for c in rec.calls] == [False, True, True, True]                # shown at record 1; updated at 3, 6, end
        assert len(rec.calls[0][2]["application/vnd.plotly.v1+json"]["data"][0]["y"]) == 1   # at once: the first record
        final = rec.calls[-1][2]["application/vnd.plotly.v1+json"]                   # show_fig's bundle
        assert list(final["data"][0]["y"]) == [r["loss"] for r in hist]
        with capture_output() as cap:                                                # nbdev's runner, mmlab-docs --execute
            Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=7, device="cpu"), callbacks=[LivePlot(every=1)]).fit()
        assert len(cap.outputs) == 1 and "application/vnd.plotly.v1+json" in cap.outputs[0].data
    finally:
        InteractiveShell.clear_instance()


class _Net(nn.Module):
    def __init__(self): super().__init__(); self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    def forward(self, x): return self.net(x)


@pytest.mark.mutation_heavy
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")   # inside inductor
def test_compiled_run_matches_eager_and_its_checkpoint_loads_eagerly(tmp_path):
    from torch._dynamo.utils import counters
    def run(compile, out=None):
        torch.manual_seed(0)
        tr = Trainer(_Net(), _mse, _data(), TrainConfig(steps=6, lr=1e-2, device="cpu", compile=compile, out_dir=out))
        return tr, tr.fit()
    eager, he = run(False)
    frames = counters["frames"]["ok"]
    comp, hc = run(True, str(tmp_path))
    assert counters["frames"]["ok"] > frames                                         # dynamo captured the forward
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(he, hc)) < 1e-6
    assert list(comp.model.state_dict()) == list(eager.model.state_dict())          # no '_orig_mod.' prefix
    back = Trainer(_Net(), _mse, _data(), TrainConfig(steps=6, device="cpu", out_dir=str(tmp_path)))
    back.resume(tmp_path)                                                            # eager trainer, compiled checkpoint
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), comp.model.state_dict().values()))
    with pytest.raises(ConfigError, match=r"nn.Module.compile\(\) captures nothing"):
        Trainer(nn.Sequential(nn.Linear(3, 1)), _mse, _data(), TrainConfig(device="cpu", compile=True))


# ---------------------------------------------------------------------------------------------
# Loop arithmetic against independent references: accumulation, logged means, schedule, EMA, cadence
from hypothesis import given, settings, strategies as st
from mmlab.core import InputError, InputTypeError
from mmlab.train import EMA, decode_state, encode_state, loss_terms, make_optimizer


class _Grads(Callback):
    "Reads the accumulated gradient BEFORE clipping and the optimizer (Adam's scale invariance hides it after)."
    def __init__(self, ref): self.ref, self.seen = ref, []
    def on_after_backward(self, t):
        got = [p.grad.clone() for p in t.model.parameters()]
        want = self.ref(t)
        self.seen.append(len(got))
        for g, w in zip(got, want): torch.testing.assert_close(g.double(), w, atol=1e-12, rtol=1e-10)


def _naive_linear_grad(params, rows):
    "float64 autograd of the MEAN squared error over all rows of the update, by hand."
    w, b = (p.detach().double().requires_grad_() for p in params)
    x = torch.cat([r[0] for r in rows]).double(); y = torch.cat([r[1] for r in rows]).double()
    (((x @ w.T + b) - y) ** 2).mean().backward()
    return [w.grad, b.grad]


@pytest.mark.parametrize("K,clip", [(1, None), (2, None), (3, 1.0)])
def test_accumulated_gradient_is_the_full_batch_gradient(K, clip):
    data = _data(6)                                     # 6 micro-batches of 8 rows; update t uses K of them
    def ref(t):
        first = t.step * K
        return _naive_linear_grad(list(t.model.parameters()), [data[(first + i) % 6] for i in range(K)])
    torch.manual_seed(0); m = nn.Linear(3, 1).double()
    cb = _Grads(ref)
    Trainer(m, lambda m, b: _mse(m, (b[0].double(), b[1].double())), data,
            TrainConfig(steps=3, grad_accum=K, lr=0.05, clip_grad_norm=clip, device="cpu"), callbacks=[cb]).fit()
    assert cb.seen == [2, 2, 2]


def _naive_clip(params, batch):
    "float64 CLIP loss of _Towers (no dropout) written out by hand: mean of row and column cross-entropies."
    p = {n: q.detach().double().requires_grad_() for n, q in params}
    f = lambda k, x: torch.tanh(x @ p[k + ".0.weight"].T + p[k + ".0.bias"]) @ p[k + ".3.weight"].T + p[k + ".3.bias"]
    a, b = f("a", batch["a"].double()), f("b", batch["b"].double())
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    s = p["log_scale"].exp() * a @ b.T
    lse_r, lse_c = s.logsumexp(1), s.logsumexp(0)
    loss = ((lse_r - s.diagonal()).mean() + (lse_c - s.diagonal()).mean()) / 2 + 1e-2 * p["log_scale"] ** 2
    loss.backward()
    return [p[n].grad for n, _ in params]


@pytest.mark.parametrize("K", [1, 2])
def test_gradcache_in_trainer_accumulates_the_full_batch_gradient(K):
    # GradCache runs its own backward passes: they must use the Trainer's 1/K-scaled backward
    data = [_batch(6, seed=s) for s in range(2 * K)]
    def ref(t):
        rows = [data[(t.step * K + i) % len(data)] for i in range(K)]
        return _naive_clip(list(t.model.named_parameters()), {k: torch.cat([r[k] for r in rows]) for k in ("a", "b")}) \
            if K == 1 else _grad_mean_of_chunks(t, rows)
    def _grad_mean_of_chunks(t, rows):   # per micro-batch contrastive loss (negatives within it), averaged over K
        gs = [_naive_clip(list(t.model.named_parameters()), r) for r in rows]
        return [sum(g) / K for g in zip(*gs)]
    torch.manual_seed(0); m = _Towers(0.0).double()
    cb = _Grads(ref)
    Trainer(m, GradCache(_embed, _loss, 4), data,
            TrainConfig(steps=2, grad_accum=K, lr=1e-2, clip_grad_norm=None, device="cpu"), callbacks=[cb]).fit()
    assert len(cb.seen) == 2


def test_logged_terms_are_the_mean_over_micro_batches():
    data = [(torch.full((4, 3), float(i)), torch.full((4, 1), 2.0 * i)) for i in range(1, 7)]   # different losses
    def loss(m, b): return {"mse": _mse(m, b), "ymean": b[1].mean() + 0 * m.bias.sum()}
    refs = []
    class Ref(Callback):       # parameters are fixed during an update: compute each micro-batch's terms by hand
        def on_step_start(self, t):
            w, bias = t.model.weight.detach().double(), t.model.bias.detach().double()
            per = [(((x.double() @ w.T + bias) - y.double()) ** 2).mean().item() for x, y in
                   data[2 * t.step % 6: 2 * t.step % 6 + 2]]
            ym = [2.0 * (2 * t.step % 6 + 1), 2.0 * (2 * t.step % 6 + 2)]
            refs.append({"mse": sum(per) / 2, "ymean": sum(ym) / 2})
    torch.manual_seed(0)
    hist = Trainer(nn.Linear(3, 1), loss, data, TrainConfig(steps=4, grad_accum=2, lr=1e-3, device="cpu"),
                   callbacks=[Ref()]).fit()
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    for rec, ref in zip(hist, refs):
        assert rec["mse"] == pytest.approx(ref["mse"], rel=1e-5) and rec["ymean"] == pytest.approx(ref["ymean"], rel=1e-6)
        assert rec["loss"] == pytest.approx(ref["mse"] + ref["ymean"], rel=1e-5)
    assert [r["ymean"] for r in hist] == pytest.approx([3.0, 7.0, 11.0, 3.0])   # (2+4)/2, (6+8)/2, (10+12)/2, wrap


def test_a_bare_scalar_loss_is_logged_as_loss_only():
    hist = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=1, device="cpu")).fit()
    assert set(hist[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "step_time"}


def test_ema_moves_exactly_one_minus_decay_of_the_gap_and_swapped_restores():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double(); m[1].requires_grad_(False)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()): p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p) + i)
    t = SimpleNamespace(model=m)
    ema = EMA(0.75); ema.on_fit_start(t)
    assert set(ema.shadow) == {"0.weight", "0.bias"}                    # frozen parameters are not averaged
    old = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        for p in m.parameters(): p.add_(4.0)
    ema.on_step_end(t)
    for n, p in m.named_parameters():
        if n in old:   # d*old + (1-d)*param, with values exact in binary: exactly (1-d)=1/4 of the gap of 4
            assert torch.equal(ema.shadow[n], 0.75 * old[n] + 0.25 * p.detach())
            assert torch.equal(ema.shadow[n] - old[n], torch.full_like(old[n], 1.0))
    own = [p.detach().clone() for p in m.parameters()]
    with ema.swapped(m) as inside:
        assert inside is m and torch.equal(m[0].weight, ema.shadow["0.weight"]) and torch.equal(m[0].bias, ema.shadow["0.bias"])
        assert torch.equal(m[1].weight, own[2])                          # not averaged: left alone
    assert all(torch.equal(a, b) for a, b in zip(own, m.parameters()))
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped(m): raise RuntimeError("inside")
    assert all(torch.equal(a, b) for a, b in zip(own, m.parameters()))   # restored after an exception too
    kept = ema.shadow; ema.on_fit_start(t)
    assert all(torch.equal(kept[n], ema.shadow[n]) for n in kept)        # a resumed shadow is not reset to the weights
    fresh = EMA(0.1); fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == 0.75 and all(torch.equal(fresh.shadow[n], kept[n]) for n in kept)


def test_ema_in_a_run_follows_the_recurrence_and_validates_decay():
    torch.manual_seed(0); m = nn.Linear(3, 1).double()
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    class Rec(Callback):        # runs after EMA's on_step_end: the weights that update used
        def on_step_end(self, t):
            for n, p in t.model.named_parameters(): ref[n] = 0.75 * ref[n] + 0.25 * p.detach()
    ema = EMA(0.75)                                 # not 0.5: swapping d and 1 - d must show
    Trainer(m, lambda m, b: _mse(m, (b[0].double(), b[1].double())), _data(), TrainConfig(steps=3, lr=0.1, device="cpu"),
            callbacks=[ema, Rec()]).fit()
    for n in ref: torch.testing.assert_close(ema.shadow[n], ref[n], atol=1e-15, rtol=0)
    assert EMA(0.0).decay == 0.0
    for bad in (1.0, -1e-9):
        with pytest.raises(ConfigError, match=r"EMA: decay=.*expected a value in \[0, 1\)"): EMA(bad)


def _closed_form(t, W, T, r):
    if t < W: return (t + 1) / W
    prog = min(1.0, (t - W) / max(1, T - W))
    return r + (1 - r) * (1 + math.cos(math.pi * prog)) / 2


def test_warmup_cosine_closed_form_points():
    W, T, r = 4, 12, 0.1
    assert warmup_cosine(0, W, T, r) == 1 / 4                    # step 0 already trains: 1/W, not 0
    assert warmup_cosine(W - 1, W, T, r) == 1.0 and warmup_cosine(W, W, T, r) == 1.0   # end of warm-up: the peak
    assert warmup_cosine(W + 4, W, T, r) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-15)   # half-way: cos = 0
    assert warmup_cosine(W + 2, W, T, r) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, abs=1e-15)
    assert warmup_cosine(T, W, T, r) == pytest.approx(0.1, abs=1e-15)                # the floor
    assert warmup_cosine(T + 5, W, T, r) == pytest.approx(0.1, abs=1e-15)            # and it stays there
    assert warmup_cosine(0, 0, 10) == 1.0 and warmup_cosine(5, 0, 10) == pytest.approx(0.5, abs=1e-15)
    assert warmup_cosine(10, 0, 10) == pytest.approx(0.0, abs=1e-15)                 # default floor 0
    assert warmup_cosine(3, 3, 3, 0.2) == pytest.approx(1.0)                         # T == W: no division by zero


@settings(max_examples=40, deadline=None)
@given(W=st.integers(0, 20), extra=st.integers(0, 30), r=st.floats(0, 1), t=st.integers(0, 60))
def test_warmup_cosine_matches_the_closed_form(W, extra, r, t):
    T = W + extra
    assert warmup_cosine(t, W, T, r) == pytest.approx(_closed_form(t, W, T, r), abs=1e-12)


def test_trainer_lr_follows_the_closed_form_each_step():
    # lr=1, W=2, T=5, floor 0.1: updates 0..4 use 1/2, 1, 1, 0.1+0.9*(1+cos(pi/3))/2, 0.1+0.9*(1+cos(2pi/3))/2
    cfg = TrainConfig(steps=5, lr=1.0, warmup_steps=2, min_lr_ratio=0.1, device="cpu")
    seen = []
    class Lr(Callback):
        def on_after_backward(self, t): seen.append([g["lr"] for g in t.opt.param_groups])
    hist = Trainer(nn.Linear(3, 1), _mse, _data(), cfg, callbacks=[Lr()]).fit()
    want = [0.5, 1.0, 1.0, 0.775, 0.325]
    assert [r["lr"] for r in hist] == pytest.approx(want, abs=1e-12)
    assert [g for s in seen for g in s] == pytest.approx([w for w in want for _ in range(2)], abs=1e-12)  # both groups


# ---------------------------------------------------------------------------------------------
# TrainConfig, loss_terms, state encoding, checkpoints on disk, cadence, optimizer groups, split_batch
@pytest.mark.parametrize("field,ok,bad", [
    ("steps", 1, 0), ("grad_accum", 1, 0), ("log_every", 1, 0), ("keep_last", 1, 0),
    ("steps", 2, True), ("keep_last", 3, 1.0),
    ("eval_every", 1, 0), ("ckpt_every", 1, 0), ("eval_every", None, 2.0),
    ("warmup_steps", 0, -1), ("warmup_steps", 0, 1.5),
    ("lr", 1e-12, 0.0), ("lr", 1e-12, float("nan")), ("weight_decay", 0.0, -1e-12),
    ("min_lr_ratio", 0.0, -1e-12), ("min_lr_ratio", 1.0, 1 + 1e-12),
    ("clip_grad_norm", 1e-12, 0.0), ("clip_grad_norm", None, -1.0),
    ("betas", (0.0, 0.0), (0.9, 1.0)), ("betas", (0.0, 0.999), (-1e-9, 0.9)), ("betas", (0.5, 0.5), (0.9,)),
    ("compile", True, 1),
])
def test_trainconfig_boundaries(field, ok, bad):
    want = {"steps": "an integer >= 1", "grad_accum": "an integer >= 1", "log_every": "an integer >= 1",
            "keep_last": "an integer >= 1", "eval_every": "None or an integer >= 1", "ckpt_every": "None or an integer >= 1",
            "warmup_steps": "an integer >= 0", "lr": "a learning rate > 0", "weight_decay": "a value >= 0",
            "min_lr_ratio": "a fraction in [0, 1]", "clip_grad_norm": "None or a norm > 0", "betas": "two values in [0, 1)",
            "compile": "True or False"}[field]
    assert getattr(TrainConfig(**{field: ok}), field) == ok
    with pytest.raises(ConfigError) as e: TrainConfig(**{field: bad})
    assert str(e.value) == f"TrainConfig.{field}={bad!r}: expected {want}"


def test_trainconfig_defaults_and_betas_become_a_tuple():
    c = TrainConfig()
    assert (c.steps, c.lr, c.weight_decay, c.betas, c.eps, c.warmup_steps, c.min_lr_ratio, c.grad_accum) == \
           (100, 1e-3, 0.05, (0.9, 0.999), 1e-8, 0, 0.0, 1)
    assert (c.clip_grad_norm, c.log_every, c.eval_every, c.ckpt_every, c.keep_last, c.log_to, c.out_dir) == \
           (1.0, 1, None, None, 3, ("jsonl",), None)
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_loss_terms_normalises_and_refuses():
    t = torch.tensor(1.5)
    assert loss_terms(t) == {"loss": t} and loss_terms({"loss": t}) == {"loss": t}
    d = {"a": t, "b": torch.tensor(2.0)}; assert loss_terms(d) is d
    with pytest.raises(InputTypeError, match="myloss: must return a scalar tensor or a non-empty dict.*got dict"):
        loss_terms({}, "myloss")
    with pytest.raises(InputTypeError, match="loss_fn: must return .* got float"): loss_terms(1.5)
    with pytest.raises(InputError, match=r"returned terms \['a', 'loss'\]; 'loss' is reserved"):
        loss_terms({"a": t, "loss": t})
    with pytest.raises(InputError, match=r"term 'b' must be a 0-d tensor \(reduce with .mean\(\)\), got \(2,\)"):
        loss_terms({"a": t, "b": torch.ones(2)})
    with pytest.raises(InputError, match="term 'a' must be a 0-d tensor .*got float"): loss_terms({"a": 1.0})
    with pytest.raises(InputError, match=r"got \(1,\)"): loss_terms(torch.ones(1))


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=4),
                  st.lists(st.floats(-1e6, 1e6, width=32), min_size=0, max_size=4).map(torch.tensor),
                  st.integers(0, 2**32 - 1).map(lambda v: np.array([v, 1], dtype=np.uint32)))
_key = st.one_of(st.sampled_from(["a", "b", "a/b", "b/0", "__tensor__", "__tuple__", "__items__", "x.y"]), st.integers(-3, 3))
_state = st.recursive(_leaf, lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                                                      st.dictionaries(_key, kids, max_size=3)), max_leaves=12)


def _same(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray): return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict): return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=50, deadline=None)
@given(obj=_state)
def test_encode_decode_round_trip_through_json(obj):
    tensors = {}
    back = decode_state(json.loads(json.dumps(encode_state(obj, tensors))), tensors)
    assert _same(obj, back)


def test_encode_state_examples_and_refusal():
    t = torch.arange(3.0); tensors = {}
    obj = {"w": t, 3: (None, [np.float32(1.5), np.int64(2)]), "__tensor__": "x"}
    back = decode_state(json.loads(json.dumps(encode_state(obj, tensors))), tensors)
    assert list(back) == ["w", 3, "__tensor__"] and back["__tensor__"] == "x" and torch.equal(back["w"], t)
    assert back[3] == (None, [1.5, 2]) and type(back[3][1][1]) is int
    t.add_(1); assert torch.equal(back["w"], torch.arange(3.0))          # stored as a copy
    tensors = {}; nested = {"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}}   # "/" in a key: paths must not collide
    back = decode_state(json.loads(json.dumps(encode_state(nested, tensors))), tensors)
    assert torch.equal(back["a/b"], torch.ones(1)) and torch.equal(back["a"]["b"], torch.zeros(1)) and len(tensors) == 2
    with pytest.raises(CheckpointError, match="cannot store object at /a/1 in a checkpoint"):
        encode_state({"a": [1, object()]}, {})


def _touch(d, step):
    save_checkpoint(d, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=100)


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_keep_last_keeps_exactly_the_newest(tmp_path, keep):
    for s in (3, 1, 7, 5, 9): save_checkpoint(tmp_path, s, {"w": torch.zeros(1)}, {"step": s}, keep_last=keep)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [f"step-{s:08d}" for s in (1, 3, 5, 7, 9)[-keep:]]           # by step number, not save order
    assert sorted(p.name for p in tmp_path.iterdir()) == names                 # nothing else left behind


def test_latest_checkpoint_orders_by_number_and_ignores_the_rest(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(tmp_path) is None
    for name in ("step-9", "step-10", "step-00000002", "step-x", ".tmp-step-00000099-1", "stepper"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-00000050").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-9", "step-10"]
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_a_flipped_byte_in_either_checkpoint_file_is_refused(tmp_path):
    state = {"step": 7, "lr": 0.125, "rng": [1, 2, 3]}
    ck = save_checkpoint(tmp_path, 7, {"w": torch.arange(64.0)}, state)
    def flipped(name, at):
        f = ck / name; raw = bytearray(f.read_bytes()); orig = bytes(raw)
        raw[at(raw)] ^= 0x01; f.write_bytes(raw)
        return orig
    orig = flipped("tensors.safetensors", lambda raw: len(raw) - 5)            # inside the tensor data
    with pytest.raises(CheckpointError, match="SHA-256 does not match state.json"): load_checkpoint(ck)
    (ck / "tensors.safetensors").write_bytes(orig)
    assert load_checkpoint(ck)[1] == state
    orig = flipped("state.json", lambda raw: raw.rindex(b'"step": 7') + len(b'"step": '))   # the state's 7 -> 6
    with pytest.raises(CheckpointError, match="state.json: SHA-256 of its content does not match"): load_checkpoint(ck)
    (ck / "state.json").write_bytes(orig)
    orig = flipped("state.json", lambda raw: raw.index(b'"format"') + 3)       # a key of the metadata
    with pytest.raises(CheckpointError, match="state.json: unknown format"): load_checkpoint(ck)
    (ck / "state.json").write_bytes(orig)
    orig = flipped("state.json", lambda raw: raw.index(b'"state_sha256"') + 3)  # the checksum's own key
    with pytest.raises(CheckpointError, match="state.json is corrupt: keys"): load_checkpoint(ck)
    (ck / "state.json").write_bytes(orig)
    orig = flipped("state.json", lambda raw: raw.index(b'"lr": 0.125') + 8)     # a float: 0.125 -> 0.025
    with pytest.raises(CheckpointError, match="state.json: SHA-256 of its content does not match"): load_checkpoint(ck)
    (ck / "state.json").write_bytes(orig)
    assert load_checkpoint(ck)[1] == state


def test_a_checkpoint_without_the_state_checksum_still_loads(tmp_path):
    ck = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1})   # as written before the checksum existed
    meta = json.loads((ck / "state.json").read_text()); del meta["state_sha256"]
    (ck / "state.json").write_text(json.dumps(meta))
    assert load_checkpoint(ck)[1] == {"step": 1}
    del meta["tensors_sha256"]; (ck / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="state.json is corrupt: keys"): load_checkpoint(ck)


def test_log_eval_and_checkpoint_cadence(tmp_path):
    evals, saves = [], []
    class Rec(Callback):
        def on_eval(self, t): evals.append(t.step)
        def on_checkpoint(self, t, path): saves.append((t.step, path.name))
    cfg = TrainConfig(steps=7, log_every=3, eval_every=2, ckpt_every=3, keep_last=10, device="cpu",
                      out_dir=str(tmp_path), log_to=())
    hist = Trainer(nn.Linear(3, 1), _mse, _data(), cfg, callbacks=[Rec()]).fit()
    assert [r["step"] for r in hist] == [3, 6, 7]                    # every 3rd update, and always the last
    assert evals == [2, 4, 6, 7]
    assert saves == [(3, "step-00000003"), (6, "step-00000006"), (7, "step-00000007")]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [s[1] for s in saves]
    evals.clear(); saves.clear()
    hist = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=3, device="cpu"), callbacks=[Rec()]).fit()
    assert [r["step"] for r in hist] == [1, 2, 3] and evals == [3] and saves == []   # no out_dir: nothing saved
    out2 = tmp_path / "b"
    Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=4, device="cpu", out_dir=str(out2)), callbacks=[Rec()]).fit()
    assert saves == [(4, "step-00000004")]                            # ckpt_every None: only at the end
    assert [json.loads(l)["step"] for l in open(out2 / "metrics.jsonl")] == [1, 2, 3, 4]


def test_trainer_save_returns_and_announces_the_checkpoint_it_wrote(tmp_path):
    seen = []
    class Rec(Callback):
        def on_checkpoint(self, t, path): seen.append(path)
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=2, device="cpu", out_dir=str(tmp_path), log_to=()),
                 callbacks=[Rec()])
    tr.fit()
    assert seen == [tmp_path / "checkpoints" / "step-00000002"] and seen[0].is_dir()
    assert tr.save() == latest_checkpoint(tmp_path / "checkpoints") == seen[-1]
    assert load_checkpoint(seen[-1])[1]["step"] == 2


def test_save_checkpoint_removes_what_a_killed_delete_left_behind(tmp_path):
    for stale in (tmp_path / ".trash-step-00000001-123-456", tmp_path / ".tmp-step-00000003-99"):   # a delete, a write
        (stale / "inner").mkdir(parents=True); (stale / "inner" / "model.safetensors").write_text("half done")
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, {"step": 2}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_progress_bar_counts_the_steps_and_shows_the_loss(capsys):
    Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=3, device="cpu", log_to=()), callbacks=[ProgressBar()]).fit()
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert err[-1].startswith("train: 100%") and "3/3" in err[-1] and "loss=" in err[-1]


def test_epochs_count_up_and_reach_the_sampler():
    class Sampler(torch.utils.data.Sampler):
        def __init__(self): self.epochs = []
        def set_epoch(self, e): self.epochs.append(e)
        def __iter__(self): return iter(range(4))
        def __len__(self): return 4
    sampler = Sampler(); x = torch.randn(4, 3, dtype=torch.float64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=2, sampler=sampler)
    tr = Trainer(nn.Linear(3, 1).double(), _mse, data, TrainConfig(steps=7, device="cpu", log_to=()))
    tr.fit()
    assert tr.epoch == 3 and sampler.epochs == [0, 1, 2, 3]                        # 2 batches an epoch, 7 updates


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_trainer_uses_the_configured_device_and_refuses_a_missing_one():
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(device="cuda"))


def test_pruning_a_checkpoint_that_cannot_be_fully_deleted_does_not_fail_the_save(tmp_path, monkeypatch):
    "keep_last deletes old folders best-effort: the new checkpoint is already in place, so a stuck file must not crash."
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"step": 1}, keep_last=1)
    unlink = os.unlink
    def stuck(name, *a, **kw):
        if str(name).endswith("tensors.safetensors"): raise PermissionError(f"[fake] cannot delete {name}")
        return unlink(name, *a, **kw)
    monkeypatch.setattr(os, "unlink", stuck)
    save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"step": 2}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert load_checkpoint(tmp_path / "step-00000002")[1]["step"] == 2


def test_ema_default_decay_and_logger_creates_missing_folders(tmp_path):
    assert EMA().decay == 0.999
    log = JSONLLogger(tmp_path / "a" / "b" / "metrics.jsonl"); at = SimpleNamespace(rank=0, step=0)
    log.on_fit_start(at); log.on_log(at, {"step": 1, "loss": 0.5}); log.on_fit_end(at)
    assert log.read() == [{"step": 1, "loss": 0.5}]


def test_make_optimizer_groups_and_hyperparameters():
    m = nn.ModuleDict({"conv": nn.Conv2d(2, 3, 3), "lin": nn.Linear(3, 4), "norm": nn.LayerNorm(4),
                       "frozen": nn.Linear(4, 4)})
    m["frozen"].requires_grad_(False)
    m.register_parameter("scale", nn.Parameter(torch.tensor(1.0)))
    opt = make_optimizer(m, TrainConfig(lr=0.02, weight_decay=0.3, betas=(0.8, 0.95), eps=1e-6))
    groups = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]
    assert groups == [({id(m["conv"].weight), id(m["lin"].weight)}, 0.3),
                      ({id(m["conv"].bias), id(m["lin"].bias), id(m["norm"].weight), id(m["norm"].bias), id(m.scale)}, 0.0)]
    assert all((g["lr"], g["betas"], g["eps"]) == (0.02, (0.8, 0.95), 1e-6) for g in opt.param_groups)
    assert isinstance(opt, torch.optim.AdamW)
    only_1d = make_optimizer(nn.LayerNorm(4), TrainConfig())
    assert len(only_1d.param_groups) == 1 and only_1d.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(InputError, match="^Trainer: the model has no trainable parameters"): make_optimizer(nn.Linear(2, 2).requires_grad_(False), TrainConfig())


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 20), chunk=st.integers(1, 25))
def test_split_batch_chunks_rows_in_order(B, chunk):
    x = torch.arange(B * 2).view(B, 2)
    batch = {"name": "fixed", "x": x, "pair": (x[:, 0], [x[:, 1]]), "present": {"x": torch.arange(B) % 2 == 0}}
    parts = split_batch(batch, chunk)
    assert len(parts) == -(-B // chunk)                                   # ceil(B / chunk)
    assert [p["x"].shape[0] for p in parts] == [min(chunk, B - i * chunk) for i in range(len(parts))]
    assert torch.equal(torch.cat([p["x"] for p in parts]), x)
    assert torch.equal(torch.cat([p["pair"][1][0] for p in parts]), x[:, 1])
    assert torch.equal(torch.cat([p["present"]["x"] for p in parts]), torch.arange(B) % 2 == 0)
    assert all(p["name"] == "fixed" and type(p["pair"]) is tuple and type(p["pair"][1]) is list for p in parts)


def test_split_batch_needs_a_tensor():
    with pytest.raises(InputError, match="split_batch: the batch holds no tensor"): split_batch({"a": [1, "x"]}, 2)
    assert [len(p[1]) for p in split_batch(["tag", torch.zeros(5)], 2)] == [2, 2, 1]   # size from the first tensor


def test_nonfinite_loss_as_a_bare_scalar_and_nonfinite_gradient_without_clipping():
    calls = []
    def loss(m, b):
        calls.append(1); v = _mse(m, b)
        return v * float("inf") if len(calls) == 3 else v
    m = nn.Linear(3, 1); before = None
    class Snap(Callback):
        def on_step_end(self, t): nonlocal before; before = [p.detach().clone() for p in t.model.parameters()]
    tr = Trainer(m, loss, _data(), TrainConfig(steps=5, device="cpu"), callbacks=[Snap()])
    with pytest.raises(NonFiniteError, match=r"step 3 \(micro-batch 1/1, epoch 0, batch 3\): term 'loss' is inf"):
        tr.fit()
    assert tr.step == 2 and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    bad = lambda m, b: torch.sqrt(m.bias * 0).sum() + _mse(m, b)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 1 .first bad parameter 'bias'"):
        Trainer(nn.Linear(3, 1), bad, _data(), TrainConfig(steps=2, clip_grad_norm=None, device="cpu")).fit()


def test_resume_refuses_callback_count_and_world_size_mismatch(tmp_path):
    cfg = TrainConfig(steps=2, device="cpu", out_dir=str(tmp_path), log_to=())
    Trainer(nn.Linear(3, 1), _mse, _data(), cfg, callbacks=[EMA(0.5)]).fit()
    with pytest.raises(CheckpointError, match="saved with 1 callbacks, this trainer has 0"):
        Trainer(nn.Linear(3, 1), _mse, _data(), cfg).resume(tmp_path)
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), cfg, callbacks=[EMA(0.5)]); tr.world = 2   # as if under torchrun
    with pytest.raises(CheckpointError, match=r"saved by 1 process\(es\), resumed with 2"): tr.resume(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        Trainer(nn.Linear(3, 1), _mse, _data(), cfg).resume(tmp_path / "nothing")
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), cfg, callbacks=[EMA(0.5)])
    assert tr.resume(tmp_path).name == "step-00000002" and tr.step == 2     # the newest under out_dir/checkpoints


def test_trainer_refuses_empty_data_gradless_loss_save_without_out_dir_and_shorter_data(tmp_path):
    with pytest.raises(InputError, match="data produced no batches"):
        Trainer(nn.Linear(3, 1), _mse, [], TrainConfig(steps=1, device="cpu")).fit()
    with pytest.raises(InputError, match="did not produce a gradient for any trainable parameter"):
        Trainer(nn.Linear(3, 1), lambda m, b: torch.ones((), requires_grad=True) * 2, _data(), TrainConfig(device="cpu")).fit()
    with pytest.raises(ConfigError, match="Trainer.save: TrainConfig.out_dir is None"):
        Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(device="cpu")).save()
    cfg = TrainConfig(steps=3, device="cpu", out_dir=str(tmp_path), log_to=())
    Trainer(nn.Linear(3, 1), _mse, _data(5), cfg).fit()                  # saved 3 batches into a 5-batch epoch
    with pytest.raises(CheckpointError, match="the data has fewer than 3 batches per epoch"):
        Trainer(nn.Linear(3, 1), _mse, _data(2), cfg).resume(tmp_path)


def test_eval_callback_runs_in_eval_mode_without_grad_and_restores_training():
    seen = []
    def fn(model):
        seen.append((model.training, torch.is_grad_enabled())); return {"n": torch.tensor(2.0), "k": 3}
    hist = Trainer(nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5)), _mse, _data(), TrainConfig(steps=2, device="cpu"),
                   callbacks=[EvalCallback(fn, prefix="val")]).fit()
    assert seen == [(False, False)] and hist[-1] == {"step": 2, "val/n": 2.0, "val/k": 3.0}
    modes = []
    class Mode(Callback):
        def on_step_start(self, t): modes.append(t.model.training)
    Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=4, eval_every=1, device="cpu"),
            callbacks=[EvalCallback(lambda m: {}), Mode()]).fit()
    assert modes == [True] * 4                                            # back in train mode after each evaluation


# ---------------------------------------------------------------------------------------------
# CUDA only (run through the device tool): fp16 with GradScaler, checkpoints of GPU tensors
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_fp16_accumulated_gradient_is_the_full_batch_gradient():
    "fp16 scales the loss (GradScaler) after dividing by K: unscaled, the gradient is the full-batch mean's."
    data = [(x.cuda(), y.cuda()) for x, y in _data(4)]
    class Check(Callback):
        n = 0
        def on_after_backward(self, t):
            got = [p.grad.double().cpu() / t.scaler.get_scale() for p in t.model.parameters()]
            rows = [tuple(r.cpu() for r in data[(t.step * 2 + i) % 4]) for i in range(2)]
            want = _naive_linear_grad([p.cpu() for p in t.model.parameters()], rows)
            for g, w in zip(got, want): torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-2)
            self.n += 1
    cb = Check()
    Trainer(nn.Linear(3, 1), _mse, data, TrainConfig(steps=2, grad_accum=2, precision="fp16", device="cuda"),
            callbacks=[cb]).fit()
    assert cb.n == 2


@pytest.mark.cuda
@needs_cuda
def test_encode_state_moves_gpu_tensors_to_the_cpu():
    tensors = {}
    state = encode_state({"w": torch.ones(2, device="cuda")}, tensors)
    assert state == {"w": {"__tensor__": "/w"}} and tensors["/w"].device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Settings supply the defaults (settings.ini < MMLAB_* variables); an explicit argument wins.
def _no_mmlab_env(monkeypatch):
    "Only the checkout's settings.ini speaks (no MMLAB_* variable leaks in from the caller's shell)."
    for k in [k for k in os.environ if k.startswith("MMLAB_") and k not in ("MMLAB_TEST_FLAGS", "MMLAB_TEST_CUDA_ARCH")]:
        monkeypatch.delenv(k)


def test_trainer_device_and_precision_come_from_the_settings(monkeypatch, tmp_path):
    _no_mmlab_env(monkeypatch)
    assert (TrainConfig().device, TrainConfig().precision) == (None, None)      # None: "the setting"
    if not torch.cuda.is_available():                                             # shipped auto/auto on a CPU: cpu, fp32
        tr = Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=1))
        assert (tr.device, tr.precision, tr.cfg.device, tr.cfg.precision) == (torch.device("cpu"), "fp32", "cpu", "fp32")
    monkeypatch.setenv("MMLAB_PRECISION", "bf16")
    cfg = TrainConfig(steps=2, device="cpu", out_dir=str(tmp_path))
    tr = Trainer(nn.Linear(3, 1), _mse, _data(), cfg)
    assert tr.precision == "bf16" and tr.cfg.precision == "bf16" and tr.cfg.device == "cpu"
    tr.fit()
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert (state["config"]["device"], state["config"]["precision"]) == ("cpu", "bf16")   # resolved values recorded
    assert Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(device="cpu", precision="fp32")).precision == "fp32"  # explicit wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_trainer_device_setting_is_read_and_explicit_device_wins(monkeypatch):
    _no_mmlab_env(monkeypatch)
    monkeypatch.setenv("MMLAB_DEVICE", "cuda")
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=1))
    assert Trainer(nn.Linear(3, 1), _mse, _data(), TrainConfig(steps=1, device="cpu")).device == torch.device("cpu")

def test_eval_callback_runs_without_gradients_in_eval_mode_and_restores_it_on_error():
    from mmlab.train import EvalCallback
    seen, model = {}, torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    def fn(m): seen.update(training=m.training, grad=torch.is_grad_enabled()); return {"x": 1.0}
    class FakeTrainer:
        step, records = 3, []
        def log(self, record): self.records.append(record)
    t = FakeTrainer(); t.model = model
    EvalCallback(fn).on_eval(t)
    assert seen == {"training": False, "grad": False} and model.training and t.records == [{"step": 3, "eval/x": 1.0}]
    with pytest.raises(ZeroDivisionError): EvalCallback(lambda m: 1 / 0).on_eval(t)
    assert model.training                                   # the failed evaluation left the model training
