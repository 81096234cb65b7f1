"""Forward+backward throughput of the default small towers on CPU, and the overhead of attention capture.

Usage: python benchmarks/encoders.py [--smoke] [--out results.json] [--repeats N] [--batch B]

What is compared, side by side in one run, for each tower (ViT-small on 64x64 images, audio-small on
2 s log-mels of 64 mel bins x 200 frames, text-small on 32 tokens; the `tiny` presets with --smoke):

- `sdpa`: the default path (torch.nn.functional.scaled_dot_product_attention);
- `capture`: the same model inside `capture_attention(model)` (all layers, all heads): the model
  still runs SDPA, and hooks recompute softmax(QK^T/sqrt(d)) on the side;
- `explicit`: the reference path (`fused_attn=False`), which materialises the attention matrix.

Two workloads: a training step (forward + backward of a scalar loss on the pooled vector, train
mode) and an inspection pass (forward only, eval mode, no_grad), the way attention capture is
normally used. The variants are interleaved within every repeat (sdpa, capture, explicit, sdpa, ...)
so that load changes on this shared machine hit all of them alike; times are medians over
`--repeats` after one warm-up call each; ratios are to `sdpa` in the same run. Throughput is
samples per second. Results go to JSON (stdout summary, `--out` file).

The video tower (`VideoEncoder`, the `small` preset on 64x64 frames, 8x8 patches, tubelets of 2 frames; `tiny` on
its 32x32 frames with --smoke) is timed in the same run for a training step (forward + backward, train mode) at 8 and 16 frames,
with joint and with divided (TimeSformer) space-time attention, interleaved within every repeat; medians
over `--repeats`, batch `--batch // 4` (video batches are smaller: a 16-frame clip is 512 tokens at `small`).
`divided_over_joint` is the ratio of the two medians at each clip length.
"""
import argparse, json, math, platform, statistics, sys, time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmlab.encoders import VideoConfig, VideoEncoder, capture_attention, count_flops, count_params, set_fused_attn
from mmlab.models import create_model

def make_inputs(name:str, batch:int, smoke:bool, g:torch.Generator) -> dict:
    "Inputs of the benchmark size for tower `name` (audio: 2 s; text: 32 tokens with some padding)."
    m = create_model(name)
    if name.startswith("vit"):
        return dict(x=torch.randn(batch, 3, *m.config.img_size, generator=g))
    if name.startswith("audio"):
        T = 60 if smoke else 200
        lengths = torch.randint(T // 2, T + 1, (batch,), generator=g); lengths[0] = T
        return dict(x=torch.randn(batch, m.config.n_mels, T, generator=g), lengths=lengths)
    L = 16 if smoke else 32
    pad = torch.zeros(batch, L, dtype=torch.bool)
    for i in range(1, batch): pad[i, int(torch.randint(L // 2, L + 1, (1,), generator=g)):] = True
    return dict(x=torch.randint(1, m.config.vocab_size, (batch, L), generator=g).masked_fill(pad, 0), padding_mask=pad)

def time_variants(model, inputs:dict, repeats:int, train:bool) -> dict:
    "Median seconds per call of each variant, interleaved within each repeat."
    def call(variant):
        set_fused_attn(model, variant != "explicit")
        ctx = capture_attention(model) if variant == "capture" else nullcontext()
        t0 = time.perf_counter()
        with ctx:
            if train:
                model(**inputs).pooled.square().mean().backward()
            else:
                with torch.no_grad(): model(**inputs)
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt
    model.train(train)
    variants = ("sdpa", "capture", "explicit")
    for v in variants: call(v)                                     # warm-up
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants: times[v].append(call(v))
    set_fused_attn(model, True)
    return {v: statistics.median(ts) for v, ts in times.items()}

def time_video(size:str, batch:int, repeats:int, g:torch.Generator, img_size:int=64) -> dict:
    "Median train-step seconds of the video tower, joint vs divided attention, at 8 and 16 frames (interleaved)."
    out = {}
    for frames in (8, 16):
        models = {att: VideoEncoder(VideoConfig.preset(size, num_frames=frames, img_size=img_size, attention=att)).train() for att in ("joint", "divided")}
        cfg = models["joint"].config
        x = torch.rand(batch, frames, cfg.in_chans, *cfg.img_size, generator=g)
        def call(m):
            t0 = time.perf_counter(); m(x).pooled.square().mean().backward(); dt = time.perf_counter() - t0
            m.zero_grad(set_to_none=True); return dt
        for m in models.values(): call(m)                                  # warm-up
        times = {att: [] for att in models}
        for _ in range(repeats):
            for att, m in models.items(): times[att].append(call(m))
        row = {att: dict(seconds=statistics.median(ts), times_s=ts, samples_per_s=batch / statistics.median(ts),
                         params=count_params(models[att]), tokens=math.prod(models[att].grid_size)) for att, ts in times.items()}
        row["divided_over_joint"] = row["divided"]["seconds"] / row["joint"]["seconds"]
        out[f"frames={frames}"] = row
    return dict(preset=f"video_{size}", batch=batch, input=f"(B, F, 3, {img_size}, {img_size})", frames=out)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny presets, batch 4, 3 repeats: seconds")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    a = ap.parse_args(argv)
    size = "tiny" if a.smoke else "small"
    batch = a.batch or (4 if a.smoke else 32)
    repeats = a.repeats or (3 if a.smoke else 10)
    torch.manual_seed(0); g = torch.Generator().manual_seed(0)
    res = dict(benchmark="encoders", smoke=a.smoke, batch=batch, repeats=repeats, torch=torch.__version__,
               threads=torch.get_num_threads(), machine=platform.machine(), processor=platform.processor(), towers={})
    for fam in ("vit", "audio", "text"):
        name = f"{fam}_{size}"
        model = create_model(name)
        inputs = make_inputs(name, batch, a.smoke, g)
        one = {k: v[:1] for k, v in inputs.items()}
        row = dict(params=count_params(model), gflops_fwd_per_sample=count_flops(model.eval(), **one) / 1e9,
                   input_shape=list(inputs["x"].shape))
        for workload, train in (("train_step", True), ("inspect_forward", False)):
            t = time_variants(model, inputs, repeats, train)
            row[workload] = {v: dict(seconds=s, samples_per_s=batch / s, ratio_to_sdpa=s / t["sdpa"]) for v, s in t.items()}
        res["towers"][name] = row
    res["video"] = time_video(size, max(1, batch // 4), repeats, g, img_size=32 if a.smoke else 64)
    print(f"{'tower':>12} {'workload':>16} {'sdpa/s':>9} {'capture/s':>10} {'explicit/s':>11} {'capture x':>10} {'explicit x':>11}")
    for name, row in res["towers"].items():
        for w in ("train_step", "inspect_forward"):
            r = row[w]
            print(f"{name:>12} {w:>16} {r['sdpa']['samples_per_s']:>9.1f} {r['capture']['samples_per_s']:>10.1f} "
                  f"{r['explicit']['samples_per_s']:>11.1f} {r['capture']['ratio_to_sdpa']:>10.2f} {r['explicit']['ratio_to_sdpa']:>11.2f}")
    v = res["video"]
    print(f"{v['preset']} train step (batch {v['batch']}):")
    for k, r in v["frames"].items():
        print(f"{k:>12} {r['joint']['tokens']:>5} tokens  joint {r['joint']['seconds'] * 1e3:8.1f} ms  "
              f"divided {r['divided']['seconds'] * 1e3:8.1f} ms  divided/joint {r['divided_over_joint']:.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    return res

if __name__ == "__main__":
    main()
