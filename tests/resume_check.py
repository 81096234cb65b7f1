"""One kill-and-resume check for recipe tests: train, drop the last checkpoint (the run "died" after the one before),
resume, and compare the final checkpoint and the loss history bit for bit."""
import shutil
import torch
from mmlab.recipes import run_recipe
from mmlab.train import latest_checkpoint, load_checkpoint

def assert_resume_bit_identical(recipe, folder, n_train:int, inspect=None) -> tuple:
    "Run `recipe` in `folder`, kill it after its next-to-last checkpoint, resume; returns both runs' results (full, resumed)."
    full = run_recipe(recipe, folder, n_train=n_train, evaluate_after=False)
    final = load_checkpoint(latest_checkpoint(folder / "checkpoints"))[0]
    if inspect is not None: inspect(final)                           # the caller's checks of the full run's state
    shutil.rmtree(latest_checkpoint(folder / "checkpoints"))
    resumed = run_recipe(recipe, folder, n_train=n_train, evaluate_after=False, resume=True)
    again = load_checkpoint(latest_checkpoint(folder / "checkpoints"))[0]
    assert sorted(again) == sorted(final)
    for k in final: assert torch.equal(final[k], again[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    return full, resumed
