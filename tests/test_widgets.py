"""Headless widget tests: set a control as a user would, then compare the figure's traces and the
labels with numbers computed independently here (numpy), never read back from the widget's own helpers."""
import re, subprocess, sys
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ipywidgets"); pytest.importorskip("plotly")
from plotly.callbacks import Points
from mmlab.widgets import AttentionExplorer, EmbeddingExplorer, GapExplorer, TrainingDashboard


def unit(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + shift, dim=-1)


def np_pca(Z, dim):
    mu = Z.mean(0); V = np.linalg.svd(Z - mu, full_matrices=False)[2][:dim]
    V *= np.sign(V[np.arange(dim), np.abs(V).argmax(1)])[:, None]
    return mu, V


def nrm(a): return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def runs():
    labels = torch.arange(40) % 4
    out = {}
    for k, s in (("a", 0), ("b", 5)):
        x, y = unit(40, 6, s, 1.0), unit(40, 6, s + 1, -1.0)
        cls = F.normalize(torch.stack([y[labels == c].mean(0) for c in range(4)]), dim=-1)
        out[k] = (x, y, cls)
    return out, labels


def test_import_is_light():
    code = "import sys, mmlab.widgets; print(any(m in sys.modules for m in ('plotly', 'ipywidgets', 'sklearn', 'umap')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("dim", [2, 3])
def test_gap_explorer_slider_and_selector(runs, dim):
    runs, labels = runs
    gx = GapExplorer(runs, labels=labels, dim=dim, max_points=25)
    gx.run.value = "b"; gx.lam.value = 0.8
    x, y, c = (t.numpy() for t in runs["b"])
    u = x.mean(0) - y.mean(0)
    xs, ys, cs = nrm(x - 0.4 * u), nrm(y + 0.4 * u), nrm(c + 0.4 * u)
    mu, V = np_pca(np.concatenate([x, y]), dim)                  # fitted on the unshifted run "b"
    px, py = (xs - mu) @ V.T, (ys - mu) @ V.T
    for j, a in enumerate("xyz"[:dim]):
        assert np.allclose(np.array(getattr(gx.fig.data[0], a)), px[:25, j], atol=1e-9)
        assert np.allclose(np.array(getattr(gx.fig.data[1], a)), py[:25, j], atol=1e-9)
        seg = np.array(getattr(gx.fig.data[2], a), dtype=float)
        assert np.allclose(seg[0::3], px[:25, j]) and np.allclose(seg[1::3], py[:25, j]) and np.isnan(seg[2::3]).all()
    cen = (np.stack([xs.mean(0), ys.mean(0)]) - mu) @ V.T
    assert np.allclose(np.array(gx.fig.data[3].x), cen[:, 0])
    gap = np.linalg.norm(xs.mean(0) - ys.mean(0))
    acc = ((xs @ cs.T).argmax(1) == labels.numpy()).mean()
    assert gx.values["gap_norm"] == pytest.approx(gap, abs=1e-12)
    assert gx.values["zero_shot"] == pytest.approx(acc)
    html = gx.readout.value
    assert f"{gap:.4f}" in html and f"zero-shot acc = <b>{acc:.4f}</b>" in html
    # switching back to run "a" re-fits the view and the numbers follow
    gx.run.value = "a"
    xa, ya, _ = (t.numpy() for t in runs["a"]); ua = xa.mean(0) - ya.mean(0)
    assert gx.values["gap_norm"] == pytest.approx(np.linalg.norm(nrm(xa - 0.4 * ua).mean(0) - nrm(ya + 0.4 * ua).mean(0)))


def test_gap_explorer_lambda_zero_is_identity_and_plain_tuple():
    x, y = unit(30, 5, 0, 1.0), unit(30, 5, 1, -1.0)
    gx = GapExplorer((x, y))
    assert gx.values["gap_norm"] == pytest.approx(np.linalg.norm(x.numpy().mean(0) - y.numpy().mean(0)))
    assert "zero-shot" not in gx.readout.value
    # retrieval without labels: pairs i <-> i
    s = x.numpy() @ y.numpy().T
    r1 = (s.argmax(1) == np.arange(30)).mean()
    assert gx.values["x_to_y_R@1"] == pytest.approx(r1)
    with pytest.raises(ValueError, match="dim"): GapExplorer((x, y), dim=4)
    with pytest.raises(TypeError, match="runs"): GapExplorer(42)


def test_training_dashboard_updates_and_trainer_events():
    from mmlab.core import ConfigError
    dash = TrainingDashboard(every=2)
    recs = [{"step": s, "loss": 1.0 / s, "logit_scale": torch.tensor(10.0 + s), "lr": 0.1, "tag": "x"} for s in range(1, 6)]
    for r in recs[:4]: dash.update(r)
    assert dash.history == recs[:4]                              # a plain list: the records as given
    assert list(dash.fig.data[0].x) == [1, 2, 3, 4]             # drawn at record 4 (every=2) ...
    dash(recs[4])
    assert list(dash.fig.data[0].x) == [1, 2, 3, 4]             # ... not at record 5
    traces = dash.fig.data
    dash.redraw()
    assert dash.fig.data[0] is traces[0]                         # same curves: the traces are updated in place
    assert [(t.name, t.xaxis) for t in dash.fig.data] == [("loss", "x"), ("logit_scale", "x")]   # "lr" bookkeeping, "tag" no number
    assert list(dash.fig.data[0].x) == [1, 2, 3, 4, 5] and np.allclose(dash.fig.data[0].y, [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert np.allclose(dash.fig.data[1].y, [11, 12, 13, 14, 15])
    dash.update({"eval/acc": float("nan")}); dash.update({"eval/acc": 0.5}); dash.redraw()   # no step: x = position 7
    assert [(t.name, t.xaxis, list(t.x), list(t.y)) for t in dash.fig.data[2:]] == [("eval/acc", "x2", [7], [0.5])]
    assert dash.fig.layout.title.text == "update 5: loss 0.2" and dash.fig.layout.yaxis.type == "log"
    with pytest.raises(TypeError, match="TrainingDashboard.update: expected a dict record, got int"): dash.update(3)
    with pytest.raises(ConfigError, match="TrainingDashboard: every=0"): TrainingDashboard(every=0)


def test_training_dashboard_with_trainer():
    train = pytest.importorskip("mmlab.train")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(2)]
    loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])
    dash = TrainingDashboard(every=2)
    tr = train.Trainer(model, loss_fn, data, train.TrainConfig(steps=3, device="cpu"), callbacks=[dash])
    tr.fit()
    assert dash.history == tr.history and len(tr.history) >= 3
    loss = next(t for t in dash.fig.data if t.name == "loss")   # drawn at the end of the fit
    assert loss.xaxis == "x" and list(loss.x) == [1, 2, 3] and np.allclose(loss.y, [r["loss"] for r in tr.history])


@pytest.fixture(scope="module")
def tiny_model():
    from mmlab.encoders import AudioConfig, AudioEncoder, TextConfig, TextEncoder, ViTConfig, ViTEncoder
    from mmlab.models import MultiModalModel
    torch.manual_seed(0)
    return MultiModalModel({"image": ViTEncoder(ViTConfig.preset("tiny", img_size=16)),
                            "audio": AudioEncoder(AudioConfig.preset("tiny")),
                            "text": TextEncoder(TextConfig.preset("tiny", vocab_size=60, max_len=16))}, proj_dim=16)


def test_attention_explorer(tiny_model):
    from mmlab.analysis import attention_rollout
    from mmlab.encoders import capture_attention
    from mmlab.data import CharTokenizer
    tok = CharTokenizer(max_len=16)
    g = torch.Generator().manual_seed(0)
    ids = [tok("seven"), tok("a handwritten two")]
    L = max(len(t) for t in ids)
    text = torch.zeros(2, L, dtype=torch.long); pad = torch.ones(2, L, dtype=torch.bool)
    for i, t in enumerate(ids): text[i, :len(t)] = t; pad[i, :len(t)] = False
    batch = {"image": torch.rand(2, 3, 16, 16, generator=g), "audio": torch.randn(2, 32, 64, generator=g),
             "audio_lengths": torch.tensor([64, 40]), "text": text, "text_lengths": torch.tensor([len(t) for t in ids]),
             "text_padding_mask": pad, "label": torch.tensor([7, 2]), "present": {}}
    ax = AttentionExplorer(tiny_model, batch, tokenizer=tok)
    # image, layer 1, head 1: the [CLS] row of that head, as a 2x2 patch grid
    ax.sample.value = 1; ax.tower.value = "image"; ax.layer.value = 1; ax.head.value = 1
    with capture_attention(tiny_model.towers["image"]) as maps: tiny_model.towers["image"](batch["image"][1:2])
    A = list(maps.values())[1][0, 1].double().numpy()
    assert np.allclose(np.array(ax.fig.data[1].z), A[0, 1:].reshape(2, 2), atol=1e-7)
    # audio rollout of sample 1 (40 real frames -> 3 time patches of 16): mean of the real rows
    ax.tower.value = "audio"
    assert ax.layer.value is None and ax.head.value is None           # options reset to rollout / mean
    aud = tiny_model.towers["audio"]
    with capture_attention(aud) as maps: aud(batch["audio"][1:2], torch.tensor([40]))
    R = attention_rollout(maps)[0].numpy()
    real = np.array([t * 2 + f < 3 * 2 for t in range(4) for f in range(2)])   # token index t*F' + f, T'=4, F'=2
    rel = (R[real][:, :] .mean(0)) * real
    assert np.allclose(np.array(ax.fig.data[1].z), rel.reshape(4, 2).T[:, :3], atol=1e-7)
    assert np.array(ax.fig.data[0].z).shape == (32, 40)
    # text: characters as x labels, one row of relevance over the real tokens
    ax.tower.value = "text"; ax.sample.value = 0
    assert list(ax.fig.data[1].x)[1] == "1:s" and len(ax.fig.data[1].x) == len(ids[0])
    assert "label 7" in ax.info.value


def test_embedding_explorer_click_hover_select():
    x, y = unit(30, 8, 0, 0.5), unit(30, 8, 1, -0.5)
    labels = torch.arange(30) % 3
    caps = [f"caption {i}" for i in range(30)]
    ee = EmbeddingExplorer(x, y, labels=labels, captions=caps, images=torch.rand(30, 3, 8, 8), k=4)
    ee._on_click(ee.fig.data[1], Points(point_inds=[5], xs=[], ys=[], trace_name="text", trace_index=1), None)
    s = x.numpy() @ y.numpy()[5]                                 # text 5 queries the images
    nb = list(np.argsort(-s, kind="stable")[:4])
    assert ee.last_click["neighbours"] == nb and ee.last_click["modality"] == "text"
    assert ee.last_click["partner_rank"] == int((s >= s[5]).sum())
    assert np.allclose(np.array(ee.fig.data[2].x), ee.coords["image"][nb, 0])
    assert f"rank <b>{int((s >= s[5]).sum())}</b> of 30" in ee.click_info.value
    ee._on_hover(ee.fig.data[0], Points(point_inds=[2], xs=[], ys=[], trace_name="image", trace_index=0), None)
    assert "image 2" in ee.hover_info.value and "caption 2" in ee.hover_info.value
    assert ee.thumb.value[:8] == b"\x89PNG\r\n\x1a\n"
    res = ee.inspect([0, 1, 2, 3], [2, 3, 4])
    assert res["n"] == {"image": 4, "text": 3} and res["classes"] == {0: 3, 1: 2, 2: 2}
    both = [2, 3]
    assert res["gap_norm"] == pytest.approx(np.linalg.norm(x.numpy()[both].mean(0) - y.numpy()[both].mean(0)))


def test_embedding_explorer_switches_view():
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    x, y = unit(15, 8, 0, 0.5), unit(15, 8, 1, -0.5)
    ee = EmbeddingExplorer(x, y, method="pca")
    ee._on_click(ee.fig.data[0], Points(point_inds=[1], xs=[], ys=[], trace_name="image", trace_index=0), None)
    assert len(ee.fig.data[2].x) == 5
    with threadpool_limits(1): ee.method.value = "tsne"
    Z = np.concatenate([x.numpy(), y.numpy()])
    with threadpool_limits(1):
        ref = TSNE(2, perplexity=min(30.0, max(2.0, (30 - 1) / 3)), init="pca", random_state=0).fit_transform(Z)
    assert np.allclose(np.array(ee.fig.data[0].x), ref[:15, 0]) and np.allclose(np.array(ee.fig.data[1].y), ref[15:, 1])
    assert len(ee.fig.data[2].x) == 0 and "TSNE" in ee.fig.layout.title.text
