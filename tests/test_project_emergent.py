"""Project p1 (emergent alignment): the headline comparison on a small configuration, and the recipe's `pairs` switch.

The headline: a model trained on image-text and image-audio pairs only (image binds, as in ImageBind) classifies audio
from text prompts well above chance, and below a model trained on audio-text pairs directly, at the same steps."""
import json
from itertools import combinations

import pytest
import torch

from mmlab.core import ConfigError
from mmlab.data import take
from mmlab.losses import clip_loss, siglip_loss
from mmlab.recipes import (ClipRecipe, build_model, contrastive_loss_fn, get_recipe, load_split, read_recipe,
                           recipe_dict, run_recipe, train_pairs)
from clip_reference import every_pair_loss_fn

HEADLINE_STEPS = 100      # short enough that the binding hops are still weak (the notebook's middle length)
ABOVE_CHANCE = 0.15       # emergent zero-shot accuracy - chance, at least
BELOW_DIRECT = 0.2        # direct zero-shot accuracy - emergent, at least
ZS = "zero_shot/text_to_audio/accuracy"

def test_headline_emergent_audio_text_is_above_chance_and_below_direct():
    torch.set_num_threads(1)
    direct = run_recipe(ClipRecipe(modalities=("audio", "text"), steps=HEADLINE_STEPS)).metrics
    bound = run_recipe(ClipRecipe(pairs="image-text,image-audio", steps=HEADLINE_STEPS)).metrics
    chance, emergent = bound["zero_shot/text_to_audio/chance"], bound[ZS]
    assert chance == pytest.approx(0.1)
    assert emergent >= chance + ABOVE_CHANCE, (emergent, chance)
    assert emergent <= direct[ZS] - BELOW_DIRECT, (emergent, direct[ZS])
    # emergent retrieval too: audio -> text R@1 above its chance level
    assert bound["retrieval/audio_to_text/R@1"] >= bound["retrieval/audio_to_text/chance_R@1"] + ABOVE_CHANCE

# ---- the `pairs` switch --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    return take(load_split(ClipRecipe(), "train", 32), range(16))


@pytest.mark.parametrize("kw", [dict(), dict(loss="siglip"), dict(targets="diagonal"), dict(modalities=("image", "text"))])
def test_default_pairs_are_bit_identical_to_every_pair(kw, batch):
    r = ClipRecipe(batch_size=16, **kw)
    assert r.pairs == () and train_pairs(r) == list(combinations(r.modalities, 2))
    model = build_model(r)
    new, old = contrastive_loss_fn(r)(model, batch), every_pair_loss_fn(r)(model, batch)
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)

def test_default_run_is_bit_identical_to_naming_every_pair():
    kw = dict(steps=3, batch_size=16, warmup_steps=1)
    a = run_recipe(ClipRecipe(**kw), n_train=32, evaluate_after=False)
    b = run_recipe(ClipRecipe(pairs="image-audio,image-text,audio-text", **kw), n_train=32, evaluate_after=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))

@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_restricted_pairs_train_only_those_pairs(loss, batch):
    r = ClipRecipe(batch_size=16, loss=loss, pairs="image-text,image-audio")
    model = build_model(r)
    terms = contrastive_loss_fn(r)(model, batch)
    assert list(terms) == ["image-audio", "image-text"]
    out = model(batch)
    f = (lambda a, b: clip_loss(a, b, out["logit_scale"], labels=batch["label"])) if loss == "clip" else \
        (lambda a, b: siglip_loss(a, b, out["logit_scale"], out["logit_bias"], labels=batch["label"]))
    ref = {"image-audio": f(out["image"], out["audio"]) / 2, "image-text": f(out["image"], out["text"]) / 2}
    for k in ref: torch.testing.assert_close(terms[k], ref[k])
    # the text tower's gradient is that of the image-text term alone: no audio-text term reaches it
    sum(terms.values()).backward()
    got = [p.grad.clone() for p in model.towers["text"].parameters()]
    model.zero_grad(); out = model(batch)
    (f(out["image"], out["text"]) / 2).backward()
    for g, p in zip(got, model.towers["text"].parameters()): torch.testing.assert_close(g, p.grad)

def test_pairs_are_normalised_and_recorded():
    r = ClipRecipe(pairs=" text-image , image-audio")
    assert r.pairs == ("image-audio", "image-text")                    # the loss's names, in its order
    assert train_pairs(r) == [("image", "audio"), ("image", "text")]
    assert ClipRecipe(pairs=("audio-image", "text-image")).pairs == r.pairs
    assert get_recipe("clip", pairs="image-text,image-audio").pairs == r.pairs      # `mmlab train clip --pairs ...`
    assert recipe_dict(r)["pairs"] == ["image-audio", "image-text"]

def test_pairs_survive_recipe_json(tmp_path):
    r = ClipRecipe(pairs="image-text,audio-text")
    (tmp_path / "recipe.json").write_text(json.dumps(recipe_dict(r)))
    back = read_recipe(tmp_path / "recipe.json")
    assert back.pairs == r.pairs and recipe_dict(back) == recipe_dict(r)    # so `--resume` accepts the run

@pytest.mark.parametrize("kw, msg", [
    (dict(pairs="image-video"), "clip.pairs: 'image-video' is not a pair of this recipe's modalities"),
    (dict(pairs="image-image"), "two different modalities"),
    (dict(pairs="image-text-audio"), "is not a pair"),
    (dict(pairs="image-audio", modalities=("image", "text")), "is not a pair"),
    (dict(pairs="image-text,text-image"), "listed twice"),
    (dict(pairs="image-text"), "audio is in no pair, so its tower would never train"),
    (dict(pairs="image-text,image-audio", loss="symile", targets="diagonal"), "symile trains one three-way term"),
    (dict(pairs=3), "expected pair names like 'image-text'"),
    (dict(pairs=("image-text", 5)), "expected pair names like 'image-text'"),
])
def test_bad_pairs_are_refused_clearly(kw, msg):
    with pytest.raises(ConfigError, match=msg): ClipRecipe(**kw)
    with pytest.raises(ValueError): ClipRecipe(**kw)                        # ConfigError is also a ValueError

def test_bound_run_logs_only_trained_terms():
    res = run_recipe(ClipRecipe(pairs="image-text,audio-text", steps=2, batch_size=16), n_train=32, evaluate_after=False)
    assert {k for k in res.history[-1] if "-" in k} == {"image-text", "audio-text"}

def test_full_sweep_flag_is_not_a_setting():
    "The projects' `MMLAB_FULL_SWEEP=1` must not be read as an unknown `mmlab` setting (which raises)."
    from mmlab.core import get_settings
    assert get_settings(env={"MMLAB_FULL_SWEEP": "1"}).seed == get_settings(env={}).seed
