"""WebDataset shards: the same tensors as the manifest, bad shards skipped and counted (never a hang), every sample
once per epoch over ranks x workers, an exact resume (seek) that matches an uninterrupted epoch and run, the
`mmlab shards` command and the recipe switch."""
import gc, hashlib, io, json, tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mmlab.core import ConfigError, DataError, MissingFileError
from mmlab.data import (CharTokenizer, LogMel, ManifestDataset, ShardDataset, Skipped, _round_robin_taken, _shuffle_buffer,
                        expand_shards, folder_samples, make_loader, manifest_samples, shard_labels, write_shards)
from mmlab.recipes import export_manifest, get_recipe, main, run_recipe, train_data
from mmlab.train import Trainer, TrainConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)          # a reader that hangs fails instead of blocking CI
KW = dict(modalities=["image", "audio", "text"], image_size=32, audio_features=LogMel(n_mels=32),
          transforms={"text": CharTokenizer(max_len=32)}, cache=False)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return export_manifest("digits", "test", tmp_path_factory.mktemp("src"), n=30)


@pytest.fixture(scope="module")
def shards(manifest, tmp_path_factory):
    "30 samples in shards of 4 (the last holds 2): uneven readers."
    out = tmp_path_factory.mktemp("shards")
    return write_shards(manifest_samples(manifest), out, "train", 4)


def keys(batches): return [k for b in batches for k in b["attrs"]["key"]]


def test_shard_sample_equals_manifest_sample(manifest, shards):
    ds, md = ShardDataset(shards["pattern"], shuffle=False, **KW), ManifestDataset(manifest, **KW)
    items = ds.first(5)
    for i in range(5):
        for m in ("image", "audio", "text"): assert torch.equal(items[i][m], md[i][m]), (i, m)
        assert items[i]["label"] == md[i]["label"] and items[i]["caption"] == md[i]["caption"]


def test_writer_is_deterministic_and_summarises(manifest, shards, tmp_path):
    again = write_shards(manifest_samples(manifest), tmp_path, "train", 4)
    digest = lambda p: [hashlib.sha256(u.read_bytes()).hexdigest() for u in sorted(Path(p).glob("train-*.tar"))]
    assert digest(tmp_path) == digest(Path(shards["pattern"]).parent)
    assert (again["samples"], again["shards"], again["skipped"]) == (30, 8, 0)
    assert json.loads((tmp_path / "train-summary.json").read_text())["shards"] == 8
    with tarfile.open(tmp_path / "train-000000.tar") as t:      # img2dataset's layout: key.png, key.wav, key.txt, key.json
        assert sorted(n.split(".", 1)[1] for n in t.getnames())[:4] == ["json", "json", "json", "json"]
        assert {n.split(".", 1)[1] for n in t.getnames()} == {"png", "wav", "txt", "json"}


def test_expand_shards_checks_files(shards, tmp_path):
    folder = Path(shards["pattern"]).parent
    assert len(expand_shards(str(folder / "train-{000000..000009}.tar"))) == 8      # past the set's end: its summary says 8
    with pytest.raises(MissingFileError, match="do not exist"): expand_shards(str(tmp_path / "x-{000000..000002}.tar"))
    (tmp_path / "a-000000.tar").write_bytes((folder / "train-000000.tar").read_bytes())
    with pytest.raises(MissingFileError, match="1 of 2"): expand_shards(str(tmp_path / "a-{000000..000001}.tar"))


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shards):
    seen = {}
    for epoch in (0, 1):
        ks = []
        for rank in (0, 1):
            ds = ShardDataset(shards["pattern"], batch_size=3, shuffle_buffer=5, seed=1, rank=rank, world=2, **KW)
            ds.set_epoch(epoch)
            ks += keys(make_loader(ds, num_workers=2))
        assert sorted(ks) == [f"{i:09d}" for i in range(30)]                     # each once, none lost
        seen[epoch] = ks
    assert seen[0] != seen[1]                                                    # a new order each epoch


def test_too_few_shards_for_the_readers(shards):
    ds = ShardDataset(shards["pattern"], rank=0, world=5, **KW)
    with pytest.raises(ConfigError, match="8 shard.*5 process.*2 worker"): list(make_loader(ds, num_workers=2))


def test_shuffle_buffer_is_a_permutation_and_seeded():
    import numpy as np
    out = list(_shuffle_buffer(range(50), 8, np.random.default_rng(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(_shuffle_buffer(range(50), 8, np.random.default_rng(0)))
    assert list(_shuffle_buffer(range(5), 0, np.random.default_rng(0))) == list(range(5))


def test_round_robin_model():
    assert _round_robin_taken(4, [3, 1]) == ([3, 1], [])      # w0 w1 w0 (w1 dry) w0
    assert _round_robin_taken(3, [3, 3]) == ([2, 1], [1, 0])  # w1 gives next
    assert _round_robin_taken(3, [3, 1]) == ([2, 1], [0])     # w1 dry: only w0 left
    assert _round_robin_taken(0, [3, 3]) == ([0, 0], [0, 1])


@pytest.mark.parametrize("workers", [0, 2])
def test_seek_gives_the_rest_of_the_epoch_bit_identically(shards, workers):
    "Skipping k batches (reading, not decoding) gives exactly batches k.. of the uninterrupted epoch, on both sides of a worker running dry."
    ds = ShardDataset(shards["pattern"], batch_size=3, shuffle_buffer=6, seed=3, **KW)
    ds.set_epoch(2); full = list(make_loader(ds, num_workers=workers))
    for k in (1, 5, len(full) - 1):
        ds.set_epoch(2, skip=k); rest = list(make_loader(ds, num_workers=workers))
        assert len(rest) == len(full) - k
        for a, b in zip(full[k:], rest):
            assert a["attrs"]["key"] == b["attrs"]["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["audio"], b["audio"])


class _Linear(nn.Module):
    def __init__(self): super().__init__(); torch.manual_seed(0); self.f = nn.Linear(3 * 32 * 32, 1)
    def forward(self, b): return ((self.f(b["image"].flatten(1)).squeeze(1) - b["label"].float() / 10) ** 2).mean()


def test_killed_and_resumed_run_is_bit_identical(shards, tmp_path):
    names = shard_labels(shards["pattern"])
    make = lambda: make_loader(ShardDataset(shards["pattern"], batch_size=4, shuffle_buffer=6, seed=0, labels=names, **KW), num_workers=2)
    cfg = lambda out, steps: TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, ckpt_every=5, out_dir=str(out), device="cpu", precision="fp32", log_to="jsonl")
    full = Trainer(_Linear(), lambda m, b: m(b), make(), cfg(tmp_path / "a", 12)); full.fit()    # 8 batches an epoch: crosses one
    part = Trainer(_Linear(), lambda m, b: m(b), make(), cfg(tmp_path / "b", 12))
    part.cfg = replace(part.cfg, steps=5); part.fit()           # "killed" after its checkpoint at step 5
    del part; gc.collect()                                       # its workers (which inherited the run lock) end
    resumed = Trainer(_Linear(), lambda m, b: m(b), make(), cfg(tmp_path / "b", 12))
    resumed.resume(tmp_path / "b"); assert (resumed.step, resumed.batch_in_epoch) == (5, 5)
    resumed.fit()
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()): assert torch.equal(p, q), n


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))


def test_bad_shards_are_skipped_and_counted_or_raise(shards, tmp_path):
    good = Path(shards["pattern"]).parent / "train-000000.tar"
    with tarfile.open(good) as t: m = {n: t.extractfile(n).read() for n in t.getnames()}
    k = sorted({n.split(".")[0] for n in m})
    _tar(tmp_path / "b-000000.tar", [(f"{k[0]}.{e}", m[f"{k[0]}.{e}"]) for e in ("png", "wav", "txt", "json")]   # good
                                    + [(f"{k[1]}.{e}", m[f"{k[1]}.{e}"]) for e in ("png", "txt", "json")]        # no audio
                                    + [(f"{k[2]}.png", b"\x89PNG not an image")] + [(f"{k[2]}.{e}", m[f"{k[2]}.{e}"]) for e in ("wav", "txt", "json")])
    cut = good.read_bytes(); (tmp_path / "b-000001.tar").write_bytes(cut[:len(cut) // 2])   # truncated inside a member
    pattern = str(tmp_path / "b-{000000..000001}.tar")
    batches = list(make_loader(ShardDataset(pattern, batch_size=64, shuffle=False, **KW)))
    assert len(batches) == 1 and len(batches[0]["image"]) == 1 + 1          # the good sample, and the complete one before the cut
    reasons = batches[0]["skipped"]
    assert len(reasons) == 3
    assert any("no audio member" in r for r in reasons) and any("cannot decode image" in r for r in reasons)
    assert any("b-000001.tar: unreadable shard" in r for r in reasons)
    with pytest.raises(DataError, match="no audio member"):
        list(make_loader(ShardDataset(pattern, batch_size=64, shuffle=False, on_error="raise", **KW)))
    with pytest.raises(DataError, match="expected a complete tar file"):
        list(make_loader(ShardDataset(str(tmp_path / "b-000001.tar"), shuffle=False, on_error="raise", **KW)))


def test_trainer_counts_skipped_shard_samples(tmp_path, shards):
    good = Path(shards["pattern"]).parent / "train-000000.tar"
    (tmp_path / "c-000000.tar").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / "c-000001.tar").write_bytes(good.read_bytes())
    data = make_loader(ShardDataset(str(tmp_path / "c-{000000..000001}.tar"), batch_size=8, shuffle=False, **KW))
    t = Trainer(_Linear(), lambda m, b: ((m.f(b["image"].flatten(1))) ** 2).mean(), data, TrainConfig(steps=2, device="cpu"))
    t.fit()
    assert t.skipped >= 1 and "unreadable shard" in t.skip_reasons[0]


def test_shards_command_from_a_folder(tmp_path, shards, capsys):
    src = tmp_path / "folder"; src.mkdir()
    with tarfile.open(Path(shards["pattern"]).parent / "train-000001.tar") as t: t.extractall(src, filter="data")
    (src / "stray.bin").write_bytes(b"x")                                       # no modality member: skipped, counted
    assert main(["shards", str(src), str(tmp_path / "out"), "--samples-per-shard", "3", "--split", "val"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out.splitlines()[0])
    assert (info["split"], info["samples"], info["shards"], info["skipped"]) == ("val", 4, 2, 1)
    assert "out/{split}-{000000..000001}.tar" in out
    assert main(["shards", str(src), str(tmp_path / "o2"), "--bogus", "1"]) == 2
    assert list(folder_samples(src))[0][0] == sorted(p.name.split(".")[0] for p in src.iterdir())[0]


def test_recipe_trains_on_shards_and_checks_its_switches(shards):
    pattern = str(Path(shards["pattern"]).parent / "{split}-{000000..000007}.tar")
    r = get_recipe("clip", dataset=pattern, steps=6, batch_size=8, lr=3e-3, warmup_steps=1, device="cpu", seed=0)
    assert isinstance(train_data(r).dataset, ShardDataset)
    res = run_recipe(r, evaluate_after=False)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="shuffle_buffer=-1"): get_recipe("clip", dataset=pattern, shuffle_buffer=-1)
    with pytest.raises(ConfigError, match="n_train and mismatch"): train_data(r, n=4)
    assert shard_labels(shards["pattern"]) == sorted(set(shard_labels(shards["pattern"])), key=shard_labels(shards["pattern"]).index)
