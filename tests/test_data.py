"""Tests of mmlab.data beyond the chapter: the shipped files against DATASHEET.md, split properties
(compositional held-out pairs, disjoint speakers), speech sanity, every kind of broken input made
with real files, caching and reproducible loaders with worker processes."""
import hashlib, io, json, re, warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmlab.core import ConfigError, DataError, MissingFileError, MMLabError, get_settings
from mmlab.data import (CharTokenizer, FeatureCache, HFTokenizer, LogMel, ManifestDataset, SpecAugment, collate,
                        dataset_meta, decode_audio, load_dataset, make_loader, make_tiny_hf_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets_small"
SHEET = (DATA / "DATASHEET.md").read_text()


def sheet_files():
    "Rows `| path | items | bytes | sha256 |` of the datasheet's file table."
    rows = re.findall(r"^\| `([^`]+)` \| (\d+|-) \| (\d+) \| ([0-9a-f]{64}) \|$", SHEET, re.M)
    assert rows, "DATASHEET.md has no file table"
    return [(p, None if n == "-" else int(n), int(b), h) for p, n, b, h in rows]


# ---------------------------------------------------------------- files, sizes, counts

def test_checksums_and_sizes_match_datasheet():
    for rel, _, nbytes, sha in sheet_files():
        p = DATA / rel
        assert p.is_file(), f"{rel} listed in DATASHEET.md but missing"
        data = p.read_bytes()
        assert len(data) == nbytes, f"{rel}: {len(data)} bytes, datasheet says {nbytes}"
        assert hashlib.sha256(data).hexdigest() == sha, f"{rel}: sha256 differs from DATASHEET.md"


def test_every_data_file_is_in_datasheet_and_budget():
    listed = {p for p, *_ in sheet_files()}
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.suffix in (".npz", ".json")}
    assert shipped == listed
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total <= 24 * 2**20, f"datasets_small/ is {total / 2**20:.1f} MiB > 24 MiB"
    m = re.search(r"Total size: ([\d.]+) MiB", SHEET)
    assert m and abs(float(m.group(1)) - total / 2**20) < 0.1, "total size in DATASHEET.md is stale"


@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_counts_match_datasheet_and_meta(name):
    meta = dataset_meta(name)
    for rel, n, _, _ in sheet_files():
        if rel.startswith(f"{name}/") and rel.endswith(".npz"):
            split = Path(rel).stem
            ds = load_dataset(name, split, modalities=["text"])
            assert len(ds) == n == meta["splits"][split], (name, split, len(ds), n)
            assert len(ds.labels) == n and all(len(v) == n for v in ds.attrs.values())


# ---------------------------------------------------------------- split properties

def pairs(ds, both=True):
    a = ds.attrs
    s = {(int(x), int(y)) for x, y in zip(a["shape"], a["colour"])}
    if both: s |= {(int(x), int(y)) for x, y in zip(a["shape2"], a["colour2"]) if x >= 0}
    return s


def test_compositional_split_has_no_train_combination():
    tr, comp = load_dataset("shapes", "train", ["text"]), load_dataset("shapes", "compositional", ["text"])
    novel = {(int(x), int(y)) for x, y in zip(comp.attrs["shape"], comp.attrs["colour"])}
    assert novel and not (novel & pairs(tr)), "a compositional (shape, colour) pair occurs in train"
    for split in ["val", "test"]:
        assert not (novel & pairs(load_dataset("shapes", split, ["text"])))
    # every shape and every colour is still seen in training, only the combinations are new
    assert {s for s, _ in pairs(tr)} == set(range(5)) and {c for _, c in pairs(tr)} == set(range(6))
    # full scene descriptions are disjoint as well
    keys = ["shape", "colour", "size", "shape2", "colour2", "size2", "relation"]
    combo = lambda ds: set(zip(*[ds.attrs[k].tolist() for k in keys]))
    assert not (combo(tr) & combo(comp))
    # names in meta.json agree with what the captions say
    meta = dataset_meta("shapes")
    for i in range(len(comp)):
        sh, co = meta["vocab"]["shape"][comp.attrs["shape"][i]], meta["vocab"]["colour"][comp.attrs["colour"][i]]
        assert sh in str(comp.texts[i]) and co in str(comp.texts[i]), (i, comp.texts[i])
        assert [sh, co] in meta["held_out"]


def test_digits_speakers_disjoint_and_pairs_match_class():
    sp = {s: set(load_dataset("digits", s, ["text"]).attrs["speaker"].tolist()) for s in ["train", "val", "test"]}
    assert not (sp["train"] & sp["test"]) and not (sp["train"] & sp["val"]) and not (sp["val"] & sp["test"])
    meta = dataset_meta("digits")
    for s in sp:
        assert len(sp[s]) == len(meta["speakers"][s])
        with np.load(DATA / "digits" / f"{s}.npz") as z:
            assert (z["clip_label"][z["clip"]] == z["label"]).all(), "an image is paired with a clip of another class"
            assert z["image"].max() <= 16 and z["image"].shape[1:] == (8, 8)
    # images: the three splits partition sklearn's 1797 digits
    idx = [np.load(DATA / "digits" / f"{s}.npz")["sklearn_index"] for s in sp]
    allidx = np.concatenate(idx)
    assert len(allidx) == len(set(allidx.tolist())) == 1797


def test_digits_images_are_sklearns():
    sk = pytest.importorskip("sklearn.datasets")
    X, y = sk.load_digits(return_X_y=True)
    with np.load(DATA / "digits" / "test.npz") as z:
        np.testing.assert_array_equal(z["image"].reshape(len(z["image"]), -1), X[z["sklearn_index"]])
        np.testing.assert_array_equal(z["label"], y[z["sklearn_index"]])


# ---------------------------------------------------------------- speech sanity (every clip)

@pytest.mark.parametrize("name", ["shapes", "digits"])
def test_every_clip_decodes_with_speech_like_energy_and_duration(name):
    meta = dataset_meta(name)
    for split in meta["splits"]:
        with np.load(DATA / name / f"{split}.npz") as z:
            off, raw = z["audio_offsets"], z["audio_bytes"]
            texts = z["text"] if name == "shapes" else None
            durs = []
            for c in range(len(off) - 1):
                x = decode_audio(raw[off[c]:off[c + 1]].tobytes(), f"{name}/{split} clip {c}").numpy()
                dur = len(x) / 16000; durs.append(dur)
                rms = np.sqrt(np.mean(x ** 2))
                assert 0.02 < rms < 0.5, (split, c, rms)            # not silent, not clipped noise
                assert np.abs(x).max() <= 1.0 + 1e-6
                # speech-like: 20 ms frames, a clear share loud and the start/end trimmed of long silence
                fr = x[: len(x) // 320 * 320].reshape(-1, 320)
                e = np.sqrt((fr ** 2).mean(1))
                assert (e > 0.1 * e.max()).mean() > 0.2, (split, c)
                if texts is not None:                               # 1.2 .. 6 words per second
                    wps = len(str(texts[c]).split()) / dur
                    assert 1.2 < wps < 6.0, (split, c, texts[c], dur)
            st = meta["generation_stats"][split]
            assert abs(min(durs) - st["dur_min"]) < 0.03 and abs(max(durs) - st["dur_max"]) < 0.03


# ---------------------------------------------------------------- items, transforms, cache

def test_item_contract_and_modality_subset():
    ds = load_dataset("digits", "train")
    it = ds[0]
    assert set(it) == {"image", "audio", "text", "label", "attrs", "index"}
    assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
    assert it["audio"].dim() == 1 and it["audio"].dtype == torch.float32 and isinstance(it["text"], str)
    sub = load_dataset("shapes", "val", modalities=["image", "text"], cache=False)
    assert sub.images is not None and not hasattr(sub, "audio_bytes")     # audio never read
    assert set(sub[3]) == {"image", "text", "label", "attrs", "index"}


def test_feature_cache_warm_equals_cold_and_keys_separate(tmp_path):
    fc = FeatureCache(tmp_path)
    ds = load_dataset("shapes", "val", ["audio"], audio_features=LogMel(), cache=fc)
    cold = [ds[i]["audio"] for i in range(5)]
    assert fc.misses == 5 and fc.hits == 0
    warm = [ds[i]["audio"] for i in range(5)]
    assert fc.hits == 5 and all(torch.equal(a, b) for a, b in zip(cold, warm))
    ds2 = load_dataset("shapes", "val", ["audio"], audio_features=LogMel(n_mels=32), cache=fc)
    assert ds2[0]["audio"].shape[0] == 32 and fc.misses == 6          # other parameters: other entry
    nocache = load_dataset("shapes", "val", ["audio"], audio_features=LogMel(), cache=False)
    torch.testing.assert_close(nocache[2]["audio"], cold[2])
    # a corrupt cache entry is recomputed, not trusted
    p = next(tmp_path.rglob("*.npy")); p.write_bytes(b"garbage")
    ds3 = load_dataset("shapes", "val", ["audio"], audio_features=LogMel(), cache=FeatureCache(tmp_path))
    for i in range(5): torch.testing.assert_close(ds3[i]["audio"], cold[i])


def test_loader_reproducible_with_workers_and_random_augment(tmp_path):
    ds = load_dataset("shapes", "val", ["audio", "text"], audio_features=LogMel(),
                      transforms={"audio": SpecAugment(), "text": CharTokenizer()}, cache=FeatureCache(tmp_path))
    def run(seed):
        return [b for _, b in zip(range(3), make_loader(ds, 16, seed=seed, num_workers=2))]
    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["audio"], y["audio"])
        assert torch.equal(x["text"], y["text"])
    assert not torch.equal(a[0]["index"], c[0]["index"])
    x = a[0]
    assert x["audio"].shape[:2] == (16, 64) and x["audio_padding_mask"].shape == (16, x["audio"].shape[-1])
    assert (x["text_lengths"] == (~x["text_padding_mask"]).sum(1)).all()
    assert x["caption"][0] == CharTokenizer().decode(x["text"][0])


def test_hf_tokenizer_roundtrip(tmp_path):
    hf = HFTokenizer(make_tiny_hf_tokenizer(tmp_path / "tok", "a red blue circle square".split()), max_len=4)
    ids = hf("a red circle square")
    assert ids.tolist() == [2, 4, 5, 3]           # truncated to 4 ids, [SEP] kept
    b = collate([{"text": hf("a red")}, {"text": hf("blue")}], pad_id=hf.pad_id)
    assert b["text"].tolist() == [[2, 4, 5, 3], [2, 6, 3, 0]]


# ---------------------------------------------------------------- broken inputs, one by one

def wav(path, sr=16000, secs=0.3):
    t = np.arange(int(sr * secs)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * 300 * t), sr)
    return path


@pytest.fixture
def good(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    wav(tmp_path / "ok.wav")
    return tmp_path


def manifest(dirpath, name, header, *rows):
    p = dirpath / name
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


BROKEN = {
    "missing_image": (lambda d: None, "image,text", "nope.png,a red circle", MissingFileError, "nope.png' does not exist"),
    "corrupt_image": (lambda d: (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40)),
                      "image,text", "bad.png,a red circle", DataError, "cannot read image"),
    "truncated_image": (lambda d: (d / "t.png").write_bytes((d / "ok.png").read_bytes()[:30]),
                        "image,text", "t.png,a red circle", DataError, "cannot read image"),
    "missing_audio": (lambda d: None, "audio,text", "nope.wav,hi", MissingFileError, "audio file"),
    "corrupt_audio": (lambda d: (d / "bad.wav").write_bytes(b"RIFF" + bytes(range(200))),
                      "audio,text", "bad.wav,hi", DataError, "cannot read audio"),
    "wrong_rate": (lambda d: wav(d / "r8k.wav", sr=8000), "audio,text", "r8k.wav,hi", DataError,
                   "sample rate 8000 Hz, expected 16000 Hz"),
    "empty_caption": (lambda d: None, "image,text", 'ok.png," "', DataError, "empty caption"),
    "missing_column": (lambda d: None, "image,caption", "ok.png,hi", DataError, "missing column 'text'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_raises_naming_file_and_row(good, case):
    make, header, row, err, msg = BROKEN[case]
    make(good)
    p = manifest(good, "m.csv", header, "ok.png,fine" if header.startswith("image") else "ok.wav,fine", row)
    mods = ["image", "text"] if case == "missing_column" else None
    with pytest.raises(err) as e:
        ManifestDataset(p, modalities=mods)
    assert isinstance(e.value, MMLabError) and msg in str(e.value)
    if case != "missing_column": assert f"{p} row 3" in str(e.value)          # file and row are named
    if case == "missing_column": return
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ManifestDataset(p, on_error="skip")
    assert len(ds) == 1 and ds.skipped == 1 and msg in ds.skip_reasons[0]
    assert any("skipped 1 of 2 rows" in str(x.message) for x in w)


def test_empty_caption_jsonl_and_null_is_missing(good):
    p = good / "m.jsonl"
    p.write_text(json.dumps({"image": "ok.png", "text": None}) + "\n" + json.dumps({"image": "ok.png"}) + "\n"
                 + json.dumps({"image": "ok.png", "text": ""}) + "\n")
    with pytest.raises(DataError, match="m.jsonl row 3: empty caption"): ManifestDataset(p)
    p.write_text(json.dumps({"image": "ok.png", "text": None, "label": 2}) + "\n"
                 + json.dumps({"image": None, "text": "hi", "speaker": "x"}) + "\n")
    ds = ManifestDataset(p)
    b = collate([ds[0], ds[1]])
    assert b["mask"]["text"].tolist() == [False, True] and b["mask"]["image"].tolist() == [True, False]
    assert b["text"] == ["", "hi"] and b["image"].shape == (2, 3, 8, 8)
    assert ds[1]["attrs"] == {"speaker": "x"}


def test_unknown_modality_and_bad_options(good):
    p = manifest(good, "m.csv", "image,text", "ok.png,hi")
    with pytest.raises(ConfigError, match="unknown modality 'video'"): ManifestDataset(p, modalities=["video"])
    with pytest.raises(ConfigError, match="unknown modality 'video'"): load_dataset("digits", "train", ["video"])
    with pytest.raises(ConfigError, match="on_error='ignore'"): ManifestDataset(p, on_error="ignore")
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"): load_dataset("cifar", "train")
    with pytest.raises(ConfigError, match="unknown format '.txt'"):
        ManifestDataset(manifest(good, "m.txt", "image", "ok.png"))
    with pytest.raises(MissingFileError, match="does not exist"): ManifestDataset(good / "none.csv")


def test_resample_option_and_row_with_nothing(good):
    wav(good / "r8k.wav", sr=8000, secs=0.5)
    ds = ManifestDataset(manifest(good, "m.csv", "audio,text", "r8k.wav,hi"), resample=True, cache=False)
    assert ds[0]["audio"].shape == (8000,)      # 0.5 s at 16 kHz
    with pytest.raises(DataError, match="row 3: none of the modalities"):
        ManifestDataset(manifest(good, "n.csv", "audio,text", "ok.wav,hi", ","))


def test_file_broken_after_check_is_skipped_at_load_time_and_counted(good):
    wav(good / "late.wav")
    p = manifest(good, "m.csv", "audio,text", "ok.wav,a", "late.wav,b")
    strict = ManifestDataset(p, cache=False)
    skip = ManifestDataset(p, cache=False, on_error="skip")
    (good / "late.wav").write_bytes(b"RIFF" + bytes(100))               # corrupted after the check
    with pytest.raises(DataError, match="row 3"): strict[1]
    with pytest.warns(UserWarning, match="skipping row 3"):
        b = collate([skip[0], skip[1]])
    assert b["skipped"] == 1 and len(b["text"]) == 1 and skip.skipped == 1


# ---------------------------------------------------------------- intelligibility of the spoken digits

def dtw_costs(Q, R):
    "DTW alignment cost (Euclidean frame distance, steps (1,0),(0,1),(1,1), length-normalised) of all pairs."
    lq, lr = np.array([len(q) for q in Q]), np.array([len(r) for r in R])
    Lq, Lr, d = lq.max(), lr.max(), Q[0].shape[1]
    qa = np.zeros((len(Q), Lq, d), np.float32); ra = np.zeros((len(R), Lr, d), np.float32)
    for i, q in enumerate(Q): qa[i, :len(q)] = q
    for j, r in enumerate(R): ra[j, :len(r)] = r
    out = np.zeros((len(Q), len(R)), np.float32)
    prev = np.full((len(Q), len(R), Lr), np.inf, np.float32)
    for i in range(Lq):
        cost = np.linalg.norm(qa[:, None, i, None, :] - ra[None, :, :, :], axis=-1)     # (nq, nr, Lr)
        row = np.empty_like(cost)
        for j in range(Lr):
            best = 0.0 if (i == 0 and j == 0) else np.minimum(prev[:, :, j], row[:, :, j - 1] if j else np.inf)
            if i and j: best = np.minimum(best, prev[:, :, j - 1])
            row[:, :, j] = cost[:, :, j] + best
        hit = lq == i + 1
        if hit.any(): out[hit] = row[hit][:, np.arange(len(R)), lr - 1] / (lq[hit, None] + lr[None, :])
        prev = row
    return out


def test_spoken_digits_recognisable_across_speakers():
    "1-nearest-neighbour DTW on log-mel: test speakers' digits matched against other (train) speakers' templates."
    lm = LogMel(n_mels=40)
    def feats(split, per_class):
        with np.load(DATA / "digits" / f"{split}.npz") as z:
            off, raw, lab, spk = z["audio_offsets"], z["audio_bytes"], z["clip_label"], z["clip_speaker"]
        keep = []
        for c in range(10):    # the first `per_class` speakers' first utterance of each digit
            ids = [k for k in np.flatnonzero(lab == c)]
            seen = []
            for k in ids:
                if spk[k] not in seen: seen.append(spk[k]); keep.append(k)
                if len(seen) == per_class: break
        F = []
        for k in keep:
            f = lm(decode_audio(raw[off[k]:off[k + 1]].tobytes())).T.numpy()[::2]   # (frames/2, 40)
            F.append(f - f.mean(0))                                                   # cepstral-style mean norm
        return F, lab[keep]
    R, yr = feats("train", 6)
    Q, yq = feats("test", 8)
    pred = yr[dtw_costs(Q, R).argmin(1)]
    acc = (pred == yq).mean()
    print(f"DTW 1-NN accuracy on unseen speakers: {acc:.3f}")
    assert acc >= 0.8, acc            # chance is 0.1


def test_using_the_data_needs_neither_sklearn_nor_espeak():
    "Load every split with all modalities in a process where sklearn cannot be imported and espeak-ng is off PATH."
    import subprocess, sys, os
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from mmlab.data import load_dataset, dataset_meta\n"
            "for name in ['shapes', 'digits']:\n"
            "    for split in dataset_meta(name)['splits']:\n"
            "        ds = load_dataset(name, split, cache=False); it = ds[len(ds) - 1]\n"
            "        assert it['audio'].numel() > 0 and it['image'].shape[0] == 3 and it['text']\n"
            "print('ok')\n")
    env = {**os.environ, "PATH": "/nonexistent"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_corrupt_bundled_file_raises(tmp_path):
    import shutil
    (tmp_path / "shapes").mkdir()
    shutil.copy(DATA / "shapes" / "meta.json", tmp_path / "shapes")
    (tmp_path / "shapes" / "val.npz").write_bytes((DATA / "shapes" / "val.npz").read_bytes()[:5000])
    with pytest.raises(DataError, match="val.npz: cannot read the dataset file"):
        load_dataset("shapes", "val", root=tmp_path)
    with pytest.raises(MissingFileError, match="test.npz does not exist"):
        load_dataset("shapes", "test", root=tmp_path)


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="the generators need espeak-ng")
def test_generator_reproduces_shipped_items_byte_for_byte():
    "Re-running the shapes generator for three val scenes gives the shipped image, caption, attributes and Opus bytes."
    import sys
    sys.path.insert(0, str(DATA))
    try:
        import make_shapes as m
    finally: sys.path.remove(str(DATA))
    kids = np.random.SeedSequence(m.SEED).spawn(len(m.SPLITS))
    seeds = [int(c.generate_state(1)[0]) for c in kids[list(m.SPLITS).index("val")].spawn(m.SPLITS["val"])]
    with np.load(DATA / "shapes" / "val.npz") as z:
        off = z["audio_offsets"]
        for i in range(3):
            img, text, blob, rec, _ = m.make_item((seeds[i], False))
            assert np.array_equal(img, z["image"][i]) and text == z["text"][i]
            assert all(z[f"attr_{k}"][i] == v for k, v in rec.items())
            assert blob == z["audio_bytes"][off[i]:off[i + 1]].tobytes()
