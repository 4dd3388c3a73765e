"""Every file kind of every method after CoOp, read by every consumer.

CoCoOp, IVLP, MaPLe, PromptSRC and CLIP-LoRA (its adapters merged), each method_runs briefly on the
tiny random-init ViT, exported as fp16, calibrated int8 and raw-input files (each verified
against the PyTorch classifier by the exporter, which raises otherwise), then read by
``coopkit predict``, ``coopkit serve`` (real HTTP on 127.0.0.1), the Ray engine (a local Ray
instance), the Triton model repository (its configs parsed by Triton's own schema, its Python
preprocessing run, the graph step run on its output) and the browser module (``web/coopkit.js``
in headless Chromium). The Python runtime on the same file is the reference every consumer must
agree with; the runtime itself is checked against PyTorch.

The deep-prompt methods' open-vocabulary text graph (``--with-text-encoder``) is checked on class
names the model never saw: class weights equal to PyTorch's for those names, and the same
predictions.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from helpers import BROWSER_TIMEOUT_MS, require_browser, web_site

from coopkit.runtime import Classifier as RuntimeClassifier

#: Each method's quick fit (``coopkit.fit`` keyword arguments besides the data and the backbone).
METHODS = {
    "cocoop": dict(epochs=1, n_views=1),
    "ivlp": dict(epochs=1, prompt_depth_text=2, prompt_depth_vision=2, n_ctx_vision=2),
    "maple": dict(epochs=1, prompt_depth=2),
    "promptsrc": dict(epochs=1, prompt_depth_text=2, prompt_depth_vision=2, gpa_mean=1.0),
    "clip-lora": dict(iters_per_shot=2),
}
#: The methods with learned, class-agnostic text prompts in the first text layers.
DEEP = ("ivlp", "maple", "promptsrc")
#: The file kinds (``export_onnx`` keyword arguments).
KINDS = {"fp16": dict(precision="fp16"), "int8": dict(precision="int8"), "raw": dict(precision="fp32", raw_input=True)}
#: How close a consumer's probabilities must be to the Python runtime's on the same file (the same
#: graph run by another client: only the order of floating-point operations may differ).
PROB_TOLERANCE = 1e-4
#: Class names none of the fits saw (the training classes are colour names).
NEW_NAMES = ["purple", "dark orange", "sky_blue", "a colour nobody named"]


@pytest.fixture(scope="module")
def images(image_folder: Path) -> list[Path]:
    """Four test images, one per class."""
    return [sorted((image_folder / "test" / c).glob("*.png"))[0] for c in sorted(os.listdir(image_folder / "test"))]


@pytest.fixture(scope="module")
def method_runs(tiny_backbone, image_folder) -> dict[str, Any]:
    import coopkit

    return {m: coopkit.fit(image_folder / "train", method=m, backbone=tiny_backbone, shots=2, seed=1, progress=False,
                           **kw) for m, kw in METHODS.items()}


@pytest.fixture(scope="module")
def method_files(method_runs, image_folder, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every (method, kind) file, verified against PyTorch by the exporter (it raises otherwise)."""
    from coopkit.exporters import export_onnx

    root = tmp_path_factory.mktemp("method_files")
    out = {}
    for m, clf in method_runs.items():
        for kind, kw in KINDS.items():
            path = root / f"{m}-{kind}.onnx"
            report = export_onnx(clf, path, verify_data=image_folder / "test", n_verify=4, **kw)
            assert report.image.problems == [] and report.image.finite, (m, kind)
            assert report.metadata.method == m and report.sidecar is not None and report.sidecar.is_file()
            if kind == "raw":
                assert report.raw is not None and report.raw.top1_agreement >= 0.95, (m, report.raw)
            if kind == "int8":
                assert report.int8 is not None
            out[(m, kind)] = path
    return out


def _runtime(path: Path) -> RuntimeClassifier:
    return RuntimeClassifier(path, device="cpu", threads=1)


def _labels(predictions: Any) -> list[str]:
    return [p.label for p in predictions]


# --- the open-vocabulary text graph of the deep-prompt methods ------------------------------------


@pytest.mark.parametrize("method", DEEP)
def test_text_graph_weighs_new_class_names_as_pytorch(method, method_runs, images, tmp_path):
    from coopkit import methods
    from coopkit.exporters import export_onnx

    assert methods.get(method).text_graph
    clf = method_runs[method]
    report = export_onnx(clf, tmp_path / "model.onnx", "fp32", with_text_encoder=True, n_verify=4)
    assert report.text is not None and report.text_path is not None and report.text_path.is_file()
    spec = report.metadata.text_encoder
    assert spec.prompt_template == f"{clf.model.prefix_text} {{}}." and spec.n_ctx == clf.model.classes.n_ctx
    rt = _runtime(report.path)
    new = clf.with_classes(NEW_NAMES)  # PyTorch: the same learned prompts over the new names
    want = new.class_weights().numpy()  # (4, D)
    got = rt.text_encoder.class_weights(NEW_NAMES)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel <= 1e-5, f"{method}: text graph class weights differ from PyTorch's by {rel:.2e} (relative)"
    # the deep prompts matter: without them (the shallow context alone) the weights differ
    shallow = clf.text_context()
    assert len(shallow.deep) >= 1 and not np.allclose(got, clf.backbone.model.logit_scale.exp().item()
                                                      * _plain_context_weights(clf, NEW_NAMES), atol=1e-3)
    rt.set_classes(NEW_NAMES)
    assert rt.classnames == NEW_NAMES
    assert _labels(rt.predict(images, top_k=1)) == _labels(new.predict(images, top_k=1))
    np.testing.assert_allclose(rt.logits(images), new.logits(images), rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _plain_context_weights(clf: Any, names: list[str]) -> np.ndarray:
    """The class features with the learned input context but no deep prompts (normalised)."""
    import torch
    import torch.nn.functional as F

    from coopkit.methods.deep_prompts import ClassPrompts

    classes = ClassPrompts(clf.backbone, names, clf.model.prefix_text, clf.model.classes.n_ctx)
    with torch.no_grad():
        return F.normalize(classes(clf.text_context().ctx).float(), dim=-1).numpy()


def test_cocoop_has_no_text_graph(method_runs, tmp_path):
    from coopkit.exporters import export_onnx

    with pytest.raises(ValueError, match="--with-text-encoder is not available for a cocoop run"):
        export_onnx(method_runs["cocoop"], tmp_path / "model.onnx", "fp32", with_text_encoder=True)
    assert not (tmp_path / "model.onnx").exists()


# --- every consumer -------------------------------------------------------------------------------


def test_runtime_and_predict_read_every_file(method_runs, method_files, images, tmp_path):
    """The runtime on each file against PyTorch, and ``coopkit predict`` against the runtime."""
    from click.testing import CliRunner

    from coopkit.cli.predict import predict

    for (m, kind), path in method_files.items():
        rt = _runtime(path)
        torch_probs = method_runs[m].probs(images)
        probs = rt.probs(images)
        assert probs.shape == torch_probs.shape and np.isfinite(probs).all()
        if kind != "int8":  # fp16 and raw: close to PyTorch's; int8's own criteria were checked at export
            assert np.abs(probs - torch_probs).max() <= 2e-2, (m, kind)
        expected = rt.predict(images, top_k=2)
        res = CliRunner().invoke(predict, [str(path), *map(str, images), "--top-k", "2", "--json", "--device", "cpu",
                                           "--threads", "1"])
        assert res.exit_code == 0, (m, kind, res.output)
        rows = [json.loads(line) for line in res.output.strip().splitlines()]
        assert [r["labels"] for r in rows] == [list(p.labels) for p in expected], (m, kind)
        np.testing.assert_allclose([r["probs"] for r in rows], [p.probs for p in expected], atol=PROB_TOLERANCE)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def test_serve_answers_every_file_over_http(method_files, images):
    """One ``coopkit serve`` child process per file, all started at once, each asked over HTTP."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    servers = {}
    try:
        for key, path in method_files.items():
            port = _port()
            proc = subprocess.Popen([sys.executable, "-m", "coopkit", "serve", str(path), "--port", str(port),
                                     "--device", "cpu", "--threads", "1"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env)
            servers[key] = (proc, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 90
        waiting = dict(servers)
        while waiting and time.monotonic() < deadline:
            for key, (proc, url) in list(waiting.items()):
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    del waiting[key]
                except (urllib.error.URLError, ConnectionError):
                    assert proc.poll() is None, f"{key}: server exited: {proc.stdout.read()}"
            time.sleep(0.2)
        assert not waiting, f"servers not up within 90 s: {sorted(waiting)}"
        blob = _png(images[0])
        for key, (proc, url) in servers.items():
            expected = _runtime(method_files[key]).predict([blob], top_k=3)[0]
            req = urllib.request.Request(url + "/predict?top_k=3", data=blob, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.loads(r.read())
            assert body["labels"] == list(expected.labels), key
            np.testing.assert_allclose(body["probs"], expected.probs, atol=1e-6)
            meta = json.loads(urllib.request.urlopen(url + "/metadata", timeout=10).read())
            assert meta["precision"] == KINDS[key[1]]["precision"], key
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_ray_engine_reads_every_file(method_files, images, tmp_path):
    """``predict_ray`` on a local Ray instance: the rows of the local engine, file by file."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from coopkit.runtime.batch import predict_collection
    from coopkit.runtime.ray_engine import RayConfig, predict_ray

    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, images)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for (m, kind), path in method_files.items():
            local, remote = tmp_path / f"{m}-{kind}-local.jsonl", tmp_path / f"{m}-{kind}-ray.jsonl"
            predict_collection(path, listing, local, progress=False, logits=True, device="cpu")
            summary = predict_ray(path, listing, remote, progress=False, logits=True, batch_size=4,
                                  ray_config=RayConfig(actors=1, cpus_per_actor=1, decode_cpus=0.5))
            assert (summary.rows, summary.errors) == (len(images), 0), (m, kind)
            want = [json.loads(line) for line in local.read_text().splitlines()]
            got = [json.loads(line) for line in remote.read_text().splitlines()]
            assert [r["labels"] for r in got] == [r["labels"] for r in want], (m, kind)
            assert max(np.abs(np.subtract(a["logits"], b["logits"])).max() for a, b in zip(got, want)) <= 1e-5
    finally:
        ray.shutdown()


def test_triton_repository_of_every_file(method_files, images, tmp_path):
    """Each file's Triton model folders: configs valid for Triton's schema, the Python backend's crops
    fed to the repository's graph give the runtime's probabilities."""
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    import importlib.util

    import onnxruntime as ort
    from google.protobuf import text_format

    from coopkit.exporters import write_triton_repository

    blobs = [_png(p) for p in images]
    for (m, kind), path in method_files.items():
        name = f"{m.replace('-', '_')}_{kind}"
        repo = tmp_path / "repo"
        folder = write_triton_repository(path, repo, name, max_batch_size=8)
        configs = {n: text_format.Parse((repo / n / "config.pbtxt").read_text(), pb.ModelConfig())
                   for n in (name, f"{name}_preprocess", f"{name}_ensemble")}
        assert configs[name].platform == "onnxruntime_onnx" and configs[f"{name}_ensemble"].platform == "ensemble"
        spec = importlib.util.spec_from_file_location(f"triton_{name}", repo / f"{name}_preprocess" / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({"model_repository": str(repo / f"{name}_preprocess"), "model_version": "1",
                          "model_config": json.dumps({"name": f"{name}_preprocess"})})
        crops, errors = module.preprocess_batch(np.array([[b] for b in blobs], dtype=object), model.metadata)
        assert errors == [None] * len(blobs), (m, kind, errors)
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        probs = np.concatenate([session.run(["probs"], {"images": crops[i : i + 1]})[0] for i in range(len(crops))])
        want = _runtime(path).probs(blobs)
        assert np.abs(probs - want).max() <= PROB_TOLERANCE, (m, kind)
        assert (repo / name / "labels.txt").read_text().splitlines() == _runtime(path).classnames


# --- the browser module ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def method_site(method_files, images) -> Iterator[dict[str, Any]]:
    """The exported files and the test images, served by examples/web/serve.py on 127.0.0.1."""
    import shutil

    require_browser()
    root = next(iter(method_files.values())).parent
    for i, p in enumerate(images):
        shutil.copy(p, root / f"img{i}.png")
    with web_site(root) as web:
        yield {"url": web.url, "images": [f"/models/img{i}.png" for i in range(len(images))]}


def test_browser_module_reads_every_file(method_files, images, method_site, browser):
    """web/coopkit.js (onnxruntime-web, WebAssembly) in headless Chromium: the runtime's probabilities."""
    page = browser.new_page()
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    first = next(iter(method_files.values())).name
    page.goto(f"{method_site['url']}/examples/web/?model=/models/{first}&backend=wasm")
    try:
        for (m, kind), path in method_files.items():
            got = page.evaluate("""async (arg) => {
                const m = await import('/web/coopkit.js');
                const clf = await m.loadClassifier(arg.model, {backend: 'wasm', threads: 1});
                const rows = await clf.probs(arg.images);
                await clf.dispose();
                return rows.map((r) => Array.from(r));
            }""", {"model": f"/models/{path.name}", "images": method_site["images"]})
            want = _runtime(path).probs(images)
            diff = float(np.abs(np.array(got) - want).max())
            assert diff <= PROB_TOLERANCE, f"{m} {kind}: browser probabilities differ by {diff:.2e}"
    finally:
        page.close()
