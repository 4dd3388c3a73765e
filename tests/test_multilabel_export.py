"""Multi-label runs exported and served: one verified ONNX file whose ``probs`` are each label's own probability
(DualCoOp's region aggregation inside the graph), the per-label thresholds in its sealed metadata, predictions
carrying every label at or above its threshold, and files that older readers refuse. The reference is always the
PyTorch classifier's own sigmoid probabilities and thresholds (``coopkit.Classifier.probs`` / ``.thresholds``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import coopkit
from coopkit.exporters import export_onnx
from coopkit.runtime import Classifier
from coopkit.runtime import contract
from coopkit.runtime.contract import MetadataError, ModelMetadata


def _applies(probs: np.ndarray, thresholds: np.ndarray, names: list[str]) -> list[list[str]]:
    """Per image, the labels whose probability reaches their threshold, most probable first (computed here)."""
    return [[names[i] for i in sorted(range(len(names)), key=lambda i: (-row[i], i)) if row[i] >= thresholds[i]]
            for row in probs]


def test_dualcoop_exports_one_file_whose_probs_are_the_pytorch_sigmoids(dualcoop_clf, multilabel_export,
                                                                        multilabel_sets):
    clf, report = dualcoop_clf, multilabel_export
    _, val = multilabel_sets
    assert report.files == [report.path] and report.text_path is None  # one file: aggregation inside the graph
    assert report.image.max_abs_logit_diff <= 1e-4 and report.image.label_agreement == 1.0
    assert report.image.max_abs_embed_diff <= 1e-4
    rt = Classifier(report.path, device="cpu", threads=1)
    m = rt.metadata
    assert (rt.task, rt.multilabel, m.method, m.precision) == ("multilabel", True, "dualcoop", "fp32")
    # DualCoOp's own preprocessing: a bilinear stretch to its input size, no crop
    assert (m.image_size, m.resize_mode, m.interpolation) == ((64, 64), "squash", "bilinear")
    np.testing.assert_array_equal(rt.thresholds, clf.thresholds)
    assert m.schema_version == contract.MULTILABEL_SCHEMA_VERSION > contract.SCHEMA_VERSION
    # odd-size photos through each side's own preprocessing: Pillow here, torchvision in PyTorch
    want = clf.probs(val.paths)
    got = rt.probs(val.paths)
    assert got.shape == want.shape == (16, 4) and not np.allclose(got.sum(1), 1.0)  # independent sigmoids
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(rt.logits(val.paths), clf.logits(val.paths), atol=1e-4)
    np.testing.assert_allclose(rt.scores(val.paths), want, atol=1e-5)  # trained with a sigmoid: scores are probs
    embeds = rt.embed(val.paths[:3])
    assert embeds.shape == (3, 128) and np.allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
    import onnx

    ops = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert {"Softmax", "Sigmoid", "Conv"} <= ops  # regions softmax-weighted per label, then the label sigmoid


def test_predictions_carry_every_label_at_or_above_its_threshold(dualcoop_clf, multilabel_export, multilabel_sets):
    clf = dualcoop_clf
    _, val = multilabel_sets
    probs, thresholds = clf.probs(val.paths), clf.thresholds
    assert np.abs(probs - thresholds).min() > 1e-5  # no decision within float rounding of its threshold
    want = _applies(probs, thresholds, clf.classnames)
    assert any(len(w) >= 2 for w in want) and any(len(w) < len(clf.classnames) for w in want)
    rt = Classifier(multilabel_export.path, device="cpu", threads=1)
    for preds in (rt.predict(val.paths, top_k=1), clf.predict(val.paths, top_k=1)):  # top_k does not cut
        assert [list(p.labels) for p in preds] == want
        for p, row in zip(preds, probs):
            np.testing.assert_allclose(p.probs, [row[clf.classnames.index(n)] for n in p.labels], atol=1e-5)
            assert list(p.label_probs) == clf.classnames
            np.testing.assert_allclose(list(p.label_probs.values()), row, atol=1e-5)
            assert p.label == (p.labels[0] if p.labels else None)
    d = rt.predict(val.paths[0])[0].to_dict()
    assert sorted(d) == ["label_probs", "labels", "probs", "source"] and len(d["label_probs"]) == 4
    json.dumps(d)


def test_single_label_files_answer_as_before(graph_model):
    rt = Classifier(graph_model.path, device="cpu", threads=1)
    assert (rt.task, rt.multilabel, rt.thresholds, rt.metadata.schema_version) == ("classify", False, None, 1)
    (p,) = rt.predict(np.zeros((32, 32, 3), np.uint8), top_k=3)
    assert len(p.labels) == 3 and p.label_probs is None and sorted(p.to_dict()) == ["labels", "probs", "source"]
    with pytest.raises(MetadataError, match="thresholds are for multilabel files"):
        ModelMetadata(classnames=["a", "b"], image_size=8, thresholds=[0.5, 0.5])


def test_older_readers_refuse_a_multilabel_file(multilabel_export, monkeypatch):
    report = multilabel_export
    rt = Classifier(report.path, device="cpu", threads=1)
    stored = rt.metadata.to_json()
    side = json.loads(report.sidecar.read_text())
    # readers before multi-label files read schema 1 and sidecar 1 at most, and refuse newer ones
    assert side["sidecar_version"] == 2 > contract.SIDECAR_VERSION and side["metadata"]["task"] == "multilabel"
    monkeypatch.setattr(contract, "NEWEST_SCHEMA_VERSION", contract.SCHEMA_VERSION)
    with pytest.raises(MetadataError, match="schema version 2, this coopkit reads up to 1; upgrade coopkit"):
        ModelMetadata.from_json(stored)
    monkeypatch.undo()
    # and nobody can make it look single-label: the task and thresholds are sealed with the rest
    raw = json.loads(stored)
    for edit in ({"task": "classify", "thresholds": None, "schema_version": 1}, {"thresholds": [0.0] * 4}):
        with pytest.raises(MetadataError, match="changed after export"):
            ModelMetadata.from_json(json.dumps({**raw, **edit}))
    with pytest.raises(MetadataError, match="a multilabel file needs schema_version 2 or newer, got 1"):
        ModelMetadata(classnames=["a"], image_size=8, task="multilabel", thresholds=[0.5], schema_version=1)
    with pytest.raises(MetadataError, match=r"needs thresholds: one per class \(2\)"):
        ModelMetadata(classnames=["a", "b"], image_size=8, task="multilabel", thresholds=[0.5])
    with pytest.raises(MetadataError, match=r"thresholds must be finite numbers, got \[nan\]"):
        ModelMetadata(classnames=["a", "b"], image_size=8, task="multilabel", thresholds=[0.5, float("nan")])


def test_fp16_int8_and_raw_input_files_verify_per_label(dualcoop_clf, multilabel_sets, tmp_path):
    clf = dualcoop_clf
    train, val = multilabel_sets
    want = clf.probs(val.paths)
    decisions = want >= clf.thresholds

    fp16 = export_onnx(clf, tmp_path / "fp16.onnx", "fp16")
    assert fp16.image.max_abs_logit_diff <= 5e-2 and fp16.image.label_agreement is not None
    got = Classifier(fp16.path, device="cpu", threads=1).probs(val.paths)
    assert np.abs(got - want).max() <= 5e-2

    int8 = export_onnx(clf, tmp_path / "int8.onnx", "int8", calibration=list(train.paths))
    check, summary = int8.image, int8.int8
    assert check.n_decisive_labels is not None and check.label_agreement_decisive >= 0.99
    assert 0 <= check.label_agreement <= 1 and summary.agreement is not None
    assert summary.agreement[0] >= 0.995 or summary.float_nodes == ()  # the accuracy-aware loop, per label
    rt8 = Classifier(int8.path, device="cpu", threads=1)
    agree = float(((rt8.probs(val.paths) >= clf.thresholds) == decisions).mean())  # measured here, on other images
    assert agree >= 0.9, f"int8 keeps {agree:.1%} of the per-label decisions"
    assert rt8.metadata.thresholds == Classifier(tmp_path / "fp16.onnx", device="cpu").metadata.thresholds

    raw = export_onnx(clf, tmp_path / "raw.onnx", "fp32", raw_input=True)
    rt_raw = Classifier(raw.path, device="cpu", threads=1)
    assert rt_raw.input_kind == "raw" and rt_raw.multilabel
    assert raw.raw.max_pixel_diff <= 3 and raw.raw.max_abs_logit_diff <= raw.raw.logit_tolerance
    assert np.abs(rt_raw.logits(val.paths) - clf.logits(val.paths)).max() <= raw.raw.logit_tolerance


def test_label_agreement_counts_changed_decisions():
    from coopkit.exporters.verify import compare, label_agreement

    ref = np.array([[2.0, -1.0, 0.1], [-3.0, 0.5, 4.0]], np.float32)
    t = np.array([0.5, 0.5, 0.6], np.float32)  # logit(0.6) = 0.405: image 0's third label is just below
    assert label_agreement(ref, ref, t) == (1.0, 1.0)
    moved = ref.copy()
    moved[0, 2] = 0.5  # crosses its threshold's logit: one of six decisions changes
    measured, estimated = label_agreement(ref, moved, t)
    assert measured == pytest.approx(5 / 6) and estimated < 1.0
    embeds = np.zeros((2, 4), np.float32)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    check = compare({"logits": ref, "probs": sig(ref), "image_embeds": embeds},
                    {"logits": moved, "probs": sig(moved), "image_embeds": embeds}, "int8", 0.1, t)
    assert check.label_agreement == pytest.approx(5 / 6) and check.n_decisive_labels == 6
    assert any("label decisions agree on only 83.3% of the 6 clear" in p for p in check.problems)
    softmaxed = compare({"logits": ref, "probs": sig(ref), "image_embeds": embeds},
                        {"logits": ref, "probs": np.full_like(ref, 1 / 3), "image_embeds": embeds}, "fp32", 1.0, t)
    assert softmaxed.problems == ["probs are not the sigmoid of the logits"]


def test_text_encoder_is_refused_in_one_line(dualcoop_clf, tmp_path):
    with pytest.raises(ValueError, match="--with-text-encoder is for single-label runs: a multi-label dualcoop run"):
        export_onnx(dualcoop_clf, tmp_path / "t.onnx", with_text_encoder=True)
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("method,extra", [("zeroshot-multilabel", {}), ("coop-sigmoid", {"epochs": 1, "n_ctx": 4})])
def test_the_baselines_export_with_their_thresholds(tiny_backbone, multilabel_sets, tmp_path, method, extra):
    train, val = multilabel_sets
    clf = coopkit.fit(train, method=method, backbone=tiny_backbone, val=val, progress=False, **extra)
    report = export_onnx(clf, tmp_path / "m.onnx")
    rt = Classifier(report.path, device="cpu", threads=1)
    assert rt.task == "multilabel" and rt.metadata.resize_mode == "shortest"  # the backbone's own preprocessing
    np.testing.assert_array_equal(rt.thresholds, clf.thresholds)
    np.testing.assert_allclose(rt.probs(val.paths), clf.probs(val.paths), atol=1e-5)
    assert [list(p.labels) for p in rt.predict(val.paths)] == [list(p.labels) for p in clf.predict(val.paths)]


def test_predict_writes_the_labels_that_apply(dualcoop_clf, multilabel_export, multilabel_sets, tmp_path):
    from click.testing import CliRunner

    from coopkit.cli import main
    from coopkit.runtime.batch import predict_collection

    clf = dualcoop_clf
    _, val = multilabel_sets
    want = _applies(clf.probs(val.paths), clf.thresholds, clf.classnames)
    out = tmp_path / "tags.csv"
    summary = predict_collection(multilabel_export.path, list(val.paths), out, progress=False, device="cpu", top_k=1)
    assert summary.rows == 16
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["labels"]) for r in rows] == want  # every label that applies, not top_k of them
    assert [r["label"] or None for r in rows] == [w[0] if w else None for w in want]
    res = CliRunner().invoke(main, ["predict", str(multilabel_export.path), *val.paths[:3], "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["labels"] for line in res.output.splitlines()] == want[:3]


def test_int8_keeps_products_fp32_until_every_label_decision_holds(multilabel_export, multilabel_sets, tmp_path):
    """The accuracy-aware loop on per-label decisions: thresholds put halfway between a calibration
    image's fp32 and all-int8 probabilities make int8 flip its decisions (and float noise, 1e-7, none);
    with min_agreement 1 the loop keeps products in fp32 until every decision on the calibration images
    is fp32's again (measured here with onnxruntime)."""
    import onnxruntime as ort

    from coopkit.exporters import QuantizationConfig
    from coopkit.exporters.int8 import to_int8

    train, _ = multilabel_sets
    fp32 = multilabel_export.path
    images = Classifier(fp32, device="cpu").preprocess(train.paths)  # (10, 64, 64, 3) uint8

    def probs(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"images": images})[0]

    want = probs(fp32)
    # every product in int8 (the thresholds play no part without tuning)
    plain = to_int8(fp32, tmp_path / "all.onnx", images, QuantizationConfig(min_agreement=0.0, smooth_alphas=(0.0,)),
                    thresholds=want[0])
    got = probs(tmp_path / "all.onnx")
    apart = np.abs(got[0] - want[0]) > 1e-5  # (C,): the labels int8 moves for image 0
    assert apart.any() and plain.float_nodes == ()
    thresholds = np.where(apart, (got[0] + want[0]) / 2, 0.5)  # between the two: int8 flips each of them
    changed = ((got >= thresholds) != (want >= thresholds)).sum()
    # the measured bar alone: image 0's margins are half of int8's own error, so the estimate for other
    # images (min_estimated_agreement) is not what this checks
    config = QuantizationConfig(min_agreement=1.0, min_estimated_agreement=0.0, smooth_alphas=(0.0,))
    summary = to_int8(fp32, tmp_path / "tuned.onnx", images, config, thresholds=thresholds)
    assert summary.agreement is not None and summary.agreement[0] == 1.0
    assert ((probs(tmp_path / "tuned.onnx") >= thresholds) == (want >= thresholds)).all()
    assert changed >= apart.sum()  # every product in int8 changes decisions ...
    assert len(summary.float_nodes) >= 1  # ... so the loop kept some in fp32
