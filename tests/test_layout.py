"""The architecture, as tests: the module map is the notebook order and the import order, `mmlab.losses` holds
no network, and every recipe's model saves, loads and hands back a reusable tower through one API."""
import ast, importlib, inspect, json, re, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

# The module map: one chapter notebook per module, in notebook order. A module imports only modules above it.
MAP = ["mmlab.core", "mmlab.data", "mmlab.encoders", "mmlab.losses.contrastive", "mmlab.masking", "mmlab.losses.masked",
       "mmlab.losses.distill", "mmlab.losses", "mmlab.models", "mmlab.kernels", "mmlab.gpu_check", "mmlab.train", "mmlab.eval",
       "mmlab.recipes", "mmlab.adapt", "mmlab.analysis", "mmlab.widgets", "mmlab.docsite"]

# Imports that may point down the map, each with its reason.
EXCEPTIONS = {
    # the optional fused C++/CUDA path of clip_loss / siglip_loss (impl="fused" or "auto"): imported lazily, inside the
    # functions, only when asked for, so `import mmlab.losses` never compiles or imports the kernels
    ("mmlab.losses.contrastive", "mmlab.kernels"),
    # `mmlab adapt` (the console entry point lives in mmlab.recipes): imported inside `_cmd` when that command runs,
    # since mmlab.adapt builds on mmlab.recipes (load_run, load_split, text_classes)
    ("mmlab.recipes", "mmlab.adapt"),
}


def notebook_modules() -> list:
    "(notebook stem, module) of every chapter notebook, in file-name order, from its `#| default_exp`."
    out = []
    for nb in sorted(NBS.glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        exp = [m.group(1) for c in cells if c["cell_type"] == "code"
               for m in [re.match(r"#\|\s*default_exp\s+(\S+)", "".join(c["source"]).strip())] if m]
        if exp: out.append((nb.stem, "mmlab." + exp[0].removesuffix(".__init__")))
    return out


def module_file(mod:str) -> Path:
    p = ROOT / Path(*mod.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def mmlab_imports(mod:str) -> dict:
    "Every mmlab module `mod` imports (module level or inside functions) -> the first line that imports it."
    path = module_file(mod)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]      # `from mmlab import kernels` names a module
        elif isinstance(node, ast.Import): names = [a.name for a in node.names]
        else: continue
        for name in names:
            if name and name.split(".")[0] == "mmlab" and name != "mmlab" and module_file(name).exists():
                found.setdefault(name, node.lineno)
    return found


def test_map_is_the_notebook_order():
    "The map written above is the order of the chapter notebooks (their `#| default_exp`), each module once."
    assert [m for _, m in notebook_modules()] == MAP
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mmlab").rglob("*.py") if p.name != "_modidx.py"
                  and str(p.relative_to(ROOT)) != "mmlab/__init__.py") == sorted(str(module_file(m).relative_to(ROOT)) for m in MAP)


def test_index_lists_the_map():
    "The chapter table of `nbs/index.ipynb` (and so README) lists the notebooks and modules in map order."
    text = "\n".join("".join(c["source"]) for c in json.loads((NBS / "index.ipynb").read_text())["cells"])
    rows = re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|", text, flags=re.M)
    assert rows == notebook_modules()


def test_no_module_imports_one_later_in_the_map():
    later = []
    for i, mod in enumerate(MAP):
        for imp, line in mmlab_imports(mod).items():
            if imp not in MAP: later.append(f"{mod} imports {imp} (line {line}), which is not in the map"); continue
            if MAP.index(imp) >= i and (mod, imp) not in EXCEPTIONS and not imp.startswith(mod + "."):
                later.append(f"{mod} imports {imp} (line {line}), which comes at or after it in the map")
    assert not later, "\n".join(later)


def test_the_exceptions_are_still_needed():
    "An exception nobody uses any more is removed from the list."
    for mod, imp in EXCEPTIONS: assert imp in mmlab_imports(mod), (mod, imp)


# ---------------------------------------------------------------- mmlab.losses holds no network
LOSS_MODULES = ["mmlab.losses.contrastive", "mmlab.losses.masked", "mmlab.losses.distill"]
NETWORK_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                  nn.GroupNorm, nn.RMSNorm, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.RNNBase)
NETWORK_NAMES = re.compile(r"^(Linear|Bilinear|LazyLinear|Conv\w*|LazyConv\w*|ConvTranspose\w*|\w*Norm\w*|Embedding\w*|"
                           r"MultiheadAttention|RNN|LSTM|GRU|Transformer\w*)$")


def test_importing_losses_imports_no_tower_or_model():
    code = "import sys, mmlab.losses; print(sorted(m for m in sys.modules if m in ('mmlab.encoders', 'mmlab.models', 'mmlab.kernels')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", f"import mmlab.losses imported {r.stdout.strip()}"


def test_losses_do_not_re_export_models():
    import mmlab.losses, mmlab.models
    shared = sorted(n for n in mmlab.models.__all__ if getattr(mmlab.losses, n, None) is getattr(mmlab.models, n))
    assert not shared, f"mmlab.losses re-exports {shared} from mmlab.models"


def _small_arguments(cls) -> dict:
    "Small values for the required arguments of `cls` (the losses' modules take sizes and temperatures)."
    out = {}
    for p in list(inspect.signature(cls).parameters.values()):
        if p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD): continue
        out[p.name] = 4
    return out


@pytest.mark.parametrize("mod", LOSS_MODULES)
def test_loss_modules_hold_no_network(mod):
    "No nn.Module defined in mmlab.losses.* contains a Linear / Conv / norm / Embedding layer, built or written."
    m = importlib.import_module(mod)
    classes = [c for c in vars(m).values() if inspect.isclass(c) and c.__module__ == mod and issubclass(c, nn.Module)]
    assert classes or mod == "mmlab.losses.masked", f"no nn.Module found in {mod}"
    for cls in classes:
        layers = [type(x).__name__ for x in cls(**_small_arguments(cls)).modules() if isinstance(x, NETWORK_LAYERS)]
        assert not layers, f"{mod}.{cls.__name__} holds network layers {layers}: it belongs in mmlab.models"
    # the text as well: no layer constructor anywhere in the module (a function could build one on the fly)
    calls = [f"{n.func.attr} (line {n.lineno})" for n in ast.walk(ast.parse(module_file(mod).read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "nn" and NETWORK_NAMES.match(n.func.attr)]
    assert not calls, f"{mod} builds network layers: {calls}"


# ---------------------------------------------------------------- every recipe's model: one save/load, one encoder()
def recipe_model(name):
    "The recipe `name` at tiny sizes, its model (HuBERT's centroids given: no k-means over data), a batch and its loss."
    from mmlab.recipes import RECIPES, load_split
    recipe = RECIPES[name](size="tiny", batch_size=4)
    torch.manual_seed(0)
    model = recipe.make_model(centroids=torch.randn(recipe.num_units, recipe.n_mels * recipe.frame_hop)) \
        if name == "hubert" else recipe.make_model()
    return recipe, model, load_split(recipe, "train", 4)


def outputs(recipe, model, batch) -> list:
    "The recipe's loss terms on `batch`, with every random draw (masks, crops) from the same seed."
    torch.manual_seed(0)
    with torch.no_grad(): out = recipe.make_loss()(model, batch)
    return list(out.values()) if isinstance(out, dict) else [out]


def _recipes():
    from mmlab.recipes import RECIPES
    return list(RECIPES)


@pytest.mark.parametrize("name", _recipes())
def test_every_recipe_model_saves_and_loads_identically(name, tmp_path):
    from mmlab.models import load_model, model_config, save_model
    recipe, model, batch = recipe_model(name)
    with torch.no_grad():                                   # not the init: the weights must really load
        for p in model.parameters(): p.add_(0.01 * torch.randn_like(p))
    model.eval()
    loaded = load_model(save_model(model, tmp_path / name))
    assert type(loaded) is type(model) and model_config(loaded) == model_config(model)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()): assert torch.equal(a, b), k
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for a, b in zip(outputs(recipe, model, batch), outputs(recipe, loaded, batch)): assert torch.equal(a, b), name


@pytest.mark.parametrize("name", _recipes())
def test_every_recipe_model_hands_back_its_towers(name):
    from mmlab.core import InputError
    from mmlab.models import model_config, model_from_config
    recipe, model, _ = recipe_model(name)
    if name == "av-mae":                                     # one encoder shared by every modality: no single tower
        for m in recipe.modalities:
            with pytest.raises(InputError, match="no stand-alone .* tower; use mmae_features"): model.encoder(m)
        return
    for m in (recipe.modalities if name not in ("clip", "lit") else model.towers):
        tower = model.encoder(m)
        assert any(tower is t for t in model.modules()), "encoder() returns the model's own module, not a copy"
        fresh = model_from_config(model_config(tower))
        fresh.load_state_dict(tower.state_dict(), strict=True)
        with pytest.raises(InputError, match="no 'depth' tower"): model.encoder("depth")   # a modality no recipe has


# ---------------------------------------------------------------- every registered preset: build, save, load, encoder()
def _tensors(y, pre="") -> dict:
    "Every tensor of a model output (named tuples, dicts, masks opened), by dotted name."
    from mmlab.masking import Mask
    if torch.is_tensor(y): return {pre or "out": y}
    if isinstance(y, Mask): y = {"mask": y.mask}
    elif hasattr(y, "_asdict"): y = y._asdict()
    if not isinstance(y, dict): return {}
    return {k2: v2 for k, v in y.items() for k2, v2 in _tensors(v, f"{pre}.{k}" if pre else k).items()}


def _presets():
    from mmlab.models import list_models
    return [n for n in list_models() if not n.endswith("_base")]   # base towers: minutes on 2 cores (test_encoders, slow flag)


@pytest.mark.parametrize("name", _presets())
def test_every_preset_saves_loads_and_hands_back_its_towers(name, tmp_path):
    from mmlab.core import InputError
    from mmlab.models import Model, MultiModalMAE, create_model, load_model, model_config, model_from_config, save_model
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():                                   # not the init: the weights must really load
        for p in model.parameters(): p.add_(0.01 * torch.randn_like(p))
    model.eval()
    loaded = load_model(save_model(model, tmp_path / name))
    assert type(loaded) is type(model) and model_config(loaded) == model_config(model)
    run = lambda m: _tensors(m(**m.example_inputs(2, torch.Generator().manual_seed(0))))
    with torch.no_grad(): a, b = run(model), run(loaded)
    assert a and a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), (name, k)
    if not isinstance(model, Model): return                 # a tower: it is its own encoder
    if isinstance(model, MultiModalMAE):                     # one encoder shared by every modality: no single tower
        for m in model.adapters:
            with pytest.raises(InputError, match="no stand-alone .* tower; use mmae_features"): model.encoder(m)
        return
    assert model.encoders(), name
    for m in model.encoders():
        tower = model.encoder(m)
        assert any(tower is t for t in model.modules())
        model_from_config(model_config(tower)).load_state_dict(tower.state_dict(), strict=True)


PRESET_OF_RECIPE = {"mae": "mae_tiny", "byol": "byol_tiny", "dino": "dino_tiny", "hubert": "hubert_tiny", "av-mae": "av_mae_tiny", "swav": "swav_tiny",
                    "videomae": "videomae_tiny"}

@pytest.mark.parametrize("recipe_name", list(PRESET_OF_RECIPE))
def test_recipe_models_are_the_presets(recipe_name):
    "A recipe at its defaults (size tiny) builds the architecture of its preset: the same model_config."
    from mmlab.models import create_model, model_config
    from mmlab.recipes import RECIPES
    recipe = RECIPES[recipe_name]()
    model = recipe.make_model(centroids=torch.zeros(recipe.num_units, recipe.n_mels * recipe.frame_hop)) \
        if recipe_name == "hubert" else recipe.make_model()
    assert model_config(model) == model_config(create_model(PRESET_OF_RECIPE[recipe_name]))
