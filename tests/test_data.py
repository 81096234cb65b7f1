"""Tests of mmlab.data beyond the chapter: the shipped files against DATASHEET.md, split properties
(compositional held-out pairs, disjoint speakers), speech sanity, every kind of broken input made
with real files, caching and reproducible loaders with worker processes."""
import hashlib, io, json, math, re, warnings
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
    assert b["present"]["text"].tolist() == [False, True] and b["present"]["image"].tolist() == [True, False]
    assert b["text"] == ["", "hi"] and b["image"].shape == (2, 3, 8, 8)
    assert ds[1]["attrs"] == {"speaker": "x"}


def test_unknown_modality_and_bad_options(good):
    p = manifest(good, "m.csv", "image,text", "ok.png,hi")
    with pytest.raises(ConfigError, match="unknown modality 'depth'"): ManifestDataset(p, modalities=["depth"])
    with pytest.raises(ConfigError, match="unknown modality 'depth'"): load_dataset("digits", "train", ["depth"])
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


def test_missing_dataset_names_the_settings_that_point_to_it(tmp_path):
    with pytest.raises(MissingFileError, match=r"meta.json does not exist; .*settings.ini or MMLAB_DATA_ROOT, or pass root="):
        load_dataset("shapes", "train", root=tmp_path)


def test_rate_error_names_the_option_of_the_way_it_was_reached(good):
    "A manifest or recipe user cannot pass decode_audio's resample_to_rate: their error names resample / --resample."
    wav(good / "late.wav")
    ds = ManifestDataset(manifest(good, "m.csv", "audio,text", "late.wav,a"), cache=False)
    wav(good / "late.wav", sr=8000)                   # the rate changes after the manifest was checked
    with pytest.raises(DataError, match=r"sample rate 8000 Hz, expected 16000 Hz; resample the file or pass resample=True "
                                        r"\(mmlab train: --resample true\)") as e: ds[0]
    assert "resample_to_rate" not in str(e.value)
    with pytest.raises(DataError, match="pass resample=True"):      # the same words when the manifest is opened
        ManifestDataset(manifest(good, "n.csv", "audio,text", "late.wav,a"), cache=False)


def test_file_broken_after_check_is_skipped_at_load_time_and_counted(good):
    wav(good / "late.wav")
    p = manifest(good, "m.csv", "audio,text", "ok.wav,a", "late.wav,b")
    strict = ManifestDataset(p, cache=False)
    skip = ManifestDataset(p, cache=False, on_error="skip")
    (good / "late.wav").write_bytes(b"RIFF" + bytes(100))               # corrupted after the check
    with pytest.raises(DataError, match="row 3"): strict[1]
    with pytest.warns(UserWarning, match="skipping row 3"):
        b = collate([skip[0], skip[1]])
    assert len(b["skipped"]) == 1 and len(b["text"]) == 1 and skip.skipped == 0       # skipped when read, not opened
    assert b["skipped"][0].startswith(f"{p} row 3: {good / 'late.wav'}: cannot decode audio")


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


# ================================================================ behaviour pinned against hand references
# (issue 14: each test below fails when the behaviour it names is broken; see the mutation notes)

from hypothesis import given, settings, strategies as st
from mmlab.core import InputTypeError, ShapeError
from mmlab.data import ModalityDropout, NoisyPairs, content_hash, image_augment

FAST = settings(max_examples=30, deadline=None)


def wav_bytes(x, sr, subtype=None):
    buf = io.BytesIO(); sf.write(buf, x, sr, format="WAV", subtype=subtype); return buf.getvalue()


# ---------------------------------------------------------------- decode_audio: the sample-rate contract

def test_decode_audio_refuses_other_rate_unless_asked_to_resample(tmp_path):
    t = np.arange(4000) / 8000
    x = 0.5 * np.sin(2 * np.pi * 250 * t)
    p = tmp_path / "r8k.wav"; sf.write(p, x, 8000, subtype="FLOAT")
    for src in (p, str(p), p.read_bytes()):
        with pytest.raises(DataError, match="sample rate 8000 Hz, expected 16000 Hz; .*resample_to_rate=True"):
            decode_audio(src)
    with pytest.raises(DataError, match=r"clip 7: sample rate 8000 Hz"): decode_audio(p.read_bytes(), "clip 7")
    # the file's own rate is accepted as is: no resampling, the samples come back unchanged
    np.testing.assert_allclose(decode_audio(p, sample_rate=8000).numpy(), x, atol=1e-7)
    # explicitly asked: resampled to 16 kHz -> twice the samples, the same 250 Hz sine (checked away from the edges)
    y = decode_audio(p, resample_to_rate=True).numpy()
    assert y.shape == (8000,) and y.dtype == np.float32
    ref = 0.5 * np.sin(2 * np.pi * 250 * np.arange(8000) / 16000)
    np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=2e-3)
    # a 16 kHz file is never touched, asked or not
    z = 0.25 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16000)
    for rs in (False, True):
        np.testing.assert_allclose(decode_audio(wav_bytes(z, 16000, "FLOAT"), resample_to_rate=rs).numpy(), z, atol=1e-7)


def test_decode_audio_mono_mix_and_bad_clips(tmp_path):
    a = np.linspace(-0.5, 0.5, 800); b = 0.25 * np.ones(800)
    out = decode_audio(wav_bytes(np.stack([a, b], 1), 16000, "FLOAT")).numpy()
    np.testing.assert_allclose(out, (a + b) / 2, atol=1e-7)          # stereo -> mean of the channels
    with pytest.raises(DataError, match="<bytes>: audio file has 0 samples"): decode_audio(wav_bytes(np.zeros(0), 16000))
    nan = np.zeros(100); nan[50] = np.nan
    with pytest.raises(DataError, match="NaN/Inf"): decode_audio(wav_bytes(nan, 16000, "FLOAT"))
    with pytest.raises(DataError, match="cannot decode audio"): decode_audio(b"RIFF" + bytes(60))
    with pytest.raises(MissingFileError, match="does not exist"): decode_audio(tmp_path / "none.wav")


# ---------------------------------------------------------------- ModalityDropout

class Toy(torch.utils.data.Dataset):
    "n examples with the given modalities (fresh dicts every time, as a real dataset returns)."
    def __init__(self, n, mods=("image", "audio", "text")): self.n, self.mods = n, mods
    def __len__(self): return self.n
    def __getitem__(self, i):
        it = {m: torch.full((2,), float(i)) if m != "text" else f"t{i}" for m in self.mods}
        if "text" in self.mods: it["caption"] = f"t{i}"
        return it | {"index": i, "label": i % 3}


@pytest.mark.parametrize("p", [0.5, 0.95, 0.999])
def test_modality_dropout_never_drops_every_modality(p):
    for mods in (("image", "audio", "text"), ("image", "text"), ("audio",)):
        ds = ModalityDropout(Toy(400, mods), p=p, seed=1)
        kept = [sum(ds[i][m] is not None for m in mods) for i in range(len(ds))]
        assert min(kept) >= 1, (mods, p)
        if len(mods) > 1 and p > 0.9: assert kept.count(1) > 300     # the cap is really exercised


def test_modality_dropout_rate_matches_p():
    # each present modality is dropped with prob p, except that when all 3 are drawn one is put back:
    # expected drop rate per modality = p - p^3 / 3
    n, p = 3000, 0.3
    ds = ModalityDropout(Toy(n), p=p, seed=0)
    items = [ds[i] for i in range(n)]
    want, sd = p - p ** 3 / 3, math.sqrt(p * (1 - p) / n)
    for m in ("image", "audio", "text"):
        rate = np.mean([it[m] is None for it in items])
        assert abs(rate - want) < 4 * sd, (m, rate, want)
    # a per-modality dict drops only the modalities it names, at their own rate
    ds = ModalityDropout(Toy(n), p={"audio": 0.5}, seed=0)
    items = [ds[i] for i in range(n)]
    assert all(it["image"] is not None and it["text"] is not None for it in items)
    assert abs(np.mean([it["audio"] is None for it in items]) - 0.5) < 4 * math.sqrt(0.25 / n)


def test_modality_dropout_fixed_per_example_seeded_and_drops_caption():
    ds = ModalityDropout(Toy(200), p=0.4, seed=3)
    pat = lambda d: [tuple(d[i][m] is None for m in ("image", "audio", "text")) for i in range(200)]
    assert pat(ds) == pat(ds)                                         # the same example -> the same pattern
    assert pat(ds) != pat(ModalityDropout(Toy(200), p=0.4, seed=4))   # another seed -> another pattern
    for i in range(200):
        it = ds[i]
        assert ("caption" in it) == (it["text"] is not None)          # a dropped caption goes with the text
        if it["image"] is not None: assert torch.equal(it["image"], torch.full((2,), float(i)))
    assert len(ds) == 200
    d0 = ModalityDropout(Toy(50), p=0.0)
    assert all(d0[i]["audio"] is not None for i in range(50))
    for bad in (1.0, -0.1, {"audio": 1.0}):
        with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"): ModalityDropout(Toy(3), p=bad)
    with pytest.raises(ConfigError, match="unknown modality 'depth'"): ModalityDropout(Toy(3), p={"depth": 0.1})


# ---------------------------------------------------------------- NoisyPairs

@pytest.mark.parametrize("n", [2, 3, 17, 500])
def test_noisy_pairs_never_pair_an_example_with_itself(n):
    for seed in range(5):
        ds = NoisyPairs(Toy(n, ("image", "text")), "text", p=1.0, seed=seed)
        for i in range(n):
            it = ds[i]
            assert it["text"] != f"t{i}" and it["caption"] == it["text"]          # another example's caption
            assert torch.equal(it["image"], torch.full((2,), float(i)))         # the other half is untouched
            assert it["attrs"]["noisy_pair"] == 1


def test_noisy_pairs_fraction_matches_p_and_marks_pairs():
    n, p = 4000, 0.2
    ds = NoisyPairs(Toy(n, ("text",)), "text", p=p, seed=0)
    items = [ds[i] for i in range(n)]
    changed = np.array([it["text"] != f"t{i}" for i, it in enumerate(items)])
    assert abs(changed.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert (changed == np.array([it["attrs"]["noisy_pair"] for it in items])).all()
    # the partners are spread over the others, not one fixed shift
    src = [int(it["text"][1:]) for it, c in zip(items, changed) if c]
    assert len({(s - i) % n for s, i in zip(src, np.flatnonzero(changed))}) > 100
    for q in (0.5, 0.9):
        dq = NoisyPairs(Toy(n, ("text",)), p=q, seed=1)
        flags = [dq[i]["attrs"]["noisy_pair"] for i in range(n)]
        assert abs(np.mean(flags) - q) < 4 * math.sqrt(q * (1 - q) / n), q
    d0 = NoisyPairs(Toy(50), p=0.0)
    assert not any(d0[i]["attrs"]["noisy_pair"] for i in range(50))
    with pytest.raises(ConfigError, match=r"p must be in \[0, 1\]"): NoisyPairs(Toy(5), p=1.5)
    with pytest.raises(ConfigError, match="no other example"): NoisyPairs(Toy(1), p=0.5)


# ---------------------------------------------------------------- tokenizers

@FAST
@given(st.text(alphabet="abcXYZ 0.!é\n", max_size=40), st.integers(2, 50))
def test_char_tokenizer_lengths_truncation_and_roundtrip(s, max_len):
    t = CharTokenizer(max_len=max_len)
    ids = t(s)
    assert ids.dtype == torch.long and len(ids) == min(len(s), max_len - 2) + 2
    assert ids[0] == t.BOS and ids[-1] == t.EOS and t.PAD not in ids.tolist()
    body = s.lower()[: max_len - 2]
    assert ids[1:-1].tolist() == [t.alphabet.index(c) + 4 if c in t.alphabet else t.UNK for c in body]
    assert t.decode(ids) == "".join(c if c in t.alphabet else "?" for c in body)
    raw = CharTokenizer(max_len=max_len, add_special=False, lower=False)(s)
    assert len(raw) == min(len(s), max_len) and t.BOS not in raw.tolist()
    assert all((i == t.UNK) == (c not in t.alphabet) for i, c in zip(raw.tolist(), s))   # upper case is unknown


def test_char_tokenizer_vocab_and_errors():
    t = CharTokenizer(alphabet="ab")
    assert t.vocab_size == 6 and t.pad_id == 0 and t("ab").tolist() == [1, 4, 5, 2]
    with pytest.raises(ConfigError, match="repeated"): CharTokenizer(alphabet="aba")
    with pytest.raises(ConfigError, match="max_len=1 is too small"): CharTokenizer(max_len=1)
    with pytest.raises(ConfigError, match="max_len=0 is too small"): CharTokenizer(max_len=0, add_special=False)
    with pytest.raises(InputTypeError, match="expected str, got int"): t(3)


WORDS = "a red blue circle square".split()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tok", WORDS)


@pytest.fixture(scope="module")
def hf_tok(hf): return HFTokenizer(hf)


@FAST
@given(words=st.lists(st.sampled_from(WORDS + ["zzz"]), max_size=12), max_len=st.integers(2, 16))
def test_hf_tokenizer_lengths_and_truncation(hf_tok, words, max_len):
    tok = hf_tok; tok.max_len = max_len                                      # (loading it once keeps this fast)
    ids = tok(" ".join(words)).tolist()
    body = [WORDS.index(w) + 4 if w in WORDS else 1 for w in words][: max_len - 2]
    assert ids == [2] + body + [3]                                   # [CLS] body [SEP], [UNK]=1, [SEP] kept
    assert tok.decode(ids) == " ".join(w for w in words[: max_len - 2] if w in WORDS)
    assert tok.pad_id == 0 and tok.vocab_size == 9


def test_hf_tokenizer_errors(tmp_path, hf):
    assert HFTokenizer(hf).max_len == 64 and HFTokenizer(hf, max_len=5).max_len == 5
    with pytest.raises(MissingFileError, match="does not exist"): HFTokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"): HFTokenizer(tmp_path / "empty")
    with pytest.raises(InputTypeError, match="expected str"): HFTokenizer(hf)(None)


# ---------------------------------------------------------------- LogMel and SpecAugment

def naive_logmel(x, sr, n_fft, hop, n_mels, f_min, f_max, eps):
    "float64 numpy log-mel: reflect-padded periodic-Hann STFT power, HTK triangular filters (no area norm)."
    x = np.pad(np.asarray(x, np.float64), n_fft // 2, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([x[s:s + n_fft] * win for s in range(0, len(x) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2                      # (frames, n_fft/2 + 1)
    mel = lambda f: 2595 * np.log10(1 + f / 700); hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    pts = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sr // 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        for k, f in enumerate(freqs): fb[m, k] = max(0.0, min((f - lo) / (c - lo), (hi - f) / (hi - c)))
    return np.log(fb @ power.T + eps)                                      # (n_mels, frames)


@pytest.mark.parametrize("kw", [dict(), dict(f_min=200.0, f_max=3000.0, eps=1e-3)])
def test_logmel_matches_naive_reference(kw):
    sr, T = 8000, 1000
    x = 0.3 * np.random.default_rng(0).standard_normal(T)
    lm = LogMel(sample_rate=sr, n_fft=64, hop_length=16, n_mels=10, **kw)
    out = lm(torch.tensor(x, dtype=torch.float32))
    assert out.shape == (10, T // 16 + 1)
    ref = naive_logmel(x, sr, 64, 16, 10, kw.get("f_min", 0.0), kw.get("f_max", sr / 2), kw.get("eps", 1e-6))
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-3, rtol=0)
    # the floor: silence gives log(eps) exactly
    assert torch.allclose(lm(torch.zeros(160)), torch.full((10, 11), math.log(kw.get("eps", 1e-6))))


def test_logmel_defaults_cache_key_and_pickling():
    import pickle
    lm = LogMel()
    assert (lm.sample_rate, lm.n_fft, lm.hop_length, lm.n_mels, lm.f_min, lm.f_max, lm.eps) == (16000, 400, 160, 64, 0.0, 8000, 1e-6)
    assert lm(torch.zeros(16000)).shape == (64, 101)                       # 1 s: 100 hops + the centred first frame
    base = LogMel(sample_rate=8000, n_fft=64, hop_length=16, n_mels=10, f_min=10.0, f_max=3000.0, eps=1e-4)
    keys = {base.cache_key}
    for k, v in dict(sample_rate=16000, n_fft=128, hop_length=8, n_mels=12, f_min=20.0, f_max=3500.0, eps=1e-5).items():
        other = LogMel(**(dict(sample_rate=8000, n_fft=64, hop_length=16, n_mels=10, f_min=10.0, f_max=3000.0, eps=1e-4) | {k: v}))
        keys.add(other.cache_key)
    assert len(keys) == 8                                                  # every parameter is in the key
    base(torch.zeros(100)); state = pickle.loads(pickle.dumps(base))
    assert state._mel is None and torch.equal(state(torch.ones(100)), base(torch.ones(100)))


def bands(rows):
    "Maximal runs of True in a 1-D bool array, as (start, stop)."
    out, start = [], None
    for i, r in enumerate(list(rows) + [False]):
        if r and start is None: start = i
        if not r and start is not None: out.append((start, i)); start = None
    return out


@FAST
@given(nf=st.integers(1, 12), nt=st.integers(1, 30), fm=st.integers(0, 3), fw=st.integers(0, 15),
       tm=st.integers(0, 3), tw=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_specaugment_masks_are_bounded_bands(nf, nt, fm, fw, tm, tw, seed):
    x = torch.rand(2, nf, nt) + 1                                          # no cell is 0 before masking
    out = SpecAugment(fm, fw, tm, tw, value=0.0)(x, torch.Generator().manual_seed(seed))
    hit = out[0] == 0
    assert torch.equal(hit, out[1] == 0)                                    # one mask for the leading dims
    rows, cols = hit.all(1).numpy(), hit.all(0).numpy()
    # every filled cell lies in a fully masked row or column; the rest is the input untouched
    assert torch.equal(hit, torch.from_numpy(rows[:, None] | cols[None, :]))
    assert torch.equal(out[~hit.expand_as(out)], x[~hit.expand_as(x)])
    # (a row is only ambiguous when every column is masked, and vice versa)
    if not cols.all():   # at most fm bands of at most fw rows each
        assert rows.sum() <= fm * min(fw, nf) and len(bands(rows)) <= fm
        if fm == 1: assert all(b - a <= fw for a, b in bands(rows))
    if not rows.all():
        assert cols.sum() <= tm * min(tw, nt) and len(bands(cols)) <= tm
        if tm == 1: assert all(b - a <= tw for a, b in bands(cols))


def test_specaugment_widths_reach_bounds_and_edges():
    # one frequency mask: width uniform on 0..W inclusive, start uniform on 0..n-w inclusive (edges reachable)
    x = torch.ones(10, 50)
    sa = SpecAugment(freq_masks=1, freq_width=4, time_masks=0, value=0.0)
    g = torch.Generator().manual_seed(0); widths, first, last = [], 0, 0
    for _ in range(400):
        rows = (sa(x, g) == 0).all(1).numpy()
        widths.append(int(rows.sum())); first += rows[0]; last += rows[-1]
        assert len(bands(rows)) <= 1
    assert set(widths) == {0, 1, 2, 3, 4} and first > 0 and last > 0
    # width capped by the size: freq_width 8 on 3 channels masks at most 3, sometimes all 3
    w3 = [int((SpecAugment(1, 8, 0, 0, value=0.0)(torch.ones(3, 5), g) == 0).all(1).sum()) for _ in range(100)]
    assert max(w3) == 3
    # time masks likewise, along the last axis
    cols = [(SpecAugment(0, 0, 1, 6, value=0.0)(x, g) == 0).all(0).numpy() for _ in range(300)]
    assert {int(c.sum()) for c in cols} == set(range(7)) and any(c[-1] for c in cols)   # the last frame too


def test_specaugment_fill_default_seeding_and_errors():
    x = torch.arange(24.0).reshape(4, 6)
    out = SpecAugment(2, 3, 2, 3)(x, torch.Generator().manual_seed(1))
    assert torch.equal(x, torch.arange(24.0).reshape(4, 6))               # input left untouched
    filled = out != x
    assert filled.any() and (out[filled] == x.mean()).all()               # default fill: the feature's mean
    sa = SpecAugment(2, 3, 2, 5, value=-1.0)
    a = sa(torch.ones(8, 20), torch.Generator().manual_seed(7))
    torch.manual_seed(0); b = sa(torch.ones(8, 20), torch.Generator().manual_seed(7))
    torch.manual_seed(1); c = sa(torch.ones(8, 20), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(b, c)                         # the generator alone decides
    assert not all(torch.equal(a, sa(torch.ones(8, 20), torch.Generator().manual_seed(s))) for s in range(8, 12))
    with pytest.raises(ShapeError, match=r"expected features \(..., n_mels, frames\), got shape \(5,\)"):
        SpecAugment()(torch.ones(5))


def test_image_augment_options():
    from torchvision.transforms import v2
    kinds = lambda t: [type(o).__name__ for o in t.transforms]
    assert kinds(image_augment()) == ["RandomResizedCrop"]                 # caption-safe by default
    assert kinds(image_augment(flip=True, colour=0.4)) == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    crop = image_augment(size=24, scale=(0.5, 0.6)).transforms[0]
    assert tuple(crop.size) == (24, 24) and crop.scale == (0.5, 0.6) and crop.ratio == (0.9, 1.1)
    cj = image_augment(colour=0.4).transforms[1]
    assert cj.brightness == (0.6, 1.4) and cj.hue == (-0.1, 0.1)
    torch.manual_seed(0)
    assert image_augment(size=16)(torch.rand(3, 40, 30)).shape == (3, 16, 16)


# ---------------------------------------------------------------- collate, take, make_loader

def test_collate_pads_masks_and_counts_skipped_rows():
    a = torch.tensor([[1., 2., 3.], [4., 5., 6.]]); b = torch.tensor([[7.], [8.]])
    items = [None, {"audio": a, "text": torch.tensor([5, 6]), "image": torch.ones(3, 2, 2), "label": 1, "index": 4},
             {"audio": None, "text": torch.tensor([7, 8, 9, 10]), "image": None, "label": 0, "index": 5}, None,
             {"audio": b, "text": None, "image": torch.full((3, 2, 2), 2.0), "label": 2, "index": 6}]
    bt = collate(items, pad_id=9, audio_pad=-1.0)
    assert bt["skipped"] == ["an example was skipped (None)"] * 2
    assert bt["present"]["audio"].tolist() == [True, False, True] and bt["present"]["text"].tolist() == [True, True, False]
    assert bt["present"]["image"].tolist() == [True, False, True]
    want = torch.full((3, 2, 3), -1.0); want[0] = a; want[2, :, :1] = b
    assert torch.equal(bt["audio"], want) and bt["audio_lengths"].tolist() == [3, 0, 1]
    assert bt["audio_padding_mask"].tolist() == [[False] * 3, [True] * 3, [False, True, True]]
    assert bt["text"].tolist() == [[5, 6, 9, 9], [7, 8, 9, 10], [9, 9, 9, 9]] and bt["text_lengths"].tolist() == [2, 4, 0]
    assert bt["text_padding_mask"].tolist() == [[False, False, True, True], [False] * 4, [True] * 4]
    assert torch.equal(bt["image"][1], torch.zeros(3, 2, 2)) and torch.equal(bt["image"][2], torch.full((3, 2, 2), 2.0))
    assert bt["label"].tolist() == [1, 0, 2] and bt["index"].tolist() == [4, 5, 6]
    assert "skipped" not in collate(items[1:3])                            # nothing skipped, nothing reported
    assert collate(items[:2])["skipped"] == ["an example was skipped (None)"]


def test_collate_strings_labels_attrs_and_errors():
    bt = collate([{"text": "a b", "caption": "A", "label": "x", "attrs": {"s": 1, "n": "p"}},
                  {"text": None, "label": "y", "attrs": {"s": 2, "n": "q"}}])
    assert bt["text"] == ["a b", ""] and bt["present"]["text"].tolist() == [True, False]
    assert bt["caption"] == ["A", None] and bt["label"] == ["x", "y"]
    assert bt["attrs"]["s"].tolist() == [1, 2] and bt["attrs"]["n"] == ["p", "q"]
    only_none = collate([{"audio": None, "text": "a"}, {"audio": None, "text": "b"}])
    assert only_none["audio"] is None and only_none["present"]["audio"].tolist() == [False, False]
    assert "label" not in collate([{"text": "a", "label": 1}, {"text": "b"}])   # partial labels are not batched
    with pytest.raises(DataError, match="all 2 items of the batch were skipped"): collate([None, None])
    with pytest.raises(ShapeError, match="image of item 1 has shape"):
        collate([{"image": torch.ones(3, 2, 2)}, {"image": torch.ones(3, 4, 4)}])
    with pytest.raises(ShapeError, match=r"audio of item 1 has shape \(3, 5\)"):
        collate([{"audio": torch.ones(2, 5)}, {"audio": torch.ones(3, 5)}])
    with pytest.raises(InputTypeError, match="all str or all token-id tensors"):
        collate([{"text": "a"}, {"text": torch.tensor([1])}])


@FAST
@given(st.lists(st.one_of(st.none(), st.integers(0, 7)), min_size=1, max_size=8).filter(lambda l: any(x is not None for x in l)))
def test_collate_padding_property(lengths):
    xs = [None if L is None else torch.arange(1, L + 1, dtype=torch.long) for L in lengths]
    bt = collate([{"text": x} for x in xs], pad_id=-5)
    Lmax = max(L or 0 for L in lengths)
    assert bt["text"].shape == (len(xs), Lmax)
    for row, L, pad in zip(bt["text"].tolist(), lengths, bt["text_padding_mask"].tolist()):
        L = L or 0
        assert row == list(range(1, L + 1)) + [-5] * (Lmax - L) and pad == [False] * L + [True] * (Lmax - L)
    assert bt["present"]["text"].tolist() == [L is not None for L in lengths]


def test_make_loader_seeded_order_and_options():
    ds = [{"text": torch.arange(i % 3 + 1), "index": i} for i in range(10)]
    order = lambda **kw: [b["index"].tolist() for b in make_loader(ds, 4, **kw)]
    a = order(seed=3)
    assert a == order(seed=3) and a != order(seed=4)
    assert sorted(sum(a, [])) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]
    assert order(shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert order(seed=3, drop_last=True) == a[:2]
    assert order() == order(seed=get_settings().seed)                       # seed None = the settings' seed
    # the same loader reshuffles each epoch, reproducibly from the seed
    dl = make_loader(ds, 10, seed=0); e1 = next(iter(dl))["index"].tolist(); e2 = next(iter(dl))["index"].tolist()
    dl2 = make_loader(ds, 10, seed=0)
    assert e1 != e2 and [next(iter(dl2))["index"].tolist(), next(iter(dl2))["index"].tolist()] == [e1, e2]
    first = next(iter(make_loader(ds, 3, shuffle=False, pad_id=7)))
    assert first["text"].tolist() == [[0, 7, 7], [0, 1, 7], [0, 1, 2]]
    custom = next(iter(make_loader(ds, 2, shuffle=False, collate_fn=lambda items: len(items))))
    assert custom == 2
    for bad in (0, 2.5, None):
        with pytest.raises(ConfigError, match="batch_size must be an int >= 1"): make_loader(ds, bad)


# ---------------------------------------------------------------- manifests: parsing

caption = st.text(alphabet='ab ,"\'xy', min_size=1, max_size=12).filter(lambda s: s.strip())


@FAST
@given(st.lists(st.tuples(caption, st.integers(0, 2)), min_size=1, max_size=6), st.data())
def test_manifest_csv_quoted_fields_and_blank_lines_keep_row_numbers(tmp_path_factory, rows, data):
    import csv as _csv
    d = tmp_path_factory.mktemp("m")
    buf = io.StringIO(); w = _csv.writer(buf, lineterminator="\n"); w.writerow(["text", "label"])
    lines = [buf.getvalue()]; want = []
    for cap, blanks in rows:
        lines.append("\n" * blanks)
        buf = io.StringIO(); _csv.writer(buf, lineterminator="\n").writerow([cap, len(want)])
        lines.append(buf.getvalue())
        want.append((cap, sum(s.count("\n") for s in lines)))              # physical line of this row
    p = d / "m.csv"; p.write_text("".join(lines))
    ds = ManifestDataset(p, cache=False)
    assert [(ds[i]["text"], ds[i]["label"]) for i in range(len(ds))] == [(c, str(i)) for i, (c, _) in enumerate(want)]
    assert [r["line"] for r in ds.rows] == [ln for _, ln in want]
    # a bad row anywhere is reported with the file and its physical line
    k = data.draw(st.integers(0, len(want) - 1))
    bad = "".join(lines).splitlines(keepends=True); bad[want[k][1] - 1] = '" ",0\n'
    p.write_text("".join(bad))
    with pytest.raises(DataError, match=re.escape(f"{p} row {want[k][1]}: empty caption")): ManifestDataset(p)


def test_manifest_short_and_long_rows_and_jsonl(good):
    # a short row would shift or drop fields silently: an error naming file, line and the header
    p = manifest(good, "m.csv", "image,text,label", "ok.png,hi,1", "", "ok.png")
    with pytest.raises(DataError, match=re.escape(f"{p} line 4: 1 fields, expected 3 (image,text,label)")):
        ManifestDataset(p, cache=False)
    p = manifest(good, "s.csv", "image,text,label", "ok.png,hi,1", "")
    p.write_text(p.read_text() + ",,\n")
    with pytest.raises(DataError, match=re.escape(f"{p} row 4: none of the modalities image, text is given")):
        ManifestDataset(p)
    # a quoted field may hold commas and a line break; an extra unnamed field is an error
    p = good / "q.csv"; p.write_text('text,speaker\n"a, ""b""\nc",s1\n')
    ds = ManifestDataset(p)
    assert ds[0]["text"] == 'a, "b"\nc' and ds[0]["attrs"] == {"speaker": "s1"} and ds.rows[0]["line"] == 3
    p.write_text('text,speaker\n"a, ""b""\nc",s1,EXTRA\n')
    with pytest.raises(DataError, match=re.escape(f"{p} line 3: 3 fields, expected 2 (text,speaker)")): ManifestDataset(p)
    p = good / "m.jsonl"; p.write_text('{"text": "a"}\n\n  \n{"text": "b", "label": "7"}\nnot json\n')
    with pytest.raises(DataError, match=re.escape(f"{p} line 5: invalid JSON")): ManifestDataset(p)
    p.write_text('{"text": "a"}\n\n{"text": "b", "label": "7"}\n[1]\n')
    with pytest.raises(DataError, match=re.escape(f"{p} line 4: expected a JSON object per line, got list")):
        ManifestDataset(p)
    p.write_text('{"text": "a"}\n\n{"text": "b", "label": "-7"}\n{"text": "c", "label": "cat"}\n')
    ds = ManifestDataset(p)
    assert [r["line"] for r in ds.rows] == [1, 3, 4] and [ds[i].get("label") for i in range(3)] == [None, "-7", "cat"]
    assert ds[2]["attrs"] == {} and ds[2]["index"] == 2                     # the label is not an attribute
    (good / "e.csv").write_text("")
    with pytest.raises(DataError, match="no modality column"): ManifestDataset(good / "e.csv")
    with pytest.raises(DataError, match="no usable rows"): ManifestDataset(manifest(good, "h.csv", "text,label"))


def test_manifest_skip_counts_reasons_and_report(good):
    rows = ["ok.png,a"] + [f"missing{i}.png,b" for i in range(7)]
    with pytest.warns(UserWarning, match="skipped 7 of 8 rows"):
        ds = ManifestDataset(manifest(good, "m.csv", "image,text", *rows), on_error="skip", cache=False)
    assert len(ds) == 1 and ds.skipped == 7 and len(ds.skip_reasons) == 5   # counted all, first 5 reasons kept
    assert "missing0.png" in ds.skip_reasons[0] and ds.report().startswith("7 row(s) skipped")
    assert ds.report().count("\n  - ") == 5


def test_manifest_image_size_root_and_transforms(good, tmp_path):
    Image.fromarray(np.full((6, 10, 3), 255, np.uint8)).save(good / "w.png")
    other = tmp_path / "elsewhere"; other.mkdir()
    p = manifest(other, "m.csv", "image,text", "w.png,Hi", f"{good / 'ok.png'},yo")
    ds = ManifestDataset(p, root=good, image_size=4, transforms={"text": str.upper}, cache=False)
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, 4, 4) and torch.allclose(a["image"], torch.ones(3, 4, 4))
    assert b["image"].shape == (3, 4, 4) and b["image"].abs().max() == 0      # absolute paths ignore root
    assert a["text"] == "HI" and a["caption"] == "Hi"
    assert ManifestDataset(p, root=good, cache=False)[0]["image"].shape == (3, 6, 10)   # image_size None keeps
    with pytest.raises(MissingFileError, match="w.png"): ManifestDataset(p)   # root defaults to the manifest's folder


# ---------------------------------------------------------------- content_hash and FeatureCache

def test_content_hash_is_sha256_prefix():
    for data in (b"", b"abc", bytes(range(256)) * 3):
        assert content_hash(data) == hashlib.sha256(data).hexdigest()[:32] and len(content_hash(data)) == 32
    assert content_hash(b"abc") != content_hash(b"abd")


def test_feature_cache_hits_misses_layout(tmp_path):
    fc = FeatureCache(tmp_path); calls = []
    def compute(v=1.0):
        calls.append(v); return torch.full((2, 3), v)
    assert torch.equal(fc.get("h1", "k1", compute), torch.full((2, 3), 1.0)) and (fc.hits, fc.misses) == (0, 1)
    assert torch.equal(fc.get("h1", "k1", lambda: compute(9.0)), torch.full((2, 3), 1.0))   # a hit: not recomputed
    assert (fc.hits, fc.misses, calls) == (1, 1, [1.0])
    fc.get("h2", "k1", lambda: compute(2.0)); fc.get("h1", "k2", lambda: compute(3.0))      # other content, other key
    assert (fc.hits, fc.misses, calls) == (1, 3, [1.0, 2.0, 3.0])
    p = fc.path("h1", "k1")
    assert p == tmp_path / hashlib.sha256(b"k1").hexdigest()[:16] / "h1.npy" and p.is_file()
    assert (p.parent / "KEY").read_text() == "k1\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["KEY", "h1.npy", "h2.npy"]      # no temp files left
    fresh = FeatureCache(tmp_path)                                          # persists across instances
    assert torch.equal(fresh.get("h2", "k1", lambda: compute(0.0)), torch.full((2, 3), 2.0)) and fresh.hits == 1
    assert FeatureCache().root == get_settings().cache_dir / "features"


def test_check_modalities_and_take():
    from mmlab.data import MODALITIES, check_modalities, take
    assert check_modalities(None) == tuple(MODALITIES) == ("image", "audio", "text", "video")   # MODALITIES: a live view of the registry
    assert check_modalities(["text", "image"]) == ("image", "text") and check_modalities("audio") == ("audio",)
    with pytest.raises(ConfigError, match="empty list of modalities"): check_modalities([])
    batch = {"label": torch.tensor([5, 6, 7]), "image": torch.arange(6).reshape(3, 2), "caption": ["a", "b", "c"],
             "present": {"text": torch.tensor([True, False, True])}, "skipped": ["m.csv row 3: x"], "scale": torch.tensor(0.5)}
    sub = take(batch, [2, 0])
    assert sub["label"].tolist() == [7, 5] and sub["image"].tolist() == [[4, 5], [0, 1]] and sub["caption"] == ["c", "a"]
    assert sub["present"]["text"].tolist() == [True, True] and "skipped" not in sub and sub["scale"] == 0.5
    assert take(batch, torch.tensor([1]))["caption"] == ["b"] and take(batch, range(1, 3))["label"].tolist() == [6, 7]


# ---------------------------------------------------------------- mutation survivors (issue 14, second pass)

def test_modality_errors_name_where_and_the_full_expected_set(good):
    from mmlab.data import check_modalities
    expect = "expected a subset of image, audio, text, video$"
    with pytest.raises(ConfigError, match="^where: empty list of modalities; " + expect): check_modalities([], "where")
    with pytest.raises(ConfigError, match="^modalities: unknown modality 'depth'; " + expect): check_modalities(["depth"])
    # a bad transforms key is reported as such, not as a bad `modalities` argument
    with pytest.raises(ConfigError, match="^transforms: unknown modality 'depth'; " + expect):
        load_dataset("shapes", "val", ["text"], transforms={"depth": str}, cache=False)
    with pytest.raises(ConfigError, match="^transforms: unknown modality 'txt'"):
        ManifestDataset(manifest(good, "m.csv", "image,text", "ok.png,hi"), transforms={"txt": str})


def test_collate_padding_keeps_the_items_dtype():
    # an int pad value must not turn float audio into integers (nor float64 into float32), nor int32 ids into int64
    a64 = torch.tensor([0.25, -1.5, 3.75], dtype=torch.float64)
    bt = collate([{"audio": a64}, {"audio": a64[:1]}], audio_pad=0)
    assert bt["audio"].dtype == torch.float64
    assert bt["audio"].tolist() == [[0.25, -1.5, 3.75], [0.25, 0.0, 0.0]]
    h = collate([{"audio": torch.tensor([[0.5, 1.5]], dtype=torch.float16)}, {"audio": None}])["audio"]
    assert h.dtype == torch.float16 and h.tolist() == [[[0.5, 1.5]], [[0.0, 0.0]]]
    t = collate([{"text": torch.tensor([4, 5], dtype=torch.int32)}, {"text": torch.tensor([6], dtype=torch.int32)}], pad_id=1)
    assert t["text"].dtype == torch.int32 and t["text"].tolist() == [[4, 5], [6, 1]]


def test_make_loader_batch_size_one_and_in_process_default():
    ds = [{"text": torch.arange(2), "index": i} for i in range(3)]
    dl = make_loader(ds, 1, shuffle=False)
    assert [b["index"].tolist() for b in dl] == [[0], [1], [2]]
    assert make_loader(ds).num_workers == 0 and not make_loader(ds).persistent_workers   # no worker processes unless asked
    with pytest.raises(ConfigError, match=r"batch_size must be an int >= 1, got 0$"): make_loader(ds, 0)


def test_bundled_dataset_keeps_vocab_and_the_digits_clip_index():
    for name in ("shapes", "digits"):
        ds = load_dataset(name, "val", ["text"], cache=False)
        meta = dataset_meta(name)
        assert ds.vocab == meta["vocab"] and ds.vocab and ds.label_names == meta["label_names"]
    with np.load(DATA / "digits" / "val.npz") as z: clip, speaker = z["clip"], z["clip_speaker"]
    ds = load_dataset("digits", "val", ["text"], cache=False)
    assert np.array_equal(ds.attrs["clip"], clip) and not np.array_equal(clip, np.arange(len(clip)))
    for i in (0, 7, len(ds) - 1):
        assert ds[i]["attrs"]["clip"] == int(clip[i]) and ds[i]["attrs"]["speaker"] == int(speaker[clip[i]])
    assert "clip" not in load_dataset("shapes", "val", ["text"], cache=False)[0]["attrs"]   # shapes: one clip per item


def test_bundled_file_with_a_damaged_member_raises_data_error(tmp_path):
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "meta.json").write_text((DATA / "shapes" / "meta.json").read_text())
    p = tmp_path / "shapes" / "val.npz"
    good = dict(label=np.arange(4), image=np.full((4, 2, 2, 3), 7, np.uint8), text=np.array(["a"] * 4))
    np.savez(p, **good)
    assert len(load_dataset("shapes", "val", ["image", "text"], root=tmp_path, cache=False)) == 4
    raw = bytearray(p.read_bytes()); k = raw.index(bytes(good["image"].ravel())); raw[k] ^= 0xFF
    p.write_bytes(bytes(raw))                                                   # one flipped bit: bad CRC
    cases = {"BadZipFile": None, "ValueError": dict(good, label=np.arange(4).astype(object)),   # pickled array
             "KeyError": {k: v for k, v in good.items() if k != "label"}}
    for err, arrays in cases.items():
        if arrays is not None: np.savez(p, **arrays)
        with pytest.raises(DataError, match=re.escape(f"{p}: cannot read the dataset file ({err}")):
            load_dataset("shapes", "val", ["image", "text"], root=tmp_path, cache=False)


def test_manifest_load_time_errors_name_the_row_and_accumulate_the_count(good):
    for n in ("late1", "late2"): Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good / f"{n}.png")
    p = manifest(good, "m.csv", "image,text", "ok.png,a", "late1.png,c", "late2.png,d")
    strict = ManifestDataset(p, cache=False)
    p = manifest(good, "s.csv", "image,text", "ok.png,a", "missing.png,b", "late1.png,c", "late2.png,d")
    with pytest.warns(UserWarning, match="skipped 1 of 4 rows"):
        skip = ManifestDataset(p, cache=False, on_error="skip")
    assert skip.skipped == 1
    (good / "late1.png").write_bytes(b"not a png")                             # broken after the checks
    (good / "late2.png").unlink()
    m = strict.path
    with pytest.raises(DataError, match=re.escape(f"{m} row 3: cannot decode image")): strict[1]
    with pytest.raises(MissingFileError, match=re.escape(f"{m} row 4: image file")): strict[2]
    with pytest.warns(UserWarning, match="skipping row"):
        s1, s2 = skip[1], skip[2]
    assert (s1.where, s2.where) == (f"{skip.path} row 4", f"{skip.path} row 5")     # the markers name file and row
    assert s1.reason.startswith("cannot decode image") and s2.reason.startswith("image file")
    assert collate([skip[0], s1, s2])["skipped"] == [str(s1), str(s2)]
    assert skip.skipped == 1 and skip.report().startswith("1 row(s) skipped")        # the rows skipped when opened
    assert skip[0]["image"].shape == (3, 8, 8)


def test_dataset_meta_reads_the_given_root(tmp_path):
    meta = json.loads((DATA / "shapes" / "meta.json").read_text()); meta["label_names"] = ["only", "mine"]
    (tmp_path / "shapes").mkdir(); (tmp_path / "shapes" / "meta.json").write_text(json.dumps(meta))
    assert dataset_meta("shapes", tmp_path)["label_names"] == ["only", "mine"]
    assert dataset_meta("shapes", str(tmp_path)) == meta and dataset_meta("shapes")["label_names"] != ["only", "mine"]
    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path / 'digits' / 'meta.json'} does not exist")):
        dataset_meta("digits", tmp_path)


def test_resized_white_images_stay_in_the_unit_range(tmp_path):
    "Bilinear resizing can round a white pixel to 1 + 1e-7; images are promised in [0, 1] (sizes chosen to hit it)."
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "meta.json").write_text((DATA / "shapes" / "meta.json").read_text())
    np.savez(tmp_path / "shapes" / "val.npz", label=np.arange(2), image=np.full((2, 5, 5, 3), 255, np.uint8),
             text=np.array(["a", "b"]))
    x = load_dataset("shapes", "val", ["image", "text"], image_size=24, root=tmp_path, cache=False)[0]["image"]
    assert x.shape == (3, 24, 24) and x.min() >= 0 and x.max() <= 1 and x.max() > 1 - 1e-6
    Image.fromarray(np.full((25, 25, 3), 255, np.uint8)).save(tmp_path / "white.png")
    x = ManifestDataset(manifest(tmp_path, "m.csv", "image,text", "white.png,a"), image_size=24, cache=False)[0]["image"]
    assert x.shape == (3, 24, 24) and x.min() >= 0 and x.max() <= 1 and x.max() > 1 - 1e-6


# ---------------------------------------------------------------- bad input, case by case (the data chapter's table)

from mmlab.core import InputError
from mmlab.data import Skipped, bad_inputs, image_to_float, label_order, read_image, run_bad_input

with __import__("tempfile").TemporaryDirectory() as _d:   # the names only; each test runs its case in a fresh folder
    CASES = [(kind, what) for kind, what, _, _ in bad_inputs(Path(_d))]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{k}: {w}" for k, w in CASES])
def test_bad_input_table(tmp_path, i):
    kind, what, call, want = bad_inputs(tmp_path)[i]
    out, ok = run_bad_input(call, want)
    assert ok, f"{kind} / {what}: got {out}; expected {want}"
    if isinstance(want, tuple): assert str(tmp_path) in out or "collate" in out   # errors name the file


def test_zero_padded_labels_end_to_end(good):
    "Dataset -> label strings -> one order -> class indices: `09` and `9` are two classes, never a KeyError."
    p = manifest(good, "m.csv", "text,label", "a,09", "b,9", "c,10", "d,09", "e,cat")
    ds = ManifestDataset(p, cache=False)
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels == ["09", "9", "10", "09", "cat"]
    names = label_order(labels)
    assert names == ["09", "9", "10", "cat"]
    index = {n: i for i, n in enumerate(names)}
    assert [index[l] for l in collate([ds[i] for i in range(len(ds))])["label"]] == [0, 1, 2, 0, 3]
    assert label_order(["²", "1"]) == ["1", "²"]             # a unicode digit is not an integer label
    with pytest.raises(InputTypeError, match="label 9 is a int; expected strings"): label_order([9])


def test_image_modes_match_numpy_on_random_pixels(tmp_path):
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g.png")
    np.testing.assert_allclose(read_image(tmp_path / "g.png").numpy(), np.stack([g16 / 65535] * 3), atol=1e-6)
    rgba = rng.integers(0, 256, (5, 7, 4)).astype(np.uint8)
    want = (rgba[..., :3] / 255 * rgba[..., 3:] / 255).transpose(2, 0, 1)      # composited on black
    np.testing.assert_allclose(image_to_float(Image.fromarray(rgba)).numpy(), want, atol=1e-6)
    grey = rng.integers(0, 256, (5, 7)).astype(np.uint8)
    np.testing.assert_allclose(image_to_float(Image.fromarray(grey)).numpy(), np.stack([grey / 255] * 3), atol=1e-6)
    with pytest.raises(InputError, match="image of item 1 has dtype torch.int64"):
        collate([{"image": torch.zeros(3, 2, 2)}, {"image": torch.zeros(3, 2, 2, dtype=torch.long)}])


def test_skipped_items_are_listed_once_per_epoch_with_workers(good):
    "Rows that break after the manifest was opened are reported by the batches, also from worker processes."
    names = [f"{i}.png" for i in range(10)]
    for n in names: Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good / n)
    ds = ManifestDataset(manifest(good, "m.csv", "image,text", *[f"{n},c{n}" for n in names]), on_error="skip", cache=False)
    for n in ("2.png", "5.png", "9.png"): (good / n).write_bytes(b"broken")
    dl = make_loader(ds, 4, seed=0, num_workers=2)
    for _ in range(2):
        reasons = [s for b in dl for s in b.get("skipped", [])]
        assert len(reasons) == 3
        assert sorted(r.split(": ")[0] for r in reasons) == sorted(f"{ds.path} row {n}" for n in (4, 7, 11))
        assert all("cannot decode image" in r for r in reasons)
    # wrappers pass the marker on instead of failing on it
    assert isinstance(ModalityDropout(ds, p=0.5)[2], Skipped) and isinstance(NoisyPairs(ds, "text", p=0.0)[5], Skipped)
