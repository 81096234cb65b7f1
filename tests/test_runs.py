"""Run folders: exact resume with DataLoader workers, skipped samples, one process per run folder, atomic writes
that survive a full disk, seeds, and CLI errors that are one clear line."""
import json, math, os, random, shutil, signal, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mmlab.core import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------
# kill-and-resume across an epoch boundary with workers=2 and a random per-sample transform in the workers
RUN_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch, torch.nn as nn
    from mmlab.data import ManifestDataset, image_augment, make_loader
    from mmlab.core import set_seed
    from mmlab.train import Callback, Trainer, TrainConfig
    manifest, out, steps, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1); set_seed(0)
    ds = ManifestDataset(manifest, modalities=["image"], image_size=16,
                         transforms={"image": image_augment(size=12, scale=(0.3, 1.0))})   # random per sample, in the workers
    data = make_loader(ds, 8, seed=0, num_workers=2, drop_last=True)                          # 3 batches per epoch
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4))
    loss_fn = lambda m, b: m(b["image"]).pow(2).mean()
    class Kill(Callback):
        def on_checkpoint(self, trainer, path):
            if trainer.step == kill_at: os.kill(os.getpid(), signal.SIGKILL)    # no clean-up of any kind
    cfg = TrainConfig(steps=steps, lr=1e-2, device="cpu", precision="fp32", out_dir=out, ckpt_every=5)
    t = Trainer(model, loss_fn, data, cfg, callbacks=[Kill()])
    if kill_at < 0: t.resume(out)
    t.fit()
''')

def _run_script(tmp_path, *args):
    script = tmp_path / "run.py"; script.write_text(RUN_SCRIPT)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)

def test_kill_and_resume_with_workers_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    from mmlab.recipes import export_manifest
    manifest = export_manifest("digits", "train", tmp_path / "data", n=24)
    p = _run_script(tmp_path, manifest, tmp_path / "full", 8, 0)                 # uninterrupted: 8 updates, 3 epochs
    assert p.returncode == 0, p.stderr
    p = _run_script(tmp_path, manifest, tmp_path / "killed", 8, 5)               # killed after its step-5 checkpoint
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [c.name for c in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-00000005"]   # epoch 2, batch 2
    p = _run_script(tmp_path, manifest, tmp_path / "killed", 8, -1)              # resumed in a fresh process
    assert p.returncode == 0, p.stderr
    full = load_file(str(tmp_path / "full/checkpoints/step-00000008/tensors.safetensors"))
    resumed = load_file(str(tmp_path / "killed/checkpoints/step-00000008/tensors.safetensors"))
    assert sorted(full) == sorted(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full), [k for k in full if not torch.equal(full[k], resumed[k])]

def _mmlab(*args, env=None, cwd=None):
    exe = shutil.which("mmlab")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from mmlab.recipes import main; sys.exit(main())"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, env=env, cwd=cwd)

# ---------------------------------------------------------------------------------------------
# a bad file, flag or setting reaches a CLI user as one line `mmlab: error: ...` and exit status 2, never a traceback
# (no case for a file without read permission: the tests run as root, which reads every file)
def _bad_files(tmp:Path):
    (tmp / "afile").write_text("x"); (tmp / "dir_manifest" / "train.csv").mkdir(parents=True)
    (tmp / "bin_train.csv").write_bytes(b"\x00\xff\xfe binary")
    (tmp / "corrupt" / "checkpoints" / "step-00000001").mkdir(parents=True); (tmp / "corrupt" / "recipe.json").write_text("{not json")
    (tmp / "bad.ini").write_text("[mmlab\ndevice = cpu\n"); (tmp / "unknown.ini").write_text("[mmlab]\nfoo = 1\n")
    (tmp / "busy").mkdir(); (tmp / "busy" / "metrics.jsonl").write_text("{}\n")

BAD_CASES = [  # (args, MMLAB_* environment, what the one line must say); {tmp} is the test's folder
    (("train", "clip", "--stepz", "1"), {}, "has no key 'stepz'"),
    (("train", "clip", "--steps", "1.5"), {}, "--steps '1.5' is not a valid int"),
    (("train", "clip", "--steps"), {}, "--steps needs a value"),
    (("train", "clip", "--overwrite", "maybe"), {}, "--overwrite 'maybe': expected true or false"),
    (("train", "clip", "--out", "{tmp}/afile"), {}, "is a file; expected a folder"),
    (("train", "clip", "--out", "{tmp}/afile/run"), {}, "cannot create run folder"),
    (("train", "clip", "--out", "{tmp}/busy"), {}, "is not empty (it holds metrics.jsonl)"),
    (("train", "clip", "--dataset", "{tmp}/missing_{split}.csv"), {}, "does not exist"),
    (("train", "clip", "--dataset", "{tmp}/dir_manifest/{split}.csv"), {}, "train.csv"),
    (("train", "clip", "--dataset", "{tmp}/bin_{split}.csv"), {}, "is not UTF-8"),
    (("eval", "{tmp}/corrupt"), {}, "recipe.json is unreadable or corrupt"),
    (("eval", "{tmp}/afile"), {}, "no checkpoint in"),
    (("train", "--resume", "{tmp}/corrupt"), {}, "recipe.json is unreadable or corrupt"),
    (("train", "clip", "--steps", "1"), {"MMLAB_DEVICE": "quantum"}, "MMLAB_DEVICE; expected auto, cpu"),
    (("train", "clip", "--steps", "1"), {"MMLAB_SETTINGS": "{tmp}/bad.ini"}, "cannot parse"),
    (("train", "clip", "--steps", "1"), {"MMLAB_SETTINGS": "{tmp}/unknown.ini"}, "unknown setting 'foo'"),
    (("train", "clip", "--steps", "1"), {"MMLAB_SEED": "abc"}, "expected an integer >= 0"),
]

@pytest.mark.parametrize("args,env,msg", BAD_CASES)
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, args, env, msg):
    _bad_files(tmp_path)
    fill = lambda v: v.replace("{tmp}", str(tmp_path))
    p = _mmlab(*map(fill, args), env=os.environ | {k: fill(v) for k, v in env.items()}, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert (p.returncode, len(lines)) == (2, 1) and lines[0].startswith("mmlab: error: ") and msg in lines[0], (args, p.stderr)

# ---------------------------------------------------------------------------------------------
# skipped samples: counted per run (part of the checkpoint), logged, with the first reasons
def _batches(*skipped):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=g)} | ({"skipped": s} if s is not None else {}) for s in skipped]

def test_trainer_counts_skipped_samples_and_resumes_the_count(tmp_path):
    from mmlab.train import Trainer, TrainConfig
    data = _batches(["a.csv row 3: unreadable image"], None, ["a.csv row 9: audio too short", "a.csv row 11: empty text"], 2)
    def trainer(steps, out=None):
        torch.manual_seed(0)
        return Trainer(torch.nn.Linear(3, 1), lambda m, b: m(b["x"]).pow(2).mean(), data,
                       TrainConfig(steps=steps, device="cpu", precision="fp32", out_dir=out, ckpt_every=3))
    t = trainer(6); t.fit()
    assert [r.get("skipped", 0) for r in t.history] == [1, 1, 3, 5, 6, 6]   # cumulative; an int (older collate) counts too
    assert t.skipped == 6 and t.skip_reasons == ["a.csv row 3: unreadable image", "a.csv row 9: audio too short",
                                                 "a.csv row 11: empty text", "a.csv row 3: unreadable image"]   # epoch 2 too
    full = trainer(6, tmp_path / "a"); full.fit()
    trainer(3, tmp_path / "b").fit()                                    # stopped after step 3 (mid-epoch 2)
    resumed = trainer(6, tmp_path / "b"); resumed.resume(tmp_path / "b"); resumed.fit()
    assert (resumed.skipped, resumed.skip_reasons) == (full.skipped, full.skip_reasons)   # replayed batches not counted twice
    logged = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in logged] == [1, 1, 3, 5, 6, 6]

def test_skipped_rows_are_counted_exactly_with_workers(tmp_path):
    from mmlab.data import ManifestDataset, make_loader
    from mmlab.recipes import export_manifest
    from mmlab.train import Trainer, TrainConfig
    manifest = export_manifest("digits", "train", tmp_path, n=24)
    ds = ManifestDataset(manifest, modalities=["image"], image_size=8, on_error="skip", cache=False)
    for i in (2, 17): (tmp_path / f"train/{i:05d}.png").write_bytes(b"not a png")   # two images broken after the check
    t = Trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1)), lambda m, b: m(b["image"]).pow(2).mean(),
                make_loader(ds, 8, seed=0, num_workers=2), TrainConfig(steps=3, device="cpu", precision="fp32"))
    t.fit()                                                             # one epoch: every row once, in two worker processes
    assert t.skipped == 2 and t.history[-1]["skipped"] == 2

# ---------------------------------------------------------------------------------------------
# run folders: a non-empty one is refused unless resumed or overwritten; overwriting never mixes two runs
def _tiny(steps=2, **kw):
    from mmlab.recipes import get_recipe
    return get_recipe("clip", steps=steps, batch_size=16, modalities=("image", "text"), device="cpu", precision="fp32", **kw)

def _steps(run): return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]

def test_non_empty_run_folder_is_refused_unless_overwritten(tmp_path):
    from mmlab.recipes import run_recipe
    run = tmp_path / "run"
    run_recipe(_tiny(3), run, n_train=32, evaluate_after=False)
    files = lambda: {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"}
    before = files()
    with pytest.raises(ConfigError, match=r"run folder .*run is not empty \(it holds checkpoints, metrics.jsonl, recipe.json\)"
                                          r".*mmlab train --resume .*--overwrite true"):
        run_recipe(_tiny(2), run, n_train=32, evaluate_after=False)
    assert files() == before                                                  # untouched
    run_recipe(_tiny(2, lr=1e-4), run, n_train=32, evaluate_after=False, overwrite=True)
    assert _steps(run) == [1, 2]                                              # not [1, 2, 3, 1, 2]
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert json.loads((run / "recipe.json").read_text())["lr"] == 1e-4
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds notes.txt, which no run writes; nothing was deleted"):
        run_recipe(_tiny(2), run, n_train=32, evaluate_after=False, overwrite=True)
    assert (run / "recipe.json").is_file() and (run / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is a file; expected a folder"):
        run_recipe(_tiny(2), run / "notes.txt", n_train=32, evaluate_after=False)
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        run_recipe(_tiny(2), run, resume=True, overwrite=True)

def test_resume_never_rewrites_recipe_json(tmp_path):
    from mmlab.recipes import run_recipe
    run = tmp_path / "run"
    run_recipe(_tiny(4, ckpt_every=2), run, n_train=32, evaluate_after=False)
    stat = (run / "recipe.json").stat()
    sorted((run / "checkpoints").iterdir())[-1].rename(run / "checkpoints" / ".tmp-gone")   # as if killed after step 2
    run_recipe(_tiny(4, ckpt_every=2), run, n_train=32, evaluate_after=False, resume=True)
    assert (run / "recipe.json").stat().st_mtime_ns == stat.st_mtime_ns and _steps(run) == [1, 2, 3, 4]

# ---------------------------------------------------------------------------------------------
# one process per run folder: a real second process is refused with the holder's pid; a kill frees the folder
def test_second_process_in_a_run_folder_is_refused(tmp_path):
    from mmlab.train import run_lock
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mmlab.train import run_lock\n"
                               f"with run_lock({str(run)!r}): print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = _mmlab("train", "clip", "--steps", "1", "--out", str(run))
        assert p.returncode == 2 and p.stderr.splitlines() == [
            f"mmlab: error: run folder {run} is in use by process {holder.pid} (lock file {run / '.lock'}); "
            "wait for that run to end or stop it, or choose another folder"], p.stderr
    finally:
        holder.send_signal(signal.SIGKILL); holder.wait()
    with run_lock(run): pass                                                  # the OS released the killed holder's lock

def test_trainer_takes_the_run_lock_re_entrantly(tmp_path):
    from mmlab.train import Callback, Trainer, TrainConfig, run_lock
    class Probe(Callback):                                                     # another process, while fit() runs
        def on_step_end(self, t):
            self.p = subprocess.run([sys.executable, "-c", f"from mmlab.train import run_lock\nwith run_lock({str(tmp_path)!r}): pass"],
                                    capture_output=True, text=True)
    probe = Probe()
    with run_lock(tmp_path):                                                   # as run_recipe holds it around the Trainer
        Trainer(torch.nn.Linear(3, 1), lambda m, b: m(b["x"]).pow(2).mean(), _batches(None),
                TrainConfig(steps=1, device="cpu", out_dir=str(tmp_path)), callbacks=[probe]).fit()
    assert probe.p.returncode != 0 and f"in use by process {os.getpid()}" in probe.p.stderr

# ---------------------------------------------------------------------------------------------
# a full disk (here: a file-size limit, so writes fail with EFBIG) gives a clear error and keeps what was there
FULL_DISK = textwrap.dedent('''
    import resource, signal, sys, torch
    from pathlib import Path
    from mmlab.core import CheckpointError
    from mmlab.train import atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint
    d = Path(sys.argv[1])
    save_checkpoint(d / "checkpoints", 1, {"w": torch.zeros(10)}, {"step": 1})
    atomic_write(d / "recipe.json", "old")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                 # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for write in (lambda: save_checkpoint(d / "checkpoints", 2, {"w": torch.zeros(100_000)}, {"step": 2}),
                  lambda: atomic_write(d / "recipe.json", "x" * 100_000)):
        try: write(); print("no error")
        except CheckpointError as e: print(e)
    print(load_checkpoint(latest_checkpoint(d / "checkpoints"))[1], (d / "recipe.json").read_text())
    print(sorted(p.name for p in d.rglob("*")))
''')

def test_full_disk_during_a_save_keeps_the_previous_files(tmp_path):
    script = tmp_path / "full.py"; script.write_text(FULL_DISK)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ckpt, recipe, loaded, files = p.stdout.splitlines()
    assert ckpt == (f"cannot save the step-2 checkpoint in {tmp_path / 'run' / 'checkpoints'}: File too large; "
                    "the previous checkpoint step-00000001 is unchanged")
    assert recipe == f"cannot write {tmp_path / 'run' / 'recipe.json'}: File too large; its previous content is unchanged"
    assert loaded == "{'step': 1} old"
    assert files == str(["checkpoints", "recipe.json", "state.json", "step-00000001", "tensors.safetensors"])  # no temp left

# ---------------------------------------------------------------------------------------------
# run_recipe seeds Python's and NumPy's generators too: a loss drawing from them repeats exactly
def test_run_recipe_seeds_python_and_numpy(tmp_path):
    from mmlab.recipes import ClipRecipe, run_recipe
    class NoisyClip(ClipRecipe):
        def make_loss(self):
            base = super().make_loss()
            def loss_fn(model, batch):
                noise = torch.from_numpy(np.random.randn(*batch["image"].shape)).float() * 0.1 + random.random()
                return base(model, batch | {"image": batch["image"] + noise})
            return loss_fn
    def losses():
        random.random(); np.random.rand()                                    # whatever ran before
        r = run_recipe(NoisyClip(steps=3, batch_size=16, modalities=("image", "text"), device="cpu", precision="fp32"),
                       n_train=32, evaluate_after=False)
        return [h["loss"] for h in r.history]
    assert losses() == losses()

# ---------------------------------------------------------------------------------------------
# the Trainer calls every module's clamp_parameters_ after each optimiser step
def test_trainer_clamps_parameters_after_each_step():
    from mmlab.models import MultiModalModel, make_tower
    from mmlab.train import Trainer, TrainConfig
    class Clamped(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.lin, self.calls, self.seen = torch.nn.Linear(3, 1), 0, []
        def forward(self, x): return self.lin(x)
        def clamp_parameters_(self):
            self.calls += 1; self.seen.append(self.lin.bias.item())
            with torch.no_grad(): self.lin.bias.clamp_(max=0.0)
    m = Clamped()
    with torch.no_grad(): m.lin.bias.fill_(5.0)
    Trainer(m, lambda m, b: (m(b["x"]) - 10).pow(2).mean(), _batches(None), TrainConfig(steps=4, device="cpu", lr=0.1)).fit()
    assert m.calls == 4 and m.seen[0] > 0 and m.lin.bias.item() == 0.0      # after the step that raised it, every step
    torch.manual_seed(0)
    mm = MultiModalModel({"image": make_tower("image", "tiny"), "text": make_tower("text", "tiny")}, proj_dim=8)
    with torch.no_grad(): mm.log_scale.fill_(math.log(500.0))              # above the cap of 100
    from mmlab.recipes import load_split, contrastive_loss_fn, get_recipe
    rec = get_recipe("clip", modalities=("image", "text"))
    Trainer(mm, contrastive_loss_fn(rec), [load_split(rec, "train", 8)], TrainConfig(steps=1, device="cpu")).fit()
    assert mm.log_scale.exp().item() == pytest.approx(mm.max_scale)

