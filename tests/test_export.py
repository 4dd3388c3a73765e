"""coopkit.exporters: real exports of tiny random-init open_clip models, run by real onnxruntime.

Every reference is computed by PyTorch through the classifier's own path (torchvision
transform, ``encode_image``, ``class_weights``) or the prompt learner, never by the code
under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import coopkit
from coopkit.exporters import ExportVerificationError, export_onnx, text_graph_name, write_triton_repository
from coopkit.runtime.contract import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, SCHEMA_VERSION, ModelMetadata

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _session(path: Path) -> Any:
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _metadata(path: Path) -> ModelMetadata:
    model = onnx.load(os.fspath(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the fp32 graph ---------------------------------------------------------------------------------


def test_fp32_graph_equals_pytorch_at_batch_1_7_64(coop, exported):
    onnx.checker.check_model(os.fspath(exported.path), full_check=True)
    sess = _session(exported.path)
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type) == (INPUT_NAME, "tensor(uint8)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [32, 32, 3]
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    assert [o.shape[1] for o in sess.get_outputs()] == [4, 4, 64]
    for n, seed in ((1, 1), (7, 2), (64, 3)):
        images = _images(n, seed)
        logits, probs, embeds = sess.run(None, {INPUT_NAME: images})
        ref = coop.logits(list(images))  # PyTorch: torchvision transform, encode_image, W
        assert logits.shape == (n, 4) and embeds.shape == (n, 64)
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs, torch.from_numpy(ref).softmax(-1).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
    assert exported.image.max_abs_logit_diff <= 1e-4 and exported.image.top1_agreement == 1.0
    assert exported.image.accuracy_onnx == exported.image.accuracy_torch


def test_export_friendly_ops_give_the_same_results_and_are_undone(tiny_backbone, exported):
    """The traced forms of attention (plain ops) and the patch conv (MatMul) equal the modules'."""
    from coopkit.exporters.trace import export_friendly

    model = tiny_backbone.model
    images = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.tokenizer(["a red cat.", "a photo of a dog."])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)  # text: causal float mask
        with export_friendly(model):
            assert "forward" in vars(model.visual.conv1)
            during = model.encode_image(images), model.encode_text(tokens)
        after = model.encode_image(images)
    assert not any("forward" in vars(m) for m in model.modules())  # class forwards restored
    for a, b in zip(before, during):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before[0], atol=0, rtol=0)
    ops = {n.op_type for n in onnx.load(os.fspath(exported.path), load_external_data=False).graph.node}
    assert "Conv" not in ops and "MatMul" in ops


def test_metadata_carries_everything_the_runtime_needs(coop, exported):
    model = onnx.load(os.fspath(exported.path))
    assert [p.key for p in model.metadata_props] == [METADATA_KEY]
    meta = _metadata(exported.path)
    cfg = coop.backbone.preprocess_cfg
    assert meta.classnames == coop.classnames == ["blue", "green", "red", "yellow"]
    assert meta.image_size == (32, 32) and meta.resize_mode == "shortest" and meta.interpolation == "bicubic"
    assert meta.mean == pytest.approx(cfg["mean"]) and meta.std == pytest.approx(cfg["std"])
    assert meta.model == coop.backbone.name and meta.pretrained is None
    assert meta.method == "coop" and meta.precision == "fp32" and meta.embed_dim == 64
    assert meta.prompt == {"n_ctx": 4, "csc": False, "class_token_position": "end", "ctx_init": None}
    assert meta.coopkit_version == coopkit.__version__ and meta.schema_version == SCHEMA_VERSION
    w = coop.class_weights().numpy().astype(np.float32)
    assert meta.weights_sha256 == hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()
    # the weights baked into the graph are W itself
    baked = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "head.scorer.weights_t"]
    np.testing.assert_array_equal(baked[0], w.T)
    te = meta.text_encoder
    assert te.file == "model.text.onnx" and te.prompt_template == "X X X X {}."
    assert te.context_length == 77 and te.vocab == "clip_bpe_49408"
    assert (te.sot_token_id, te.eot_token_id) == (49406, 49407)


def test_runtime_classifier_serves_the_file(coop, exported, image_folder):
    from coopkit.runtime import Classifier

    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    with Classifier(exported.path, device="cpu") as rt:
        assert rt.classnames == coop.classnames
        got = rt.logits(paths)
        assert [p.label for p in rt.predict(paths)] == [p.label for p in coop.predict(paths)]
    np.testing.assert_allclose(got, coop.logits(paths), atol=2e-3, rtol=0)  # PIL vs torchvision resizing


def test_files_are_written_atomically(exported):
    folder = exported.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.text.onnx"]  # + sidecar
    assert exported.files == [exported.path, exported.text_path]
    assert exported.size_bytes == sum(f.stat().st_size for f in exported.files)


def test_failed_verification_leaves_nothing_behind(coop, tmp_path, monkeypatch):
    from coopkit.exporters import verify as exp_verify

    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    monkeypatch.setitem(exp_verify.LOGIT_TOLERANCE, "fp32", 0.0)  # real comparison, impossible bar
    with pytest.raises(ExportVerificationError, match="does not match the PyTorch classifier"):
        export_onnx(coop, target, "fp32", with_text_encoder=True)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_zero_shot_classifier_exports_the_same_way(tiny_backbone, tmp_path):
    names = ["cat", "dog", "red car"]
    zs = coopkit.zero_shot(tiny_backbone, names, ["a photo of a {}.", "a blurry photo of a {}."])
    res = export_onnx(zs, tmp_path / "zs.onnx", with_text_encoder=True)
    images = _images(9, 5)
    np.testing.assert_allclose(_session(res.path).run(["logits"], {INPUT_NAME: images})[0],
                               zs.logits(list(images)), atol=1e-4, rtol=0)
    meta = _metadata(res.path)
    assert meta.method == "zeroshot" and meta.prompt == {"templates": ["a photo of a {}.", "a blurry photo of a {}."]}
    assert meta.text_encoder.templates == meta.prompt["templates"]

    # open vocabulary through the runtime: template ensemble of new names equals PyTorch's
    from coopkit.runtime import Classifier

    new = ["golden retriever", "fire_truck", "x-ray"]
    expected = coopkit.zero_shot(tiny_backbone, new, meta.prompt["templates"]).class_weights().numpy()
    with Classifier(res.path, device="cpu") as rt:
        np.testing.assert_allclose(rt.text_encoder.class_weights(new), expected, atol=1e-4, rtol=0)


# --- precisions -------------------------------------------------------------------------------------


def test_fp16_within_5e_2_same_top1_fp32_interface(coop, image_folder, tmp_path):
    res = export_onnx(coop, tmp_path / "m16.onnx", "fp16", verify_data=image_folder / "test")
    onnx.checker.check_model(os.fspath(res.path), full_check=True)
    model = onnx.load(os.fspath(res.path))
    dtypes = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    # LayerNorm and Softmax run in fp32: their float inputs are fp32 values
    ln_inputs = [n.input[0] for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert ln_inputs and all(not name.endswith("__to_fp16") for name in ln_inputs)
    from coopkit.exporters.verify import FP16_CPU_DISABLED_OPTIMIZERS

    sess = ort.InferenceSession(os.fspath(res.path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(FP16_CPU_DISABLED_OPTIMIZERS))
    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    from coopkit.runtime.preprocess import preprocess

    for n, images in ((1, _images(1, 8)), (7, _images(7, 9)), (24, np.stack([preprocess(p, (32, 32)) for p in paths]))):
        (logits,) = sess.run(["logits"], {INPUT_NAME: images})
        ref = coop.logits(list(images))
        assert np.abs(logits - ref).max() <= 5e-2
        assert (logits.argmax(1) == ref.argmax(1)).all()
    assert _metadata(res.path).precision == "fp16"


def _batch_changes(session: Any, images: np.ndarray, n: int = 4) -> float:
    """Largest change of an image's logits between a batch of all ``images``, the image alone, and
    the image beside white, black and noise images (written here, apart from verify.py's check)."""
    (together,) = session.run(["logits"], {INPUT_NAME: images})
    rng = np.random.default_rng(5)
    others = np.stack([np.full(images.shape[1:], 255, np.uint8), np.zeros(images.shape[1:], np.uint8),
                       rng.integers(0, 256, images.shape[1:], dtype=np.uint8)])
    worst = 0.0
    for i in range(n):
        (alone,) = session.run(["logits"], {INPUT_NAME: images[i : i + 1]})
        (mixed,) = session.run(["logits"], {INPUT_NAME: np.concatenate([others[:1], images[i : i + 1], others[1:]])})
        worst = max(worst, np.abs(alone[0] - together[i]).max(), np.abs(mixed[1] - together[i]).max())
    return float(worst)


def test_int8_agrees_on_the_task_test_images(coop, image_folder, tmp_path):
    res = export_onnx(coop, tmp_path / "m8.onnx", "int8", verify_data=image_folder / "test")
    onnx.checker.check_model(os.fspath(res.path), full_check=True)
    model = onnx.load(os.fspath(res.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops, ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights
    for n in weights:  # int8 weights within [-64, 64] (no vpmaddubsw overflow), one scale per output channel
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 and scale.shape == (w.shape[-1],)
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[1]].shape == () for n in activations)  # fixed, per tensor
    head = [n for n in model.graph.node if n.name == "/head/scorer/MatMul"]
    assert head and head[0].op_type == "MatMul" and all(inits.get(x) is None or inits[x].dtype == np.float32
                                                         for x in head[0].input)  # the head stays fp32
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert res.int8.calibration_images == 8  # the run's own 2 shots x 4 classes

    dataset = coopkit.load_dataset(image_folder / "test").relabel(coop.classnames)
    from coopkit.runtime.preprocess import preprocess

    images = np.stack([preprocess(p, (32, 32)) for p in dataset.paths])
    session = _session(res.path)
    (logits,) = session.run(["logits"], {INPUT_NAME: images})
    ref = coop.logits(list(images))
    agreement = (logits.argmax(1) == ref.argmax(1)).mean()
    labels = np.array(dataset.labels)
    acc_onnx, acc_torch = (logits.argmax(1) == labels).mean(), (ref.argmax(1) == labels).mean()
    assert agreement >= 0.99 and abs(acc_onnx - acc_torch) <= 0.01  # the criteria, on all 24
    assert _batch_changes(session, images) <= 1e-5  # the same answer whatever shares the batch
    for n in (1, 7, 64):
        assert session.run(["probs"], {INPUT_NAME: _images(n, n)})[0].shape == (n, 4)
    assert res.image.n_labelled == 24 and res.image.top1_agreement >= 0.99
    assert res.image.n_decisive >= 1 and res.image.top1_agreement_decisive >= 0.99
    assert res.image.batch_invariance_max_diff <= 1e-5


def test_batch_check_refuses_dynamic_int8(coop, exported, tmp_path):
    """The exporter's check catches what coopkit shipped before: onnxruntime's dynamic int8, whose
    activation scales come from the whole batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from coopkit.exporters.int8 import int8_targets
    from coopkit.exporters.verify import verify_image_graph

    dynamic = tmp_path / "dynamic.onnx"
    quantize_dynamic(exported.path, dynamic, nodes_to_quantize=int8_targets(onnx.load(os.fspath(exported.path))),
                     per_channel=True, weight_type=QuantType.QInt8)
    images = _images(16, 3)
    assert _batch_changes(_session(dynamic), images) > 1e-3  # really batch-dependent
    with pytest.raises(ExportVerificationError, match=r"an image's logits change by up to .* with the images that share its batch"):
        verify_image_graph(dynamic, coop, "int8", images)


def test_int8_calibration_sources(coop, tiny_backbone, image_folder, tmp_path):
    import dataclasses

    from coopkit.classifier import Classifier
    from coopkit.methods.coop import CoOpModel
    from coopkit.config import TrainingData

    assert coop.config.data == TrainingData(str((image_folder / "train").resolve()))
    assert coopkit.load(coop.save(tmp_path / "run"), backbone=tiny_backbone).config.data == coop.config.data
    zs = coopkit.zero_shot(tiny_backbone, ["red", "green", "blue", "yellow"])
    with pytest.raises(ValueError, match="a zero-shot classifier has no training images; pass calibration="):
        export_onnx(zs, tmp_path / "zs.onnx", "int8")
    res = export_onnx(zs, tmp_path / "zs.onnx", "int8", calibration=image_folder / "train")
    assert res.int8.calibration_images == 32 and res.image.batch_invariance_max_diff <= 1e-5
    res = export_onnx(zs, tmp_path / "zs.onnx", "int8", calibration=_images(5, 2))
    assert res.int8.calibration_images == 5
    moved = Classifier(coop.backbone, dataclasses.replace(coop.config, data=TrainingData(str(tmp_path / "gone"))),
                       coop.model)
    with pytest.raises(ValueError, match="not where the run recorded them .*dataset not found"):
        export_onnx(moved, tmp_path / "m.onnx", "int8")
    with pytest.raises(ValueError, match=r"calibration images must be uint8 \(n, 32, 32, 3\)"):
        export_onnx(zs, tmp_path / "m.onnx", "int8", calibration=_images(2, 0, size=16))
    with pytest.raises(ValueError, match="calibration images are for int8 exports"):
        export_onnx(zs, tmp_path / "m.onnx", "fp32", calibration=image_folder / "train")
    assert not (tmp_path / "m.onnx").exists()


def test_int8_on_an_embedded_world_task(tmp_path):
    """coopkit-tiny (a ModifiedResNet) fitted on the world's colors task: int8 calibrated on its 32
    training images agrees with fp32 on >= 99% of the 104 labelled test images (all of them agreeing
    on the calibration images was not enough: the estimated agreement keeps products in fp32 too),
    and the accuracy is within 1 point."""
    from coopkit.embedded import world
    from coopkit.runtime.preprocess import preprocess

    root = world.write_task("colors", tmp_path / "colors", shots_per_class=4, test_per_class=13, seed=3)
    clf = coopkit.fit(root / "train", shots=4, epochs=10, n_views=1, augment=False, progress=False)
    res = export_onnx(clf, tmp_path / "tiny8.onnx", "int8", verify_data=root / "test")
    assert res.image.n_labelled == 104 and res.int8.calibration_images == 32
    test = coopkit.load_dataset(root / "test").relabel(clf.classnames)
    images = np.stack([preprocess(p, clf.backbone.image_size) for p in test.paths])
    session = _session(res.path)
    (logits,) = session.run(["logits"], {INPUT_NAME: images})
    ref = clf.logits(list(images))
    labels = np.array(test.labels)
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.99 and res.int8.agreement[1] >= 0.99
    assert abs((logits.argmax(1) == labels).mean() - (ref.argmax(1) == labels).mean()) <= 0.01
    assert _batch_changes(session, images) <= 1e-5


def test_external_data_path(coop, tmp_path):
    res = export_onnx(coop, tmp_path / "big.onnx", "fp32", size_threshold=0)
    assert res.external_data and [f.name for f in res.files] == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 100_000 < (tmp_path / "big.onnx.data").stat().st_size
    onnx.checker.check_model(os.fspath(res.path), full_check=True)
    images = _images(3, 11)
    np.testing.assert_allclose(_session(res.path).run(["logits"], {INPUT_NAME: images})[0],
                               coop.logits(list(images)), atol=1e-4, rtol=0)
    # the Triton copy takes the data file along
    model_dir = write_triton_repository(res.path, tmp_path / "repo")
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["big.onnx.data", "model.onnx"]
    np.testing.assert_allclose(_session(model_dir / "1" / "model.onnx").run(["logits"], {INPUT_NAME: images})[0],
                               coop.logits(list(images)), atol=1e-4, rtol=0)
    # exporting again to the same name without external data removes the old data file
    again = export_onnx(coop, tmp_path / "big.onnx", "fp32")
    assert not again.external_data and not (tmp_path / "big.onnx.data").exists()
    np.testing.assert_allclose(_session(again.path).run(["logits"], {INPUT_NAME: images})[0],
                               coop.logits(list(images)), atol=1e-4, rtol=0)


def test_reexport_without_text_encoder_removes_the_old_text_graph(coop, tmp_path):
    first = export_onnx(coop, tmp_path / "m.onnx", "fp32", with_text_encoder=True)
    assert first.text_path is not None and first.text_path.is_file()
    second = export_onnx(coop, tmp_path / "m.onnx", "fp32")
    assert second.text_path is None and not first.text_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


# --- open vocabulary: the text graph ----------------------------------------------------------------


NEW_NAMES = ["golden retriever", "nighthawk (bird)", "cat?", "x-ray", "mr. x", "fire_truck", "wow!!"]


@pytest.mark.parametrize("position,ctx_init", [("end", None), ("middle", None), ("front", "a photo of a")])
def test_text_graph_equals_the_prompt_learner(tiny_backbone, tmp_path, position, ctx_init):
    from coopkit.classifier import Classifier
    from coopkit.methods.coop import CoOpModel
    from coopkit.config import PromptConfig, RunConfig
    from coopkit.prompts import PromptLearner
    from coopkit.runtime import Classifier as Runtime

    names = ["blue", "green", "red"]
    torch.manual_seed(3)
    learner = PromptLearner(tiny_backbone, names, n_ctx=6, class_token_position=position, ctx_init=ctx_init)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx) * 0.3)  # a "trained" context
    learner.requires_grad_(False)
    config = RunConfig(method="coop", classnames=names, model=tiny_backbone.name,
                       prompt=PromptConfig(learner.n_ctx, False, position, ctx_init))
    clf = Classifier(tiny_backbone, config, CoOpModel(tiny_backbone, learner))
    res = export_onnx(clf, tmp_path / "m.onnx", with_text_encoder=True)
    assert res.text_path == tmp_path / text_graph_name("m.onnx") and res.text.max_abs_diff <= 1e-4

    # names the run never saw, through the runtime's torch-free tokenizer and the text graph
    fresh = PromptLearner(tiny_backbone, NEW_NAMES, n_ctx=6, class_token_position=position, ctx_init=ctx_init)
    with torch.no_grad():
        fresh.ctx.copy_(learner.ctx)
        expected = (fresh.text_features() * tiny_backbone.model.logit_scale.exp()).numpy()
    with Runtime(res.path, device="cpu") as rt:
        np.testing.assert_allclose(rt.text_encoder.class_weights(NEW_NAMES), expected, atol=1e-4, rtol=0)
        rt.set_classes(NEW_NAMES)
        images = _images(5, 4)
        np.testing.assert_allclose(rt.logits(list(images)), rt.embed(list(images)) @ expected.T, atol=1e-4, rtol=0)


def test_class_specific_context_refuses_the_text_encoder(tiny_backbone, tmp_path):
    from coopkit.classifier import Classifier
    from coopkit.methods.coop import CoOpModel
    from coopkit.config import PromptConfig, RunConfig
    from coopkit.prompts import PromptLearner

    learner = PromptLearner(tiny_backbone, ["a", "b"], n_ctx=2, csc=True).requires_grad_(False)
    config = RunConfig(method="coop", classnames=["a", "b"], model=tiny_backbone.name, prompt=PromptConfig(2, True))
    clf = Classifier(tiny_backbone, config, CoOpModel(tiny_backbone, learner))
    with pytest.raises(ValueError, match="class-specific context .* no.* context for a new class name|unified context"):
        export_onnx(clf, tmp_path / "m.onnx", with_text_encoder=True)
    assert list(tmp_path.iterdir()) == []
    res = export_onnx(clf, tmp_path / "m.onnx")  # without the text graph it exports
    assert res.text_path is None and _metadata(res.path).prompt["csc"] is True


def test_multilabel_runs_export_but_refuse_the_text_graph_in_one_line(tiny_backbone, tmp_path):
    """A multi-label run (per-label sigmoid scores) exports through the CLI to a file that says so (its answers:
    tests/test_multilabel_export.py); a text graph, which cannot give its labels' scores, is refused before
    anything is written, through the Python API and the CLI."""
    from helpers import write_multilabel_set

    from coopkit.cli import main
    from coopkit.runtime import Classifier

    (tmp_path / "imgs").mkdir()
    data = write_multilabel_set(tmp_path / "imgs", 4, 3, ["cat", "dog", "car"])
    clf = coopkit.fit(data, method="zeroshot-multilabel", backbone=tiny_backbone, progress=False)
    assert clf.config.task == "multilabel"
    msg = "--with-text-encoder is for single-label runs: a multi-label zeroshot-multilabel run"
    with pytest.raises(ValueError, match=re.escape(msg)):
        export_onnx(clf, tmp_path / "out" / "m.onnx", with_text_encoder=True)
    assert not (tmp_path / "out").exists()
    run = clf.save(tmp_path / "run")
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "out2" / "m.onnx"),
                                    "--with-text-encoder"])
    assert res.exit_code != 0 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not list((tmp_path / "out2").glob("*")) if (tmp_path / "out2").exists() else True
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "out3" / "m.onnx")])
    assert res.exit_code == 0, res.output
    rt = Classifier(tmp_path / "out3" / "m.onnx", device="cpu")
    assert rt.task == "multilabel" and rt.thresholds.tolist() == [0.5, 0.5, 0.5]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"precision": "bf16"}, r"unsupported precision 'bf16'; valid: fp32, fp16, int8"),
        ({"opset": 9}, r"opset must be an integer from 14 to 20"),
    ],
)
def test_bad_settings(coop, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(coop, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(coop, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the output folder"):
        export_onnx(coop, blocker / "m.onnx")
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(coop, tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="Permission denied"):  # the environment: exit 1 in the CLI
            export_onnx(coop, locked / "m.onnx")


def test_export_config_is_validated_when_built(coop, tmp_path):
    from coopkit.exporters import ExportConfig, QuantizationConfig

    for kwargs, match in [
        ({"precision": "bf16"}, r"unsupported precision 'bf16'; valid: fp32, fp16, int8"),
        ({"opset": 21}, r"opset must be an integer from 14 to 20, got 21"),
        ({"raw_input": True, "opset": 17}, r"raw input needs opset 18 or newer"),
        ({"n_verify": 0}, r"n_verify must be an integer >= 1, got 0"),
        ({"size_threshold": -1}, r"size_threshold must be an integer >= 0"),
        ({"with_text_encoder": "yes"}, r"with_text_encoder must be True or False"),
        ({"fused_attention": 1}, r"fused_attention must be True or False"),
        ({"precision": "int8", "fused_attention": True}, r"fused_attention is for fp32 files .*; precision is int8"),
        ({"int8": QuantizationConfig(calibration="somewhere")}, r"calibration images are for int8 exports"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExportConfig(**kwargs)
    with pytest.raises(ValueError, match=r"smooth_alphas must be one or more numbers in \[0, 1\], got \(0.0, 1.5\)"):
        QuantizationConfig(smooth_alphas=(0.0, 1.5))
    with pytest.raises(ValueError, match=r"calibration_max_images must be an integer >= 1"):
        QuantizationConfig(calibration_max_images=0)
    # keyword overrides reach the config that owns them; an unknown one names the valid ones
    built = ExportConfig.build(precision="int8", calibration="data", seed=3, smooth_alphas=(0.5,))
    assert built == ExportConfig(precision="int8", seed=3, int8=QuantizationConfig(calibration="data", smooth_alphas=(0.5,)))
    assert built.resolved_opset == 17 and ExportConfig(raw_input=True).resolved_opset == 18
    assert ExportConfig.build(built) is built
    with pytest.raises(ValueError, match=r"unknown export settings \['n_verfy'\]; valid: .*n_verify"):
        export_onnx(coop, tmp_path / "m.onnx", n_verfy=4)
    assert list(tmp_path.iterdir()) == []
    # a config object and keyword overrides give the same export; the report says how it ran
    res = export_onnx(coop, tmp_path / "m.onnx", config=ExportConfig(n_verify=3, verify_batch=2), seed=5)
    assert res.config == ExportConfig(n_verify=3, verify_batch=2, seed=5)
    assert res.image.n_images == 3 and res.image.batch_sizes == [1, 2, 4] and res.int8 is None and res.raw is None


def test_files_without_a_resize_plan_load_and_answer_as_before(exported, image_folder, tmp_path):
    """Files written by coopkit 0.2.0 have no resize_plan: the runtime derives it as it always did."""
    from coopkit.runtime import Classifier
    from coopkit.runtime.preprocess import resize_plan

    meta = _metadata(exported.path)
    derived = resize_plan(meta.image_size, meta.resize_mode, meta.interpolation, meta.fill_color)
    assert meta.resize_plan is not None and (meta.resize_plan.rule, meta.resize_plan.interpolation) == derived[:2]
    assert meta.resize_plan.crop == (derived.fill is not None) and meta.resize_plan.size == meta.image_size
    old = onnx.load(os.fspath(exported.path))
    raw = json.loads(next(p.value for p in old.metadata_props if p.key == METADATA_KEY))
    del raw["resize_plan"], raw["text_encoder"], raw["metadata_sha256"]  # as 0.2.0 wrote it (no text graph beside it)
    old.metadata_props[0].value = json.dumps(raw)
    onnx.save(old, os.fspath(tmp_path / "old.onnx"))
    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    with Classifier(tmp_path / "old.onnx", device="cpu") as before, Classifier(exported.path, device="cpu") as now:
        assert before.metadata.resize_plan is None
        np.testing.assert_array_equal(before.logits(paths), now.logits(paths))


class _ChangedImageTower:
    """Exactly the interface the exporter documents (no learner, no text tower), for a method whose
    image tower is changed: features go through ``I + delta``, as merged LoRA weights would change them."""

    def __init__(self, classifier: Any, delta: torch.Tensor) -> None:
        self.backbone, self.classnames, self.config, self.method = (
            classifier.backbone, classifier.classnames, classifier.config, classifier.method)
        self._classifier, self._encoder = classifier, _Mixed(classifier.backbone.model, delta)

    def head(self) -> torch.nn.Module:
        return self._classifier.head()

    def class_weights(self) -> torch.Tensor:
        return self._classifier.class_weights()

    def image_encoder(self) -> torch.nn.Module:
        return self._encoder


class _Mixed(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, delta: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mix", torch.eye(delta.shape[0]) + delta)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels) @ self.mix.T  # (b, embed_dim)


def test_the_image_graph_is_the_classifiers_image_encoder(tiny_backbone, tmp_path):
    from PIL import Image

    zs = coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"])
    delta = 0.5 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    res = export_onnx(_ChangedImageTower(zs, delta), tmp_path / "m.onnx", n_verify=4)
    images = _images(6, 12)
    (got,) = _session(res.path).run(["logits"], {INPUT_NAME: images})
    with torch.no_grad():  # written out here: torchvision transform, encoder, the change, L2, class weights
        x = torch.stack([tiny_backbone.preprocess(Image.fromarray(a)) for a in images])
        features = tiny_backbone.model.encode_image(x) @ (torch.eye(64) + delta).T
        expected = (torch.nn.functional.normalize(features, dim=-1) @ zs.class_weights().T).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(got - zs.logits(list(images))).max() > 1e-2  # the change is really in the file


# --- Triton -------------------------------------------------------------------------------------


def _parse_pbtxt(text: str) -> dict[str, Any]:
    """A minimal protobuf text-format reader (messages, lists, scalars), independent of the writer."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            return message("}")
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        if tok.startswith('"'):
            return json.loads(tok)
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end: str) -> dict[str, Any]:
        nonlocal pos
        fields: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            fields[key] = value()
        pos += 1
        return fields

    return message("<eof>")


def test_triton_repository_matches_the_graph(exported, tmp_path):
    model_dir = write_triton_repository(exported.path, tmp_path / "repo", max_batch_size=32)
    assert model_dir == tmp_path / "repo" / "model"
    config = _parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == "model" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 32 and "max_queue_delay_microseconds" in config["dynamic_batching"]
    graph = onnx.load(os.fspath(exported.path)).graph
    onnx_types = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}

    def spec(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        return {"name": v.name, "data_type": onnx_types[t.elem_type], "dims": [d.dim_value for d in t.shape.dim[1:]]}

    assert [{k: e[k] for k in ("name", "data_type", "dims")} for e in config["input"]] == [spec(v) for v in graph.input]
    assert [{k: e[k] for k in ("name", "data_type", "dims")} for e in config["output"]] == [spec(v) for v in graph.output]
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported.path.read_bytes()
    labels = (model_dir / config["output"][0]["label_filename"]).read_text().splitlines()
    assert labels == _metadata(exported.path).classnames
    # writing again replaces the model folder whole, and leaves other models alone
    (tmp_path / "repo" / "other").mkdir()
    write_triton_repository(exported.path, tmp_path / "repo", max_batch_size=8)
    assert _parse_pbtxt((model_dir / "config.pbtxt").read_text())["max_batch_size"] == 8
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["model", "model_ensemble", "model_preprocess", "other"]


# --- the command line ---------------------------------------------------------------------------


def test_cli_export(coop, tmp_path):
    from coopkit.cli import main

    run = coop.save(tmp_path / "run")
    runner = CliRunner()
    out = tmp_path / "out" / "model.onnx"
    res = runner.invoke(main, ["export", str(run), "--out", str(out), "--precision", "int8",
                               "--triton", str(tmp_path / "repo"), "--with-text-encoder", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["precision"] == "int8" and summary["classes"] == 4 and summary["top1_agreement"] >= 0.99
    assert summary["calibration_images"] == 8 and summary["batch_invariance_max_diff"] <= 1e-5
    assert out.is_file() and (tmp_path / "out" / "model.text.onnx").is_file()
    assert (tmp_path / "repo" / "model" / "config.pbtxt").is_file()
    assert _metadata(out).precision == "int8"

    for args, message in [
        ([str(tmp_path / "missing"), "--out", str(out)], "run folder not found"),
        ([str(run), "--out", str(out), "--precision", "bf16"], "'bf16' is not one of"),
        ([str(run), "--out", str(out), "--precision", "int8", "--calibration", str(tmp_path / "none")],
         "dataset not found"),
    ]:
        res = runner.invoke(main, ["export", *args])
        assert res.exit_code == 2 and message in res.output, res.output
    # options made from the configs: a bad value is refused in one line before the run is even loaded
    for args, message in [
        (["--opset", "9"], "opset must be an integer from 14 to 20, got 9"),
        (["--raw-input", "--opset", "17"], "raw input needs opset 18 or newer"),
        (["--n-verify", "0"], "n_verify must be an integer >= 1, got 0"),
        (["--calibration", str(tmp_path)], "calibration images are for int8 exports; precision is fp32"),
    ]:
        res = runner.invoke(main, ["export", str(tmp_path / "missing"), "--out", str(out), *args])
        assert res.exit_code == 2 and message in res.output, res.output
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    res = runner.invoke(main, ["export", str(corrupt), "--out", str(out)])
    assert res.exit_code == 2 and "corrupt" in res.output, res.output


def test_cli_options_are_generated_from_the_configs():
    import dataclasses

    from coopkit.cli.export import export
    from coopkit.exporters import ExportConfig, QuantizationConfig

    options = {p.name: p for p in export.params}
    for cls, skipped in ((ExportConfig, {"int8"}), (QuantizationConfig, {"smooth_alphas"})):
        for f in dataclasses.fields(cls):
            if f.name not in skipped:
                assert options[f.name].help == f.metadata["help"], f.name
    flags = {opt for p in export.params for opt in p.opts}
    assert {"--out", "--precision", "--opset", "--raw-input", "--triton", "--triton-name", "--max-batch-size",
            "--with-text-encoder", "--verify-data", "--calibration", "--device", "--pretrained", "--json",
            "--fused-attention"} <= flags


def test_tensor_bytes_counts_external_tensors(coop, tmp_path):
    from coopkit.exporters.io import save_model, tensor_bytes

    res = export_onnx(coop, tmp_path / "m.onnx")
    model = onnx.load(os.fspath(res.path))
    inside = tensor_bytes(model)
    assert inside > 100_000
    save_model(model, tmp_path / "ext.onnx", size_threshold=0)
    assert tensor_bytes(onnx.load(os.fspath(tmp_path / "ext.onnx"), load_external_data=False)) == inside


def test_int8_rule_forgives_close_calls_only():
    from coopkit.exporters.verify import compare

    scale = 10.0
    ref = np.array([[5.0, 4.99, 0.0]] * 50 + [[5.0, 3.0, 0.0]] * 150, np.float32)  # 50 close, 150 clear calls
    embeds = np.zeros((200, 2), np.float32)

    def outputs(logits: np.ndarray) -> dict[str, np.ndarray]:
        p = np.exp(logits - logits.max(1, keepdims=True))
        return {"logits": logits, "probs": p / p.sum(1, keepdims=True), "image_embeds": embeds}

    close_flips = ref.copy()
    close_flips[:50, 1] = 5.01  # every close call swaps: 75% agreement overall
    res = compare(outputs(ref), outputs(close_flips), "int8", scale)
    assert res.top1_agreement == 0.75 and res.top1_agreement_decisive == 1.0 and not res.problems
    clear_flips = ref.copy()
    clear_flips[50:52, 1] = 5.5  # 2 of 150 clear calls swap: 98.7%
    res = compare(outputs(ref), outputs(clear_flips), "int8", scale)
    assert res.n_decisive == 150 and "top-1 agrees on only 98.7%" in res.problems[0]


def test_smoothing_is_exact_in_fp32_and_evens_the_channels(exported, tmp_path):
    """SmoothQuant's rescaling before int8: the smoothed fp32 graph gives the same logits, and each
    quantised product's input has a flatter per-channel range (what one uint8 scale must cover)."""
    from coopkit.exporters.int8 import activation_ranges, int8_targets, smooth_activations

    model = onnx.load(os.fspath(exported.path))
    targets = int8_targets(model)
    inputs = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.name in set(targets)))
    calibration = _images(24, 5)
    ranges = activation_ranges(exported.path, inputs, calibration)
    after = smooth_activations(model, targets, ranges, alpha=0.5)
    assert len(after) == len(inputs) and all(name.endswith(".smoothed") for name in after)
    onnx.checker.check_model(model)
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(model, os.fspath(smoothed))
    images = _images(9, 6)
    np.testing.assert_allclose(_session(smoothed).run(["logits"], {INPUT_NAME: images})[0],
                               _session(exported.path).run(["logits"], {INPUT_NAME: images})[0], atol=1e-4, rtol=0)
    new_ranges = activation_ranges(smoothed, list(after), calibration)
    for x, name in zip(inputs, after):
        spread = [np.abs(np.stack(r)).max(0) for r in (ranges[x], new_ranges[name])]
        before_ratio, after_ratio = (s.max() / np.median(s) for s in spread)
        assert after_ratio < before_ratio, (x, before_ratio, after_ratio)
        assert after[name] == pytest.approx((new_ranges[name][0].min(), new_ranges[name][1].max()), rel=1e-4, abs=1e-5)


def test_layout_optimiser_is_off_for_fp16_files_only(coop, tmp_path):
    """onnxruntime's NCHWc layout optimiser crashes on some fp16 graphs and is worth 1.2-1.7x on
    convolutional towers elsewhere: the runtime switches it off by what the file stores."""
    from coopkit.runtime import Classifier
    from coopkit.runtime.session import CPU_DISABLED_OPTIMIZERS, disabled_optimizers

    for precision, expected in (("fp32", []), ("fp16", list(CPU_DISABLED_OPTIMIZERS)), ("int8", [])):
        res = export_onnx(coop, tmp_path / f"{precision}.onnx", precision)
        assert disabled_optimizers(res.path) == expected, precision
        np.testing.assert_allclose(Classifier(res.path, device="cpu").logits(list(_images(3, 2))),
                                   _session(res.path).run(["logits"], {INPUT_NAME: _images(3, 2)})[0], atol=1e-4)
    assert disabled_optimizers((tmp_path / "fp32.onnx").read_bytes()) == list(CPU_DISABLED_OPTIMIZERS)
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert disabled_optimizers(tmp_path / "junk.onnx") == list(CPU_DISABLED_OPTIMIZERS)


def test_int8_keeps_the_smoothing_closest_to_fp32(exported, tmp_path):
    """to_int8 tries each smoothing strength and keeps the file whose logits on the calibration
    images are closest to fp32's: never worse there than either strength alone."""
    from coopkit.exporters.config import SMOOTH_ALPHAS, QuantizationConfig
    from coopkit.exporters.int8 import to_int8

    calibration = _images(40, 8)
    (ref,) = _session(exported.path).run(["logits"], {INPUT_NAME: calibration})

    def error(path: Path) -> tuple[int, float]:
        (got,) = _session(path).run(["logits"], {INPUT_NAME: calibration})
        return int((got.argmax(1) != ref.argmax(1)).sum()), float(np.abs(got - ref).mean())

    alone = {}  # each strength alone; every product int8 (min_agreement=0: the trial compares quantisations)
    for alpha in SMOOTH_ALPHAS:
        info = to_int8(exported.path, tmp_path / f"a{alpha}.onnx", calibration,
                       QuantizationConfig(smooth_alphas=(alpha,), min_agreement=0.0))
        assert info.smoothing == alpha and not info.trials
        alone[alpha] = error(tmp_path / f"a{alpha}.onnx")
    info = to_int8(exported.path, tmp_path / "best.onnx", calibration, QuantizationConfig(min_agreement=0.0))
    assert info.smoothing == min(alone, key=alone.__getitem__) and set(info.trials) == set(SMOOTH_ALPHAS)
    assert error(tmp_path / "best.onnx") == pytest.approx(min(alone.values()), rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0.0.onnx", "a0.5.onnx", "best.onnx"]  # no trial left
    with pytest.raises(ValueError, match="smooth_alphas"):
        to_int8(exported.path, tmp_path / "bad.onnx", calibration, QuantizationConfig(smooth_alphas=(1.5,)))
