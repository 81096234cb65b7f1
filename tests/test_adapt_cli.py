"""`mmlab adapt RUN`: the adaptation chapter's levers on a finished run. Every method lands in the JSON file, its
numbers are those of code written here without the adaptation module, and bad input stops with one line naming the
option (exit status 2)."""
import copy, json

import pytest

from mmlab.adapt import ADAPT_METHODS, ZeroShotClassifier, accuracy, fine_tune, shift_batch
from mmlab.eval import embed, few_shot_subset, linear_probe, zero_shot_eval
from mmlab.data import take
from mmlab.recipes import get_recipe, label_names, load_run, load_split, main, run_recipe, text_classes

FAST = ["--seeds", "1", "--steps", "3", "--shots", "4"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    "A tiny image-text CLIP run folder (a few updates: enough to load, adapt and compare, not to be good)."
    run = tmp_path_factory.mktemp("adapt") / "clip"
    recipe = get_recipe("clip", steps=3, batch_size=16, modalities=("image", "text"), device="cpu", precision="fp32")
    run_recipe(recipe, run, evaluate_after=False)
    return run


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    "A tiny MAE run: towers but no text tower, so no zero-shot."
    run = tmp_path_factory.mktemp("adapt") / "mae"
    run_recipe(get_recipe("mae", steps=2, batch_size=16, device="cpu", precision="fp32"), run, evaluate_after=False)
    return run


def _zero_shot(model, recipe, batch):
    "Zero-shot accuracy of the image queries with the recipe's prompt ensemble (chapter 08a's path, not mmlab.adapt's)."
    return zero_shot_eval(embed(model, batch)["image"], text_classes(model, recipe, label_names(recipe)), batch["label"])["accuracy"]


def test_every_method_is_written_and_matches_independent_code(clip_run, capsys):
    assert main(["adapt", str(clip_run), *FAST, "--lam", "1"]) == 0
    out = capsys.readouterr().out
    res = json.loads((clip_run / "adapt-invert.json").read_text())
    assert list(res["rows"]) == list(res["summary"]) == list(ADAPT_METHODS)
    assert all(f"| {m} |" in out for m in ADAPT_METHODS) and str(clip_run / "adapt-invert.json") in out
    assert not [p.name for p in clip_run.iterdir() if p.name.startswith(".tmp")]        # written whole, then renamed
    rows = {m: r[0] for m, r in res["rows"].items()}

    recipe, model = load_run(clip_run)
    test = load_split(recipe, "test")
    shifted = shift_batch(test, "invert", seed=2)
    assert [rows["zero-shot"][k] for k in ("clean", "invert")] == [_zero_shot(model, recipe, b) for b in (test, shifted)]
    # the labelled pool is the training split shifted with seed 1; seed 0 picks its 4 examples per class
    pool = shift_batch(load_split(recipe, "train"), "invert", seed=1)
    idx = few_shot_subset(pool["label"], 4, seed=0)
    pooled = lambda b: embed(model.encoder("image"), b, fn=lambda t, x: t(x["image"]).pooled)
    probe = linear_probe(pooled(pool)[idx], pool["label"][idx], pooled(shifted), shifted["label"])["accuracy"]
    assert rows["probe"]["invert"] == probe
    assert rows["probe"]["trainable"] == (model.encoder("image").config.embed_dim + 1) * 10
    # full fine-tuning: every weight of the zero-shot classifier at lr 1e-3, the same subset, steps and seed
    zs = ZeroShotClassifier(model, "image", text_classes(model, recipe, label_names(recipe)))
    ft = fine_tune(copy.deepcopy(zs), take(pool, idx), steps=3, lr=1e-3, seed=0)
    assert [rows["full"][k] for k in ("clean", "invert")] == [accuracy(ft, test), accuracy(ft, shifted)]
    assert rows["full"]["trainable"] == sum(p.numel() for p in zs.parameters())
    assert rows["zero-shot"]["trainable"] == 0 < rows["probe"]["trainable"] < rows["lora"]["trainable"] < rows["full"]["trainable"]
    # lam = 1: WiSE-FT is the fine-tuned model itself
    assert [rows["wise-ft"][k] for k in ("clean", "invert")] == [rows["full"][k] for k in ("clean", "invert")]
    s = res["summary"]["full"]
    assert s["invert"] == rows["full"]["invert"] and s["invert std"] == 0.0 and s["cpu_s"] > 0


def test_seeded_shift_named_with_a_hyphen_and_out_file(clip_run, tmp_path):
    out = tmp_path / "sub" / "noise.json"
    assert main(["adapt", str(clip_run), *FAST, "--shift", "pixel-noise", "--methods", "zero-shot", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shift"] == "pixel noise" and list(res["rows"]) == ["zero-shot"]
    recipe, model = load_run(clip_run)
    test = load_split(recipe, "test")
    assert res["rows"]["zero-shot"][0]["pixel noise"] == _zero_shot(model, recipe, shift_batch(test, "pixel noise", seed=2))


def test_a_run_without_text_tower_gets_the_probe_only(mae_run, capsys):
    assert main(["adapt", str(mae_run), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no text tower" in err and "methods" in err and "probe" in err, err
    assert main(["adapt", str(mae_run), *FAST, "--methods", "probe"]) == 0
    assert list(json.loads((mae_run / "adapt-invert.json").read_text())["rows"]) == ["probe"]


@pytest.mark.parametrize("args, msg", [
    ((), "give a RUN folder"),
    (("{run}", "--shift", "blur"), "shift 'blur' is unknown"),
    (("{run}", "--shift", "audio-noise"), "shift 'audio noise' changes 'audio'"),
    (("{run}", "--methods", "zero-shot,magic"), "methods ['zero-shot', 'magic'] not understood"),
    (("{run}", "--shots", "x"), "--shots 'x' is not an integer"),
    (("{run}", "--shots", "0"), "--shots '0' is not an integer >= 1"),
    (("{run}", "--shots", "100000"), "shots=100000 exceeds"),
    (("{run}", "--seeds", "-1"), "--seeds '-1' is not an integer"),
    (("{run}", "--steps", "1.5"), "--steps '1.5' is not an integer"),
    (("{run}", "--lam", "half"), "--lam 'half' is not a number"),
    (("{run}", "--lam", "2"), "lam (WiSE-FT's mixing coefficient) must be in [0, 1]"),
    (("{run}", "--shfit", "invert"), "unknown option(s) ['shfit']"),
    (("{run}/nowhere",), "does not exist"),
])
def test_bad_input_is_one_line_naming_the_option(clip_run, capsys, args, msg):
    assert main(["adapt", *(a.format(run=clip_run) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmlab: error: ") and err.count("\n") == 1 and msg in err, err


def test_help_lists_the_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "mmlab adapt RUN" in out and "--methods zero-shot,probe,lora,full,wise-ft" in out
