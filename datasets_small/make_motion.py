"""Generate the `motion` dataset: 8-frame 32x32 clips of one `shapes` object moving left/right/up/down,
growing or shrinking, a caption naming the motion, and a 1 s tone whose sound follows the motion.

    python datasets_small/make_motion.py            # writes datasets_small/motion/*.npz + meta.json

Seeded (SEED below) and byte-reproducible with the same Pillow / libopus versions; needs no espeak-ng.
`make_clips(split, n)` regenerates the first n clips of a split (the tests compare them with the files).

Motion is needed to tell the classes apart: every clip's *middle frame* (frame T // 2) draws the object's
centre and radius from one distribution for every class, and the path is laid around that state. So a
single frame carries no information on the class; two frames do.
"""
import json, sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from _speech import SAMPLE_RATE, OPUS_LEVEL, encode_opus, decode, logmel_corr, pack_bytes, save_npz
from make_shapes import COLOURS, COLOUR_NAMES, SHAPES, polygon

SEED = 20261205
OUT = Path(__file__).parent / "motion"
SIZE, T, FPS = 32, 8, 8                     # frames of SIZE x SIZE; T frames at FPS frames/s: a 1 s clip
MID = T // 2                                # the middle frame, the one `image` holds
LABELS = ["moving left", "moving right", "moving up", "moving down", "growing", "shrinking"]
VERBS = ["moves left", "moves right", "moves up", "moves down", "grows", "shrinks"]
SPLITS = {"train": 1800, "val": 300, "test": 300}
CENTRE = (11.0, 21.0)    # middle-frame centre, x and y, uniform in this range (px), for every class
RADIUS = (3.5, 5.0)      # middle-frame half-extent (px), uniform, for every class
SPEED = (0.75, 1.25)     # px per frame (left/right/up/down)
GROWTH = (1.06, 1.10)    # radius factor per frame (growing; its inverse for shrinking)


def render(shape, colour, cx, cy, r, bg, ss=4):
    "One 32x32 frame: the object drawn at `ss`x and box-downsampled (anti-aliased), as make_shapes draws."
    im = Image.new("RGB", (SIZE * ss, SIZE * ss), bg)
    pts = polygon(shape, cx * ss, cy * ss, r * ss)
    d = ImageDraw.Draw(im)
    if shape == "circle": d.ellipse(pts, fill=COLOURS[colour])
    else: d.polygon(pts, fill=COLOURS[colour])
    return np.asarray(im.resize((SIZE, SIZE), Image.BOX))


def path(rng, label):
    "Centre x, y and radius at each frame (T,) each: the middle-frame state drawn first, the motion around it."
    cx, cy = rng.uniform(*CENTRE, 2); r = rng.uniform(*RADIUS)
    k = np.arange(T) - MID                                   # frames relative to the middle one
    v, g = rng.uniform(*SPEED), rng.uniform(*GROWTH)
    dx = {0: -v, 1: v}.get(label, 0.0); dy = {2: -v, 3: v}.get(label, 0.0)   # image y grows downwards
    grow = {4: g, 5: 1 / g}.get(label, 1.0)
    return cx + dx * k, cy + dy * k, r * grow ** k.astype(float), dict(speed=v if label < 4 else g)


def tone(xs, ys, rs):
    """The clip's sound, 1 s at 16 kHz: pitch follows height (440 Hz at mid-height, an octave per 8 px up),
    brightness follows x (share of the 3rd harmonic = x / 32), loudness follows size (amplitude = r / 10)."""
    n = SAMPLE_RATE * T // FPS
    u = (np.arange(n) + 0.5) / n * T - 0.5                    # continuous frame index of each sample
    frame = np.arange(T)
    x, y, r = (np.interp(u, frame, a) for a in (xs, ys, rs))
    f = 440.0 * 2 ** ((SIZE / 2 - y) / 8)
    phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
    h = np.clip(x / SIZE, 0, 1)
    wave = (r / 10) * ((1 - h) * np.sin(phase) + h * np.sin(3 * phase))
    ramp = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))   # 10 ms fades
    return (wave * ramp).astype(np.float32)


def caption(rng, shape, colour, label):
    "One of five templates; one leaves the colour out."
    m, vb = LABELS[label], VERBS[label]
    return [f"a {colour} {shape} {m}", f"the {colour} {shape} {vb}", f"a {shape} {m}",
            f"there is a {colour} {shape} {m}", f"a {colour} {shape} that {vb}"][rng.integers(5)]


def make_clip(seed, label):
    "Frames (T, 32, 32, 3) uint8, caption, Opus bytes and attributes of one clip of class `label`."
    rng = np.random.default_rng(seed)
    shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    xs, ys, rs, extra = path(rng, label)
    g = int(rng.integers(225, 246)); bg = (g, g, g)
    video = np.stack([render(shape, colour, x, y, r, bg) for x, y, r in zip(xs, ys, rs)])
    text = caption(rng, shape, colour, label)
    wave = tone(xs, ys, rs); blob = encode_opus(wave)
    attrs = dict(shape=SHAPES.index(shape), colour=COLOUR_NAMES.index(colour), x=round(xs[MID] * 10),
                 y=round(ys[MID] * 10), radius=round(rs[MID] * 10), speed=round(extra["speed"] * 100))
    return video, text, blob, attrs, wave


def split_seeds(split):
    "Per-clip seeds of `split` (SeedSequence children, one per clip) and the balanced, shuffled labels."
    i = list(SPLITS).index(split)
    child = np.random.SeedSequence(SEED).spawn(len(SPLITS))[i]
    n = SPLITS[split]
    seeds = [int(c.generate_state(1)[0]) for c in child.spawn(n)]
    labels = np.random.default_rng(child.generate_state(1)[0]).permutation(np.arange(n) % len(LABELS))
    return seeds, labels


def make_clips(split, n=None, waves=None):
    "The arrays of the first `n` clips of `split` (all when None), as stored in <split>.npz; `waves` (a list) gets the tones."
    seeds, labels = split_seeds(split)
    n = len(seeds) if n is None else n
    res = [make_clip(s, int(l)) for s, l in zip(seeds[:n], labels[:n])]
    videos, texts, blobs, recs, _ = zip(*res)
    audio_bytes, audio_offsets = pack_bytes(blobs)
    arrays = dict(video=np.stack(videos).astype(np.uint8), text=np.array(texts), audio_bytes=audio_bytes,
                  audio_offsets=audio_offsets, label=np.asarray(labels[:n], dtype=np.int64))
    for k in recs[0]: arrays[f"attr_{k}"] = np.array([r[k] for r in recs], dtype=np.int64)
    if waves is not None: waves.extend(r[-1] for r in res)
    return arrays


def main():
    OUT.mkdir(exist_ok=True)
    summary = {}
    for split in SPLITS:
        waves = []; arrays = make_clips(split, waves=waves)
        save_npz(OUT / f"{split}.npz", **arrays)
        off, ab = arrays["audio_offsets"], arrays["audio_bytes"]
        dec = [decode(ab[off[c]:off[c + 1]].tobytes()) for c in range(len(off) - 1)]
        d = np.array([len(x) / SAMPLE_RATE for x in dec]); rms = np.array([np.sqrt(np.mean(x ** 2)) for x in dec])
        c = np.array([logmel_corr(w, x) for w, x in zip(waves, dec)])
        summary[split] = dict(n=len(arrays["label"]), dur_min=float(d.min()), dur_max=float(d.max()), dur_mean=float(d.mean()),
                              rms_min=float(rms.min()), logmel_corr_min=float(c.min()), logmel_corr_median=float(np.median(c)),
                              label_counts=np.bincount(arrays["label"], minlength=len(LABELS)).tolist())
        print(split, summary[split], flush=True)
    meta = dict(name="motion", modalities=["image", "audio", "text", "video"], sample_rate=SAMPLE_RATE, image_size=SIZE,
                num_frames=T, fps=FPS, middle_frame=MID, seed=SEED, splits=SPLITS, label_names=LABELS,
                vocab=dict(shape=SHAPES, colour=COLOUR_NAMES),
                units=dict(x="0.1 px (middle frame)", y="0.1 px (middle frame)", radius="0.1 px (middle frame)",
                           speed="0.01 px/frame (moving) or 0.01 x radius factor/frame (growing, shrinking)"),
                image="derived at load time: the middle frame video[:, T // 2]",
                audio_rule="pitch 440 Hz * 2^((16 - y) / 8) (rises as the object moves up); 3rd-harmonic share x / 32 "
                           "(brighter to the right); amplitude radius / 10 (louder as it grows)",
                audio_codec=f"Ogg/Opus, libsndfile compression_level={OPUS_LEVEL}", generation_stats=summary)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
