"""The clip recipe's loss as it was before the experiment switches (pairs, noisy pairs, smoothing, hard negatives):
the mean of `pair_loss` over every pair of its modalities. The switch tests compare the recipe's default against it."""
from itertools import combinations
from mmlab.recipes import pair_loss

def every_pair_loss_fn(recipe):
    "(model, batch) -> {pair: loss}: every modality pair, no smoothing, no negatives beyond the batch."
    ms = recipe.modalities
    def loss_fn(model, batch):
        out = model(batch)
        labels = batch["label"] if recipe.targets == "label" else None
        return {f"{a}-{b}": pair_loss(out[a], out[b], out, labels, recipe.loss) / (len(ms) * (len(ms) - 1) // 2)
                for a, b in combinations(ms, 2)}
    return loss_fn
