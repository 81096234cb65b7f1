"""mmlab.adapt: shifts are seeded and match independent references, LoRA equals the `peft` library's LoRA on the same
weights and reproduces the base model at rank 0, WiSE-FT's zero mix is the base model exactly, and the zero-shot
classifier predicts what zero-shot evaluation predicts."""
import copy
import pytest
import torch
import torch.nn as nn

from mmlab.adapt import (LoRALinear, ZeroShotClassifier, accuracy, add_lora, fine_tune, invert, mel_noise, merge_lora,
                         pixel_noise, rotate, shift_batch, tower_features, wise_ft, SHIFTS)
from mmlab.core import ConfigError, InputError, ShapeError
from mmlab.encoders import count_params, tower_inputs
from mmlab.eval import embed, zero_shot_eval
from mmlab.data import take
from mmlab.models import create_model
from mmlab.recipes import ClipRecipe, load_split

LINEARS = ("qkv", "proj", "fc1", "fc2")


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("trimodal_tiny").eval()


_DATA = {}
def _batch(model, n=6):
    "The first n test examples of the bundled digits (image, log-mel audio, char-token text, labels)."
    if "test" not in _DATA: _DATA["test"] = load_split(ClipRecipe(device="cpu", precision="fp32"), "test", 24)
    return take(_DATA["test"], range(n))


def test_rotate_quarter_turn_is_rot90_and_invert_is_an_involution():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 0), x, atol=1e-6, rtol=0)
    assert torch.equal(invert(invert(x)), x) and torch.equal(invert(x), 1 - x)


def test_pixel_noise_is_seeded_and_clipped():
    x, g = torch.rand(2, 3, 8, 8), lambda s: torch.Generator().manual_seed(s)
    y = pixel_noise(x, 0.5, g(0))
    assert torch.equal(y, pixel_noise(x, 0.5, g(0))) and not torch.equal(y, pixel_noise(x, 0.5, g(1)))
    assert y.min() >= 0 and y.max() <= 1 and (y - x).abs().max() > 0.1


def test_mel_noise_adds_the_expected_power_and_leaves_padding():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(4, 16, 400, dtype=torch.float64)
    lens = torch.tensor([400, 300, 200, 50])
    for snr in (0.0, 10.0):
        L2 = mel_noise(L, lens, snr, torch.Generator().manual_seed(1))
        for i, T in enumerate(lens.tolist()):
            P, P2 = L[i, :, :T].exp(), L2[i, :, :T].exp()
            expected = P.mean() * 10 ** (-snr / 10)           # float64 mean power of the real frames
            assert abs(((P2 - P).mean() / expected).item() - 1) < 0.1
            assert torch.equal(L2[i, :, T:], L[i, :, T:])
    assert torch.equal(mel_noise(L, lens, 0.0, torch.Generator().manual_seed(3)), mel_noise(L, lens, 0.0, torch.Generator().manual_seed(3)))


def test_shift_batch_changes_one_modality_and_names_bad_input():
    m = _model(); b = _batch(m)
    for name, (modality, _) in SHIFTS.items():
        s = shift_batch(b, name, seed=0)
        assert not torch.equal(s[modality], b[modality])
        own = (modality, f"{modality}_lengths", f"{modality}_padding_mask")   # a speed change moves the lengths too
        assert all(s[k] is b[k] for k in b if k not in own)
    with pytest.raises(InputError, match="expected one of"): shift_batch(b, "blur")
    with pytest.raises(InputError, match="lacks"): shift_batch({"image": b["image"]}, "audio noise")


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (8, 32.0)])
def test_lora_equals_peft_on_the_same_weights(modality, r, alpha):
    "The chapter's LoRA and peft's LoRA (the reference), given the same A and B, compute the same tower outputs."
    from peft import LoraConfig, inject_adapter_in_model
    m = _model(); tower = m.encoder(modality)
    ours = add_lora(copy.deepcopy(tower), r=r, alpha=alpha, seed=1)
    names = [n for n, c in tower.named_modules() if isinstance(c, nn.Linear)]
    ref = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names), copy.deepcopy(tower))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in names:
            mine, theirs = ours.get_submodule(n), ref.get_submodule(n)
            mine.B.copy_(torch.randn(mine.B.shape, generator=g) * 0.2)
            theirs.lora_A["default"].weight.copy_(mine.A); theirs.lora_B["default"].weight.copy_(mine.B)
        inp = tower_inputs(_batch(m), modality)
        base, a, b = tower(**inp).pooled, ours(**inp).pooled, ref(**inp).pooled
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-2                       # the update matters, so the comparison can fail
    assert count_params(ours, trainable=True) == sum(p.numel() for p in ref.parameters() if p.requires_grad)


def test_lora_initialisation_matches_peft_statistics_and_starts_at_the_base():
    "A is initialised as peft (and nn.Linear) do, B is zero: the wrapped tower gives the pretrained outputs exactly."
    m = _model(); tower = m.encoder("image"); inp = tower_inputs(_batch(m), "image")
    with torch.no_grad():
        y0 = tower(**inp).pooled
        for r in (0, 4):
            assert torch.equal(add_lora(copy.deepcopy(tower), r=r)(**inp).pooled, y0)
    lin = nn.Linear(64, 32); lora = LoRALinear(lin, r=4, generator=torch.Generator().manual_seed(0))
    bound = 1 / 64 ** 0.5                                       # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), +)
    assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.8 * bound and torch.equal(lora.B, torch.zeros(32, 4))


def test_merge_and_gradients():
    m = _model(); tower = add_lora(copy.deepcopy(m.encoder("text")), r=4, targets=("qkv", "fc1"))
    assert {n.split(".")[-2] for n, p in tower.named_parameters() if p.requires_grad} == {"qkv", "fc1"}
    with torch.no_grad():
        for mod in tower.modules():
            if isinstance(mod, LoRALinear): mod.B.normal_(0, 0.1)
    inp = tower_inputs(_batch(m), "text")
    y = tower(**inp).pooled
    y.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in tower.parameters())
    merged = merge_lora(copy.deepcopy(tower))
    assert not any(isinstance(x, LoRALinear) for x in merged.modules())
    torch.testing.assert_close(merged(**inp).pooled, y.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="r must be"): LoRALinear(nn.Linear(2, 2), r=-1)
    with pytest.raises(InputError, match="no nn.Linear"): add_lora(nn.Conv1d(1, 1, 1))


def test_zero_shot_classifier_predicts_as_zero_shot_eval():
    m = _model(); b = _batch(m, n=12)
    cls = torch.nn.functional.normalize(torch.randn(10, m.proj_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    for modality in ("image", "audio"):
        clf = ZeroShotClassifier(m, modality, cls)
        pred = embed(clf, b, fn=lambda c, x: c(x)).argmax(1)
        ref = zero_shot_eval(embed(m, b)[modality], cls, b["label"])
        assert torch.equal(pred, ref["predictions"]) and accuracy(clf, b) == pytest.approx(ref["accuracy"])
    with pytest.raises(Exception, match="no projection head"): ZeroShotClassifier(nn.Linear(2, 2), "image", cls)


def test_tower_features_through_the_public_encoder():
    m = _model(); b = _batch(m)
    with torch.no_grad(): ref = m.towers["audio"](**tower_inputs(b, "audio")).pooled
    torch.testing.assert_close(tower_features(m, b, "audio", chunk=4), ref, atol=1e-6, rtol=1e-6)


def test_wise_ft_ends_are_exact_and_the_middle_is_the_mean():
    m = _model(); cls = torch.nn.functional.normalize(torch.randn(10, m.proj_dim), dim=-1)
    zs = ZeroShotClassifier(m, "image", cls); b = _batch(m, n=12)
    ft = fine_tune(copy.deepcopy(zs), b, steps=3, lr=1e-2, batch_size=4)
    s0, s1 = zs.state_dict(), ft.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)          # fine-tuning moved the weights
    for lam, ref in ((0.0, s0), (1.0, s1)):
        got = wise_ft(zs, ft, lam).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    mid = wise_ft(zs, ft, 0.5).state_dict()
    for k in s0: torch.testing.assert_close(mid[k].double(), (s0[k].double() + s1[k].double()) / 2, atol=1e-6, rtol=0)
    with pytest.raises(InputError): wise_ft(zs, ft, -0.1)
    lora = copy.deepcopy(zs); lora.requires_grad_(False); add_lora(lora.tower)
    with pytest.raises(ShapeError, match="merge_lora"): wise_ft(zs, lora, 0.5)
    wise_ft(zs, merge_lora(lora), 0.5)                               # merged: the same architecture


def test_fine_tune_trains_only_lora_parameters():
    m = _model(); cls = torch.nn.functional.normalize(torch.randn(10, m.proj_dim), dim=-1)
    clf = ZeroShotClassifier(m, "image", cls); clf.requires_grad_(False); add_lora(clf.tower, r=2)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    fine_tune(clf, _batch(m, n=12), steps=3, lr=1e-2, batch_size=4)
    changed = {k for k, v in clf.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith((".A", ".B")) for k in changed)
