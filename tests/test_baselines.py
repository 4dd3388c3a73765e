"""Few-shot baselines (linear probe, CLAP, Tip-Adapter, Tip-Adapter-F): fitted on cached features,
saved and loaded, and exported into one ONNX graph verified against PyTorch like CoOp."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import coopkit
from coopkit.config import ClapConfig, TipAdapterConfig
from coopkit.exporters import export_onnx
from coopkit.features import encode_images
from coopkit.research.baselines import clap, encode_fewshot, linear_probe, search_alpha_beta, tip_adapter
from coopkit.runtime.contract import INPUT_NAME, METADATA_KEY, ModelMetadata

NAMES = ["blue", "green", "red", "yellow"]


@pytest.fixture(scope="module")
def shots(tiny_backbone, image_folder):
    train = coopkit.few_shot(coopkit.load_dataset(image_folder / "train"), 4, seed=1)
    return encode_fewshot(tiny_backbone, train, views=2)


@pytest.fixture(scope="module")
def test_set(tiny_backbone, image_folder):
    data = coopkit.load_dataset(image_folder / "test")
    feats, _ = encode_images(tiny_backbone, data.paths)
    return [str(p) for p in data.paths], torch.tensor(data.labels), feats[0]


def _scores(clf, feats):
    with torch.no_grad():
        return clf.head()(feats).numpy()


def _fitted(bb, shots, method, val=None):
    if method == "linear-probe":
        return linear_probe(bb, shots)
    if method == "clap":
        return clap(bb, shots, config=ClapConfig(epochs=30, batch_size=8))
    return tip_adapter(bb, shots, val=val, finetune=method == "tip-adapter-f",
                       config=TipAdapterConfig(epochs=5, batch_size=8, search_steps=(20, 10)))


def test_tip_adapter_head_is_the_papers_formula(tiny_backbone, shots, test_set):
    clf = _fitted(tiny_backbone, shots, "tip-adapter")
    x = test_set[2][:5]  # (5, D)
    w = tiny_backbone.model.logit_scale.exp() * coopkit.zero_shot(tiny_backbone, NAMES).text_features()
    keys = F.normalize(shots.feats.mean(0), dim=-1)
    values = F.one_hot(shots.labels, 4).float()
    expected = x @ w.T + 1.0 * torch.exp(-1.0 * (1 - x @ keys.T)) @ values  # alpha = beta = 1 without search
    torch.testing.assert_close(torch.from_numpy(_scores(clf, x)), expected, atol=1e-4, rtol=0)


def test_search_picks_the_first_best_pair_on_the_grid():
    # 2 validation images, 2 classes; the zero-shot part is wrong on image 0 and the cache can fix it
    clip_logits = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    affinity = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.eye(2)
    alpha, beta, acc = search_alpha_beta(clip_logits, affinity, values, torch.tensor([0, 1]), (2.0, 3.0), (4, 4))
    assert acc == 1.0
    # by hand: image 0 needs 1 + alpha > 2 + alpha * exp(-beta), i.e. alpha * (1 - exp(-beta)) > 1; on the grids
    # betas (0.1, 0.575, 1.05, 1.525) x alphas (0.1, 0.825, 1.55, 2.275) the first pair is beta 1.05, alpha 1.55
    assert beta == pytest.approx(1.05) and alpha == pytest.approx(1.55)


@pytest.mark.parametrize("method", ["linear-probe", "clap", "tip-adapter", "tip-adapter-f"])
def test_baseline_saves_loads_and_exports_into_one_verified_graph(tiny_backbone, shots, test_set, tmp_path, method):
    paths, labels, feats = test_set
    val = (feats, labels) if method.startswith("tip") else None
    clf = _fitted(tiny_backbone, shots, method, val)
    assert clf.method == method and clf.model.state()
    logits = clf.logits(paths)
    assert logits.shape == (len(paths), 4)
    if method.startswith("tip"):
        assert "val_accuracy" in clf.config.metrics
    run = clf.save(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "head.safetensors"]
    back = coopkit.load(run, backbone=tiny_backbone)
    np.testing.assert_array_equal(_scores(back, feats), _scores(clf, feats))

    res = export_onnx(back, tmp_path / "m.onnx", "fp32")
    assert res.image.top1_agreement == 1.0 and res.image.max_abs_logit_diff < 1e-3
    session = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.method == method and meta.classnames == NAMES
    from coopkit.runtime import Classifier

    with Classifier(res.path, device="cpu") as rt:
        np.testing.assert_allclose(rt.logits(paths), logits, atol=2e-3, rtol=0)  # PIL vs torchvision resizing
    if method == "tip-adapter":
        with pytest.raises(ValueError, match="needs a CoOp or zero-shot run; a tip-adapter head"):
            export_onnx(back, tmp_path / "t.onnx", with_text_encoder=True)
        with pytest.raises(ValueError, match="weights for its training classes only"):
            back.with_classes(["cat"])


def test_clap_starts_at_zero_shot_and_its_constraint_holds_it_there(tiny_backbone, shots, test_set):
    feats = test_set[2]
    zs = coopkit.zero_shot(tiny_backbone, NAMES)
    untrained = clap(tiny_backbone, shots, config=ClapConfig(epochs=1))  # the warm-up epoch only (lr 1e-5)
    np.testing.assert_allclose(_scores(untrained, feats), _scores(zs, feats), atol=1e-2, rtol=0)
    free = clap(tiny_backbone, shots, config=ClapConfig(epochs=30, batch_size=8, constraint=False))
    held = clap(tiny_backbone, shots, config=ClapConfig(epochs=30, batch_size=8))
    w0 = zs.class_weights()

    def drift(c):
        return float((F.normalize(c.class_weights(), dim=-1) - F.normalize(w0, dim=-1)).norm())

    assert 0 < drift(held) < drift(free)
    assert all(0 < v < 1 for v in held.config.metrics["constraint_weights"])


def test_corrupt_head_file_is_refused(tiny_backbone, shots, tmp_path, check_tensors_file_guarded):
    run = _fitted(tiny_backbone, shots, "tip-adapter").save(tmp_path / "run")
    check_tensors_file_guarded(run, "head.safetensors", "tip-adapter", tiny_backbone)
