"""Generate the `shapes` dataset: synthetic 64x64 scenes of one or two coloured shapes, a written caption,
the same caption spoken by espeak-ng (16 kHz Ogg/Opus), and attribute labels.

    python datasets_small/make_shapes.py            # writes datasets_small/shapes/*.npz + meta.json

Re-runnable and seeded (SEED below): the same espeak-ng / libopus versions give byte-identical files.
Needs the Debian package espeak-ng; *using* the data needs only numpy + soundfile.
"""
import json, sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from _speech import SPEAKERS, SAMPLE_RATE, synth, encode_opus, decode, pack_bytes, logmel_corr, OPUS_LEVEL, save_npz

SEED = 20261123
OUT = Path(__file__).parent / "shapes"
SIZE = 64
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
COLOURS = {"red": (215, 38, 38), "green": (36, 160, 64), "blue": (40, 80, 215), "yellow": (230, 200, 30),
           "purple": (140, 60, 185), "orange": (240, 128, 20)}
COLOUR_NAMES = list(COLOURS)
SIZES = ["small", "large"]
RELATIONS = ["left of", "right of", "above", "below"]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# (shape, colour) pairs that never occur in train/val/test, only in the compositional split.
# One per shape and one per colour, so every shape and every colour is still seen in training.
HELD_OUT = [("circle", "green"), ("square", "yellow"), ("triangle", "purple"), ("diamond", "orange"),
            ("star", "red")]
SPLITS = {"train": 2000, "val": 250, "test": 250, "compositional": 400}
P_SINGLE = 0.4  # fraction of scenes with one shape


def polygon(shape, cx, cy, r):
    "Vertices (or bbox for circle) of `shape` with centre (cx, cy) and half-extent r."
    if shape == "circle": return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square": r = r * 0.85; return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle": return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond": return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        rr = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + q * np.cos(t), cy - q * np.sin(t)) for q, t in zip(rr, a)]
    raise ValueError(shape)


def render(objs, bg, ss=4):
    "Draw objects [(shape, colour, size, cx, cy, r)] at `ss`x supersampling, downsample with a box filter."
    im = Image.new("RGB", (SIZE * ss, SIZE * ss), bg)
    d = ImageDraw.Draw(im)
    for shape, colour, _, cx, cy, r in objs:
        pts = polygon(shape, cx * ss, cy * ss, r * ss)
        if shape == "circle": d.ellipse(pts, fill=COLOURS[colour])
        else: d.polygon(pts, fill=COLOURS[colour])
    return np.asarray(im.resize((SIZE, SIZE), Image.BOX))


def radius(rng, size): return rng.uniform(6, 8) if size == "small" else rng.uniform(11, 14)


def place(rng, objs_attrs, relation):
    "Centres for one object anywhere, or two objects whose layout makes `relation` (obj1 rel obj2) unambiguous."
    rs = [radius(rng, a[2]) for a in objs_attrs]
    if len(rs) == 1:
        r = rs[0]; return [(rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1), r)]
    r1, r2 = rs
    for _ in range(1000):
        c1 = rng.uniform(r1 + 1, SIZE - r1 - 1, 2); c2 = rng.uniform(r2 + 1, SIZE - r2 - 1, 2)
        ax = 0 if relation in ("left of", "right of") else 1
        sign = -1 if relation in ("left of", "above") else 1        # image y grows downwards
        d = c1 - c2
        if sign * d[ax] < r1 + r2 + 2: continue                       # separated along the axis, no overlap
        if abs(d[1 - ax]) > 0.5 * abs(d[ax]): continue                # mostly along that axis
        return [(c1[0], c1[1], r1), (c2[0], c2[1], r2)]
    raise RuntimeError("could not place objects")


def caption(rng, objs, relation):
    "One of several templates; some omit the size (real captions are incomplete too)."
    def np_(o, det="a", size=True): return f"{det} {o[2] + ' ' if size else ''}{o[1]} {o[0]}"
    if len(objs) == 1:
        o = objs[0]
        t = rng.integers(5)
        return [f"{np_(o)}", f"there is {np_(o)}", f"a picture of {np_(o)}", f"one {o[2]} {o[1]} {o[0]}",
                f"{np_(o, size=False)}"][t]
    a, b = objs
    rel = relation
    t = rng.integers(6)
    return [f"{np_(a)} {rel} {np_(b)}",
            f"{np_(a, 'the', False)} is {rel} {np_(b, 'the', False)}",
            f"there is {np_(a)} {rel} {np_(b)}",
            f"{np_(b)} {INVERSE[rel]} {np_(a)}",
            f"{np_(a)} to the {rel} {np_(b)}" if rel in ("left of", "right of") else f"{np_(a)} just {rel} {np_(b)}",
            f"{np_(a, 'the')} and {np_(b, 'the')}, the {a[0]} {rel} the {b[0]}"][t]


def sample_scene(rng, compositional):
    "Attributes of one scene; compositional scenes put a held-out (shape, colour) pair on object 1."
    n = 1 if rng.random() < P_SINGLE else 2
    objs = []
    for k in range(n):
        while True:
            sh, co = SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            held = (sh, co) in HELD_OUT
            if k == 0 and compositional and not held: continue
            if not compositional and held: continue
            if k == 1 and compositional and held: continue   # only object 1 is the novel pair
            break
        objs.append((sh, co, SIZES[rng.integers(2)]))
    relation = RELATIONS[rng.integers(4)] if n == 2 else None
    return objs, relation


def make_item(args):
    "Render, caption and speak one scene (runs in a worker)."
    seed, compositional = args
    rng = np.random.default_rng(seed)
    attrs, relation = sample_scene(rng, compositional)
    centres = place(rng, attrs, relation)
    objs = [(*a, *c) for a, c in zip(attrs, centres)]
    g = int(rng.integers(225, 246)); bg = (g, g, g)
    img = render(objs, bg)
    text = caption(rng, objs, relation)
    spk = int(rng.integers(len(SPEAKERS))); speed = int(rng.integers(150, 211)); pitch = int(rng.integers(25, 76))
    wav = synth(text, SPEAKERS[spk], speed, pitch)
    blob = encode_opus(wav)
    dec = decode(blob)
    rec = dict(shape=SHAPES.index(attrs[0][0]), colour=COLOUR_NAMES.index(attrs[0][1]), size=SIZES.index(attrs[0][2]),
               shape2=SHAPES.index(attrs[1][0]) if len(attrs) > 1 else -1,
               colour2=COLOUR_NAMES.index(attrs[1][1]) if len(attrs) > 1 else -1,
               size2=SIZES.index(attrs[1][2]) if len(attrs) > 1 else -1,
               relation=RELATIONS.index(relation) if relation else -1, n_objects=len(attrs),
               speaker=spk, speed=speed, pitch=pitch)
    stats = dict(dur=len(dec) / SAMPLE_RATE, rms=float(np.sqrt(np.mean(dec ** 2))), corr=logmel_corr(wav, dec))
    return img, text, blob, rec, stats


def main():
    OUT.mkdir(exist_ok=True)
    ss = np.random.SeedSequence(SEED)
    seeds = {s: [int(c.generate_state(1)[0]) for c in child.spawn(n)]
             for (s, n), child in zip(SPLITS.items(), ss.spawn(len(SPLITS)))}
    summary = {}
    with Pool(2) as pool:
        for split, sd in seeds.items():
            res = pool.map(make_item, [(x, split == "compositional") for x in sd], chunksize=16)
            imgs, texts, blobs, recs, stats = zip(*res)
            audio_bytes, audio_offsets = pack_bytes(blobs)
            arrays = dict(image=np.stack(imgs).astype(np.uint8), text=np.array(texts),
                          audio_bytes=audio_bytes, audio_offsets=audio_offsets,
                          label=np.array([r["shape"] for r in recs], dtype=np.int64))
            for k in recs[0]: arrays[f"attr_{k}"] = np.array([r[k] for r in recs], dtype=np.int64)
            save_npz(OUT / f"{split}.npz", **arrays)
            d = np.array([s["dur"] for s in stats]); rms = np.array([s["rms"] for s in stats])
            c = np.array([s["corr"] for s in stats])
            summary[split] = dict(n=len(res), dur_min=float(d.min()), dur_max=float(d.max()), dur_mean=float(d.mean()),
                                  rms_min=float(rms.min()), logmel_corr_min=float(c.min()),
                                  logmel_corr_median=float(np.median(c)),
                                  label_counts=np.bincount(arrays["label"], minlength=len(SHAPES)).tolist())
            print(split, summary[split], flush=True)
    meta = dict(name="shapes", sample_rate=SAMPLE_RATE, image_size=SIZE, seed=SEED, splits=SPLITS,
                label_names=SHAPES,
                vocab=dict(shape=SHAPES, colour=COLOUR_NAMES, size=SIZES, shape2=SHAPES, colour2=COLOUR_NAMES,
                           size2=SIZES, relation=RELATIONS, speaker=SPEAKERS),
                held_out=[list(p) for p in HELD_OUT], audio_codec=f"Ogg/Opus, libsndfile compression_level={OPUS_LEVEL}",
                generation_stats=summary)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
