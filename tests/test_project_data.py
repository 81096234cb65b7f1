"""Project p3 (what the data does): the headline comparison on a small configuration, and the recipe switches it added.

The headline, through the same `run_recipe` calls as the notebook (image-text, plain InfoNCE, B = 32, 100 steps): when
60 % of the training captions are shuffled, zero-shot accuracy falls by at least MISMATCH_MARGIN, and training on the
clean 40 % alone beats training on all the pairs by at least FILTER_MARGIN. The held-out InfoNCE of the clean model lies
between the floor set by the data (a caption names only its digit) and log K, so the estimate log K - L never exceeds
log K nor the best estimate the data allows.

The switches: `mismatch` (shuffles exactly the stated fraction, as a permutation; 0 is the clean data bit for bit),
`label_smoothing`, `init_scale` / `learn_scale`, `init_bias` and `grad_cache`, each at its default bit-identical to the
recipe before it existed."""
import json, math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmlab.core import ConfigError
from mmlab.data import InMemoryBatches, NoisyPairs, load_dataset, take
from mmlab.eval import embed
from mmlab.losses import clip_loss
from mmlab.recipes import (ClipRecipe, build_model, contrastive_loss_fn, get_recipe, load_split, read_recipe,
                           recipe_dict, run_recipe, train_data, train_split)
from clip_reference import every_pair_loss_fn

PAIRS = dict(modalities=("image", "text"), targets="diagonal")      # the notebook's setup
MISMATCH_MARGIN = 0.2     # zero-shot accuracy, clean minus 60 % shuffled, at least
FILTER_MARGIN = 0.15      # clean 40 % alone minus all pairs with 60 % shuffled, at least
ZS = "zero_shot/text_to_image/accuracy"

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)

@pytest.fixture(scope="module")
def clean_run():
    return run_recipe(ClipRecipe(**PAIRS, batch_size=32, steps=100))

def test_headline_shuffled_captions_cost_accuracy_and_a_wrong_pair_costs_more_than_a_missing_one(clean_run):
    n = len(load_split(ClipRecipe(**PAIRS), "train")["label"])
    noisy = run_recipe(ClipRecipe(**PAIRS, batch_size=32, steps=100, mismatch=0.6)).metrics[ZS]
    kept = run_recipe(ClipRecipe(**PAIRS, batch_size=32, steps=100), n_train=round(0.4 * n)).metrics[ZS]
    clean = clean_run.metrics[ZS]
    assert noisy <= clean - MISMATCH_MARGIN, (clean, noisy)
    assert kept >= noisy + FILTER_MARGIN, (kept, noisy)
    assert noisy > clean_run.metrics["zero_shot/text_to_image/chance"]      # still learns something from the 40 % left

def _floor(labels, k, draws=3000, seed=0):
    "Monte Carlo of E log n_i: the least expected InfoNCE when a caption names only its class (n_i same-class candidates)."
    g = torch.Generator().manual_seed(seed)
    ys = [labels[torch.randperm(len(labels), generator=g)[:k]] for _ in range(draws)]
    return torch.stack([(y[:, None] == y[None]).sum(1).float().log().mean() for y in ys]).mean().item()

@pytest.mark.parametrize("k", [8, 32])
def test_heldout_infonce_lies_between_the_data_floor_and_log_k(clean_run, k):
    test = load_split(ClipRecipe(**PAIRS), "test")
    model = clean_run.model
    emb, g, losses = embed(model, test), torch.Generator().manual_seed(0), []
    for _ in range(5):
        perm = torch.randperm(len(test["label"]), generator=g)
        for idx in perm[:len(perm) // k * k].view(-1, k):
            losses.append(clip_loss(emb["image"][idx], emb["text"][idx], model.logit_scale.detach()).item())
    loss, floor = sum(losses) / len(losses), _floor(test["label"], k)
    assert 0 < floor < loss < math.log(k), (floor, loss, math.log(k))
    assert math.log(k) - loss <= math.log(k) - floor <= math.log(10) + 1e-6      # estimate <= best estimate <= log C
    assert math.log(k) - loss > 0.1                                             # the trained model beats chance

# ---- mismatch ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu, n", [(0.2, None), (0.6, None), (1.0, None), (0.3, 100)])
def test_mismatch_shuffles_exactly_the_stated_fraction_as_a_permutation(mu, n):
    r = ClipRecipe(**PAIRS, mismatch=mu, batch_size=16)
    ds = train_split(r, n)
    clean = load_split(ClipRecipe(**PAIRS), "train", n)
    size = len(clean["label"])
    chosen, src = np.flatnonzero(ds.noisy), ds.source[ds.noisy]
    assert len(chosen) == round(mu * size)                                   # exactly the stated fraction
    assert sorted(src) == sorted(chosen) and (src != chosen).all()           # a permutation of them, no fixed point
    batch = train_data(r, n).batch                                           # what the trainer draws from
    source = torch.as_tensor(ds.source)
    assert torch.equal(batch["text"], clean["text"][source])                 # captions moved, as a permutation
    assert torch.equal(batch["image"], clean["image"]) and torch.equal(batch["label"], clean["label"])
    assert int(batch["attrs"]["noisy_pair"].sum()) == len(chosen)
    assert sorted(map(tuple, batch["text"].tolist())) == sorted(map(tuple, clean["text"].tolist()))   # same captions

def test_mismatch_is_seeded_by_the_recipe():
    a, b = (train_split(ClipRecipe(**PAIRS, mismatch=0.4, seed=s)) for s in (0, 0))
    c = train_split(ClipRecipe(**PAIRS, mismatch=0.4, seed=1))
    assert np.array_equal(a.source, b.source) and not np.array_equal(a.source, c.source)

def test_mismatch_without_text_shuffles_the_last_modality():
    ds = train_split(ClipRecipe(modalities=("image", "audio"), mismatch=0.5), 20)
    assert ds.modality == "audio" and int(ds.noisy.sum()) == 10

def test_mismatch_zero_is_the_clean_data_bit_for_bit():
    r = ClipRecipe(**PAIRS, batch_size=16)
    assert not isinstance(train_split(r, 64), NoisyPairs)
    for new in (train_data(r, 64), train_data(ClipRecipe(**PAIRS, batch_size=16, mismatch=0.0), 64)):
        old = InMemoryBatches(load_split(r, "train", 64), r.batch_size, r.seed)    # the recipe's data before the switch
        assert new.batch.keys() == old.batch.keys()
        for k, v in old.batch.items():
            if torch.is_tensor(v): assert torch.equal(v, new.batch[k]), k
        assert [b["index"].tolist() for b in new] == [b["index"].tolist() for b in old]

def test_default_run_is_bit_identical_to_every_switch_at_its_neutral_value():
    kw = dict(steps=3, batch_size=16, warmup_steps=1)
    a = run_recipe(ClipRecipe(**kw), n_train=32, evaluate_after=False)
    b = run_recipe(ClipRecipe(**kw, mismatch=0.0, label_smoothing=0.0, init_scale=0.0, learn_scale=True, grad_cache=0),
                   n_train=32, evaluate_after=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))

@pytest.fixture(scope="module")
def batch():
    return take(load_split(ClipRecipe(), "train", 32), range(16))


@pytest.mark.parametrize("kw", [dict(), dict(loss="siglip"), dict(targets="diagonal"), dict(modalities=("image", "text"))])
def test_default_loss_and_model_are_unchanged(kw, batch):
    r = ClipRecipe(batch_size=16, **kw)
    model = build_model(r)
    assert model.log_scale.requires_grad
    assert model.logit_scale.item() == pytest.approx(10.0 if r.loss == "siglip" else 1 / 0.07)
    if r.loss == "siglip": assert model.logit_bias.item() == -10.0
    new, old = contrastive_loss_fn(r)(model, batch), every_pair_loss_fn(r)(model, batch)
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)

# ---- the other switches --------------------------------------------------------------------------------------------
def test_label_smoothing_is_clip_loss_with_smoothed_targets(batch):
    r = ClipRecipe(**PAIRS, label_smoothing=0.2)
    model = build_model(r)
    out = model(batch)
    got = contrastive_loss_fn(r)(model, batch)["image-text"]
    a, b, s = out["image"].double(), out["text"].double(), out["logit_scale"].double()
    logits, B = s * a @ b.T, len(a)
    q = (1 - 0.2) * torch.eye(B, dtype=torch.float64) + 0.2 / B                     # the smoothed targets, by hand
    ref = -((q * logits.log_softmax(1)).sum(1).mean() + (q * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)

def test_fixed_scale_never_moves_and_a_learnt_one_does():
    kw = dict(**PAIRS, steps=4, batch_size=16, warmup_steps=1)
    fixed = run_recipe(ClipRecipe(**kw, init_scale=5.0, learn_scale=False), n_train=32, evaluate_after=False).model
    learnt = run_recipe(ClipRecipe(**kw, init_scale=5.0), n_train=32, evaluate_after=False).model
    assert not fixed.log_scale.requires_grad and fixed.log_scale.item() == torch.tensor(math.log(5.0)).item()
    assert learnt.log_scale.item() != fixed.log_scale.item()
    assert abs(learnt.log_scale.item() - math.log(5.0)) <= 4 * ClipRecipe().lr + 1e-6   # AdamW: at most about lr per step

def test_init_bias_starts_siglip_there():
    model = build_model(ClipRecipe(**PAIRS, loss="siglip", init_bias=-math.log(16)))
    assert model.logit_bias.item() == pytest.approx(-math.log(16)) and model.logit_scale.item() == pytest.approx(10.0)

@pytest.mark.parametrize("loss, targets", [("clip", "label"), ("clip", "diagonal"), ("siglip", "diagonal")])
def test_grad_cache_gives_the_whole_batch_loss_and_gradient(loss, targets, batch):
    r = ClipRecipe(modalities=("image", "text"), loss=loss, targets=targets, label_smoothing=0.1 * (loss == "clip"))
    whole, chunked = build_model(r), build_model(r)
    terms = contrastive_loss_fn(r)(whole, batch)
    sum(terms.values()).backward()
    cached = contrastive_loss_fn(replace(r, grad_cache=5))                  # chunks of 5, 5, 5, 1
    assert cached.backward_inside
    got = cached(chunked, batch)                                            # runs its own backward passes
    assert list(got) == list(terms)
    for k in terms: torch.testing.assert_close(got[k], terms[k].detach(), rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)

def test_grad_cache_runs_in_the_trainer():
    kw = dict(modalities=("image", "text"), steps=3, batch_size=16, warmup_steps=1)
    a = run_recipe(ClipRecipe(**kw), n_train=32, evaluate_after=False)
    b = run_recipe(ClipRecipe(**kw, grad_cache=5), n_train=32, evaluate_after=False)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-5)
    assert [h["grad_norm"] for h in a.history] == pytest.approx([h["grad_norm"] for h in b.history], rel=1e-4)

def test_switches_survive_recipe_json_and_the_command_line(tmp_path):
    r = get_recipe("clip", mismatch="0.4", label_smoothing="0.1", init_scale="5", learn_scale="false", grad_cache="64")
    assert (r.mismatch, r.label_smoothing, r.init_scale, r.learn_scale, r.grad_cache) == (0.4, 0.1, 5.0, False, 64)
    s = get_recipe("clip", loss="siglip", init_bias="-2.5")
    for x in (r, s):
        (tmp_path / "recipe.json").write_text(json.dumps(recipe_dict(x)))
        assert recipe_dict(read_recipe(tmp_path / "recipe.json")) == recipe_dict(x)

@pytest.mark.parametrize("kw, msg", [
    (dict(mismatch=1.5), "clip.mismatch=1.5: expected a fraction in [0, 1]"),
    (dict(mismatch=-0.1), "clip.mismatch=-0.1"),
    (dict(label_smoothing=1.0), "clip.label_smoothing=1.0"),
    (dict(label_smoothing=0.1, loss="siglip"), "with loss=clip"),
    (dict(init_scale=0.5), "clip.init_scale=0.5: expected 0 (the loss's own) or a multiplier"),
    (dict(init_scale=500.0), "clip.init_scale=500.0"),
    (dict(init_bias=-3.0), "clip.init_bias=-3.0: expected -10 unless loss=siglip"),
    (dict(learn_scale="no"), "clip.learn_scale='no'"),
    (dict(grad_cache=-1), "clip.grad_cache=-1: expected an integer >= 0"),
])
def test_bad_switches_are_refused_clearly(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")): ClipRecipe(**kw)

def test_shuffle_of_a_single_pair_is_refused():
    ds = load_dataset("digits", "val", modalities=["text"])
    with pytest.raises(ConfigError, match="has no other to swap with"): NoisyPairs(ds, "text", p=1 / len(ds), shuffle=True)
    assert int(NoisyPairs(ds, "text", p=0.0, shuffle=True).noisy.sum()) == 0
