"""The two multi-label baselines: zero-shot (positive vs negative hand prompt) and CoOp with a sigmoid and the
ASL, through the registry (fit, save, load, evaluate), checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coopkit
from coopkit.methods.multilabel import ZeroShotMultiLabelConfig, asymmetric_loss_sigmoid, zeroshot_multilabel
from coopkit.multilabel_data import MultiLabelDataset

from helpers import write_multilabel_set
from coopkit.prompts import PromptLearner, reference_text_features

NAMES = ["red", "green", "blue", "sea_turtle"]


def _data(root, n: int, seed: int) -> MultiLabelDataset:
    return write_multilabel_set(root, n, seed, NAMES)


def _global(bb, paths):
    x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return F.normalize(bb.model.encode_image(x).float(), dim=-1)


def test_zeroshot_is_the_softmax_over_the_two_hand_prompts(tiny_backbone, tmp_path):
    bb = tiny_backbone
    data = _data(tmp_path, 4, seed=0)
    model = zeroshot_multilabel(bb, NAMES, ZeroShotMultiLabelConfig(negative="a photo with no {}."))
    x = _global(bb, data.paths)
    with torch.no_grad():  # the reference: open_clip's own text encoder on the filled prompts, softmax over the pair
        def text(t):
            tokens = bb.tokenizer([t.format(n.replace("_", " ")) for n in NAMES])
            return F.normalize(bb.model.encode_text(tokens).float(), dim=-1)
        scale = bb.model.logit_scale.exp()
        pair = torch.stack([scale * x @ text("a photo with no {}.").T, scale * x @ text("a photo of a {}.").T], 1)
        ref = torch.softmax(pair, dim=1)[:, 1]  # (n, C)
        ours = torch.sigmoid(model.head()(x))
    assert torch.allclose(ours, ref, atol=1e-6)
    with pytest.raises(ValueError, match="one {} for the label"):
        ZeroShotMultiLabelConfig(positive="a photo")


def test_zeroshot_fit_chooses_thresholds_on_val_and_saves(tiny_backbone, tmp_path):
    train, val = _data(tmp_path, 3, seed=1), _data(tmp_path, 8, seed=2)
    clf = coopkit.fit(train, method="zeroshot-multilabel", backbone=tiny_backbone, val=val, progress=False)
    assert clf.config.task == "multilabel" and "val_mAP" in clf.config.metrics
    again = coopkit.load(clf.save(tmp_path / "run"), backbone=tiny_backbone)
    assert torch.equal(again.model.thresholds, clf.model.thresholds)
    np.testing.assert_allclose(again.probs(val.paths), clf.probs(val.paths), rtol=1e-6)
    assert again.evaluate(val)["mAP"] == pytest.approx(clf.config.metrics["val_mAP"])


def test_coop_sigmoid_trains_and_its_saved_head_is_the_learned_prompt(tiny_backbone, tmp_path, check_tensors_file_guarded):
    bb = tiny_backbone
    train, val = _data(tmp_path, 10, seed=3), _data(tmp_path, 6, seed=4)
    clf = coopkit.fit(train, method="coop-sigmoid", backbone=bb, val=val, epochs=4, n_ctx=4, lr=0.01, progress=False)
    losses = clf.config.metrics["history"]["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses)) and clf.config.method_config["n_ctx"] == 4
    state = clf.model.state()
    assert sorted(state) == ["bias", "ctx", "thresholds", "weight"]
    # independent path: the saved context through the plain full-length text pass, CLIP's scale, the bias
    learner = PromptLearner(bb, NAMES, coopkit.config.PromptConfig(n_ctx=4))
    with torch.no_grad():
        learner.ctx.copy_(state["ctx"])
        x = _global(bb, val.paths)
        ref = torch.sigmoid(bb.model.logit_scale.exp() * x @ reference_text_features(learner).T + state["bias"])
    np.testing.assert_allclose(clf.probs(val.paths), ref.numpy(), atol=1e-5)
    run = clf.save(tmp_path / "run")
    again = coopkit.load(run, backbone=bb)
    np.testing.assert_allclose(again.probs(val.paths), clf.probs(val.paths), rtol=1e-6)
    report = again.evaluate(val)
    assert report["mAP"] == pytest.approx(clf.config.metrics["val_mAP"]) and report["n"] == 6
    check_tensors_file_guarded(run, "multilabel_head.safetensors", "coop-sigmoid", bb)


def test_saved_head_tensors_that_do_not_fit_are_refused(tiny_backbone, tmp_path):
    clf = coopkit.fit(_data(tmp_path, 3, seed=5), method="zeroshot-multilabel", backbone=tiny_backbone, progress=False)
    from coopkit.methods.multilabel import MultiLabelHeadModel

    state = clf.model.state()
    with pytest.raises(ValueError, match=r"'thresholds' must have shape \(4,\)"):
        MultiLabelHeadModel(tiny_backbone, NAMES, {**state, "thresholds": torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN or infinite"):
        MultiLabelHeadModel(tiny_backbone, NAMES, {**state, "bias": torch.tensor([float("nan")])})


def test_unknown_labels_leave_the_sigmoid_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    full = asymmetric_loss_sigmoid(logits, torch.tensor([[1, 0, 1]]))
    part = asymmetric_loss_sigmoid(logits, torch.tensor([[1, -1, 1]]))
    only = asymmetric_loss_sigmoid(logits[:, [0, 2]], torch.tensor([[1, 1]]))
    assert part == pytest.approx(float(only)) and full > part


def test_cli_fits_and_evaluates_a_multilabel_csv(tiny_config, tmp_path):
    import json

    from click.testing import CliRunner

    from coopkit.cli import main

    data = _data(tmp_path, 6, seed=6)
    csv = tmp_path / "tags.csv"
    csv.write_text("path,labels,unknown\n" + "".join(
        f"{p},{'|'.join(data.labels_of(i))},{'|'.join(n for n, t in zip(NAMES, data.targets[i]) if t == -1)}\n"
        for i, p in enumerate(data.paths)))
    runner = CliRunner()
    common = ["--model", str(tiny_config), "--pretrained", "none", "--device", "cpu"]
    res = runner.invoke(main, ["fit", str(csv), *common, "--method", "coop-sigmoid", "--coop-sigmoid-epochs", "2",
                               "--val", str(csv), "--out", str(tmp_path / "run"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["method"] == "coop-sigmoid" and 0 <= out["val_mAP"] <= 1
    res = runner.invoke(main, ["eval", str(tmp_path / "run"), str(csv), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["mAP"] == pytest.approx(out["val_mAP"]) and report["classes"] == sorted(NAMES)
    res = runner.invoke(main, ["eval", str(tmp_path / "run"), str(csv), "--device", "cpu", "--per-class"])
    assert res.exit_code == 0 and "mAP" in res.output and "sea_turtle" in res.output, res.output
