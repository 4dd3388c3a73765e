"""The runtime checks the exported file it opens: every metadata field against its metadata_sha256,
class names against the graph's outputs, the class weights and every stored tensor against the digests
written at export (inline or in an external data file), the text graph too. Real exports of the tiny model, edited or damaged, run by real onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coopkit.runtime import Classifier as RuntimeClassifier
from coopkit.runtime import MetadataError


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.parent.glob("model*.onnx"):
        shutil.copy(p, dst / p.name)
    return dst / src.name


def _flip(path: Path, tensor: str, n: int = 400) -> None:
    """Flip ``n`` bytes inside the stored data of one initializer (found by the onnx package)."""
    import onnx

    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == tensor)
    data = bytearray(init.raw_data)
    for i in range(0, min(n, len(data))):
        data[i] ^= 0x5A
    blob = path.read_bytes()
    start = blob.index(init.raw_data)
    path.write_bytes(blob[:start] + bytes(data) + blob[start + len(data):])


def _set_metadata(path: Path, *, reseal: bool = True, drop: tuple[str, ...] = (), **changes: Any) -> None:
    """Edit the coopkit metadata of an exported file; ``reseal``: recompute its metadata_sha256, as
    a writer that seals whatever it writes would (so the checks behind that one are reached)."""
    import onnx

    from coopkit.runtime.contract import METADATA_KEY, metadata_checksum

    model = onnx.load(str(path))
    entry = next(e for e in model.metadata_props if e.key == METADATA_KEY)
    meta = json.loads(entry.value)
    meta.update(changes)
    for key in drop:
        meta.pop(key, None)
    if reseal and "metadata_sha256" in meta:
        meta["metadata_sha256"] = metadata_checksum(meta)
    entry.value = json.dumps(meta)
    onnx.save(model, str(path))


def test_class_names_edited_inside_an_exported_file_are_refused(exported, tmp_path):
    """The issue's case: the class names of an exported file reversed in its metadata (same count,
    so every width still fits) were served without complaint; the metadata checksum refuses them."""
    names = RuntimeClassifier(exported.path, device="cpu").classnames
    path = _copy_export(exported.path, tmp_path / "m")
    _set_metadata(path, reseal=False, classnames=list(reversed(names)))
    with pytest.raises(MetadataError, match="metadata changed after export"):
        RuntimeClassifier(path, device="cpu")


def test_every_answer_changing_metadata_field_is_under_the_checksum(exported, tmp_path, caplog):
    """The general rule: an edit to any field of the metadata (each one that changes an answer,
    and a field this version does not know) is refused; a file without metadata_sha256 (as 0.2.0
    wrote them) opens with a warning naming what cannot be verified, and strict=True refuses it."""
    import logging

    meta = RuntimeClassifier(exported.path, device="cpu").metadata
    edits = {
        "classnames": list(reversed(meta.classnames)), "image_size": [24, 24], "mean": [0.5, 0.5, 0.5],
        "std": [0.2, 0.2, 0.2], "resize_mode": "squash", "interpolation": "bilinear", "fill_color": 128,
        "logit_bias": -3.0, "method": "zeroshot", "prompt": {**meta.prompt, "class_token_position": "front"},
        "precision": "fp16", "input_kind": "raw", "embed_dim": meta.embed_dim + 1, "pretrained": "other.pt",
        "resize_plan": None, "text_encoder": None, "a_field_of_a_newer_schema": 1,
    }
    for i, (key, value) in enumerate(edits.items()):
        path = _copy_export(exported.path, tmp_path / f"edit{i}")
        _set_metadata(path, reseal=False, **{key: value})
        with pytest.raises(MetadataError, match="metadata changed after export"):
            RuntimeClassifier(path, device="cpu")
    path = _copy_export(exported.path, tmp_path / "unsealed")
    _set_metadata(path, drop=("metadata_sha256",))
    with caplog.at_level(logging.WARNING, logger="coopkit.runtime"):
        clf = RuntimeClassifier(path, device="cpu")
    assert clf.classnames == meta.classnames
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "records no metadata_sha256" in text and "class names, templates, input size, mean and std" in text
    with pytest.raises(MetadataError, match="records no metadata_sha256"):
        RuntimeClassifier(path, device="cpu", strict=True)
    RuntimeClassifier(exported.path, device="cpu", strict=True)  # a sealed file opens under strict


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a", "b", "c", "d", "e", "f"]])
def test_runtime_refuses_a_graph_wider_or_narrower_than_its_class_names(exported, tmp_path, names):
    path = _copy_export(exported.path, tmp_path / "m")
    _set_metadata(path, classnames=names)
    with pytest.raises(MetadataError, match=rf"'logits' output is 4 wide but the metadata has {len(names)} class names"):
        RuntimeClassifier(path, device="cpu")


def test_runtime_detects_flipped_bytes_in_the_weights(coop, exported, tmp_path):
    clean = RuntimeClassifier(exported.path, device="cpu")
    path = _copy_export(exported.path, tmp_path / "head")
    _flip(path, "head.scorer.weights_t")
    with pytest.raises(MetadataError, match="the class weights do not match the weights_sha256"):
        RuntimeClassifier(path, device="cpu", check_tensors=False)  # the cheap check runs anyway
    path = _copy_export(exported.path, tmp_path / "encoder")
    import onnx

    biggest = max(onnx.load(str(path)).graph.initializer, key=lambda i: len(i.raw_data)).name
    _flip(path, biggest)
    with pytest.raises(MetadataError, match="the stored tensors do not match the tensors_sha256"):
        RuntimeClassifier(path, device="cpu")
    unchecked = RuntimeClassifier(path, device="cpu", check_tensors=False)  # the documented opt-out
    crops = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert not np.allclose(unchecked.logits(crops), clean.logits(crops), atol=1e-3)  # why it matters


def test_runtime_checks_tensors_kept_in_an_external_data_file(coop, tmp_path):
    from coopkit.exporters import export_onnx

    res = export_onnx(coop, tmp_path / "big.onnx", "fp32", size_threshold=0, n_verify=2)
    assert res.external_data
    crops = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(RuntimeClassifier(res.path, device="cpu").logits(crops), coop.logits(list(crops)),
                               atol=1e-4)  # the class weights were found and hashed in big.onnx.data
    data = tmp_path / "big.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit
    data.write_bytes(bytes(blob))
    with pytest.raises(MetadataError, match="the stored tensors do not match"):
        RuntimeClassifier(res.path, device="cpu")


@pytest.mark.parametrize("shape,transposed", [((3, 5), False), ((5, 3), True), ((4, 4), True), ((4, 4), False)])
def test_class_weight_reader_finds_the_matrix_either_way_round(tmp_path, shape, transposed):
    """The protobuf reader against the onnx package: a (n_classes, embed_dim) matrix stored as
    it is or transposed (as the exporter stores ``x W^T``), square ones included, among other tensors."""
    import onnx
    from onnx import helper, numpy_helper

    from coopkit.runtime.integrity import class_weights_sha256, tensors_sha256

    n_classes, embed_dim = (shape[1], shape[0]) if transposed else shape
    w = np.random.default_rng(0).normal(size=(n_classes, embed_dim)).astype(np.float32)
    stored = w.T.copy() if transposed else w
    inits = [numpy_helper.from_array(np.ones((7,), np.float32), "other"), numpy_helper.from_array(stored, "w")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert hashlib.sha256(w.tobytes()).hexdigest() in class_weights_sha256(path, n_classes, embed_dim)
    expected = hashlib.sha256(b"coopkit tensors v1\n")
    for init in onnx.load(str(path)).graph.initializer:
        expected.update(init.SerializeToString())
    assert tensors_sha256(path) == expected.hexdigest()


def test_runtime_detects_a_damaged_text_graph(exported, tmp_path):
    import onnx

    path = _copy_export(exported.path, tmp_path / "m")
    text = path.parent / "model.text.onnx"
    _flip(text, max(onnx.load(str(text)).graph.initializer, key=lambda i: len(i.raw_data)).name, 40)
    clf = RuntimeClassifier(path, device="cpu")
    with pytest.raises(MetadataError, match="model.text.onnx: the stored tensors do not match"):
        clf.set_classes(["cat", "dog"])
