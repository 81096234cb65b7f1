"""A modality is a plug-in: one registered `Modality` (defined here, nowhere in the library) is batched by `collate`,
read from a manifest, fed to its tower by `tower_inputs`, built by `make_tower` and trained with CLIP by `Trainer`,
with no change to losses, trainer or evaluation."""
import csv
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmlab.core import ConfigError
from mmlab.data import (MODALITIES, CharTokenizer, ManifestDataset, load_dataset, Modality, check_modalities, collate, get_modality,
                        make_loader, register_modality, stack_fields, unregister_modality, x_inputs)
from mmlab.encoders import TowerConfig, TransformerEncoder, sincos_1d, tower_inputs
from mmlab.eval import zero_shot_eval
from mmlab.losses import clip_loss
from mmlab.models import MODEL_CLASSES, MultiModalModel, make_tower
from mmlab.train import TrainConfig, Trainer

LENGTH, CLASSES = 64, ("two", "four", "six", "eight")          # class k: a sine of 2(k+1) cycles over the window


@dataclass
class SignalConfig(TowerConfig):
    "1-D signal tower: patches of `patch` samples, sin-cos positions, mean pooling."
    length: int = LENGTH
    patch: int = 16                 # samples per token
    class_token: bool = False
    pool: str = "mean"
    PRESETS = {"tiny": dict(embed_dim=32, depth=1, num_heads=2)}


class SignalEncoder(TransformerEncoder):
    config_class = SignalConfig
    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.proj = nn.Linear(c.patch, c.embed_dim)
        self.register_buffer("pos", sincos_1d(torch.arange(c.length // c.patch), c.embed_dim)[None], persistent=False)
        self.init_weights()
    def embed(self, x):                                        # (B, L) -> ((B, L/patch, D), no padding)
        return self.proj(x.unflatten(-1, (-1, self.config.patch))) + self.pos, None
    def example_inputs(self, batch_size=2, generator=None):
        return dict(x=torch.randn(batch_size, self.config.length, generator=generator))


def _read_npy(ds, path, where): return torch.from_numpy(np.load(path)).float()


@pytest.fixture
def signal():
    "Register the modality and its tower for one test, and leave the registries as they were."
    mod = register_modality(Modality("signal", stack_fields, x_inputs, read=_read_npy, tower="SignalEncoder"))
    MODEL_CLASSES["SignalEncoder"] = SignalEncoder
    yield mod
    unregister_modality("signal"); del MODEL_CLASSES["SignalEncoder"]


def make_signals(n, seed):
    "Noisy sines whose number of cycles is the class; random phase."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(CLASSES), (n,), generator=g)
    t = torch.arange(LENGTH) / LENGTH
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    x = torch.sin(2 * torch.pi * 2 * (y[:, None] + 1) * t + phase) + 0.3 * torch.randn(n, LENGTH, generator=g)
    return x, y


def test_unknown_and_unregistered_names_are_clear_errors(signal):
    assert "signal" in MODALITIES and check_modalities(None)[-1] == "signal"      # a live view, registration order
    unregister_modality("signal")
    with pytest.raises(ConfigError, match=r"unknown modality 'signal'; registered modalities: image, audio, text, video "
                                          r"\(add one with register_modality\)"):
        get_modality("signal")
    with pytest.raises(ConfigError, match="unknown modality 'signal'; expected a subset of image, audio, text, video$"):
        check_modalities(["text", "signal"])
    with pytest.raises(ConfigError, match="unknown modality 'signal'"): make_tower("signal", "tiny")
    with pytest.raises(ConfigError, match="registered modalities: image, audio, text, video"): unregister_modality("signal")
    register_modality(signal)                                  # the fixture unregisters it again
    with pytest.raises(ConfigError, match="not usable"): register_modality(Modality("present", stack_fields, x_inputs))


def test_collate_manifest_and_tower_inputs(signal, tmp_path):
    x, y = make_signals(3, 0)
    for i in range(3): np.save(tmp_path / f"{i}.npy", x[i].numpy())
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["signal", "text", "label"], ["0.npy", "a", 0], ["", "b", 1], ["2.npy", "c", 2]])
    ds = ManifestDataset(tmp_path / "m.csv")
    assert ds.modalities == ("text", "signal")                 # columns found, in registration order
    b = collate([ds[i] for i in range(3)])
    assert b["present"]["signal"].tolist() == [True, False, True]
    torch.testing.assert_close(b["signal"], torch.stack([x[0], torch.zeros(LENGTH), x[2]]))   # absent: zeros
    assert set(tower_inputs(b, "signal")) == {"x"} and tower_inputs(b, "signal")["x"] is b["signal"]
    (tmp_path / "bad.csv").write_text("signal\nmissing.npy\n")
    with pytest.raises(Exception, match="bad.csv row 2: signal file .*missing.npy' does not exist"):
        ManifestDataset(tmp_path / "bad.csv")
    assert load_dataset("digits", "val").modalities == ("image", "audio", "text")   # the bundled files hold these three
    with pytest.raises(ConfigError, match="dataset 'digits' holds image, audio, text, not signal"):
        load_dataset("digits", "val", ["text", "signal"])


def test_clip_trains_on_the_new_modality(signal):
    torch.manual_seed(0)
    tok = CharTokenizer(max_len=32)
    x, y = make_signals(256, 1)
    train = [{"signal": x[i], "text": tok(CLASSES[int(y[i])]), "label": int(y[i])} for i in range(256)]
    model = MultiModalModel({"signal": make_tower("signal", "tiny"),
                             "text": make_tower("text", "tiny", vocab_size=tok.vocab_size, depth=1)}, proj_dim=16)
    assert isinstance(model.towers["signal"], SignalEncoder)

    def loss_fn(model, batch):                                 # the kit's CLIP loss; repeated captions are positives
        out = model(batch)
        return clip_loss(out["signal"], out["text"], out["logit_scale"], labels=batch["label"])

    cfg = TrainConfig(steps=40, lr=1e-3, device="cpu", precision="fp32", warmup_steps=4)
    hist = Trainer(model, loss_fn, make_loader(train, 32, seed=0, pad_id=tok.pad_id), cfg).fit()
    first, last = hist[0]["loss"], np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.75 * first, (first, last)

    xt, yt = make_signals(200, 2)                              # unseen signals, classified by text prompts alone
    model.eval()
    with torch.no_grad():
        prompts = collate([{"text": tok(c)} for c in CLASSES], pad_id=tok.pad_id)
        res = zero_shot_eval(model(collate([{"signal": s} for s in xt]))["signal"], model(prompts)["text"], yt)
    assert res["accuracy"] > 2 * res["chance"], res
