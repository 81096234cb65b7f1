"""mmlab.adapt, adaptation without target labels: the projection that removes class-agnostic directions equals a float64
projector and is idempotent, centroid refinement repairs corrupted labels on separable clusters, ReCLIP trains only
norm parameters and predicts its own refined labels, TENT's entropy has the closed-form gradient, TENT at lr=0 is the
zero-shot classifier exactly and at lr>0 moves only norm affine parameters, and bad input is named."""
import copy
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmlab.adapt import (ZeroShotClassifier, classifier_embeddings, prediction_entropy, reclip, refine_labels,
                         remove_directions, tent, train_norms_only, unlabelled)
from mmlab.core import InputError, InputTypeError, ShapeError
from mmlab.data import take
from mmlab.eval import embed
from mmlab.models import create_model
from mmlab.recipes import ClipRecipe, load_split

_DATA = {}
def _setup(n=32):
    "A seeded tiny tri-modal model, a zero-shot image classifier over random unit class embeddings, and n test rows."
    if "test" not in _DATA: _DATA["test"] = load_split(ClipRecipe(device="cpu", precision="fp32"), "test", 64)
    torch.manual_seed(0)
    model = create_model("trimodal_tiny").eval()
    E = model.heads["image"].net[0].out_features
    w = F.normalize(torch.randn(10, E, generator=torch.Generator().manual_seed(1)), dim=-1)
    return model, ZeroShotClassifier(model, "image", w), take(_DATA["test"], range(n))


def _projector(A):
    "float64 reference: I - A^T (A A^T)^-1 A, the orthogonal projector onto the complement of A's row space."
    A = A.double()
    return torch.eye(A.shape[1], dtype=torch.float64) - A.T @ torch.linalg.solve(A @ A.T, A)


@pytest.mark.parametrize("K,E", [(1, 4), (2, 16), (3, 32), (5, 5)])
def test_remove_directions_is_the_orthogonal_projector(K, E):
    g = torch.Generator().manual_seed(K * 100 + E)
    A = torch.randn(K, E, generator=g, dtype=torch.float64) * torch.rand(K, 1, generator=g, dtype=torch.float64) * 5
    x = torch.randn(7, 3, E, generator=g, dtype=torch.float64)
    y = remove_directions(x, A)
    torch.testing.assert_close(y, x @ _projector(A), atol=1e-12, rtol=0)            # equals the reference
    torch.testing.assert_close(remove_directions(y, A), y, atol=1e-12, rtol=0)      # idempotent
    torch.testing.assert_close(y @ A.T, torch.zeros(7, 3, K, dtype=torch.float64), atol=1e-12, rtol=0)   # orthogonal
    z = torch.randn(E, generator=g, dtype=torch.float64)                            # a vector orthogonal to A is kept
    z = z @ _projector(A)
    torch.testing.assert_close(remove_directions(z, A), z, atol=1e-12, rtol=0)
    xf = x.float()                                                                  # dtype preserved
    assert remove_directions(xf, A.float()).dtype == torch.float32


def test_remove_directions_removes_the_gap_of_two_means():
    g = torch.Generator().manual_seed(0)
    u, w = F.normalize(torch.randn(50, 8, generator=g) + 2, dim=-1), F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    A = torch.stack([w.mean(0), u.mean(0)])
    assert remove_directions(u.mean(0) - w.mean(0), A).abs().max() < 1e-6


def test_remove_directions_names_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ShapeError, match="remove_directions: directions must be"): remove_directions(x, torch.randn(4))
    with pytest.raises(ShapeError, match="E = 4"): remove_directions(x, torch.randn(1, 5))
    with pytest.raises(ShapeError, match="K <= E"): remove_directions(x, torch.randn(5, 4))
    with pytest.raises(InputError, match="linearly dependent"): remove_directions(x, torch.ones(2, 4))
    with pytest.raises(InputError, match="zero"): remove_directions(x, torch.zeros(1, 4))
    with pytest.raises(InputTypeError, match="tensors"): remove_directions(x.tolist(), torch.randn(1, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refine_labels_fixes_corrupted_labels_on_separable_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    C, n, E = 4, 25, 12
    y = torch.arange(C).repeat_interleave(n)
    x = torch.eye(E)[:C][y] * 3 + 0.3 * torch.randn(C * n, E, generator=g) + 1.0   # a shared offset, as a shift adds
    flip = torch.rand(C * n, generator=g) < 0.25
    noisy = torch.where(flip, (y + torch.randint(1, C, (C * n,), generator=g)) % C, y)
    assert (noisy != y).sum() > 10
    fixed, mu = refine_labels(x, noisy, C)
    assert torch.equal(fixed, y)
    # the centroids are the unit class means of the final labels, in float64 by hand
    xs = F.normalize(x.double(), dim=-1)
    ref = torch.stack([F.normalize(xs[fixed == c].sum(0), dim=0) for c in range(C)])
    torch.testing.assert_close(mu.double(), ref, atol=1e-6, rtol=0)
    assert torch.equal((xs @ ref.T).argmax(1), fixed)                               # labels are nearest centroids


def test_refine_labels_keeps_a_consistent_labelling_and_names_bad_input():
    x = torch.eye(3)[torch.tensor([0, 0, 1, 1, 2, 2])]
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(refine_labels(x, y, 3)[0], y)
    assert refine_labels(x, torch.tensor([0, 0, 1, 1, 1, 1]), 4)[1][3].abs().max() == 0   # an empty class: a zero row
    with pytest.raises(ShapeError, match="refine_labels: x must be"): refine_labels(torch.randn(6), y, 3)
    with pytest.raises(ShapeError, match="integer"): refine_labels(x, y.float(), 3)
    with pytest.raises(ShapeError, match="N = 6"): refine_labels(x, y[:4], 3)
    with pytest.raises(InputError, match=r"\[0, 2\)"): refine_labels(x, y, 2)
    with pytest.raises(InputError, match="n_classes"): refine_labels(x, y, 0)
    with pytest.raises(InputError, match="iters"): refine_labels(x, y, 3, iters=0)


def test_prediction_entropy_matches_the_closed_form_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    for B, C in ((1, 2), (5, 10), (3, 7)):
        z = (torch.randn(B, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
        H = prediction_entropy(z)
        p = z.detach().softmax(-1)
        Href = -(p * p.log()).sum(-1)
        torch.testing.assert_close(H.detach(), Href, atol=1e-12, rtol=0)
        H.sum().backward()
        torch.testing.assert_close(z.grad, -p * (p.log() + Href[:, None]), atol=1e-12, rtol=0)
        assert torch.autograd.gradcheck(prediction_entropy, (z.detach().clone().requires_grad_(),))
    torch.testing.assert_close(prediction_entropy(torch.zeros(2, 8)), torch.full((2,), torch.log(torch.tensor(8.0)).item()))
    assert torch.isfinite(prediction_entropy(torch.tensor([[1e4, -1e4, 0.0]]))).all()   # no NaN at large logits
    with pytest.raises(ShapeError, match="prediction_entropy"): prediction_entropy(torch.zeros(3))


def test_train_norms_only_selects_norm_affine_parameters():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.LayerNorm(4, elementwise_affine=False))
    params = train_norms_only(net)
    assert {id(p) for p in params} == {id(net[1].weight), id(net[1].bias), id(net[2].weight), id(net[2].bias)}
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    with pytest.raises(InputError, match="no normalisation layer"): train_norms_only(nn.Linear(3, 3))


def test_tent_at_lr_zero_is_the_zero_shot_classifier_exactly():
    _, zs, b = _setup()
    clf = copy.deepcopy(zs)
    online = tent(clf, b, epochs=2, lr=0.0, batch_size=16, seed=3)
    ref = embed(zs, b, fn=lambda m, x: m(x)).argmax(1)
    assert online.shape == (2, len(ref)) and torch.equal(online, ref.expand(2, -1))
    for k, v in clf.state_dict().items(): assert torch.equal(v, zs.state_dict()[k]), k


def test_tent_moves_only_norm_affine_parameters_and_is_seeded():
    _, zs, b = _setup()
    a, c = copy.deepcopy(zs), copy.deepcopy(zs)
    pa, pc = tent(a, b, epochs=2, lr=1e-2, batch_size=16, seed=0), tent(c, b, epochs=2, lr=1e-2, batch_size=16, seed=0)
    assert torch.equal(pa, pc)
    for k, v in a.state_dict().items(): assert torch.equal(v, c.state_dict()[k]), k       # same seed, same model
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, zs.state_dict()[k])}
    norms = {f"{n}.{p}" for n, m in zs.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}
    assert changed and changed <= norms, changed - norms
    assert not any(p.requires_grad for n, p in a.named_parameters() if n not in norms)
    assert not a.training                                                                  # left in eval mode


def test_tent_ignores_labels_and_lowers_the_entropy():
    _, zs, b = _setup()
    a, c = copy.deepcopy(zs), copy.deepcopy(zs)
    scrambled = b | {"label": torch.randperm(len(b["label"]), generator=torch.Generator().manual_seed(9)) % 10}
    assert torch.equal(tent(a, b, lr=1e-2, seed=1), tent(c, scrambled, lr=1e-2, seed=1))
    H = lambda m: prediction_entropy(embed(m, b, fn=lambda mm, x: mm(x))).mean()
    tent(a, b, epochs=3, lr=1e-2, seed=1)
    assert H(a) < H(zs)


def test_tent_names_bad_input():
    _, zs, b = _setup(8)
    with pytest.raises(InputError, match="epochs"): tent(copy.deepcopy(zs), b, epochs=0)
    with pytest.raises(InputError, match="lr"): tent(copy.deepcopy(zs), b, lr=-1.0)
    with pytest.raises(InputError, match="batch_size"): tent(copy.deepcopy(zs), b, batch_size=0)
    with pytest.raises(InputError, match="no examples"): tent(copy.deepcopy(zs), {"label": torch.zeros(0)})
    with pytest.raises(InputError, match="no normalisation layer"):
        tent(nn.Linear(3, 3), {"x": torch.zeros(2, 3)})


def test_reclip_trains_norms_predicts_its_labels_and_ignores_labels():
    _, zs, b = _setup()
    a, c = copy.deepcopy(zs), copy.deepcopy(zs)
    scrambled = b | {"label": torch.zeros_like(b["label"])}
    ha, hc = reclip(a, b, rounds=1, steps=2, seed=0), reclip(c, scrambled, rounds=1, steps=2, seed=0)
    assert len(ha) == 2 and all(torch.equal(x, y) for x, y in zip(ha, hc))      # labels never read; seeded
    assert torch.equal(embed(a, b, fn=lambda m, x: m(x)).argmax(1), ha[-1])     # predicts its last pseudo-labels
    norms = {f"{n}.{p}" for n, m in zs.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}
    assert {n for n, p in a.named_parameters() if p.requires_grad} == norms
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, zs.state_dict()[k])}
    assert changed <= norms | {"weight"} and changed & norms
    # the class weights are the unit centroids, orthogonal to the two removed means of the last round
    u = classifier_embeddings(a, unlabelled(b))
    w0 = F.normalize(zs.weight.detach(), dim=-1)
    ortho = a.weight.detach() @ torch.stack([w0.mean(0), u.mean(0)]).T
    assert ortho.abs().max() < 1e-4


def test_reclip_round_zero_is_projection_then_refinement():
    _, zs, b = _setup()
    a = copy.deepcopy(zs)
    h = reclip(a, b, rounds=0)
    u = classifier_embeddings(zs, b).double()
    w = F.normalize(zs.weight.detach().double(), dim=-1)
    P = _projector(torch.stack([w.mean(0), u.mean(0)]))                            # float64 reference
    x, wp = F.normalize(u @ P, dim=-1), F.normalize(w @ P, dim=-1)
    y = (x @ wp.T).argmax(1)
    for _ in range(3):
        mu = torch.stack([F.normalize(x[y == c].sum(0), dim=0) if (y == c).any() else torch.zeros(x.shape[1], dtype=x.dtype)
                          for c in range(len(w))])
        y = (x @ mu.T).argmax(1)
    assert (h[0] == y).double().mean() >= 0.98                                     # float32 vs float64 near-ties aside
    for k, v in a.state_dict().items():                                            # no training at rounds=0
        if k != "weight": assert torch.equal(v, zs.state_dict()[k]), k


def test_reclip_names_bad_input():
    _, zs, b = _setup(8)
    with pytest.raises(InputTypeError, match="ZeroShotClassifier"): reclip(nn.Linear(2, 2), b)
    with pytest.raises(InputError, match="rounds"): reclip(copy.deepcopy(zs), b, rounds=-1)
