"""mmlab.adapt prompt learning: CoOp initialised from a template is that template's zero-shot classifier (for any kit
text tower), only the prompts learn, everything is seeded, coupled image prompts are attended to but never pooled
(against a hand-run tower), and bad input is named."""
import copy
import pytest
import torch
import torch.nn.functional as F

from mmlab.adapt import PromptClassifier, PromptLearner, accuracy, fine_tune, prompted_pool
from mmlab.core import ConfigError, InputError, InputTypeError, ShapeError
from mmlab.data import take
from mmlab.encoders import AudioEncoder, TextConfig, TextEncoder, ViTConfig, ViTEncoder, tower_inputs
from mmlab.eval import embed, zero_shot_classifier, zero_shot_eval
from mmlab.models import MultiModalModel, create_model
from mmlab.recipes import ClipRecipe, load_split, prompt_encoder

MAX_LEN = 32
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMERALS = [str(d) for d in range(10)]
TEXT_TOWERS = {   # the kit's text towers differ in the prefix token, attention and pooling, and position codes
    "cls": dict(),
    "causal-last": dict(causal=True, class_token=False, pool="last"),
    "mean-sincos": dict(class_token=False, pool="mean", pos_embed="sincos"),
}

_DATA = {}
def _batch(n=24):
    "The first n test examples of the bundled digits (images, log-mel audio, labels)."
    if "test" not in _DATA: _DATA["test"] = load_split(ClipRecipe(device="cpu", precision="fp32"), "test", 24)
    return take(_DATA["test"], range(n))


def _model(text=None, seed=0):
    torch.manual_seed(seed)
    if text is None: return create_model("trimodal_tiny").eval()
    towers = {"image": ViTEncoder(ViTConfig.preset("tiny")), "text": TextEncoder(TextConfig.preset("tiny", **text))}
    return MultiModalModel(towers, proj_dim=16).eval()


@pytest.mark.parametrize("tower", list(TEXT_TOWERS))
@pytest.mark.parametrize("template, names", [("the digit {}", NUMERALS), ("a handwritten {}", WORDS)])
def test_template_initialised_coop_is_the_template_zero_shot_classifier(tower, template, names):
    model, b = _model(TEXT_TOWERS[tower]), _batch()
    ref = zero_shot_classifier(prompt_encoder(model, MAX_LEN), names, [template])     # the recipes' zero-shot path
    clf = PromptClassifier(model, "image", names, MAX_LEN, init=template)
    assert len(clf.prompts.ctx) == len(template) - 2                                   # one vector per character
    with torch.no_grad(): w = clf.prompts()
    torch.testing.assert_close(w, ref, atol=1e-5, rtol=0)
    logits = embed(clf, b, fn=lambda m, x: m(x))
    u = embed(model, b)["image"]
    torch.testing.assert_close(logits, model.logit_scale.detach() * u @ ref.T, atol=1e-4, rtol=0)
    pred = zero_shot_eval(u, ref, b["label"])["predictions"]
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4                                          # rows without a near tie
    assert clear.sum() > len(b["label"]) // 2 and torch.equal(logits.argmax(1)[clear], pred[clear])


def test_with_classes_keeps_the_context_and_matches_the_template_on_new_names():
    model = _model()
    clf = PromptClassifier(model, "image", WORDS[:5], MAX_LEN, init="a handwritten {}")
    new = clf.with_classes(WORDS[5:])
    assert torch.equal(new.prompts.ctx, clf.prompts.ctx) and clf.prompts.ids.shape[0] == 5
    with torch.no_grad(): w = new.prompts()
    torch.testing.assert_close(w, zero_shot_classifier(prompt_encoder(model, MAX_LEN), WORDS[5:], ["a handwritten {}"]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("coupled, trainable", [(False, {"prompts.ctx"}),
                                                (True, {"prompts.ctx", "coupling.weight", "coupling.bias"})])
def test_only_the_prompts_learn(coupled, trainable):
    model, b = _model(), _batch(16)
    before = copy.deepcopy(model.state_dict())
    clf = PromptClassifier(model, "image", WORDS, MAX_LEN, n_ctx=4, seed=1, coupled=coupled)
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == trainable
    F.cross_entropy(clf(b), b["label"]).backward()
    assert {n for n, p in clf.named_parameters() if p.grad is not None} == trainable
    frozen = {k: v.clone() for k, v in clf.state_dict().items() if k not in trainable}
    start = {k: clf.state_dict()[k].clone() for k in trainable}
    clf.zero_grad(); fine_tune(clf, b, steps=3, lr=1e-2, batch_size=8)
    for k, v in clf.state_dict().items():
        if k in trainable: assert not torch.equal(v, start[k]), f"{k} did not move"
        else: assert torch.equal(v, frozen[k]), f"{k} changed"
    for k, v in model.state_dict().items(): assert torch.equal(v, before[k])        # the model itself is untouched
    assert 0.0 <= accuracy(clf, b) <= 1.0


def test_seeded_initialisation_and_training():
    model, b = _model(), _batch(16)
    def trained(seed):
        clf = PromptClassifier(model, "image", WORDS, MAX_LEN, n_ctx=4, seed=seed, coupled=True)
        init = clf.prompts.ctx.detach().clone()
        assert not clf.coupling.weight.any() and not clf.coupling.bias.any()             # phi starts at zero
        fine_tune(clf, b, steps=3, lr=1e-2, batch_size=8, seed=seed)
        return init, clf.prompts.ctx.detach(), clf.coupling.weight.detach()
    c0, t0, w0 = trained(0)
    c0b, t0b, w0b = trained(0)
    c1, t1, w1 = trained(1)
    assert torch.equal(c0, c0b) and torch.equal(t0, t0b) and torch.equal(w0, w0b)
    assert not torch.equal(c0, c1) and not torch.equal(t0, t1) and not torch.equal(w0, w1)
    assert abs(c0.std().item() - 0.02) < 0.01                                            # CoOp's N(0, 0.02^2) start
    state = torch.get_rng_state(); PromptClassifier(model, "image", WORDS, MAX_LEN, n_ctx=4, coupled=True)
    assert torch.equal(torch.get_rng_state(), state)                                     # the global generator is untouched


def _hand_run(tower, tokens, attend, pool_rows):
    "Reference: [CLS] if any, then the blocks with an explicit key mask, final norm, and the pooling written out."
    x = tokens if tower.cls_token is None else torch.cat([tower.cls_token.expand(len(tokens), -1, -1), tokens], 1)
    if tower.cls_token is not None and attend is not None: attend = torch.cat([attend.new_ones(len(x), 1), attend], 1)
    for blk in tower.blocks: x = blk(x, attn_mask=None if attend is None else attend[:, None, None, :])
    x = tower.norm(x)
    if tower.config.pool == "cls": return x[:, 0]
    t, w = x[:, tower.num_prefix_tokens:], pool_rows.float()[..., None]
    return (t * w).sum(1) / w.sum(1)


def test_coupled_prompts_are_attended_to_and_never_pooled():
    model, b = _model(), _batch(4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vit = model.encoder("image")                                                   # [CLS] pooling, no padding
        p = torch.randn(3, vit.embed_dim, generator=g)
        tokens = vit.embed_patches(b["image"])[0] + vit.pos_embed
        got = prompted_pool(vit, tower_inputs(b, "image"), p)
        torch.testing.assert_close(got, _hand_run(vit, torch.cat([tokens, p.expand(4, -1, -1)], 1), None, None))
        assert not torch.allclose(got, vit(b["image"]).pooled, atol=1e-3)              # the prompts are read
        aud = model.encoder("audio")                                                   # mean pooling over real patches
        assert isinstance(aud, AudioEncoder) and aud.config.pool == "mean"
        inp = tower_inputs(b, "audio")
        tokens, valid = aud.embed(inp["x"], inp["lengths"])
        assert not valid.all()                                                         # the batch has padding
        ones, zeros = torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.bool)
        ref = _hand_run(aud, torch.cat([tokens, p.expand(4, -1, -1)], 1), torch.cat([valid, ones], 1), torch.cat([valid, zeros], 1))
        torch.testing.assert_close(prompted_pool(aud, inp, p), ref)


def test_bad_input_is_named():
    model = _model()
    for t in ("{} digit", "the digit", "{} and {}", 3):
        with pytest.raises(InputError, match="must end with its one"): PromptLearner(model, WORDS, MAX_LEN, init=t)
    with pytest.raises(ConfigError, match="n_ctx must be an integer >= 1"): PromptLearner(model, WORDS, MAX_LEN, n_ctx=0)
    with pytest.raises(ConfigError, match="n_ctx must be an integer >= 1"): PromptLearner(model, WORDS, MAX_LEN)
    with pytest.raises(ConfigError, match="n_ctx must be an integer >= 1"): PromptLearner(model, WORDS, MAX_LEN, init="{}")
    with pytest.raises(ConfigError, match="gives 10 context tokens"): PromptLearner(model, WORDS, MAX_LEN, n_ctx=4, init="the digit {}")
    with pytest.raises(InputError, match="classnames"): PromptLearner(model, [], MAX_LEN, n_ctx=4)
    with pytest.raises(ShapeError, match="positions"): PromptLearner(model, ["x" * 20], MAX_LEN, n_ctx=16)
    torch.manual_seed(0)
    no_text = MultiModalModel({"image": ViTEncoder(ViTConfig.preset("tiny")), "audio": create_model("trimodal_tiny").encoder("audio")})
    with pytest.raises(InputTypeError, match="no text tower"): PromptClassifier(no_text, "image", WORDS, MAX_LEN, n_ctx=4)
    with pytest.raises(InputTypeError, match="no projection head for 'video'"): PromptClassifier(model, "video", WORDS, MAX_LEN, n_ctx=4)
    with pytest.raises(InputTypeError, match="no projection head"): PromptClassifier(torch.nn.Linear(2, 2), "image", WORDS, MAX_LEN, n_ctx=4)


def test_a_hugging_face_text_tower_is_refused():
    tf = pytest.importorskip("transformers")
    from mmlab.encoders import HFEncoder
    torch.manual_seed(0)
    bert = HFEncoder(tf.BertModel(tf.BertConfig(vocab_size=64, max_position_embeddings=64, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64)), "text")
    model = MultiModalModel({"image": ViTEncoder(ViTConfig.preset("tiny")), "text": bert}, proj_dim=8)
    with pytest.raises(InputTypeError, match="lacks tok_embed"): PromptClassifier(model, "image", WORDS, MAX_LEN, n_ctx=4)
