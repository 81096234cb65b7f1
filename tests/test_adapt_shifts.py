"""mmlab.adapt, the added shifts and the late fusion: a new background keeps full ink and shows the texture where
there is none (the 'over' operator in float64), a speed change matches numpy's interpolation and is the identity
at factor 1, a mel shift moves bins and back, and the shifted batch keeps its lengths and padding mask consistent.
The fusion classifier with one modality present is the linear layer on that embedding, never reads an absent
modality, and modality dropout never empties a sample, is seeded and drops at the closed-form rate."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlab.adapt import (FusionClassifier, SHIFTS, accuracy, audio_fields, composite, fine_tune, fusion_inputs,
                         mark_absent, mel_shift, modality_dropout, new_background, shift_batch, smooth_background,
                         time_stretch)
from mmlab.core import ConfigError, InputError, ShapeError
from mmlab.data import take
from mmlab.models import create_model
from mmlab.recipes import ClipRecipe, load_split

MODS = ("image", "audio", "text")
g = lambda s: torch.Generator().manual_seed(s)

_DATA = {}
def _batch(n=12):
    "The first n test examples of the bundled digits (image, log-mel audio with lengths, char-token text, labels)."
    if "test" not in _DATA: _DATA["test"] = load_split(ClipRecipe(device="cpu", precision="fp32"), "test", 24)
    return take(_DATA["test"], range(n))


def _specs(B=5, n_mels=8, T=40, seed=0):
    "Random float64 log-mel spectrograms with ragged lengths (one full) and zero padding, as collate writes them."
    x = torch.randn(B, n_mels, T, generator=g(seed), dtype=torch.float64)
    lens = torch.tensor([T, 31, 17, 5, 1][:B])
    return x.masked_fill(torch.arange(T)[None, None] >= lens[:, None, None], 0.0), lens


# ---- new background -----------------------------------------------------------------------------------------------
def test_new_background_keeps_full_ink_and_shows_the_texture_where_there_is_none():
    x = torch.rand(3, 3, 16, 16, generator=g(0))
    x[:, :, 4:8] = 1.0; x[:, :, 10:] = 0.0                                   # full ink rows, empty rows
    out, bg = new_background(x, g(1), level=0.4), smooth_background(x.shape, g(1), level=0.4)
    assert torch.equal(out[x == 1], x[x == 1]) and torch.equal(out[x == 0], bg[x == 0])
    a, b = x.double().numpy(), bg.double().numpy()                           # float64 'over': alpha a, white ink
    np.testing.assert_allclose(out.double().numpy(), a * 1.0 + (1 - a) * b, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1 and (out >= x - 1e-7).all()    # compositing over black only adds light
    assert torch.equal(new_background(x, g(1), level=0.4), out) and not torch.equal(new_background(x, g(2), level=0.4), out)
    assert torch.equal(composite(x, torch.zeros_like(x)), x)                 # a black background is the original


def test_smooth_background_is_in_range_and_smooth():
    for cells, level, H in ((4, 0.3, 32), (2, 1.0, 9), (8, 0.5, 64)):
        bg = smooth_background((2, 3, H, H), g(cells), cells=cells, level=level)
        assert bg.shape == (2, 3, H, H) and bg.min() >= 0 and bg.max() <= level + 1e-7
        step = level * (cells - 1) / (H - 1) + 1e-6                         # bilinear: the steepest grid slope per pixel
        assert bg.diff(dim=-1).abs().max() <= step and bg.diff(dim=-2).abs().max() <= step


def test_new_background_names_bad_input():
    with pytest.raises(ShapeError, match="new_background"): new_background(torch.rand(3, 8, 8), g(0))
    with pytest.raises(InputError, match=r"\[0, 1\]"): new_background(torch.rand(1, 3, 8, 8) * 2, g(0))
    with pytest.raises(InputError, match="level"): smooth_background((1, 3, 8, 8), g(0), level=1.5)
    with pytest.raises(InputError, match="cells"): smooth_background((1, 3, 8, 8), g(0), cells=1)
    with pytest.raises(ShapeError, match="composite"): composite(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4))


# ---- speed and pitch ----------------------------------------------------------------------------------------------
def test_time_stretch_at_factor_one_is_the_identity_bit_for_bit():
    x, lens = _specs()
    out, new = time_stretch(x, lens, 1.0)
    assert torch.equal(out, x) and torch.equal(new, lens)
    a = _batch()
    out, new = time_stretch(a["audio"], a["audio_lengths"], 1)
    assert torch.equal(out, a["audio"]) and torch.equal(new, a["audio_lengths"])


@pytest.mark.parametrize("rho", [1.5, 0.8, 2.0, 0.5, 1.25])
def test_time_stretch_matches_numpy_interpolation_and_documented_lengths(rho):
    x, lens = _specs()
    T = x.shape[-1]
    out, new = time_stretch(x, lens, rho, pad=-7.0)
    assert new.tolist() == [min(T, max(1, round(n / rho))) for n in lens.tolist()]   # Python's round: halves to even
    for i, (n, n2) in enumerate(zip(lens.tolist(), new.tolist())):
        t = np.clip((np.arange(n2) + 0.5) * rho - 0.5, 0, n - 1)            # frame centres, clamped to the clip
        ref = np.stack([np.interp(t, np.arange(n), row) for row in x[i, :, :n].numpy()])
        np.testing.assert_allclose(out[i, :, :n2].numpy(), ref, atol=1e-12)
        assert (out[i, :, n2:] == -7.0).all()                                # padding holds the pad value


def test_time_stretch_keeps_a_constant_in_time_spectrogram_constant():
    x, lens = _specs()
    flat = x[:, :, :1].expand_as(x).contiguous()
    for rho in (0.7, 1.5, 3.0):
        out, new = time_stretch(flat, lens, rho)
        real = (torch.arange(x.shape[-1])[None] < new[:, None])[:, None].expand_as(x)
        torch.testing.assert_close(out[real], flat[real], atol=1e-12, rtol=0)


def test_time_stretch_names_bad_input():
    x, lens = _specs()
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(InputError, match="factor"): time_stretch(x, lens, bad)
    with pytest.raises(InputError, match="lengths must be"): time_stretch(x, lens.clamp(max=0), 1.5)
    with pytest.raises(InputError, match="lengths must be"): time_stretch(x, lens + 1, 1.5)
    with pytest.raises(ShapeError, match=r"\(B, F, T\)"): time_stretch(x[0], lens, 1.5)
    with pytest.raises(ShapeError, match="lengths"): time_stretch(x, lens[:2], 1.5)


@pytest.mark.parametrize("k", [1, 2, 5, -3])
def test_mel_shift_moves_bins_with_edge_repeat_and_back(k):
    x, lens = _specs()
    Fm, T = x.shape[1:]
    out = mel_shift(x, lens, k)
    for i, n in enumerate(lens.tolist()):                                    # a loop reference: bin f reads f - k
        for f in range(Fm):
            assert torch.equal(out[i, f, :n], x[i, min(max(f - k, 0), Fm - 1), :n])
        assert torch.equal(out[i, :, n:], x[i, :, n:])                       # padding frames untouched
    back = mel_shift(out, lens, -k)
    inner = slice(0, Fm - k) if k > 0 else slice(-k, Fm)                     # bins not pushed off the edge
    assert torch.equal(back[:, inner], x[:, inner])
    assert torch.equal(mel_shift(x, lens, 0), x)


def test_mel_shift_names_bad_input():
    x, lens = _specs()
    with pytest.raises(InputError, match="bins"): mel_shift(x, lens, x.shape[1])
    with pytest.raises(InputError, match="bins"): mel_shift(x, lens, 1.5)
    with pytest.raises(ShapeError): mel_shift(x[0], lens, 1)


def test_shifted_batches_keep_lengths_and_padding_mask_consistent():
    b = _batch()
    for name in ("audio speed", "audio pitch", "new background"):
        s = shift_batch(b, name, seed=0)
        modality = SHIFTS[name][0]
        assert not torch.equal(s[modality], b[modality])
        if modality == "audio":
            T = s["audio"].shape[-1]
            assert torch.equal(s["audio_padding_mask"], torch.arange(T)[None] >= s["audio_lengths"][:, None])
        others = [k for k in b if k not in (modality, f"{modality}_lengths", f"{modality}_padding_mask")]
        assert all(s[k] is b[k] for k in others)
    s = shift_batch(b, "audio speed")
    assert (s["audio_lengths"] < b["audio_lengths"]).all()                   # faster: shorter clips
    f = audio_fields(*time_stretch(b["audio"], b["audio_lengths"], 1.5))
    assert torch.equal(f["audio"], s["audio"]) and torch.equal(f["audio_lengths"], s["audio_lengths"])
    assert torch.equal(shift_batch(b, "new background", seed=3)["image"], shift_batch(b, "new background", seed=3)["image"])


# ---- late fusion and modality dropout -----------------------------------------------------------------------------
def _features(B=64, E=8, C=4, seed=0):
    "Synthetic embeddings whose every modality points to its class (plus noise), all present."
    gen = g(seed); y = torch.arange(B) % C
    centres = torch.randn(C, E, generator=gen)
    feats = {m: centres[y] + 0.3 * torch.randn(B, E, generator=gen) for m in MODS}
    return feats | {"present": {m: torch.ones(B, dtype=torch.bool) for m in MODS}, "label": y}


def _random_classifier(E=8, C=4, **kw):
    clf = FusionClassifier(MODS, E, C, **kw).eval().requires_grad_(False)
    clf.linear.weight.normal_(generator=g(5)); clf.linear.bias.normal_(generator=g(6))
    return clf


def test_fusion_with_one_modality_present_is_the_linear_layer_on_its_embedding():
    b, clf = _features(), _random_classifier()
    W, beta = clf.linear.weight.double(), clf.linear.bias.double()
    for m in MODS:
        only = mark_absent(b, *[o for o in MODS if o != m])
        u = b[m].double() / b[m].double().norm(dim=1, keepdim=True)
        torch.testing.assert_close(clf(only).double(), u @ W.T + beta, atol=1e-5, rtol=0)
    mean = sum(b[m].double() / b[m].double().norm(dim=1, keepdim=True) for m in MODS) / 3   # all present: the mean
    torch.testing.assert_close(clf(b).double(), mean @ W.T + beta, atol=1e-5, rtol=0)


def test_fusion_respects_the_presence_mask_per_sample():
    b, clf = _features(), _random_classifier()
    pres = {m: torch.rand(64, generator=g(i)) < 0.6 for i, m in enumerate(MODS)}
    pres["image"] |= ~(pres["audio"] | pres["text"])
    mixed = b | {"present": pres}
    garbage = mixed | {m: torch.where(pres[m][:, None], b[m], torch.full_like(b[m], float("nan"))) for m in MODS}
    assert torch.equal(clf(mixed), clf(garbage)) and torch.isfinite(clf(garbage)).all()
    for i in range(0, 64, 9):                                               # row by row: the mean of what is present
        have = [m for m in MODS if pres[m][i]]
        row = {m: b[m][i:i + 1] for m in have} | {"present": {m: torch.ones(1, dtype=torch.bool) for m in have}}
        sub = FusionClassifier(have, 8, 4).eval(); sub.load_state_dict(clf.state_dict())
        torch.testing.assert_close(clf(mixed)[i:i + 1], sub(row), atol=1e-6, rtol=0)
    no_text = mark_absent(b, "text")
    assert torch.equal(clf(no_text), clf(no_text | {"text": None}))         # an absent modality need not exist


def test_fusion_and_dropout_name_bad_input():
    b = _features()
    with pytest.raises(ConfigError, match="unknown modality"): FusionClassifier(("image", "smell"), 8, 4)
    with pytest.raises(InputError, match="every modality absent"): _random_classifier()(mark_absent(b, *MODS))
    for p in (1.0, -0.1, 1.5, "0.5", None):
        with pytest.raises(InputError, match="p|probability"): FusionClassifier(MODS, 8, 4, p_drop=p)
        with pytest.raises(InputError, match="p|probability"): modality_dropout(b["present"], p, g(0))
    with pytest.raises(InputError, match=r"\[0, 1\)"): modality_dropout(b["present"], {"text": 1.0}, g(0))
    with pytest.raises(ConfigError, match="unknown modality"): modality_dropout({"smell": torch.ones(3, dtype=torch.bool)}, 0.5, g(0))
    with pytest.raises(ConfigError, match="unknown modality"): modality_dropout(b["present"], {"smell": 0.5}, g(0))
    with pytest.raises(InputError, match="no modality present"):
        modality_dropout({m: torch.zeros(3, dtype=torch.bool) for m in MODS}, 0.5, g(0))
    with pytest.raises(InputError, match="neither"): _random_classifier()({"image": b["image"], "label": b["label"]})
    with pytest.raises(InputError, match="mark_absent"): mark_absent({"present": {"image": torch.ones(2)}}, "text")


def test_modality_dropout_never_empties_a_sample_is_seeded_and_drops_at_the_closed_form_rate():
    B = 40_000
    pres = {m: torch.ones(B, dtype=torch.bool) for m in MODS}
    for p in (0.3, 0.5, 0.8):
        kept = modality_dropout(pres, p, g(1))
        K = torch.stack([kept[m] for m in MODS], 1)
        assert K.any(1).all()
        # each of 3 modalities survives with 1 - p; all three are dropped with p^3 and then one is put back
        expected = 3 * (1 - p) + p ** 3
        assert abs(K.sum(1).double().mean().item() - expected) < 0.02, (p, K.sum(1).double().mean().item(), expected)
        again = modality_dropout(pres, p, g(1))
        assert all(torch.equal(again[m], kept[m]) for m in MODS)
        other = modality_dropout(pres, p, g(2))
        assert any(not torch.equal(other[m], kept[m]) for m in MODS)
    half = {m: torch.arange(B) % 2 == (0 if m == "image" else 1) for m in MODS}   # image alone, or audio and text
    kept = modality_dropout(half, 0.9, g(3))
    assert all(not (kept[m] & ~half[m]).any() for m in MODS)                # never adds a modality
    assert kept["image"][::2].all()                                          # a sole modality is never dropped
    zero = modality_dropout(pres, 0.0, g(4))
    assert all(zero[m].all() for m in MODS)
    only_text = modality_dropout(pres, {"text": 0.5}, g(4))
    assert only_text["image"].all() and only_text["audio"].all() and 0.45 < only_text["text"].double().mean() < 0.55


def test_fusion_dropout_acts_in_training_mode_only_and_is_seeded():
    b = _features()
    a1, a2 = _random_classifier(p_drop=0.5, seed=7), _random_classifier(p_drop=0.5, seed=7)
    assert torch.equal(a1(b), _random_classifier()(b))                     # eval mode: no dropout
    a1.train(); a2.train()
    y1, y2 = a1(b), a2(b)
    assert torch.equal(y1, y2) and not torch.equal(y1, a1.eval()(b))


def test_fine_tune_trains_a_fusion_classifier_that_survives_a_missing_modality():
    b = _features(B=96)
    clf = fine_tune(FusionClassifier(MODS, 8, 4, p_drop=0.5, seed=0), b, steps=40, lr=3e-2, batch_size=32, seed=0)
    assert accuracy(clf, b) > 0.9 and accuracy(clf, mark_absent(b, "text", "audio")) > 0.9
    assert not clf.training


def test_fusion_inputs_are_unit_embeddings_with_presence_and_labels():
    torch.manual_seed(0)
    model = create_model("trimodal_tiny").eval()
    b = _batch(6)
    f = fusion_inputs(model, b, ("image", "text"))
    assert set(f) == {"image", "text", "present", "label"} and torch.equal(f["label"], b["label"])
    for m in ("image", "text"):
        torch.testing.assert_close(f[m].norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
        assert torch.equal(f["present"][m], b["present"][m])
    with pytest.raises(ConfigError, match="unknown modality"): fusion_inputs(model, b, ("image", "smell"))
