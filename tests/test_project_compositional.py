"""Project p2 (compositional understanding, NegCLIP): the headline comparison on a small configuration, and the pieces it
rests on: `swap_colours`, the clip recipe's `hard_negatives` switch, `negclip_loss` and `compositional_eval`.

The headline: trained with each caption's colour-swapped copy as an extra negative (NegCLIP), the clip recipe tells a
scene's caption from its colour swap more often than the plain recipe at the same steps."""
import json, math, os, re

import pytest
import torch
import torch.nn.functional as F

from mmlab.core import ConfigError, DataError, InputTypeError, ShapeError
from mmlab.data import dataset_meta, load_dataset, take
from mmlab.losses import clip_loss, negclip_loss
from mmlab.recipes import (COLOUR_WORDS, ClipRecipe, build_model, compositional_eval, contrastive_loss_fn, get_recipe,
                           hard_negative_texts, load_split, read_recipe, recipe_dict, run_recipe, swap_colours)
from clip_reference import every_pair_loss_fn

SMALL = dict(dataset="shapes", modalities=("image", "text"), targets="diagonal", max_len=64)   # the notebook's setup
HEADLINE_STEPS = 350     # the notebook's training length
TRAIN_MARGIN = 0.03      # NegCLIP - CLIP swap accuracy on 1000 training scenes, at least (measured: +0.048)
NEAR_CHANCE = 0.1        # |plain CLIP's swap accuracy on the test split - 0.5|, at most (measured: 0.01)
SWAP = "swap/image/accuracy"

# Two 350-step trainings (about 80 s): the p2 notebook's student run in tests/test_course.py asserts the same direction
# at the same length in CI (NegCLIP above CLIP on training scenes, CLIP near chance on new ones); this stricter margin
# runs with MMLAB_TEST_FLAGS=slow.
@pytest.mark.skipif("slow" not in os.environ.get("MMLAB_TEST_FLAGS", "").split(), reason="two 350-step trainings; set MMLAB_TEST_FLAGS=slow")
def test_headline_negclip_rejects_swapped_captions_of_training_scenes_more_often():
    """At the notebook's length NegCLIP tells its training scenes' captions from their colour swaps more often than CLIP,
    while plain CLIP is at chance on new scenes (a bag of words there). The gain on new scenes is within noise at this
    length (the notebook shows it), so it is not asserted."""
    torch.set_num_threads(1)
    acc = {}
    for hn in ("none", "swap-colours"):
        r = ClipRecipe(steps=HEADLINE_STEPS, hard_negatives=hn, **SMALL)
        model = run_recipe(r, evaluate_after=False).model
        acc[hn] = {split: compositional_eval(model, r, load_split(r, split, n)) for split, n in (("train", 1000), ("test", 250))}
    plain, neg = acc["none"]["train"][SWAP], acc["swap-colours"]["train"][SWAP]
    assert acc["none"]["train"]["swap/image/n"] > 300
    assert neg >= plain + TRAIN_MARGIN, (plain, neg)
    assert abs(acc["none"]["test"][SWAP] - 0.5) <= NEAR_CHANCE, acc["none"]["test"]

# ---- swap_colours ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_train():
    ds = load_dataset("shapes", "train", modalities=("text",))
    return [str(t) for t in ds.texts], ds.attrs

def words(c): return re.findall(r"[a-z]+", c.lower())

def test_swap_colours_on_every_training_caption(shapes_train):
    "Two objects of different colours: exactly the two colour words change places, so the bag of words is the same."
    caps, at = shapes_train
    colours = dataset_meta("shapes")["vocab"]["colour"]
    assert set(colours) <= set(COLOUR_WORDS)
    n_swapped = 0
    for i, c in enumerate(caps):
        s = swap_colours(c)
        two_colours = at["n_objects"][i] == 2 and at["colour"][i] != at["colour2"][i]
        if not two_colours:
            assert s is None, c                                          # one object, or one colour twice: no negative
            continue
        n_swapped += 1
        w, v = words(c), words(s)
        changed = [k for k in range(len(w)) if w[k] != v[k]]
        assert len(w) == len(v) and len(changed) == 2, (c, s)          # exactly two words moved ...
        assert {w[k] for k in changed} == {colours[at["colour"][i]], colours[at["colour2"][i]]}   # ... the two colours
        assert (w[changed[0]], w[changed[1]]) == (v[changed[1]], v[changed[0]])
        assert sorted(w) == sorted(v) and s != c                         # same bag of words, different caption
        assert swap_colours(s) == c                                      # an involution
    assert n_swapped > 800

def test_swap_colours_is_deterministic_and_exact():
    c = "a small Red circle left of a large blue square"
    assert swap_colours(c) == swap_colours(c) == "a small blue circle left of a large Red square"   # words keep their case
    assert swap_colours("a red circle") is None
    assert swap_colours("there is a large orange triangle above a large orange triangle") is None
    assert swap_colours("a redder circle and a bluish square") is None        # whole words only
    assert swap_colours("red, green and blue") is None                        # three colours: no single swap
    assert swap_colours("a red cube and a teal cube", colours=("red", "teal")) == "a teal cube and a red cube"
    with pytest.raises(InputTypeError, match="expected a caption string"): swap_colours(3)

# ---- the hard_negatives switch --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    return take(load_split(ClipRecipe(**SMALL), "train", 64), range(32))


@pytest.mark.parametrize("kw", [dict(SMALL), dict(), dict(loss="siglip"), dict(targets="diagonal"), dict(SMALL, targets="label")])
def test_default_is_bit_identical_to_the_loss_without_the_switch(kw):
    r = ClipRecipe(batch_size=16, **kw)
    assert r.hard_negatives == "none"
    b = take(load_split(r, "train", 32), range(16))
    model = build_model(r)
    new, old = contrastive_loss_fn(r)(model, b), every_pair_loss_fn(r)(model, b)
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)

def test_default_run_is_bit_identical_to_naming_none():
    kw = dict(SMALL, steps=3, batch_size=16, warmup_steps=1)
    a = run_recipe(ClipRecipe(**kw), n_train=32, evaluate_after=False)
    b = run_recipe(ClipRecipe(hard_negatives="none", **kw), n_train=32, evaluate_after=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))

@pytest.mark.parametrize("targets", ["diagonal", "label"])
def test_switch_adds_the_swapped_captions_as_negatives_with_gradient(targets, batch):
    r = ClipRecipe(**(SMALL | dict(targets=targets)), hard_negatives="swap-colours", batch_size=32)
    model = build_model(r)
    term = contrastive_loss_fn(r)(model, batch)["image-text"]
    # reference: encode the swapped captions by hand, through the same text path, and apply NegCLIP's loss
    from mmlab.data import CharTokenizer, collate
    tok = CharTokenizer(max_len=r.max_len)
    swapped = [s for s in map(swap_colours, batch["caption"]) if s is not None and s not in set(batch["caption"])]
    assert 8 <= len(swapped) <= 32
    neg_batch = collate([{"text": tok(s)} for s in swapped], pad_id=tok.pad_id)
    labels = batch["label"] if targets == "label" else None
    term.backward()
    got = [p.grad.clone() for p in model.towers["text"].parameters()]
    model.zero_grad()
    out, negs = model(batch), model({k: v for k, v in neg_batch.items() if k.startswith("text")})["text"]
    ref = negclip_loss(out["image"], out["text"], negs, out["logit_scale"], labels=labels)
    torch.testing.assert_close(term, ref)
    ref.backward()
    for g, p in zip(got, model.towers["text"].parameters()): torch.testing.assert_close(g, p.grad)
    # the negatives carry gradient: detaching them changes the text tower's gradient
    model.zero_grad()
    out = model(batch)
    negclip_loss(out["image"], out["text"], negs.detach(), out["logit_scale"], labels=labels).backward()
    assert any(not torch.allclose(g, p.grad) for g, p in zip(got, model.towers["text"].parameters()))

def test_a_swap_equal_to_another_caption_of_the_batch_is_not_a_negative(batch):
    r = ClipRecipe(**SMALL, hard_negatives="swap-colours")
    b = take(batch, range(4))
    i = next(k for k, c in enumerate(b["caption"]) if swap_colours(c))
    b["caption"] = list(b["caption"]); b["caption"][(i + 1) % 4] = swap_colours(b["caption"][i])   # row i's swap is a caption
    n_before = sum(swap_colours(c) is not None for c in b["caption"])
    negs = hard_negative_texts(build_model(r), r, b)
    assert len(negs) <= n_before - 1

def test_switch_is_checked_and_recorded(tmp_path):
    with pytest.raises(ConfigError, match="expected one of none, swap-colours"): ClipRecipe(hard_negatives="swap")
    with pytest.raises(ConfigError, match="expected loss='clip', text among"): ClipRecipe(hard_negatives="swap-colours", loss="siglip")
    with pytest.raises(ConfigError, match="text among the modalities"):
        ClipRecipe(hard_negatives="swap-colours", modalities=("image", "audio"))
    with pytest.raises(DataError, match="the batch has no 'caption'"):
        r = ClipRecipe(**SMALL, hard_negatives="swap-colours")
        hard_negative_texts(build_model(r), r, {"text": torch.ones(2, 5, dtype=torch.long)})
    r = get_recipe("clip", hard_negatives="swap-colours", dataset="shapes")          # `mmlab train clip --hard_negatives ...`
    assert r.hard_negatives == "swap-colours" and recipe_dict(r)["hard_negatives"] == "swap-colours"
    (tmp_path / "recipe.json").write_text(json.dumps(recipe_dict(r)))
    assert recipe_dict(read_recipe(tmp_path / "recipe.json")) == recipe_dict(r)     # so `--resume` accepts the run

def test_negclip_run_trains_and_logs_the_same_terms():
    res = run_recipe(ClipRecipe(**SMALL, hard_negatives="swap-colours", steps=3, batch_size=16, warmup_steps=1),
                     n_train=32, evaluate_after=False)
    assert {k for k in res.history[-1] if "-" in k} == {"image-text"} and all(math.isfinite(h["loss"]) for h in res.history)

# ---- negclip_loss ----------------------------------------------------------------------------------------------------
def loop_negclip(a, b, n, s, y=None):
    "float64 loops: image rows over B captions + K negatives, caption columns over the B images; targets 1[y_i = y_j] / n_i."
    B = len(a); y = list(range(B)) if y is None else y.tolist()
    rows = [[s * float(a[i] @ b[j]) for j in range(B)] + [s * float(a[i] @ n[k]) for k in range(len(n))] for i in range(B)]
    cols = [[s * float(a[i] @ b[j]) for i in range(B)] for j in range(B)]
    def ce(M):
        out = 0.0
        for i, r in enumerate(M):
            lse = math.log(sum(math.exp(v) for v in r)); pos = [j for j in range(B) if y[j] == y[i]]
            out += sum(lse - r[j] for j in pos) / len(pos)
        return out / B
    return (ce(rows) + ce(cols)) / 2

@pytest.mark.parametrize("K", [0, 1, 7])
@pytest.mark.parametrize("labelled", [False, True])
def test_negclip_loss_matches_float64_loops(K, labelled):
    g = torch.Generator().manual_seed(K + 10 * labelled)
    a, b, n = (F.normalize(torch.randn(m, 6, generator=g, dtype=torch.float64), dim=-1) for m in (10, 10, K))
    y = torch.randint(0, 4, (10,), generator=g) if labelled else None
    got = negclip_loss(a, b, n, 7.0, labels=y)
    assert got.item() == pytest.approx(loop_negclip(a, b, n, 7.0, y), abs=1e-10)
    if K == 0: torch.testing.assert_close(got, clip_loss(a, b, 7.0, labels=y))     # no negatives: CLIP
    a32, b32, n32 = a.float().requires_grad_(), b.float(), n.float().requires_grad_()
    negclip_loss(a32, b32, n32, 7.0, labels=y).backward()                          # float32 with gradients works
    assert torch.isfinite(a32.grad).all() and (K == 0 or torch.isfinite(n32.grad).all())

def test_negclip_loss_refuses_bad_negatives():
    a = F.normalize(torch.randn(4, 6), dim=-1)
    with pytest.raises(ShapeError, match=r"negatives must be a \(K, D\) = \(K, 6\) tensor"): negclip_loss(a, a, a[:, :3], 5.0)
    with pytest.raises(ShapeError, match="negatives must be"): negclip_loss(a, a, None, 5.0)

# ---- compositional_eval ------------------------------------------------------------------------------------------------
def test_a_bag_of_characters_text_tower_scores_exactly_chance():
    "Without positions, the text tower sees a caption as a bag of characters: a caption and its colour swap are the same bag."
    r = ClipRecipe(**SMALL)
    model = build_model(r)
    with torch.no_grad(): model.towers["text"].pos_embed.zero_()   # no positions at all
    m = compositional_eval(model, r, load_split(r, "test", 120))
    assert m["swap/image/n"] > 30 and m[SWAP] == 0.5

def test_compositional_eval_matches_a_direct_computation():
    r = ClipRecipe(**SMALL)
    model = build_model(r)
    b = load_split(r, "test", 80)
    m = compositional_eval(model, r, b)
    from mmlab.recipes import prompt_encoder
    from mmlab.eval import embed
    emb = embed(model, b)
    keep = [i for i, c in enumerate(b["caption"]) if swap_colours(c) and b["attrs"]["shape"][i] != b["attrs"]["shape2"][i]]
    neg = prompt_encoder(model, r.max_len)([swap_colours(b["caption"][i]) for i in keep])
    d = (emb["image"][keep] * emb["text"][keep]).sum(1) - (emb["image"][keep] * neg).sum(1)
    assert m["swap/image/n"] == len(keep) and m[SWAP] == pytest.approx((d > 0).float().mean().item())
    # own-caption retrieval: a match is the same caption, so chance is about one in the number of distinct captions
    assert m["captions/image_to_text/chance_R@1"] == pytest.approx(1 / len(set(b["caption"])), rel=0.2)
