"""Per-update time of `mmlab.train.Trainer` vs a minimal hand-written loop doing the same math (AdamW with the
same parameter groups, warmup+cosine LambdaLR, gradient clipping, loss.item() per step) on the same model,
initial weights and batches, CPU. The two are run interleaved (A B A B ...) so that load drift on the shared
machine hits both; medians over repeats, the ratio of medians, the ratio of the fastest runs (robust when
other jobs share the cores) and CPU time of this process are reported. `identical_losses` checks that the
two loops really do the same math (every logged loss equal bit for bit).

Two sizes: `mlp` (a 3-layer GELU MLP, 1.6M parameters, batch 128: a realistic small CPU step) for the target
(overhead <= 5%), and `tiny` (a 2-layer MLP, batch 16) where the fixed per-step cost of the Trainer is
all there is, reported in microseconds.

    python benchmarks/trainer_overhead.py [--smoke] [--threads 2] [--steps 20] [--repeats 11] [--sizes mlp,tiny] [--out F.json]
"""
import argparse, json, os, platform, statistics, time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from mmlab.train import Trainer, TrainConfig, make_optimizer, warmup_cosine

SIZES = {"mlp": dict(d_in=512, width=1024, depth=3, batch=128), "tiny": dict(d_in=16, width=32, depth=2, batch=16)}


def make_model(d_in, width, depth, seed=0):
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth - 1): layers += [nn.Linear(d, width), nn.GELU()]; d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def make_batches(n, d_in, batch):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, d_in, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def hand_loop(model, batches, cfg):
    "The minimal loop: what one would write by hand with the same optimiser, schedule and clipping."
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=cfg.warmup_steps,
                                                           total=cfg.steps, min_ratio=cfg.min_lr_ratio))
    model.train(); losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step(); sched.step()
        losses.append(loss.item())
    return time.perf_counter() - t0, time.process_time() - c0, losses


def trainer_loop(model, batches, cfg):
    tr = Trainer(model, loss_fn, batches, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = tr.fit()
    return time.perf_counter() - t0, time.process_time() - c0, [r["loss"] for r in hist]


def measure(size, steps, repeats):
    p = SIZES[size]
    batches = make_batches(min(steps, 20), p["d_in"], p["batch"])
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=5, clip_grad_norm=1.0, device="cpu")
    n_params = sum(q.numel() for q in make_model(p["d_in"], p["width"], p["depth"]).parameters())
    for fn in (hand_loop, trainer_loop):                       # warm-up (allocator, thread pools), not timed
        fn(make_model(p["d_in"], p["width"], p["depth"]), batches, TrainConfig(**{**cfg.__dict__, "steps": 3}))
    hand, trainer = [], []
    for r in range(repeats):                                   # interleaved, alternating which goes first
        order = [(hand_loop, hand), (trainer_loop, trainer)]
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            acc.append(fn(make_model(p["d_in"], p["width"], p["depth"]), batches, cfg))
    same_losses = all(h[2] == t[2] for h, t in zip(hand, trainer))   # identical math, so identical losses
    med = lambda xs, i: statistics.median(x[i] / steps for x in xs)
    low = lambda xs, i: min(x[i] / steps for x in xs)   # the least-disturbed run: robust on a loaded machine
    h_wall, t_wall, h_cpu, t_cpu = med(hand, 0), med(trainer, 0), med(hand, 1), med(trainer, 1)
    return dict(size=size, params=n_params, batch=p["batch"], steps=steps, repeats=repeats,
                hand_ms_per_step=1e3 * h_wall, trainer_ms_per_step=1e3 * t_wall,
                overhead_ratio_wall=t_wall / h_wall, overhead_us_per_step_wall=1e6 * (t_wall - h_wall),
                hand_cpu_ms_per_step=1e3 * h_cpu, trainer_cpu_ms_per_step=1e3 * t_cpu,
                overhead_ratio_cpu=t_cpu / h_cpu,
                hand_ms_per_step_min=1e3 * low(hand, 0), trainer_ms_per_step_min=1e3 * low(trainer, 0),
                overhead_ratio_wall_min=low(trainer, 0) / low(hand, 0),
                hand_ms_all=[1e3 * x[0] / steps for x in hand], trainer_ms_all=[1e3 * x[0] / steps for x in trainer],
                identical_losses=same_losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="3 steps, 1 repeat (CI)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the 2-core target)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--sizes", default="mlp,tiny", help="comma-separated subset of: " + ", ".join(SIZES))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    steps, repeats = (3, 1) if a.smoke else (a.steps, a.repeats)
    results = [measure(s, steps, repeats) for s in a.sizes.split(",")]
    res = dict(benchmark="trainer_overhead", smoke=a.smoke, threads=a.threads, torch=torch.__version__,
               cpu=platform.processor() or platform.machine(), cpus_visible=os.cpu_count(),
               load_average_1min=os.getloadavg()[0], results=results,
               target_overhead_ratio=1.05, within_target=results[0]["overhead_ratio_wall"] <= 1.05 if results[0]["size"] == "mlp" else None)
    print(json.dumps(res, indent=1))
    if a.out: a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
