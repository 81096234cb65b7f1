"""Run folders: exact resume with DataLoader workers, skipped samples, one process per run folder, atomic writes
that survive a full disk, seeds, and CLI errors that are one clear line."""
import json, os, random, signal, subprocess, sys, textwrap
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
