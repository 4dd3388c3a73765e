"""Raw-input files (``export --raw-input``): open_clip's resize and crop inside the ONNX graph.

References are independent of the code under test: open_clip's own ``image_transform``
(torchvision on Pillow) for the crops, the PyTorch classifier (``Classifier.logits`` on the
decoded images, open_clip transform, ``encode_image``) for the logits, and Pillow called pass by
pass for the resampling order of Pillow before 13.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

import coopkit
from coopkit.cli import main
from coopkit.exporters import export_onnx
from coopkit.exporters.preprocess import RAW_INPUT_OPSET, preprocess_model
from coopkit.exporters.verify import RAW_LOGIT_TOLERANCE, RAW_PIXEL_TOLERANCE, synthetic_image
from coopkit.runtime import Classifier
from coopkit.runtime.contract import INPUT_NAME, MetadataError, ModelMetadata
from coopkit.runtime.classifier import resizes_in_graph
from coopkit.runtime.preprocess import ImageDecodeError, resize_and_crop
from coopkit.runtime.session import CPU, CUDA

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
open_clip = pytest.importorskip("open_clip")

CLASSES = ["red", "green", "blue", "yellow"]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Uniform noise (even seeds: the worst case for resampling) or a photo-like field with an edge."""
    return synthetic_image(h, w, seed, photo=seed % 2 == 1)


SIZES = [(1, 1), (2, 3), (7, 5), (33, 47), (99, 640), (640, 99), (1, 300), (300, 1), (223, 225), (68, 15),
         (277, 37), (1333, 2000)]


def _session(model: Any) -> Any:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _open_clip_crop(transform: Any, img: np.ndarray) -> np.ndarray:
    """open_clip's eval transform of ``img``, back in grey levels (it ends in ToTensor + Normalize)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    x = transform(Image.fromarray(img)) * std + mean  # (3, H, W) in [0, 1]
    return torch.round(x * 255).permute(1, 2, 0).numpy().astype(np.int16)


# --- the preprocessing graph against open_clip's transform, per resize mode and filter ------------

CASES = [
    ((32, 32), "shortest", "bicubic", 0),
    ((32, 32), "shortest", "bilinear", 0),
    ((40, 24), "shortest", "bilinear", 0),  # non-square: open_clip resizes bicubic whatever the setting
    ((32, 32), "longest", "bicubic", 0),
    ((24, 40), "longest", "bilinear", 128),
    ((32, 32), "squash", "bicubic", 0),
    ((40, 24), "squash", "bilinear", 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[2]}-{c[0][0]}x{c[0][1]}")
def test_graph_crop_equals_open_clip_transform(case: tuple) -> None:
    size, mode, interpolation, fill = case
    meta = ModelMetadata(["a"], size, resize_mode=mode, interpolation=interpolation, fill_color=fill)
    session = _session(preprocess_model(meta))
    transform = open_clip.image_transform(size, is_train=False, resize_mode=mode, interpolation=interpolation,
                                          fill_color=fill)
    equal = total = 0
    for i, (h, w) in enumerate([*SIZES, size]):
        img = _image(h, w, i)
        try:
            want = _open_clip_crop(transform, img)
        except ValueError:  # open_clip rounds a side to 0 pixels (1x300, longest); coopkit keeps 1
            assert mode == "longest" and min(h, w) * max(size) < max(h, w)
            want = resize_and_crop(Image.fromarray(img), size, mode, interpolation, fill).astype(np.int16)
        got = session.run(None, {INPUT_NAME: img[None]})[0][0].astype(np.int16)
        assert got.shape == want.shape == (*size, 3), (h, w)
        diff = np.abs(got - want)
        assert diff.max() <= RAW_PIXEL_TOLERANCE, f"{h}x{w}: {diff.max()} grey levels off"
        equal, total = equal + int((diff == 0).sum()), total + diff.size
    assert equal / total > 0.99  # nearly every value is exactly Pillow's


def test_resampling_order_of_pillow_before_and_after_13() -> None:
    # Pillow resamples one axis to uint8, then the other; before 13 always columns first, from 13
    # rows first when the height loses more than twice as many pixels as the width. Where a cubic
    # overshoot is clipped in between, the order shows; the graph follows either rule.
    meta = ModelMetadata(["a"], (64, 64), resize_mode="squash", interpolation="bicubic")
    img = _image(68, 15, 0)  # rows 68 -> 64, columns 15 -> 64: Pillow 13 goes rows first
    pil = Image.fromarray(img)
    columns_first = np.asarray(pil.resize((64, 68), Image.BICUBIC).resize((64, 64), Image.BICUBIC), np.int16)
    rows_first = np.asarray(pil.resize((15, 64), Image.BICUBIC).resize((64, 64), Image.BICUBIC), np.int16)
    assert np.abs(columns_first - rows_first).max() > 3 * RAW_PIXEL_TOLERANCE  # the order matters here
    for rule, want in ((False, columns_first), (True, rows_first)):
        got = _session(preprocess_model(meta, vertical_first_rule=rule)).run(None, {INPUT_NAME: img[None]})[0][0]
        assert np.abs(got.astype(np.int16) - want).max() <= 1, rule


def test_graph_passes_a_crop_through_unchanged() -> None:
    for mode in ("shortest", "longest", "squash"):
        meta = ModelMetadata(["a"], (24, 40), resize_mode=mode)
        crop = _image(24, 40, 0)
        out = _session(preprocess_model(meta)).run(None, {INPUT_NAME: np.stack([crop, crop[::-1]])})[0]
        np.testing.assert_array_equal(out, np.stack([crop, crop[::-1]]))


# --- exports -----------------------------------------------------------------------------------


def _variant(backbone: Any, mode: str, interpolation: str, fill: int = 0) -> Any:
    """The tiny backbone with another preprocessing (as open_clip's image_resize_mode etc. give)."""
    cfg = dict(backbone.preprocess_cfg, resize_mode=mode, interpolation=interpolation, fill_color=fill)
    transform = open_clip.image_transform(backbone.image_size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          resize_mode=mode, interpolation=interpolation, fill_color=fill)
    return dataclasses.replace(backbone, preprocess=transform, preprocess_cfg=cfg)


def _raw_images(n: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Images of sides 16 to 500 (open_clip's own longest mode fails when a side rounds to 0)."""
    rng = np.random.default_rng(seed)
    sizes = [(int(a), int(b)) for a, b in np.exp(rng.uniform(np.log(16), np.log(500), (n, 2)))]
    return [_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]


def _assert_like_pytorch(path: Path, classifier: Any, images: list[np.ndarray]) -> None:
    runtime = Classifier(path, device="cpu")
    got = runtime.logits(images)
    want = classifier.logits(images)  # PyTorch: open_clip's transform of each decoded image, encode_image, W
    scale = float(classifier.class_weights().norm(dim=1).mean())
    assert np.abs(got - want).max() <= RAW_LOGIT_TOLERANCE * scale
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.fixture(scope="module")
def raw_run(tiny_backbone: Any, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A zero-shot run exported with ``coopkit export --raw-input`` (fp32), verified on the test images."""
    root = tmp_path_factory.mktemp("raw")
    zs = coopkit.zero_shot(tiny_backbone, CLASSES)
    zs.save(root / "run")
    out = CliRunner().invoke(main, ["export", str(root / "run"), "--out", str(root / "model.onnx"), "--raw-input",
                                    "--verify-data", str(image_folder / "test"), "--json"])
    assert out.exit_code == 0, out.output
    return {"classifier": zs, "path": root / "model.onnx", "summary": json.loads(out.output)}


def test_cli_exports_a_verified_raw_input_file(raw_run: dict[str, Any]) -> None:
    s, path = raw_run["summary"], raw_run["path"]
    assert s["input"] == "raw" and s["raw_verified_images"] == 35 + 24  # generated + the task's test images
    assert s["raw_max_pixel_diff"] <= RAW_PIXEL_TOLERANCE and s["raw_top1_agreement"] >= 0.995
    model = onnx.load(os.fspath(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= RAW_INPUT_OPSET
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "height", "width", 3]
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    assert meta.input_kind == "raw" and meta.image_size == (32, 32)
    assert "any size" in model.doc_string


def test_raw_file_answers_like_pytorch_on_images_of_any_size(raw_run: dict[str, Any]) -> None:
    images = _raw_images()
    images += [images[0], images[0][::-1]]  # two of one size: run together
    _assert_like_pytorch(raw_run["path"], raw_run["classifier"], images)


@pytest.mark.parametrize("mode,interpolation,fill", [("longest", "bilinear", 128), ("squash", "bicubic", 0)])
def test_other_resize_modes_export_and_serve(tiny_backbone: Any, tmp_path: Path, mode: str, interpolation: str,
                                             fill: int) -> None:
    zs = coopkit.zero_shot(_variant(tiny_backbone, mode, interpolation, fill), CLASSES)
    result = export_onnx(zs, tmp_path / "m.onnx", raw_input=True)
    assert result.metadata.resize_mode == mode and result.metadata.interpolation == interpolation
    assert result.raw.max_pixel_diff <= RAW_PIXEL_TOLERANCE
    _assert_like_pytorch(result.path, zs, _raw_images(6, seed=1))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_raw_input_quantised_variants(tiny_backbone: Any, tmp_path: Path, precision: str) -> None:
    zs = coopkit.zero_shot(tiny_backbone, CLASSES)
    # int8 calibrates its activation ranges; a zero-shot classifier has no training images to do it on
    calibration = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) if precision == "int8" else None
    result = export_onnx(zs, tmp_path / "m.onnx", precision, raw_input=True, calibration=calibration)
    assert result.raw.max_pixel_diff <= RAW_PIXEL_TOLERANCE and result.raw.top1_agreement >= 0.995
    graph = onnx.load(os.fspath(result.path)).graph
    ops = {n.op_type for n in graph.node}
    assert "If" in ops and (("QuantizeLinear" in ops) if precision == "int8" else ("Cast" in ops))
    images = _raw_images(4, seed=2)
    runtime = Classifier(result.path, device="cpu")
    crops = runtime.preprocess(images)  # Pillow's crops, which the graph passes through unchanged
    np.testing.assert_allclose(runtime.logits(images), runtime.session.run(["logits"], {INPUT_NAME: crops})[0],
                               atol=RAW_LOGIT_TOLERANCE * float(zs.class_weights().norm(dim=1).mean()))


def test_raw_input_refusals(tiny_backbone: Any, tmp_path: Path) -> None:
    zs = coopkit.zero_shot(tiny_backbone, CLASSES)
    with pytest.raises(ValueError, match="opset 18 or newer"):
        export_onnx(zs, tmp_path / "m.onnx", raw_input=True, opset=17)
    nearest = coopkit.zero_shot(dataclasses.replace(
        tiny_backbone, preprocess_cfg=dict(tiny_backbone.preprocess_cfg, interpolation="nearest")), CLASSES)
    with pytest.raises(ValueError, match="bicubic or bilinear"):
        export_onnx(nearest, tmp_path / "m.onnx", raw_input=True)
    assert not any(tmp_path.iterdir())


# --- the runtime with raw-input files ------------------------------------------------------------


def test_bad_inputs_are_converted_or_refused_per_image(raw_run: dict[str, Any], tmp_path: Path) -> None:
    clf = Classifier(raw_run["path"], device="cpu", max_pixels=200_000)
    rgb = _image(60, 45, 1)
    grey, rgba = rgb[:, :, 0], np.concatenate([rgb, np.full((60, 45, 1), 255, np.uint8)], axis=2)
    as_rgb = [np.stack([grey] * 3, axis=-1), rgb]  # what the runtime converts them to
    np.testing.assert_allclose(clf.logits([grey, rgba]), clf.logits(as_rgb), atol=1e-6)
    huge = np.zeros((500, 500, 3), np.uint8)  # 250 000 pixels > max_pixels
    strip = np.zeros((2, 40_000, 3), np.uint8)  # 80 000 pixels, but 32 x 640 000 once resized
    results = clf.predict([rgb, np.zeros((0, 10, 3), np.uint8), huge, rgb[:, :0], strip], errors="skip")
    assert [r.ok for r in results] == [True, False, False, False, False]
    assert "empty image" in results[1].error and "more than 200000 pixels" in results[2].error
    assert "aspect ratio too extreme" in results[4].error and "(2, 40000, 3)" in results[4].error
    with pytest.raises(ImageDecodeError, match="empty image"):
        clf.predict([rgb, np.zeros((4, 0, 3), np.uint8)])
    jpeg = tmp_path / "rotated.jpg"  # EXIF orientation applied before the graph, as for cropped files
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_image(80, 50, 1)).save(jpeg, exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(jpeg)))
    assert upright.shape == (50, 80, 3)
    np.testing.assert_allclose(clf.logits([jpeg]), clf.logits([upright]), atol=1e-6)


def test_cuda_safeguard_and_the_pillow_fallback_path(raw_run: dict[str, Any]) -> None:
    clf = Classifier(raw_run["path"], device="cpu")
    meta = clf.metadata
    assert clf.provider == CPU and clf.input_kind == "raw" and clf.resizes_in_graph and resizes_in_graph(meta, CPU)
    assert not resizes_in_graph(meta, CUDA)  # cubic + antialias: onnxruntime issue 25264
    assert resizes_in_graph(dataclasses.replace(meta, interpolation="bilinear"), CUDA)
    assert not resizes_in_graph(dataclasses.replace(meta, input_kind="cropped"), CPU)
    # the fallback feeds Pillow's crops to the raw graph: the same answers as resizing in the graph
    images = _raw_images(6, seed=3)
    crops = clf.preprocess(images)
    assert crops.shape == (6, 32, 32, 3)
    np.testing.assert_allclose(clf.session.run(["logits"], {INPUT_NAME: crops})[0], clf.logits(images),
                               atol=RAW_LOGIT_TOLERANCE * float(raw_run["classifier"].class_weights().norm(dim=1).mean()))


def test_cli_predict_serves_raw_files(raw_run: dict[str, Any], tmp_path: Path) -> None:
    from coopkit.cli.predict import predict

    paths = []
    for i, (h, w) in enumerate([(90, 60), (17, 300), (90, 60)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(_image(h, w, i)).save(paths[-1])
    expected = Classifier(raw_run["path"], device="cpu").predict(paths, top_k=1)
    out = CliRunner().invoke(predict, [str(raw_run["path"]), *map(str, paths), "--top-k", "1", "--json",
                                       "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["labels"] for line in out.output.strip().splitlines()] == [[r.label] for r in expected]


def test_metadata_input_kind() -> None:
    old = json.dumps({"classnames": ["a", "b"], "image_size": [32, 32], "schema_version": 1})
    assert ModelMetadata.from_json(old).input_kind == "cropped"  # files written before the field
    with pytest.raises(MetadataError, match="input_kind"):
        ModelMetadata(["a"], (32, 32), input_kind="decoded")


def test_gpu_check_section_dry_run_on_the_cpu(raw_run: dict[str, Any], monkeypatch: Any, capsys: Any) -> None:
    """benchmarks/gpu_check_rawgraph.py, with every CUDA step on the CPU (fewer modes and sizes)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_rawgraph.py"
    spec = importlib.util.spec_from_file_location("gpu_check_rawgraph", script)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    monkeypatch.setattr(module, "MODES", module.MODES[:2])
    monkeypatch.setattr(module, "SIZES", [(60, 80), (7, 5), (1, 300)])
    assert module.main(["--device", "cpu", "--no-export", "--model", str(raw_run["path"])]) == 0
    out = capsys.readouterr().out
    assert "| graph shortest/bicubic 224x224 | CPU | CPU | 0 levels |" in out
    assert "model.onnx runtime (in graph)" in out and "agrees with the CPU on all 1 files" in out


def test_triton_repository_of_a_raw_file(raw_run: dict[str, Any], tmp_path: Path, caplog: Any) -> None:
    from coopkit.exporters import write_triton_repository

    with caplog.at_level(logging.WARNING, logger="coopkit"):
        folder = write_triton_repository(raw_run["path"], tmp_path / "repo")
    config = (folder / "config.pbtxt").read_text()
    assert "dims: [ -1, -1, 3 ]" in config  # any height and width
    assert "kind: KIND_CPU" in config and "25264" in caplog.text  # bicubic: CUDA's resize is wrong
