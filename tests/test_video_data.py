"""Video data (issue 22): the bundled `motion` set (determinism, motion needed, captions, audio following the
motion), the video modality's collate, `read_video`'s sampling rule and errors, manifests and shards of clips."""
import csv, io, math, sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmlab.core import ConfigError, DataError, InputError, InputTypeError, MissingFileError, ShapeError
from mmlab.data import (MODALITIES, ManifestDataset, ShardDataset, collate, count_video_frames, dataset_meta,
                        get_modality, load_dataset, manifest_samples, read_video, sample_frame_indices, write_shards,
                        write_video)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets_small"
LABELS = ["moving left", "moving right", "moving up", "moving down", "growing", "shrinking"]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def motion():
    "The stored arrays of train and test (uint8 clips, labels, captions)."
    out = {}
    for split in ("train", "test"):
        with np.load(DATA / "motion" / f"{split}.npz", allow_pickle=False) as z:
            out[split] = {k: z[k] for k in ("video", "label", "text")}
    return out


def object_state(frames):
    "Centre x, y and area (pixels) of the one coloured object in uint8 frames (..., H, W, 3); the background is grey."
    f = frames.astype(np.int16)
    mask = (f.max(-1) - f.min(-1)) > 40                               # colour, not grey
    area = mask.sum((-1, -2)).astype(float)
    ys, xs = np.arange(mask.shape[-2]), np.arange(mask.shape[-1])
    cx = (mask * xs).sum((-1, -2)) / np.maximum(area, 1); cy = (mask * ys[:, None]).sum((-1, -2)) / np.maximum(area, 1)
    return np.stack([cx, cy, area], -1)


def nearest_centroid_accuracy(xtr, ytr, xte, yte):
    mu = np.stack([xtr[ytr == c].mean(0) for c in range(len(LABELS))])
    pred = ((xte[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yte).mean())


# ---------------------------------------------------------------- the bundled set

def test_regenerating_clips_from_the_seed_gives_the_stored_bytes():
    sys.path.insert(0, str(DATA))
    try: from make_motion import make_clips
    finally: sys.path.remove(str(DATA))
    new = make_clips("val", 6)
    with np.load(DATA / "motion" / "val.npz", allow_pickle=False) as z:
        for k in ("video", "text", "label", "attr_x", "attr_y", "attr_radius", "attr_shape", "attr_colour", "attr_speed"):
            np.testing.assert_array_equal(new[k], z[k][:6], err_msg=k)
        off = z["audio_offsets"]
        assert new["audio_bytes"].tobytes() == z["audio_bytes"][:off[6]].tobytes()     # the Opus files, byte for byte
    assert make_clips("val", 2)["video"].tobytes() == new["video"][:2].tobytes()       # a second run: the same


def test_meta_lists_modalities_and_image_is_the_middle_frame():
    meta = dataset_meta("motion")
    assert meta["modalities"] == ["image", "audio", "text", "video"] and meta["label_names"] == LABELS
    ds = load_dataset("motion", "val")
    assert ds.modalities == ("image", "audio", "text", "video") and len(ds) == meta["splits"]["val"] == 300
    it = ds[3]
    assert it["video"].shape == (8, 3, 32, 32) and it["video"].dtype == torch.float32 and it["audio"].shape == (16000,)
    assert torch.equal(it["image"], it["video"][4])                                   # frame T // 2
    assert torch.equal(load_dataset("motion", "val", ("image", "text"))[3]["image"], it["image"])
    assert load_dataset("motion", "val", ["video"], image_size=16)[3]["video"].shape == (8, 3, 16, 16)
    assert load_dataset("shapes", "val").modalities == ("image", "audio", "text")    # no list in its meta: the three
    with pytest.raises(ConfigError, match="dataset 'shapes' holds image, audio, text, not video"):
        load_dataset("shapes", "val", ["text", "video"])
    with pytest.raises(ConfigError, match="unknown modality 'depth'"): load_dataset("motion", "val", ["depth"])
    with pytest.raises(ConfigError, match="bundled datasets are shapes, digits, motion"): load_dataset("moving", "val")


def test_middle_frame_state_has_one_distribution_for_every_class(motion):
    tr = motion["train"]
    st = object_state(tr["video"][:, 4])                                              # (N, 3): x, y, area
    assert (st[:, 2] > 5).all()                                                       # every object is found
    for j, name in enumerate(["x", "y", "area"]):
        means = np.array([st[tr["label"] == c, j].mean() for c in range(6)])
        se = st[:, j].std() / np.sqrt((tr["label"] == 0).sum())
        assert np.abs(means - means.mean()).max() < 4 * se, (name, means, se)         # within noise
    # ... while the clip's first and last frames tell the classes apart by construction
    first, last = object_state(tr["video"][:, 0]), object_state(tr["video"][:, 7])
    d = last - first
    lab = tr["label"]
    assert (d[lab == 0, 0] < 0).all() and (d[lab == 1, 0] > 0).all() and (d[lab == 2, 1] < 0).all() and (d[lab == 3, 1] > 0).all()
    assert (d[lab == 4, 2] > 0).all() and (d[lab == 5, 2] < 0).all()


def test_single_frames_are_at_chance_frame_differences_far_above(motion):
    tr, te = motion["train"], motion["test"]
    flat = lambda v: v.reshape(len(v), -1).astype(np.float32) / 255
    one = nearest_centroid_accuracy(flat(tr["video"][:, 4]), tr["label"], flat(te["video"][:, 4]), te["label"])
    diff = lambda v: object_state(v[:, 7]) - object_state(v[:, 0])
    two = nearest_centroid_accuracy(diff(tr["video"]), tr["label"], diff(te["video"]), te["label"])
    assert one < 0.3, one              # chance is 1/6; 300 test clips: a standard error of about 0.02
    assert two > 0.9, two


def test_captions_name_the_label_and_no_other_motion(motion):
    verbs = ["moves left", "moves right", "moves up", "moves down", "grows", "shrinks"]
    for split in ("train", "test"):
        for text, y in zip(motion[split]["text"], motion[split]["label"]):
            said = [c for c in range(6) if LABELS[c] in text or verbs[c] in text]
            assert said == [y], (text, y)


def test_audio_follows_the_motion():
    ds = load_dataset("motion", "val", ["audio"], cache=False)
    sr, q = 16000, 4000                                                                # quarters of a second

    def peak_hz(x):                     # the fundamental: the strongest peak, or a third of it when that is strong too
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))); f = np.fft.rfftfreq(len(x), 1 / sr); top = f[spec.argmax()]
        near = np.abs(f - top / 3) < 12                                                  # the 3rd harmonic may be the peak
        return top / 3 if spec[near].max() > 0.15 * spec.max() else top
    def rms(x): return float(np.sqrt(np.mean(x ** 2)))
    def bright(x):                                                                     # power above 1.5x the fundamental
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2; f = np.fft.rfftfreq(len(x), 1 / sr); f0 = peak_hz(x)
        return spec[f > 1.5 * f0].sum() / spec.sum()
    up = lambda h, t: math.log2(peak_hz(t) / peak_hz(h))                              # octaves the pitch rises
    rules = {2: lambda h, t: up(h, t) > 0.4, 3: lambda h, t: up(h, t) < -0.4,            # up: rises; down: falls
             0: lambda h, t: bright(t) < bright(h) and abs(up(h, t)) < 0.1,               # left: duller, one pitch
             1: lambda h, t: bright(t) > bright(h) and abs(up(h, t)) < 0.1,               # right: brighter
             4: lambda h, t: rms(t) > 1.1 * rms(h), 5: lambda h, t: rms(t) < rms(h) / 1.1} # growing: louder; shrinking: quieter
    ok = {c: [] for c in range(6)}
    for i in range(len(ds)):
        a = ds[i]["audio"].numpy()
        ok[int(ds.labels[i])].append(rules[int(ds.labels[i])](a[200:200 + q], a[-q - 200:-200]))
    share = {LABELS[c]: float(np.mean(v)) for c, v in ok.items()}
    # Opus at about 12 kbit/s flattens the level of a few loud, low tones (the loudness rule), so not every clip
    assert min(share.values()) >= 0.9, share


# ---------------------------------------------------------------- the modality

def test_registry_order_and_collate_errors():
    assert tuple(MODALITIES)[:4] == ("image", "audio", "text", "video") and get_modality("video").tower == "VideoEncoder"
    b = collate([{"video": torch.rand(8, 3, 4, 4), "label": 0}, {"video": None, "label": 1}])
    assert b["video"].shape == (2, 8, 3, 4, 4) and b["present"]["video"].tolist() == [True, False]
    assert b["video"][1].abs().sum() == 0 and set(get_modality("video").inputs(b, "video")) == {"x"}
    with pytest.raises(ShapeError, match="video of item 1 has shape \\(5, 3, 4, 4\\), item 0 has \\(8, 3, 4, 4\\); expected one num_frames"):
        collate([{"video": torch.rand(8, 3, 4, 4)}, {"video": torch.rand(5, 3, 4, 4)}])
    with pytest.raises(ShapeError, match="expected one num_frames and one frame size"):
        collate([{"video": torch.rand(8, 3, 4, 4)}, {"video": torch.rand(8, 3, 6, 6)}])
    with pytest.raises(InputError, match="dtype torch.uint8; expected floats in \\[0, 1\\]"):
        collate([{"video": torch.zeros(8, 3, 4, 4, dtype=torch.uint8)}])
    with pytest.raises(ShapeError, match="expected \\(num_frames, 3, H, W\\)"): collate([{"video": torch.rand(8, 4, 4, 3)}])


# ---------------------------------------------------------------- reading clips

def ramp_clip(n, size=16):
    "n frames whose grey level encodes the frame index (10 + 12 k), so a decoded frame tells which it was."
    return torch.stack([torch.full((3, size, size), (10 + 12 * k) / 255) for k in range(n)])


def test_sample_frame_indices_closed_form_and_errors():
    for S in (1, 2, 5, 8, 16):
        for M in range(S, 120):
            got = sample_frame_indices(M, S)
            assert got == [math.floor((i + 0.5) * M / S) for i in range(S)]
            assert len(set(got)) == S and got[0] >= 0 and got[-1] < M
    assert sample_frame_indices(300, 8) == [18, 56, 93, 131, 168, 206, 243, 281]
    with pytest.raises(DataError, match="a clip of 5 frames cannot give 8"): sample_frame_indices(5, 8)
    with pytest.raises(ConfigError, match="num_frames must be an int >= 1"): sample_frame_indices(5, 0)


def test_sampling_rule_is_tsn_test_time_sampling():
    # Peer: Temporal Segment Networks' reference loader (yjxiong/tsn-pytorch, dataset.py, TSNDataSet._get_test_indices,
    # new_length=1) takes tick = num_frames / num_segments and offsets int(tick / 2 + tick * x), 1-based (+ 1).
    # Transcribed here; the two agree except where (2i + 1) M / (2S) is a whole number, which the peer's float
    # product can land just below (e.g. M=12, S=7, i=3: 6 exactly, 5.999... in floats), and the kit's integers do not.
    differ = 0
    for S in (1, 2, 3, 7, 8, 16):
        for M in range(S, 600):
            tick = M / float(S)
            peer = [int(tick / 2.0 + tick * x) + 1 for x in range(S)]       # 1-based frame numbers
            ours = [j + 1 for j in sample_frame_indices(M, S)]
            for i, (a, b) in enumerate(zip(peer, ours)):
                if a != b:
                    assert (2 * i + 1) * M % (2 * S) == 0 and b == (2 * i + 1) * M // (2 * S) + 1 and a == b - 1, (M, S, i)
                    differ += 1
    assert sample_frame_indices(12, 7) == [0, 2, 4, 6, 7, 9, 11] and differ > 0


@pytest.mark.parametrize("suffix,codec", [("mp4", "libx264"), ("avi", "mpeg4"), ("webm", "libvpx-vp9")])
def test_read_video_takes_the_frames_the_rule_names(tmp_path, suffix, codec):
    p = write_video(tmp_path / f"ramp.{suffix}", ramp_clip(20), codec=codec)
    assert count_video_frames(p) == 20
    x = read_video(p)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    which = ((x.mean((1, 2, 3)) * 255 - 10) / 12).round().long().tolist()            # the grey level back to its frame
    assert which == sample_frame_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert torch.equal(read_video(p.read_bytes()), x)                                  # bytes (a shard member) = the file
    assert read_video(p, 4, size=8).shape == (4, 3, 8, 8)


def test_written_motion_clip_decodes_within_codec_error(tmp_path):
    clip = load_dataset("motion", "val", ["video"])[0]["video"]
    back = read_video(write_video(tmp_path / "c.mp4", clip))
    err = (back - clip).abs()
    assert err.mean() < 0.02 and err.flatten().quantile(0.99) < 0.2, (err.mean(), err.max())


def test_read_video_errors(tmp_path):
    short = write_video(tmp_path / "short.mp4", ramp_clip(5))
    with pytest.raises(DataError, match="short.mp4: video has 5 frames; expected at least 8"): read_video(short)
    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(DataError, match="fake.mp4: cannot open video .*expected a readable video file"): read_video(tmp_path / "fake.mp4")
    with pytest.raises(DataError, match="<bytes>: cannot open video"): read_video(b"\x00" * 100)
    cut = tmp_path / "cut.mp4"; cut.write_bytes(write_video(tmp_path / "ok.mp4", ramp_clip(12)).read_bytes()[:300])
    with pytest.raises(DataError, match="cut.mp4: cannot"): read_video(cut)
    wav = tmp_path / "tone.wav"; sf.write(wav, np.zeros(1600, np.float32), 16000)
    with pytest.raises(DataError, match="no video stream"): read_video(wav)
    with pytest.raises(MissingFileError, match="none.mp4' does not exist"): read_video(tmp_path / "none.mp4")
    with pytest.raises(InputTypeError, match="got ndarray"): read_video(np.zeros((8, 16, 16, 3)))
    with pytest.raises(ShapeError, match="write_video: expected a \\(T, 3, H, W\\) tensor"): write_video(tmp_path / "x.mp4", torch.rand(8, 16, 16, 3))


def test_manifest_and_shards_round_trip(tmp_path):
    ds = load_dataset("motion", "test", ["video", "text"])
    for i in range(4): write_video(tmp_path / f"{i}.mp4", ds[i]["video"])
    write_video(tmp_path / "short.mp4", ds[4]["video"][:5])
    rows = [["video", "text", "label"]] + [[f"{i}.mp4", ds[i]["text"], ds.label_names[ds.labels[i]]] for i in range(4)]
    with open(tmp_path / "m.csv", "w", newline="") as f: csv.writer(f).writerows(rows + [["", "no clip", "growing"]])
    m = ManifestDataset(tmp_path / "m.csv", cache=False)
    assert m.modalities == ("text", "video") and m.num_frames == 8
    b = collate([m[i] for i in range(len(m))])
    assert b["video"].shape == (5, 8, 3, 32, 32) and b["present"]["video"].tolist() == [True] * 4 + [False]
    assert (b["video"][:4] - torch.stack([ds[i]["video"] for i in range(4)])).abs().mean() < 0.02
    assert ManifestDataset(tmp_path / "m.csv", num_frames=3, image_size=16, cache=False)[0]["video"].shape == (3, 3, 16, 16)
    with open(tmp_path / "bad.csv", "w", newline="") as f: csv.writer(f).writerows(rows + [["short.mp4", "x", "growing"]])
    with pytest.raises(DataError, match="bad.csv row 6: video .*short.mp4' has 5 frames; expected at least 8"):
        ManifestDataset(tmp_path / "bad.csv", cache=False)
    assert len(ManifestDataset(tmp_path / "bad.csv", num_frames=5, cache=False)) == 5
    info = write_shards(manifest_samples(tmp_path / "m.csv"), tmp_path / "shards", "test", samples_per_shard=2)
    sd = ShardDataset(info["pattern"], modalities=["video", "text"], shuffle=False, cache=False, batch_size=2)
    got = sd.first(4)
    assert all(torch.equal(g["video"], m[i]["video"]) for i, g in enumerate(got))     # identical to the manifest's
    assert next(iter(sd))["video"].shape == (2, 8, 3, 32, 32)
    assert ShardDataset(info["pattern"], modalities=["video"], num_frames=8, shuffle=False, cache=False).first(5)[4].reason.startswith("no video member")
    bad = write_shards(iter([("000", {"mp4": b"broken", "txt": "a"})]), tmp_path / "bad", "x")
    sk = ShardDataset(bad["pattern"], modalities=["video"], shuffle=False, cache=False).first()
    assert "cannot open video" in sk[0].reason


def test_folder_of_clips_becomes_shards(tmp_path):
    from mmlab.data import folder_samples
    src = tmp_path / "clips"; src.mkdir()
    write_video(src / "0001.webm", ramp_clip(10), codec="libvpx-vp9"); (src / "0001.txt").write_text("a grey ramp")
    (src / "0002.json").write_text("{}")                                              # no member of any modality
    samples = list(folder_samples(src))
    assert samples[0][0] == "0001" and set(samples[0][1]) == {"webm", "txt"}
    assert "no image, audio, text or video member" in samples[1].reason
    info = write_shards(iter(samples), tmp_path / "shards", "train")
    got = ShardDataset(info["pattern"], modalities=["video", "text"], num_frames=5, shuffle=False, cache=False).first()
    assert got[0]["video"].shape == (5, 3, 16, 16) and got[0]["text"] == "a grey ramp" and info["skipped"] == 1


def test_counts_and_sizes_match_meta_and_budget():
    meta = dataset_meta("motion")
    for split, n in meta["splits"].items():
        ds = load_dataset("motion", split, ["text"])
        assert len(ds) == n and all(len(v) == n for v in ds.attrs.values())
        assert np.bincount(ds.labels, minlength=6).tolist() == [n // 6] * 6                # balanced classes
    size = sum(p.stat().st_size for p in (DATA / "motion").iterdir())
    assert size <= 6 * 2**20, f"motion/ is {size / 2**20:.2f} MiB > 6 MiB"
    sheet = (DATA / "DATASHEET.md").read_text()
    assert "`motion/train.npz` | 1800 |" in sheet and "## motion" in sheet


def test_shards_without_video_are_read_with_the_modalities_they_hold(tmp_path):
    "modalities=None reads what each sample holds (as a manifest reads its columns): image/text shards skip nothing."
    from PIL import Image
    buf = io.BytesIO(); Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    samples = [(f"{i:03d}", {"png": buf.getvalue(), "txt": f"red {i}"}) for i in range(3)]
    info = write_shards(iter(samples), tmp_path / "s", "train")
    got = ShardDataset(info["pattern"], shuffle=False, cache=False).first()
    assert all(isinstance(g, dict) for g in got), got
    assert set(got[0]) >= {"image", "text"} and "video" not in got[0] and got[2]["text"] == "red 2"
    b = next(iter(ShardDataset(info["pattern"], shuffle=False, cache=False, batch_size=3)))
    assert b["image"].shape == (3, 3, 8, 8) and "skipped" not in b
    with pytest.raises(DataError, match="no video member"):          # asked for: every sample must hold it
        ShardDataset(info["pattern"], modalities=["video"], on_error="raise", shuffle=False, cache=False).first()


def test_manifest_samples_keeps_clips_shorter_than_eight_frames(tmp_path):
    "The frame count is a read-time choice: a 6-frame clip is written to the shards and read with num_frames=6."
    write_video(tmp_path / "six.mp4", ramp_clip(6))
    (tmp_path / "m.csv").write_text("video,text\nsix.mp4,a ramp\n")
    info = write_shards(manifest_samples(tmp_path / "m.csv"), tmp_path / "s", "train")
    assert (info["samples"], info["skipped"]) == (1, 0)
    got = ShardDataset(info["pattern"], num_frames=6, shuffle=False, cache=False).first()[0]
    assert got["video"].shape == (6, 3, 16, 16)
    with pytest.raises(DataError, match="no usable rows"): next(manifest_samples(tmp_path / "m.csv", num_frames=8))   # asked for 8


def test_video_frames_have_their_own_size():
    "video_size sizes clips apart from images (None = image_size); num_frames takes frames of a bundled clip."
    ds = load_dataset("motion", "test", ["image", "video"], image_size=64, video_size=32)
    x = ds[0]
    assert x["image"].shape == (3, 64, 64) and x["video"].shape == (8, 3, 32, 32)
    assert load_dataset("motion", "test", ["video"], image_size=16)[0]["video"].shape == (8, 3, 16, 16)
    four = load_dataset("motion", "test", ["video"], num_frames=4)[0]["video"]
    assert torch.equal(four, x["video"][sample_frame_indices(8, 4)])
