"""The Triton model repository: the ensemble's layout and configs checked against Triton's own
schema (``model_config.proto`` as shipped in tritonclient), and its Python-backend
preprocessing run directly. No Triton server exists here, so ``execute`` itself is not run."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402
from helpers import image_graph, photo  # noqa: E402

from coopkit.exporters import write_triton_repository  # noqa: E402
from coopkit.runtime import Classifier  # noqa: E402

MC = model_config_pb2.ModelConfig


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("triton")
    image_graph(root / "clf.onnx", image_size=(32, 40))
    write_triton_repository(root / "clf.onnx", root / "repo", max_batch_size=16)
    return {"root": root, "repo": root / "repo", "model": root / "clf.onnx"}


def _config(folder: Path) -> Any:
    """config.pbtxt parsed strictly by protobuf against Triton's ModelConfig (unknown fields fail)."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), MC())


def _tensors(entries: Any) -> dict[str, tuple[int, list[int]]]:
    return {e.name: (e.data_type, list(e.dims)) for e in entries}


def test_layout_and_configs_follow_tritons_schema(repo: dict[str, Any]) -> None:
    r = repo["repo"]
    assert sorted(p.name for p in r.iterdir()) == ["clf", "clf_ensemble", "clf_preprocess"]
    graph, pre, ens = _config(r / "clf"), _config(r / "clf_preprocess"), _config(r / "clf_ensemble")
    assert (r / "clf" / "1" / "model.onnx").is_file() and (r / "clf_ensemble" / "1").is_dir()
    assert (graph.platform, pre.backend, ens.platform) == ("onnxruntime_onnx", "python", "ensemble")
    assert not graph.parameters and not ens.parameters and not (r / "clf" / "thresholds.txt").exists()  # single-label
    assert [c.name for c in (graph, pre, ens)] == ["clf", "clf_preprocess", "clf_ensemble"]  # names = folders
    assert {c.max_batch_size for c in (graph, pre, ens)} == {16}
    assert graph.HasField("dynamic_batching") and pre.HasField("dynamic_batching")
    assert pre.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    # the Python model: model.py in the version folder, with Triton's entry points
    tree = ast.parse((r / "clf_preprocess" / "1" / "model.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel")
    assert {"initialize", "execute"} <= {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
    # the ensemble: bytes in, each step's maps name real tensors of its model, types and shapes chain
    models = {"clf": graph, "clf_preprocess": pre}
    available = _tensors(ens.input)
    assert available == {"IMAGE_BYTES": (model_config_pb2.TYPE_STRING, [1])}
    for step in ens.ensemble_scheduling.step:
        model = models[step.model_name]
        ins, outs = _tensors(model.input), _tensors(model.output)
        assert set(step.input_map) == set(ins) and set(step.output_map) <= set(outs)
        for key, tensor in step.input_map.items():
            assert available[tensor] == ins[key], (step.model_name, key)
        for key, tensor in step.output_map.items():
            available[tensor] = outs[key]
    for out in ens.output:
        assert available[out.name] == (out.data_type, list(out.dims))
    assert _tensors(pre.output)["images"] == (model_config_pb2.TYPE_UINT8, [32, 40, 3]) == _tensors(graph.input)["images"]
    labels = (r / "clf_ensemble" / next(o.label_filename for o in ens.output if o.label_filename)).read_text()
    assert labels.splitlines() == Classifier(repo["model"], device="cpu").classnames


def _load_model_py(repo: dict[str, Any]) -> Any:
    spec = importlib.util.spec_from_file_location("triton_model_py", repo["repo"] / "clf_preprocess" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_backend_preprocessing_feeds_the_graph_like_the_runtime(repo: dict[str, Any]) -> None:
    module = _load_model_py(repo)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo["repo"] / "clf_preprocess"), "model_version": "1",
                      "model_config": json.dumps({"name": "clf_preprocess"})})
    blobs = []
    for i, fmt in enumerate(["JPEG", "PNG", "PNG"]):
        buf = io.BytesIO()
        Image.fromarray(photo(50 + 7 * i, 45, seed=i)).save(buf, fmt)
        blobs.append(buf.getvalue())
    batch = np.array([[b] for b in blobs + [b"broken"]], dtype=object)  # (n, 1), as Triton hands TYPE_STRING
    images, errors = module.preprocess_batch(batch, model.metadata)
    clf = Classifier(repo["model"], device="cpu")
    assert images.dtype == np.uint8 and images.shape == (4, 32, 40, 3)
    np.testing.assert_array_equal(images[:3], clf.preprocess(blobs))
    assert errors[:3] == [None] * 3 and "cannot decode" in errors[3]
    # the graph step of the ensemble on these crops gives what the runtime predicts
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo["repo"] / "clf" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["probs"], {"images": images[:3]})[0]
    np.testing.assert_allclose(probs, clf.probs(blobs), atol=1e-6)


def test_a_multilabel_file_carries_its_task_and_thresholds(multilabel_export: Any, dualcoop_clf: Any,
                                                          multilabel_sets: Any, tmp_path: Path) -> None:
    """The graph's and the ensemble's configs (Triton's schema, strictly) say multilabel and hold the thresholds;
    thresholds.txt lists them beside labels.txt; the preprocessing model stretches as DualCoOp does, and the
    graph on its crops gives the PyTorch classifier's own sigmoid probabilities."""
    _, val = multilabel_sets
    final = write_triton_repository(multilabel_export.path, tmp_path / "repo", name="tags")
    thresholds = [float(t) for t in dualcoop_clf.thresholds]
    for folder in (final, tmp_path / "repo" / "tags_ensemble"):
        params = {k: v.string_value for k, v in _config(folder).parameters.items()}
        assert params["coopkit_task"] == "multilabel" and json.loads(params["coopkit_thresholds"]) == thresholds
        assert (folder / "labels.txt").read_text().splitlines() == dualcoop_clf.classnames
        assert [float(x) for x in (folder / "thresholds.txt").read_text().split()] == thresholds
    pre = tmp_path / "repo" / "tags_preprocess"
    from coopkit.runtime.triton_model import preprocess_batch
    from coopkit.runtime.contract import ModelMetadata

    meta = ModelMetadata.from_json((pre / "metadata.json").read_text())
    assert meta.task == "multilabel" and meta.thresholds == thresholds
    blobs = np.array([[Path(p).read_bytes()] for p in val.paths[:3]], dtype=object)
    images, errors = preprocess_batch(blobs, meta)
    assert errors == [None] * 3 and images.shape == (3, 64, 64, 3)
    import onnxruntime as ort

    session = ort.InferenceSession(str(final / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["probs"], {"images": images})[0], dualcoop_clf.probs(val.paths[:3]),
                               atol=1e-5)
