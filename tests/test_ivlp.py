"""IVLP against the official code (tests/reference/ivlp_official.py) on the same weights and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopkit.methods.ivlp import IVLPConfig, IVLPModel, from_official
from reference.harness import copy_into_official_ivlp, half_casts_off, official_ivlp, rel

NAMES = ["red car", "green_apple", "blue sky", "yellow submarine", "dog"]
TOL = 1e-5



# Every configuration of the official IVLP configs: MaPLe's repository (2+2 tokens, depth 12; language
# only: 4 text tokens, depth 12, no image prompts) and PromptSRC's (4+4 tokens, depth 9).
CONFIGS = [
    dict(n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=12, prompt_depth_vision=12),
    dict(n_ctx_text=4, n_ctx_vision=0, prompt_depth_text=12, prompt_depth_vision=0),
    dict(n_ctx_text=4, n_ctx_vision=4, prompt_depth_text=9, prompt_depth_vision=9),
]


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def compare(ours, official, bb) -> dict[str, float]:
    """Relative differences of text features, image features, logits, loss and every gradient."""
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 4, 2])
    out = {}
    with half_casts_off():
        official.eval()
        pl = official.prompt_learner
        txt_o = F.normalize(official.text_encoder(pl(), official.tokenized_prompts), dim=-1)
        img_o = official.image_encoder(pixels)
        logits_o = official(pixels)  # eval: logits
        official.train()
        loss_o = official(pixels, labels)  # train: the cross-entropy loss
        loss_o.backward()
    p = ours.prompts()
    txt = ours.text_features(p)
    img = ours.image_features(pixels, p)
    out["text"] = rel(txt, txt_o)
    out["image"] = rel(img, F.normalize(img_o, dim=-1))
    logits = ours.logits(pixels)
    out["logits"] = rel(logits, logits_o)
    loss = F.cross_entropy(logits, labels)
    out["loss"] = rel(loss, loss_o)
    loss.backward()
    return out


@pytest.mark.parametrize("quick", [True, False], ids=["quickgelu", "gelu"])
@pytest.mark.parametrize("settings", CONFIGS, ids=["2+2ctx-d12", "language-only-d12", "4+4ctx-d9"])
def test_equals_the_official_ivlp(openai_backbones, settings, quick):
    if not quick and settings["prompt_depth_vision"] == 0:
        pytest.skip("one GELU case per image side suffices")
    bb = openai_backbones[quick]
    config = IVLPConfig(**settings)
    torch.manual_seed(0)
    ours = IVLPModel(bb, NAMES, config)
    official = official_ivlp(bb, config, NAMES, quick)
    torch.testing.assert_close(ours.ctx.detach(), official.prompt_learner.ctx.detach().float())  # same init words
    randomise(ours, seed=1)
    copy_into_official_ivlp(ours, official)
    diffs = compare(ours, official, bb)
    assert max(diffs.values()) <= TOL, diffs
    grads = {"ctx": (ours.ctx.grad, official.prompt_learner.ctx.grad)}
    blocks_t = official.text_encoder.transformer.resblocks
    for i in range(1, config.prompt_depth_text):
        grads[f"text{i}"] = (ours.text_deep.grad[i - 1], blocks_t[i].VPT_shallow.grad)
    if config.prompt_depth_vision:
        grads["vision_ctx"] = (ours.vision_ctx.grad, official.image_encoder.VPT.grad)
        blocks_v = official.image_encoder.transformer.resblocks
        for i in range(1, config.prompt_depth_vision):
            grads[f"vision{i}"] = (ours.vision_deep.grad[i - 1], blocks_v[i].VPT_shallow.grad)
    worst = {k: rel(a, b) for k, (a, b) in grads.items()}
    assert max(worst.values()) <= TOL, worst
    # the official checkpoint's names map back to ours
    imported = from_official(official.state_dict(), config)
    for k, v in ours.state().items():
        torch.testing.assert_close(imported[k], v, rtol=0, atol=0)


def test_random_init_beyond_four_tokens_uses_placeholders(openai_backbones):
    bb = openai_backbones[True]
    model = IVLPModel(bb, NAMES, IVLPConfig(n_ctx_text=6, prompt_depth_text=2, prompt_depth_vision=2))
    assert model.prefix_text == "X X X X X X"
    assert model.ctx.shape == (6, 128) and model.text_deep.shape == (1, 6, 128)
    assert model.vision_ctx.shape == (2, 192) and model.vision_deep.shape == (1, 2, 192)


@pytest.mark.parametrize("bad, match", [
    (dict(prompt_depth_text=0), "prompt_depth_text must be an integer >= 1"),
    (dict(n_ctx_text=0), "n_ctx_text must be an integer >= 1"),
    (dict(n_ctx_vision=0), "n_ctx_vision must be an integer >= 1"),
    (dict(prompt_depth_vision=0), "n_ctx_vision=2 with prompt_depth_vision=0"),
    (dict(lr=0), "lr must be"),
])
def test_bad_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        IVLPConfig(**bad)


def test_depth_beyond_the_layers_is_refused(openai_backbones):
    with pytest.raises(ValueError, match="text prompt depth 13 exceeds the text transformer's 12 layers"):
        IVLPModel(openai_backbones[True], NAMES, IVLPConfig(prompt_depth_text=13))
    with pytest.raises(ValueError, match="vision prompt depth 14 exceeds the image transformer's 12 layers"):
        IVLPModel(openai_backbones[True], NAMES, IVLPConfig(prompt_depth_vision=14))




def test_fit_save_load_and_export_parts(tiny_backbone, image_folder, tmp_path):
    import coopkit

    def fit():
        return coopkit.fit(image_folder / "train", method="ivlp", backbone=tiny_backbone, shots=4, seed=2,
                           n_ctx_vision=2, prompt_depth_text=2, prompt_depth_vision=2, epochs=3, progress=False)

    clf = fit()
    model = clf.model
    history = clf.config.metrics["history"]
    assert len(history["loss"]) == 3 and all(np.isfinite(history["loss"]))
    assert history["lr"][0] == 1e-5 and history["lr"][1] == model.config.lr  # Dassl: constant warm-up, then cosine
    from coopkit.methods.deep_prompts import build_seeded

    start = build_seeded(IVLPModel,  # the seeded initial prompts, drawn again
                         tiny_backbone, clf.classnames, model.config, 2)
    assert not torch.equal(start.vision_deep, model.vision_deep) and not torch.equal(start.text_deep, model.text_deep)
    assert not any(p.requires_grad for p in model.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(model.image_encoder()(pixels), dim=-1)
        torch.testing.assert_close(feats, model.encode_image(pixels))
        torch.testing.assert_close(model.head()(feats), model.logits(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.class_weights(), tiny_backbone.model.logit_scale.exp() * model.text_features())
    assert set(model.state()) == {"ctx", "text_deep", "vision_ctx", "vision_deep"}
    again = fit()  # seeded: the same run twice
    for k, v in model.state().items():
        torch.testing.assert_close(again.model.state()[k], v, rtol=0, atol=0)
    clf.save(tmp_path / "run")
    loaded = coopkit.load(tmp_path / "run", backbone=tiny_backbone)
    assert loaded.method == "ivlp" and loaded.model.config == model.config
    images = sorted((image_folder / "test").rglob("*.png"))[:6]
    np.testing.assert_array_equal(loaded.logits(images), clf.logits(images))
    acc = loaded.evaluate(image_folder / "test")["accuracy"]
    assert 0 <= acc <= 1
    new = clf.model.with_classes(["red", "purple"])  # base-to-new: the prompts carry over to new names
    assert new.class_weights().shape == (2, 64)


def test_a_saved_run_with_wrong_tensors_is_refused(tiny_backbone):
    from coopkit import methods
    from coopkit.config import RunConfig
    from coopkit.methods.deep_prompts import build_seeded

    config = RunConfig(method="ivlp", classnames=NAMES, method_config=IVLPConfig(
        prompt_depth_text=2, prompt_depth_vision=2).to_dict(), **tiny_backbone.run_fields())
    good = build_seeded(IVLPModel, tiny_backbone, NAMES, IVLPConfig(prompt_depth_text=2, prompt_depth_vision=2), 0)
    tensors = good.state()
    assert torch.equal(methods.get("ivlp").build(tiny_backbone, config, tensors).state()["ctx"], tensors["ctx"])
    with pytest.raises(ValueError, match="must hold the tensors"):
        methods.get("ivlp").build(tiny_backbone, config, {k: v for k, v in tensors.items() if k != "vision_ctx"})
    with pytest.raises(ValueError, match="do not fit the backbone"):
        methods.get("ivlp").build(tiny_backbone, config, {**tensors, "text_deep": torch.zeros(3, 2, 64)})
    with pytest.raises(ValueError, match="NaN or infinite"):
        methods.get("ivlp").build(tiny_backbone, config, {**tensors, "ctx": torch.full_like(tensors["ctx"], float("nan"))})
