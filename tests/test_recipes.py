"""Recipes and the `mmlab` command: every recipe variant learns on bundled data; CLI errors are clear."""
import json, math, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from mmlab.core import CheckpointError, ConfigError
from mmlab.recipes import ClipRecipe, RECIPES, get_recipe, label_names, load_run, main, run_recipe

VARIANTS = [dict(loss="clip", targets="label"), dict(loss="clip", targets="diagonal"),
            dict(loss="siglip", targets="label"), dict(loss="siglip", targets="diagonal"),
            dict(loss="symile", targets="diagonal"),
            dict(loss="clip", targets="label", modalities=("image", "text")),
            dict(loss="clip", targets="label", modalities=("audio", "text")),
            dict(loss="siglip", targets="diagonal", modalities=("image", "audio"))]

@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v if isinstance(v, str) else "+".join(v)) for v in kw.values()))
def test_recipe_variant_loss_decreases(kw):
    # one fixed batch of 32 (reshuffled each step): the loss on it must fall within a few steps
    r = ClipRecipe(steps=25, batch_size=32, warmup_steps=2, **kw)
    res = run_recipe(r, n_train=32, evaluate_after=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 25 and all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

def naive_knn_accuracy(bank_f, bank_y, test_f, test_y, k=20, tau=0.07, C=10):
    "Weighted kNN written out in float64 (votes exp(cos/tau) of the k nearest), the reference for the recipes' kNN metric."
    a = torch.nn.functional.normalize(bank_f.double(), dim=1); q = torch.nn.functional.normalize(test_f.double(), dim=1)
    right = 0
    for i in range(len(q)):
        sims = [(float(q[i] @ a[j]), j) for j in range(len(a))]
        sims.sort(key=lambda t: (-t[0], t[1]))
        votes = [0.0] * C
        for s, j in sims[:k]: votes[int(bank_y[j])] += math.exp(s / tau)
        right += max(range(C), key=lambda c: (votes[c], -c)) == int(test_y[i])
    return right / len(q)

def pooled(encoder):
    "The frozen features the image recipes evaluate: the encoder's pooled output, in eval mode."
    def f(batch):
        was = encoder.training; encoder.eval()
        try: return encoder(batch["image"]).pooled
        finally: encoder.train(was)
    return f

@torch.no_grad()
def assert_knn_metric(res, recipe, features, key, n_train, n_eval, above_chance=0.05):
    """The reported kNN accuracy equals the float64 reference on the trained model's features (bank: the first n_train),
    up to one test example (float32 similarities of nearly collinear features can swap neighbours), and above chance
    (these runs are tiny: 64-example banks after 20-30 steps reach 17-35 % on digits, chance 10 %)."""
    from mmlab.recipes import load_split
    bank, test = load_split(recipe, "train", n_train), load_split(recipe, recipe.eval_split, n_eval)
    ref = naive_knn_accuracy(features(bank), bank["label"], features(test), test["label"])
    assert res.metrics[key] == pytest.approx(ref, abs=1 / n_eval + 1e-9), (res.metrics[key], ref)
    assert res.metrics[key] > res.metrics[key.replace("accuracy", "chance")] + above_chance, res.metrics

def test_every_registered_recipe_builds():
    for name in RECIPES: assert get_recipe(name).name == name

def test_config_errors():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"): get_recipe("nope")
    with pytest.raises(ConfigError, match="allowed keys: modalities, loss"): get_recipe("clip", lr_max="1")
    with pytest.raises(ConfigError, match="not a valid float"): get_recipe("clip", lr="fast")
    with pytest.raises(ConfigError, match="expected one of clip, siglip, symile"): get_recipe("clip", loss="infonce")
    with pytest.raises(ConfigError, match="two or three distinct"): get_recipe("clip", modalities="image,depth")
    with pytest.raises(ConfigError, match="expected an integer >= 1"): get_recipe("clip", steps="0")

def _mmlab(*args, cwd=None):
    exe = shutil.which("mmlab")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from mmlab.recipes import main; sys.exit(main())"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)

def test_cli_train_eval_and_errors(tmp_path):
    run = tmp_path / "run"
    p = _mmlab("train", "clip", "--steps", "3", "--batch_size", "16", "--modalities", "image,text", "--out", str(run))
    assert p.returncode == 0, p.stderr
    assert str(run) in p.stdout
    assert (run / "recipe.json").is_file() and (run / "metrics.json").is_file()
    assert "zero_shot/text_to_image/accuracy" in json.loads((run / "metrics.json").read_text())
    p = _mmlab("eval", str(run), "--out", str(tmp_path / "ev.json"))
    assert p.returncode == 0, p.stderr
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev == json.loads((run / "metrics.json").read_text())    # same weights, same split: same numbers
    for args, msg in [(("train", "nope"), "unknown recipe 'nope'"), (("train", "clip", "--stepz", "1"), "allowed keys"),
                      (("train", "clip", "--steps", "two"), "not a valid int"), (("train", "clip", "--loss", "x"), "expected one of"),
                      (("eval", str(tmp_path / "missing")), "does not exist"), (("frobnicate",), "unknown command")]:
        p = _mmlab(*args)
        assert p.returncode == 2 and msg in p.stderr, (args, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr
    # a corrupted checkpoint is refused with a clear message
    step = next((run / "checkpoints").glob("step-*"))
    (step / "tensors.safetensors").write_bytes(b"garbage")
    p = _mmlab("eval", str(run))
    assert p.returncode == 2 and "corrupt" in p.stderr, p.stderr
    with pytest.raises(CheckpointError): load_run(run)
    (run / "recipe.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"): load_run(run)

def test_cli_help_lists_recipes_and_keys(capsys):
    assert main(["--help"]) == 0 and "clip" in capsys.readouterr().out
    assert main(["train", "clip", "--help"]) == 0 and "--targets" in capsys.readouterr().out

def test_mae_recipe_loss_decreases_and_evaluates(tmp_path):
    r = get_recipe("mae", steps="30", batch_size="32", warmup_steps="3")
    res = run_recipe(r, tmp_path / "mae", n_train=64, n_eval=40)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    m = res.metrics
    assert m["knn/image/chance"] == 0.1
    assert_knn_metric(res, r, pooled(res.model.encoder("image")), "knn/image/accuracy", 64, 40)
    recipe, model = load_run(tmp_path / "mae")          # rebuilt from recipe.json + the checkpoint
    assert recipe.name == "mae" and recipe.steps == 30
    for (n, p), q in zip(res.model.state_dict().items(), model.state_dict().values()): assert torch.equal(p, q), n

def test_byol_recipe_loss_decreases_teacher_moves(tmp_path):
    r = get_recipe("byol", steps="20", batch_size="32", warmup_steps="3")
    res = run_recipe(r, tmp_path / "byol", n_train=64, n_eval=40)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    fresh = r.make_model()
    t_now, t_init = res.model.teacher.module.state_dict(), fresh.teacher.module.state_dict()
    o_now = res.model.online.state_dict()
    moved = [k for k in t_now if t_now[k].is_floating_point() and not torch.equal(t_now[k], t_init[k])]
    assert moved                                          # the EMA callback updated the teacher ...
    assert any(not torch.equal(t_now[k], o_now[k]) for k in moved)   # ... towards, not onto, the online net
    assert_knn_metric(res, r, pooled(res.model.online["encoder"]), "knn/image/accuracy", 64, 40)
    recipe, model = load_run(tmp_path / "byol")
    for (n, p), q in zip(res.model.state_dict().items(), model.state_dict().values()): assert torch.equal(p, q), n

def test_lit_recipe_locks_pretrained_tower(tmp_path):
    # the locked image tower comes from a short image-audio CLIP run (a barely trained tower has near-constant features)
    run_recipe(get_recipe("clip", steps="30", batch_size="32", modalities="image,audio"), tmp_path / "clip", n_train=64,
               evaluate_after=False)
    run_recipe(get_recipe("byol", steps="2", batch_size="16"), tmp_path / "byol", n_train=16, evaluate_after=False)
    r = get_recipe("lit", init_from=str(tmp_path / "clip"), steps="25", batch_size="32", warmup_steps="2",
                   modalities="image,text")
    res = run_recipe(r, tmp_path / "lit", n_train=32, n_eval=40)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    from mmlab.recipes import pretrained_tower
    _, byol = load_run(tmp_path / "byol")                # byol runs give their online encoder
    assert pretrained_tower(tmp_path / "byol") is not None
    for p, q in zip(pretrained_tower(tmp_path / "byol").state_dict().values(), byol.online["encoder"].state_dict().values()):
        assert torch.equal(p, q)
    enc = pretrained_tower(tmp_path / "clip", "image")
    for (n, p), q in zip(enc.state_dict().items(), res.model.towers["image"].state_dict().values()):
        assert torch.equal(p, q), n                       # locked: bit-identical after training
    recipe, model = load_run(tmp_path / "lit")            # rebuilt without needing the byol run again
    assert recipe.name == "lit" and recipe.locked == "image"
    with pytest.raises(CheckpointError): get_recipe("lit", init_from=str(tmp_path / "nowhere")).make_model()
    with pytest.raises(ConfigError, match="lit.locked"): get_recipe("lit", locked="audio", modalities="image,text")

def test_hubert_recipe_loss_decreases(tmp_path):
    r = get_recipe("hubert", steps="25", batch_size="32", warmup_steps="3")
    res = run_recipe(r, tmp_path / "hubert", n_train=64, n_eval=40)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    def frames_mean(b):                                   # mean of the encoder's frames over the unpadded ones
        res.model.eval(); h = res.model.hubert.hidden_states(b["audio"]); res.model.train()
        pt = res.model.encoder("audio").config.patch_size[1]       # log-mel columns per frame
        frames = torch.arange(h.shape[1])[None] < torch.ceil(b["audio_lengths"][:, None] / pt)
        assert torch.equal(frames, res.model.valid_frames(b))
        return (h * frames[..., None]).sum(1) / frames.sum(1, keepdim=True)
    assert_knn_metric(res, r, frames_mean, "knn/audio/accuracy", 64, 40)
    # the centroids are k-means of real frames: every unit is used by some training frame
    from mmlab.recipes import load_split
    from mmlab.losses.masked import kmeans_targets
    b = load_split(r, "train", 64); v = res.model.valid_frames(b)
    units = kmeans_targets(res.model.hubert.frame_features(b["audio"]), res.model.centroids)[v]
    assert units.unique().numel() > r.num_units // 2
    recipe, model = load_run(tmp_path / "hubert")
    assert torch.equal(model.centroids, res.model.centroids)   # from the checkpoint, not recomputed

def test_dino_recipe_learns_and_reloads(tmp_path):
    r = get_recipe("dino", steps="30", batch_size="32", warmup_steps="3")
    res = run_recipe(r, tmp_path / "dino", n_train=64, n_eval=40)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses        # falls, away from log K (collapse)
    assert res.model.criterion.center.abs().sum() > 0                        # the centre is model state ...
    recipe, model = load_run(tmp_path / "dino")
    assert torch.equal(model.criterion.center, res.model.criterion.center)  # ... so the checkpoint carries it
    assert_knn_metric(res, r, pooled(res.model.teacher.module["encoder"]), "knn/image/accuracy", 64, 40)
    assert_knn_metric(res, r, pooled(res.model.online["encoder"]), "knn/image_student/accuracy", 64, 40)
    from mmlab.recipes import pretrained_tower
    enc = pretrained_tower(tmp_path / "dino")                                # DINO's tower is the teacher's encoder
    for p, q in zip(enc.state_dict().values(), res.model.teacher.module["encoder"].state_dict().values()): assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="local_scale < global_scale"): get_recipe("dino", local_scale="0.6")

def test_av_mae_recipe_loss_decreases(tmp_path):
    r = get_recipe("av-mae", steps="25", batch_size="32", warmup_steps="3")
    res = run_recipe(r, tmp_path / "avmae", n_train=64, n_eval=40)
    assert set(res.history[0]) >= {"image", "audio"}                         # one term per modality
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    from mmlab.models import mmae_features
    for m in ("image", "audio"):
        assert f"av-mae/{m}/masked_mse" in res.metrics
        assert_knn_metric(res, r, lambda b: (res.model.eval(), mmae_features(res.model, b, m), res.model.train())[1],
                          f"knn/{m}/accuracy", 64, 40)
    r2 = get_recipe("av-mae", steps="3", batch_size="16", contrastive_weight="0.5")
    assert "contrastive" in run_recipe(r2, n_train=32, evaluate_after=False).history[0]

def test_bf16_and_grad_accum_fields_reach_the_trainer():
    r = get_recipe("clip", steps="20", batch_size="16", grad_accum="2", precision="bf16", modalities="image,text", warmup_steps="2")
    res = run_recipe(r, n_train=32, evaluate_after=False)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    with pytest.raises(ConfigError, match="expected one of fp32, bf16"): get_recipe("clip", precision="fp8")
    with pytest.raises(ConfigError, match="expected one of tiny, small, base"): get_recipe("mae", size="huge")

def _manifest(tmp_path, labels=True):
    from mmlab.recipes import export_manifest
    for split, n in (("train", 48), ("test", 24)): export_manifest("digits", split, tmp_path, n, labels=labels)
    return str(tmp_path / "{split}.csv")

def test_manifest_dataset_trains_like_bundled_data(tmp_path):
    from mmlab.recipes import label_names, load_split
    ds = _manifest(tmp_path)
    r = get_recipe("clip", dataset=ds, steps="25", batch_size="16", warmup_steps="2")
    a, b = load_split(r, "test"), load_split(ClipRecipe(), "test", 24)
    assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6 and torch.allclose(a["audio"], b["audio"], atol=1e-5)
    names = label_names(r)
    assert [names[i] for i in a["label"]] == [["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][i] for i in b["label"]]
    res = run_recipe(r, tmp_path / "run")
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses        # 48 examples in batches of 16
    assert "zero_shot/text_to_audio/accuracy" in res.metrics
    recipe, _ = load_run(tmp_path / "run")                                   # `mmlab eval` rebuilds it from recipe.json
    assert recipe.dataset == ds
    # every unimodal recipe reads the same manifest (the columns it needs)
    for name in ("mae", "hubert", "av-mae"):
        assert run_recipe(get_recipe(name, dataset=ds, steps="2", batch_size="8"), n_eval=16).metrics

def test_manifest_without_labels_gives_pair_retrieval(tmp_path):
    from mmlab.recipes import label_names, load_split
    r = get_recipe("clip", dataset=_manifest(tmp_path, labels=False), steps="3", batch_size="16", modalities="image,text")
    assert label_names(r) is None
    assert load_split(r, "test")["label"].tolist() == list(range(24))        # each item is its own class
    m = run_recipe(r).metrics
    assert not any(k.startswith("zero_shot/") for k in m) and m["retrieval/image_to_text/chance_R@1"] == pytest.approx(1 / 24)
    m = run_recipe(get_recipe("mae", dataset=r.dataset, steps="2", batch_size="8")).metrics
    assert list(m) == ["mae/image/masked_mse"]                                 # no labels: no kNN

def test_manifest_errors_name_file_and_row(tmp_path):
    from mmlab.core import DataError, MissingFileError
    from mmlab.recipes import load_split
    ds = _manifest(tmp_path)
    with open(tmp_path / "test.csv", "a") as f: f.write("test/00000.png,,a cat,cat\n")
    r = get_recipe("clip", dataset=ds)
    with pytest.raises(DataError, match=r"test.csv: 1 row\(s\) lack one of image, audio, text \(first: row 26\)"): load_split(r, "test")
    with open(tmp_path / "test.csv", "a") as f: f.write("test/00000.png,test/00000.wav,a cat,cat\n")
    r = get_recipe("clip", dataset=ds, modalities="image,text")
    with pytest.raises(DataError, match=r"row 26: label 'cat' is not a train-split label.*\(2 such row\(s\)\)"): load_split(r, "test")
    with pytest.raises(MissingFileError, match="does not exist"): load_split(get_recipe("clip", dataset=str(tmp_path / "{split}.jsonl")), "test")

def test_cli_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    run = tmp_path / "run"
    p = _mmlab("train", "clip", "--steps", "6", "--ckpt_every", "3", "--batch_size", "16", "--modalities", "image,text",
               "--log_to", "jsonl,csv", "--out", str(run))
    assert p.returncode == 0, p.stderr
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert last.name == "step-00000006"
    final = load_file(str(last / "tensors.safetensors"))
    shutil.rmtree(last)                                                       # as if killed after step 3
    p = _mmlab("train", "--resume", str(run))
    assert p.returncode == 0, p.stderr
    again = load_file(str(last / "tensors.safetensors"))
    assert sorted(again) == sorted(final) and all(torch.equal(final[k], again[k]) for k in final)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5, 6]                                        # no duplicated or lost records
    for args, msg in [(("train", "--resume"), "exactly one run folder"), (("train", "--resume", str(tmp_path)), "no recipe.json"),
                      (("train", "--resume", str(run), "--steps", "9"), "exactly one run folder")]:
        p = _mmlab(*args)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)

# ---------------------------------------------------------------------------------------------
# device, precision and seed default to the settings (settings.ini < MMLAB_*); an explicit value wins.
def _no_mmlab_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MMLAB_") and k not in ("MMLAB_TEST_FLAGS", "MMLAB_TEST_CUDA_ARCH")]:
        monkeypatch.delenv(k)

def test_recipe_defaults_come_from_the_settings(monkeypatch, tmp_path):
    from mmlab.core import get_device
    _no_mmlab_env(monkeypatch)
    r = get_recipe("clip")
    assert (r.device, r.precision, r.seed) == ("auto", "auto", 0)           # settings.ini as shipped
    monkeypatch.setenv("MMLAB_PRECISION", "bf16"); monkeypatch.setenv("MMLAB_SEED", "7")
    for name in RECIPES: assert (get_recipe(name).precision, get_recipe(name).seed) == ("bf16", 7), name
    assert (ClipRecipe(seed=3, precision="fp32").seed, get_recipe("clip", seed="3", precision="fp32").precision) == (3, "fp32")
    r = get_recipe("clip", steps="2", batch_size="8", modalities="image,text")
    for p, q in zip(r.make_model().state_dict().values(), ClipRecipe(seed=7, modalities=("image", "text")).make_model().state_dict().values()):
        assert torch.equal(p, q)                                              # the seed setting seeds the weights
    res = run_recipe(r, tmp_path / "run", n_train=16, evaluate_after=False)
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert (saved["device"], saved["precision"], saved["seed"]) == (str(get_device("auto")), "bf16", 7)   # resolved, recorded
    assert len(res.history) == 2
    with pytest.raises(ConfigError, match="clip.device='gpu'"): get_recipe("clip", device="gpu")
    with pytest.raises(ConfigError, match="clip.seed=-1"): ClipRecipe(seed=-1)

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_train_reads_device_setting_and_explicit_key_wins(monkeypatch, tmp_path, capsys):
    _no_mmlab_env(monkeypatch)
    monkeypatch.setenv("MMLAB_DEVICE", "cuda"); monkeypatch.setenv("MMLAB_SEED", "5")
    assert main(["train", "clip", "--help"]) == 0
    assert "(default 'cuda', from the device setting / MMLAB_DEVICE)" in next(
        l for l in capsys.readouterr().out.splitlines() if l.split()[0] == "--device")
    args = ["train", "clip", "--steps", "2", "--batch_size", "8", "--modalities", "image,text", "--eval_split", "test"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "'cuda' requested but CUDA is not available" in capsys.readouterr().err
    assert main(args + ["--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert (saved["device"], saved["precision"], saved["seed"]) == ("cpu", "fp32", 5)

# ---------------------------------------------------------------------------------------------
def test_cli_export_tower_loads_strictly(tmp_path, capsys):
    "`mmlab export RUN --tower image -o OUT`: load_model(OUT) gives the run's tower; its keys load strictly into a fresh tower."
    from safetensors.torch import load_file
    from mmlab.encoders import ViTConfig, ViTEncoder
    from mmlab.models import load_model, model_config
    from mmlab.recipes import pretrained_tower
    run, out = tmp_path / "run", tmp_path / "image-tower"
    run_recipe(get_recipe("clip", steps="2", batch_size="8", modalities="image,text"), run, n_train=16, evaluate_after=False)
    assert main(["export", str(run), "--tower", "image", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tower, back = pretrained_tower(run, "image").eval(), load_model(out).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): a, b = tower(x), back(x)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class"] == "ViTEncoder" and cfg["config"] == json.loads(json.dumps(model_config(tower)["config"]))
    fresh = ViTEncoder(ViTConfig.from_dict(cfg["config"]))
    missing, unexpected = fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not missing and not unexpected
    # errors name the run and the modality, and the CLI turns them into one line and status 2
    with pytest.raises(ConfigError, match=r"run: the clip run cannot give a 'audio' tower"):
        from mmlab.recipes import export_tower; export_tower(run, "audio", tmp_path / "x")
    assert main(["export", str(run), "--tower", "audio", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "'audio' tower" in err and not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "nope"), "--tower", "image", "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "'image' tower of" in err and "nope" in err and "does not exist" in err
    assert main(["export", str(run), "-o", str(tmp_path / "y")]) == 2 and "--tower MODALITY" in capsys.readouterr().err
    assert main(["export", str(run), "--tower", "image", "--out", str(tmp_path / "y"), "--size", "1"]) == 2
    assert main(["--help"]) == 0 and "mmlab export RUN --tower MODALITY -o FOLDER" in capsys.readouterr().out

def hybrid_cell() -> str:
    "The recipes chapter's CLIP + MAE hybrid: the code cell that defines `ClipMaeRecipe`."
    nb = json.loads((Path(__file__).resolve().parents[1] / "nbs" / "08a_recipes.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and "class ClipMaeRecipe" in "".join(c["source"])]
    assert len(cells) == 1, "expected exactly one cell defining ClipMaeRecipe in nbs/08a_recipes.ipynb"
    return cells[0]

def test_recipe_contract_hybrid_from_public_api_in_40_lines():
    # the recipe contract: a CLIP + MAE objective written from public names only, at most 40 lines, trains through run_recipe
    src = hybrid_cell()
    assert len(src.strip().splitlines()) <= 40
    for line in src.splitlines():
        if line.startswith("from mmlab"):
            mod, names = line.split()[1], line.split(" import ")[1].split(", ")
            public = __import__(mod, fromlist=["__all__"]).__all__
            assert all(n in public for n in names), f"{line!r} imports a name outside {mod}.__all__"
    ns = {}; exec(src, ns)
    res = run_recipe(ns["ClipMaeRecipe"](steps=12, batch_size=32, warmup_steps=2), n_train=64, n_eval=64)
    model, first, last = res.model, res.history[0], res.history[-1]
    assert model.mae.tower is model.encoder("image")                     # one tower shaped by both objectives
    assert set(first) >= {"image-text", "mae"} and math.isclose(first["loss"], first["image-text"] + first["mae"], rel_tol=1e-6)
    assert last["mae"] < first["mae"] and last["image-text"] < first["image-text"]
    assert "zero_shot/text_to_image/accuracy" in res.metrics
    with pytest.raises(ConfigError, match="clip-mae.mask_ratio=1.5"): ns["ClipMaeRecipe"](mask_ratio=1.5)

def test_image_only_recipes_carry_no_audio_or_text_fields():
    # a recipe lists (and `--help` shows) only the keys it uses: no n_mels / max_len without audio / text
    for name, cls in RECIPES.items():
        r = cls()
        assert hasattr(r, "n_mels") == ("audio" in r.modalities), name
        assert hasattr(r, "max_len") == ("text" in r.modalities), name

def test_one_size_table_for_towers_and_recipes():
    # `size` means one trunk everywhere: the recipes accept exactly the sizes of encoders.SIZES, and each tower's preset
    # takes its width / depth / heads from that row (CLIP's text tower at base is the one documented exception of width)
    from mmlab.encoders import SIZES, AudioConfig, TextConfig, ViTConfig
    assert set(SIZES) == {"tiny", "small", "base"}
    for s, trunk in SIZES.items():
        ClipRecipe(size=s)
        for cfg in (ViTConfig, AudioConfig, TextConfig):
            c = cfg.preset(s)
            assert c.depth == trunk["depth"], (cfg.__name__, s)
            if (cfg, s) != (TextConfig, "base"): assert (c.embed_dim, c.num_heads) == (trunk["embed_dim"], trunk["num_heads"])
    with pytest.raises(ConfigError, match="expected one of tiny, small, base"): ClipRecipe(size="huge")

@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_help_gives_every_key_its_meaning_and_default(name, capsys):
    # `mmlab train RECIPE --help`: exactly the recipe's fields, each with the comment beside its definition and its default
    from dataclasses import fields
    from mmlab.recipes import field_default, field_help
    assert main(["train", name, "--help"]) == 0
    out = capsys.readouterr().out
    lines, run_folder = out.split("\nrun folder")[0].splitlines()[1:], out.split("\nrun folder")[1]
    assert "--out " in run_folder and "--overwrite " in run_folder     # the run folder's options follow the recipe's keys
    doc, fs = field_help(RECIPES[name]), fields(RECIPES[name])
    assert sorted(l.split()[0] for l in lines) == sorted(f"--{f.name}" for f in fs)
    for f in fs:
        line = next(l for l in lines if l.split()[0] == f"--{f.name}")
        assert doc.get(f.name) and doc[f.name] in line and f"(default {field_default(f)!r}" in line, line
    assert field_help(RECIPES["clip"])["steps"] == "optimiser updates"          # an override keeps its base class's meaning

@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_composes_the_trainers_config_with_the_same_names(name):
    # one vocabulary: every field a recipe shares with TrainConfig goes to the trainer under the same name, and the
    # trainer's own checks guard them, with errors naming the recipe
    from dataclasses import fields
    from mmlab.train import TrainConfig
    r = RECIPES[name](steps=7, lr=0.01, weight_decay=0.2, grad_accum=2, log_to="jsonl,csv", ckpt_every=3)
    tc, shared = r.train_config("/tmp/run"), {f.name for f in fields(TrainConfig)} & {f.name for f in fields(r)}
    assert shared >= {"steps", "lr", "weight_decay", "warmup_steps", "grad_accum", "device", "precision", "compile", "log_to",
                      "ckpt_every"}
    for k in shared - {"warmup_steps", "log_to"}: assert getattr(tc, k) == getattr(r, k), k
    assert tc.warmup_steps == min(r.warmup_steps, 6) and tc.log_to == ("jsonl", "csv") and tc.out_dir == "/tmp/run"
    for bad, msg in ((dict(lr=0), "lr=0: expected a learning rate > 0"), (dict(grad_accum=0), "grad_accum=0: expected an integer >= 1"),
                     (dict(log_to="jsonl,wandb"), "log_to="), (dict(compile="yes"), "compile='yes': expected True or False")):
        with pytest.raises(ConfigError, match=f"^{name}\\.{msg}"): RECIPES[name](**bad)


def test_zero_padded_labels_are_distinct_classes_in_one_order(tmp_path):
    "`09` and `9` are two labels (text, never parsed to 9): label_names orders them by value then text, LabelIndex maps each row."
    from mmlab.data import ManifestDataset
    from mmlab.recipes import LabelIndex
    (tmp_path / "train.csv").write_text("text,label\na,9\nb,09\nc,10\nd,cat\n")
    recipe = get_recipe("clip", dataset=str(tmp_path / "{split}.csv"))
    assert label_names(recipe) == ["09", "9", "10", "cat"]
    ds = LabelIndex(ManifestDataset(tmp_path / "train.csv", modalities=["text"]), label_names(recipe))
    assert [ds[i]["label"] for i in range(4)] == [1, 0, 2, 3]


def test_resample_is_a_recipe_key_from_the_cli():
    "The audio rate error tells CLI users `--resample true`: the key exists on every recipe and parses as a bool."
    assert get_recipe("clip", resample="true").resample is True
    assert get_recipe("clip").resample is False
