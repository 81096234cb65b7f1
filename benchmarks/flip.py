"""Training-step time of FLIP (Li et al. 2023: CLIP on a random part of the image patches) at 50 % and 75 % of the
patches hidden vs full-patch CLIP, side by side in one run: the clip recipe's model and loss (`image_mask_ratio`),
one step = forward + backward + AdamW step, on the same initial weights and the same synthetic image-text batch.
The configurations run interleaved (A B C A B C ..., rotating which goes first) so that load drift on a shared
machine hits all; medians over repeats, ratios of medians to full-patch CLIP, and the ratio of the fastest runs
(robust when other jobs share the cores). `tokens` is what the image tower encodes per image ([CLS] included);
`same_as_clip_at_zero` checks that ratio 0 computes exactly CLIP's loss (the switch off is the old code path).

Sizes: `small` (the kit's ViT preset: 64x64 images, 64 patches, width 192, 6 blocks; batch 64) and `tiny` (32x32, 16
patches, width 64, 2 blocks; batch 64), where the text tower and the fixed costs take a larger share; `base`
(ViT-B/16 at 224: 196 patches; for a GPU, --device cuda).

    python benchmarks/flip.py [--smoke] [--threads 2] [--steps 5] [--repeats 7] [--sizes small,tiny] [--device cpu] [--out F.json]
"""
import argparse, json, os, platform, statistics, time
from dataclasses import replace
from pathlib import Path

import torch

from mmlab.recipes import ClipRecipe, build_model, contrastive_loss_fn
from mmlab.train import TrainConfig, make_optimizer

SIZES = {"tiny": dict(batch=64), "small": dict(batch=64), "base": dict(batch=128)}
RATIOS = (0.0, 0.5, 0.75)


def make_batch(recipe, B, device):
    "A synthetic image-text batch at the preset's image size (labels all distinct: plain InfoNCE targets)."
    g = torch.Generator().manual_seed(1)
    side = build_model(recipe).towers["image"].config.img_size
    return {"image": torch.rand(B, 3, *side, generator=g).to(device),
            "text": torch.randint(1, 100, (B, recipe.max_len), generator=g).to(device), "label": torch.arange(B).to(device)}


def step_time(recipe, batch, steps, device):
    "Seconds per training step (forward + backward + AdamW) of `recipe` on `batch`, after one untimed step; the losses."
    model = build_model(recipe).to(device).train()
    opt, loss_fn = make_optimizer(model, TrainConfig(lr=1e-4, device=str(device))), contrastive_loss_fn(recipe)
    losses = []
    def one():
        opt.zero_grad(set_to_none=True)
        loss = sum(loss_fn(model, batch).values()); loss.backward(); opt.step(); losses.append(loss.item())
    torch.manual_seed(0); one()                                   # warm-up: allocator, autograd graph, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync(); t0 = time.perf_counter()
    for _ in range(steps): one()
    sync()
    return (time.perf_counter() - t0) / steps, losses


def measure(size, steps, repeats, device, batch_size=None):
    B = batch_size or SIZES[size]["batch"]
    base = ClipRecipe(size=size, modalities=("image", "text"), targets="diagonal", device=str(device), precision="fp32")
    recipes = {r: replace(base, image_mask_ratio=r) for r in RATIOS}
    batch = make_batch(base, B, device)
    times = {r: [] for r in RATIOS}
    for rep in range(repeats):                                    # interleaved, rotating which configuration goes first
        order = list(RATIOS[rep % 3:] + RATIOS[:rep % 3])
        for r in order: times[r].append(step_time(recipes[r], batch, steps, device)[0])
    with torch.no_grad():                                         # the switch at 0 is CLIP's loss, bit for bit
        model = build_model(base).to(device)
        clip_terms = contrastive_loss_fn(base)(model, batch)
        zero_terms = contrastive_loss_fn(recipes[0.0])(model, batch)
    vit = model.towers["image"]; N = vit.grid_size[0] * vit.grid_size[1]
    med = {r: statistics.median(t) for r, t in times.items()}; low = {r: min(t) for r, t in times.items()}
    rows = [dict(image_mask_ratio=r, tokens=vit.num_prefix_tokens + N - round(r * N), ms_per_step=1e3 * med[r],
                 ms_per_step_min=1e3 * low[r], ms_all=[1e3 * t for t in times[r]], time_vs_clip=med[r] / med[0.0],
                 time_vs_clip_min=low[r] / low[0.0], speedup=med[0.0] / med[r], pairs_per_s=B / med[r]) for r in RATIOS]
    return dict(size=size, batch=B, patches=N, steps=steps, repeats=repeats, rows=rows,
                same_as_clip_at_zero=all(torch.equal(clip_terms[k], zero_terms[k]) for k in clip_terms))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny size, batch 8, 1 step, 1 repeat (CI)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the 2-core target)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="small,tiny", help="comma-separated subset of: " + ", ".join(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sizes, steps, repeats = (["tiny"], 1, 1) if a.smoke else (a.sizes.split(","), a.steps, a.repeats)
    results = [measure(s, steps, repeats, device, 8 if a.smoke else None) for s in sizes]
    res = dict(benchmark="flip", smoke=a.smoke, threads=a.threads, device=str(device), torch=torch.__version__,
               cpu=platform.processor() or platform.machine(), cpus_visible=os.cpu_count(),
               load_average_1min=os.getloadavg()[0], results=results)
    print(json.dumps(res, indent=1))
    if a.out: a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
