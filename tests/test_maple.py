"""MaPLe against the official code (tests/reference/maple_official.py) on the same weights and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopkit.methods.maple import MaPLeConfig, MaPLeModel, from_official
from reference.harness import copy_into_official_maple, half_casts_off, official_maple, rel

NAMES = ["red car", "green_apple", "blue sky", "yellow submarine", "dog"]
TOL = 1e-5



@pytest.mark.parametrize("quick", [True, False], ids=["quickgelu", "gelu"])
@pytest.mark.parametrize("depth", [9, 3], ids=["depth9", "depth3-cross-dataset"])
def test_equals_the_official_maple(openai_backbones, depth, quick):
    if not quick and depth == 3:
        pytest.skip("one GELU case suffices")
    bb = openai_backbones[quick]
    config = MaPLeConfig(n_ctx=2, prompt_depth=depth)
    torch.manual_seed(0)
    ours = MaPLeModel(bb, NAMES, config)
    official = official_maple(bb, config, NAMES, quick)
    torch.testing.assert_close(ours.ctx.detach(), official.prompt_learner.ctx.detach().float())  # same init words
    if depth > 2:  # the deeper projections start equal (official: deep copies of one Linear)
        assert torch.equal(ours.deep_proj_weight[0], ours.deep_proj_weight[1])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    copy_into_official_maple(ours, official)

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 4, 2])
    with half_casts_off():
        official.eval()
        prompts, shared, deep_text, deep_vision = official.prompt_learner()
        txt_o = F.normalize(official.text_encoder(prompts, official.tokenized_prompts, deep_text), dim=-1)
        img_o = F.normalize(official.image_encoder(pixels, shared, deep_vision), dim=-1)
        logits_o = official(pixels)
        official.train()
        loss_o = official(pixels, labels)
        loss_o.backward()
    p = ours.prompts()
    logits = ours.logits(pixels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    diffs = {"text": rel(ours.text_features(p), txt_o), "image": rel(ours.image_features(pixels, p), img_o),
             "logits": rel(logits, logits_o), "loss": rel(loss, loss_o)}
    assert max(diffs.values()) <= TOL, diffs
    pl = official.prompt_learner
    grads = {"ctx": (ours.ctx.grad, pl.ctx.grad), "proj.weight": (ours.proj.weight.grad, pl.proj.weight.grad),
             "proj.bias": (ours.proj.bias.grad, pl.proj.bias.grad)}
    for i in range(depth - 1):
        grads[f"text{i}"] = (ours.text_deep.grad[i], pl.compound_prompts_text[i].grad)
        grads[f"W{i}"] = (ours.deep_proj_weight.grad[i], pl.compound_prompt_projections[i].weight.grad)
        grads[f"b{i}"] = (ours.deep_proj_bias.grad[i], pl.compound_prompt_projections[i].bias.grad)
    worst = {k: rel(a, b) for k, (a, b) in grads.items()}
    assert max(worst.values()) <= TOL, worst
    imported = from_official(official.state_dict(), config)
    for k, v in ours.state().items():
        torch.testing.assert_close(imported[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(prompt_depth=0), "prompt_depth must be an integer >= 1"),
    (dict(n_ctx=0), "n_ctx must be an integer >= 1"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
])
def test_bad_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        MaPLeConfig(**bad)


def test_depth_beyond_the_layers_is_refused(openai_backbones):
    with pytest.raises(ValueError, match="text prompt depth 13 exceeds the text transformer's 12 layers"):
        MaPLeModel(openai_backbones[True], NAMES, MaPLeConfig(prompt_depth=13))


def test_resnet_image_towers_are_refused():
    import coopkit

    resnet = coopkit.load_backbone("coopkit-tiny", pretrained=None, device="cpu")
    with pytest.raises(ValueError, match="image tower \\(ModifiedResNet\\) is not open_clip's VisionTransformer"):
        MaPLeModel(resnet, NAMES, MaPLeConfig(prompt_depth=1))


def test_fit_save_load_and_export_parts(tiny_backbone, image_folder, tmp_path):
    import coopkit
    from coopkit.methods.deep_prompts import build_seeded

    clf = coopkit.fit(image_folder / "train", method="maple", backbone=tiny_backbone, shots=4, seed=2,
                      method_config=MaPLeConfig(prompt_depth=2, epochs=2), progress=False)
    model = clf.model
    assert all(np.isfinite(clf.config.metrics["history"]["loss"]))
    start = build_seeded(MaPLeModel, tiny_backbone, clf.classnames, model.config, 2)
    assert not torch.equal(start.deep_proj_weight, model.deep_proj_weight)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(model.image_encoder()(pixels), dim=-1)
        torch.testing.assert_close(feats, model.encode_image(pixels))
        torch.testing.assert_close(model.head()(feats), model.logits(pixels), rtol=1e-5, atol=1e-5)
    assert set(model.state()) == {"ctx", "text_deep", "proj.weight", "proj.bias", "deep_proj_weight", "deep_proj_bias"}
    clf.save(tmp_path / "run")
    loaded = coopkit.load(tmp_path / "run", backbone=tiny_backbone)
    images = sorted((image_folder / "test").rglob("*.png"))[:6]
    np.testing.assert_array_equal(loaded.logits(images), clf.logits(images))
