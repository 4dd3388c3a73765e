"""PromptSRC against the official trainer (tests/reference/promptsrc_official.py): its training steps
(cross-entropy + self-regulating losses, SGD) and its Gaussian prompt aggregation, on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopkit.methods.promptsrc import (GaussianAggregate, PromptSRCConfig, PromptSRCModel, SelfRegulation, gpa_weights,
                                       promptsrc_templates)
from reference.harness import half_casts_off, load_tiny, official_promptsrc, openai_config, promptsrc_shims, rel, set_param
from reference.promptsrc_templates import IMAGENET_TEMPLATES

NAMES = ["red car", "green_apple", "blue sky", "yellow submarine", "dog"]
TOL = 1e-5
LR = 0.0025


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.set_num_threads(1)
    return load_tiny(tmp_path_factory.mktemp("promptsrc"), "promptsrc-quick", openai_config())


def test_templates_are_the_official_sixty():
    assert promptsrc_templates() == IMAGENET_TEMPLATES


def pairs(ours: PromptSRCModel, official):
    """(our tensor, official parameter name) for every learned tensor."""
    c = ours.config
    out = [(ours.ctx, "prompt_learner.ctx"), (ours.vision_ctx, "image_encoder.VPT")]
    out += [(ours.text_deep[i - 1], f"text_encoder.transformer.resblocks.{i}.VPT_shallow")
            for i in range(1, c.prompt_depth_text)]
    out += [(ours.vision_deep[i - 1], f"image_encoder.transformer.resblocks.{i}.VPT_shallow")
            for i in range(1, c.prompt_depth_vision)]
    return out


@pytest.mark.parametrize("settings", [
    dict(prompt_depth_text=9, prompt_depth_vision=9, gpa_mean=2, gpa_std=1),  # base-to-new (GPA shifted to 3 epochs)
    dict(prompt_depth_text=3, prompt_depth_vision=3, gpa_mean=6, gpa_std=10),  # cross-dataset
], ids=["4+4ctx-d9", "4+4ctx-d3"])
def test_training_steps_and_gpa_equal_the_official_trainer(backbone, settings, tmp_path):
    epochs = 3
    config = PromptSRCConfig(epochs=epochs, **settings)
    torch.manual_seed(0)
    ours = PromptSRCModel(backbone, NAMES, config)
    with promptsrc_shims(backbone, config):
        trainer = official_promptsrc(backbone, config, NAMES, epochs, LR)
    official = trainer.model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    for tensor, name in pairs(ours, official):
        set_param(official, name, tensor)
    trainer.optim = torch.optim.SGD([p for p in official.parameters() if p.requires_grad], lr=LR, momentum=0.9,
                                    weight_decay=5e-4)
    regulation = SelfRegulation(ours, config)
    torch.testing.assert_close(regulation.fixed, F.normalize(official.prompt_learner.fixed_embeddings, dim=-1),
                               rtol=1e-5, atol=1e-6)
    gpa = GaussianAggregate(ours, config)
    assert np.allclose(gpa.weights, trainer.gauss, rtol=1e-12)
    optim = torch.optim.SGD(list(ours.parameters()), lr=LR, momentum=0.9, weight_decay=5e-4)
    scale = backbone.model.logit_scale.exp().float()
    for epoch in range(epochs):
        pixels = torch.randn(4, 3, 32, 32, generator=gen)
        labels = torch.tensor([0, 4, 2, 1])
        official.train()
        with half_casts_off(), promptsrc_shims(backbone, config):
            summary = trainer.forward_backward({"img": pixels, "label": labels})
        ours.train()
        p = ours.prompts()
        img, text = ours.image_features(pixels, p), ours.text_features(p)
        logits = scale * img @ text.T
        loss = F.cross_entropy(logits, labels) + regulation(ours, pixels, logits, img, text)
        optim.zero_grad()
        loss.backward()
        assert rel(loss, torch.tensor(summary["loss"])) <= TOL
        named = dict(official.named_parameters())
        grads = {name: rel(t.grad if t.grad is not None else ours.text_deep.grad[0] * 0, named[name].grad)
                 for t, name in pairs(ours, official)[:2]}
        grads["text_deep"] = rel(ours.text_deep.grad, torch.stack([named[n].grad for _, n in pairs(ours, official)
                                                                   if n.startswith("text_encoder")]))
        grads["vision_deep"] = rel(ours.vision_deep.grad, torch.stack([named[n].grad for _, n in pairs(ours, official)
                                                                       if n.startswith("image_encoder.transformer")]))
        assert max(grads.values()) <= TOL, (epoch, grads)
        optim.step()
        gpa(epoch)
    gpa.finish()  # the official trainer loaded its aggregate after the last epoch's step
    named = dict(official.named_parameters())
    worst = {name: rel(t, named[name]) for t, name in pairs(ours, official)}
    assert max(worst.values()) <= TOL, worst
    # the trainer's checkpoint (Dassl saves the whole CustomCLIP, ZS_image_encoder included) imports
    from coopkit.research.compat import import_official

    path = tmp_path / "VLPromptLearner" / "model.pth.tar-3"
    path.parent.mkdir()
    torch.save({"state_dict": official.state_dict(), "epoch": epochs, "optimizer": trainer.optim.state_dict(),
                "scheduler": None, "val_result": None}, path)
    clf = import_official(path, NAMES, backbone=backbone)
    assert clf.method == "promptsrc" and clf.model.config.prompt_depth_vision == config.prompt_depth_vision
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad(), half_casts_off():
        assert rel(clf.model.logits(pixels), official.eval()(pixels)) <= TOL


def test_gpa_weights_follow_the_gaussian():
    w = gpa_weights(20, 15, 1)
    assert abs(sum(w) - 1) < 1e-12 and max(range(20), key=w.__getitem__) == 14
    with pytest.raises(ValueError, match="every one of the 2 epochs a Gaussian weight of 0"):
        PromptSRCConfig(epochs=2, gpa_mean=500, gpa_std=1)


@pytest.mark.parametrize("bad, match", [
    (dict(text_loss_weight=-1), "text_loss_weight must be a finite number >= 0"),
    (dict(gpa_std=0), "gpa_std must be a finite number > 0"),
    (dict(prompt_depth_vision=0, n_ctx_vision=0), None),
])
def test_bad_configs_are_refused(backbone, bad, match):
    if match is None:  # a valid config, refused for this method on the backbone: it regularises image prompts
        from coopkit.methods.promptsrc import check_backbone

        with pytest.raises(ValueError, match="prompt_depth_vision must be >= 1"):
            check_backbone(backbone, PromptSRCConfig(**bad))
        return
    with pytest.raises(ValueError, match=match):
        PromptSRCConfig(**bad)


def test_fit_aggregates_the_epochs(tiny_backbone, image_folder, monkeypatch):
    import coopkit

    seen = []
    original = GaussianAggregate.__call__

    def record(self, epoch):
        seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        original(self, epoch)

    monkeypatch.setattr(GaussianAggregate, "__call__", record)
    config = PromptSRCConfig(prompt_depth_text=2, prompt_depth_vision=2, epochs=3, gpa_mean=2, gpa_std=1)
    clf = coopkit.fit(image_folder / "train", method="promptsrc", backbone=tiny_backbone, shots=4, seed=2,
                      method_config=config, progress=False)
    model = clf.model
    assert all(np.isfinite(clf.config.metrics["history"]["loss"])) and len(seen) == 3
    w = gpa_weights(3, 2, 1)
    for k, v in model.state().items():  # the final prompts: the Gaussian-weighted sum of the epochs'
        torch.testing.assert_close(v, sum(wi * s[k] for wi, s in zip(w, seen)))
    assert not torch.equal(model.state()["ctx"], seen[-1]["ctx"])
