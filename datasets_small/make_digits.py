"""Generate the `digits` dataset: scikit-learn's real 8x8 handwritten digits paired *by class* with spoken
digits (espeak-ng, many speakers / speeds / pitches, 16 kHz Ogg/Opus) and a short text, in the AV-MNIST style.

    python datasets_small/make_digits.py            # writes datasets_small/digits/*.npz + meta.json

The 8x8 images are copied from `sklearn.datasets.load_digits` (UCI "Optical Recognition of Handwritten
Digits", CC BY 4.0) into the npz files, so *using* the data needs neither scikit-learn nor espeak-ng.
Speakers are split disjointly: no (accent, voice) pair speaks in more than one split.
"""
import json, sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speech import SPEAKERS, SAMPLE_RATE, synth, encode_opus, decode, pack_bytes, logmel_corr, OPUS_LEVEL, save_npz

SEED = 20261124
OUT = Path(__file__).parent / "digits"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_SPEAKERS = {"train": 64, "val": 16, "test": 16}
N_IMAGES = {"val": 30, "test": 30}          # images per class in val and test; the rest is train
UTTERANCES = 2                              # each speaker says each digit this many times (new speed/pitch)
TEMPLATES = ["{w}", "the digit {d}", "a handwritten {w}", "number {w}", "{d}", "this is a {w}", "the number {d}"]


def make_clip(args):
    "Speak one digit word (runs in a worker); returns the Opus bytes and sanity statistics."
    digit, speaker, speed, pitch = args
    wav = synth(WORDS[digit], SPEAKERS[speaker], speed, pitch)
    blob = encode_opus(wav)
    dec = decode(blob)
    return blob, dict(dur=len(dec) / SAMPLE_RATE, rms=float(np.sqrt(np.mean(dec ** 2))), corr=logmel_corr(wav, dec))


def main():
    from sklearn.datasets import load_digits
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(SEED)
    X, y = load_digits(return_X_y=True)
    X = X.reshape(-1, 8, 8).astype(np.uint8)           # values 0..16
    # stratified image split
    idx = {s: [] for s in ["train", "val", "test"]}
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(y == c))
        idx["val"] += ids[:N_IMAGES["val"]].tolist()
        idx["test"] += ids[N_IMAGES["val"]:N_IMAGES["val"] + N_IMAGES["test"]].tolist()
        idx["train"] += ids[N_IMAGES["val"] + N_IMAGES["test"]:].tolist()
    # disjoint speaker split
    perm = rng.permutation(len(SPEAKERS)).tolist()
    spk, start = {}, 0
    for s, n in N_SPEAKERS.items(): spk[s] = sorted(perm[start:start + n]); start += n
    summary = {}
    with Pool(2) as pool:
        for split in ["train", "val", "test"]:
            jobs = [(d, s, int(rng.integers(140, 221)), int(rng.integers(20, 81)))
                    for s in spk[split] for d in range(10) for _ in range(UTTERANCES)]
            res = pool.map(make_clip, jobs, chunksize=16)
            blobs, stats = zip(*res)
            clip_label = np.array([j[0] for j in jobs]); clip_speaker = np.array([j[1] for j in jobs])
            ids = np.array(sorted(idx[split]))
            labels = y[ids]
            # pair every image with a clip of the same class from this split's speakers
            pair = np.array([rng.choice(np.flatnonzero(clip_label == c)) for c in labels])
            texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[c], d=c) for c in labels]
            audio_bytes, audio_offsets = pack_bytes(blobs)
            save_npz(OUT / f"{split}.npz", image=X[ids], label=labels.astype(np.int64), text=np.array(texts),
                                sklearn_index=ids.astype(np.int64), clip=pair.astype(np.int64),
                                audio_bytes=audio_bytes, audio_offsets=audio_offsets,
                                clip_label=clip_label.astype(np.int64), clip_speaker=clip_speaker.astype(np.int64),
                                clip_speed=np.array([j[2] for j in jobs], dtype=np.int64),
                                clip_pitch=np.array([j[3] for j in jobs], dtype=np.int64))
            d = np.array([s["dur"] for s in stats]); rms = np.array([s["rms"] for s in stats])
            c = np.array([s["corr"] for s in stats])
            summary[split] = dict(n=len(ids), n_clips=len(jobs), n_speakers=len(spk[split]),
                                  dur_min=float(d.min()), dur_max=float(d.max()), dur_mean=float(d.mean()),
                                  rms_min=float(rms.min()), logmel_corr_min=float(c.min()),
                                  logmel_corr_median=float(np.median(c)),
                                  label_counts=np.bincount(labels, minlength=10).tolist())
            print(split, summary[split], flush=True)
    meta = dict(name="digits", sample_rate=SAMPLE_RATE, image_size=8, default_image_size=32, seed=SEED,
                splits={s: summary[s]["n"] for s in summary}, label_names=WORDS,
                speakers={s: [SPEAKERS[i] for i in v] for s, v in spk.items()}, vocab=dict(speaker=SPEAKERS),
                audio_codec=f"Ogg/Opus, libsndfile compression_level={OPUS_LEVEL}", generation_stats=summary)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
