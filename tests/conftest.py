"""The fixtures every test module shares: tiny random-init open_clip models, small image folders,
fitted and exported runs, hand-built ONNX graphs; all offline. Plain helper functions are in helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (
    MULTILABEL_NAMES,
    TINY_CONFIG,
    GraphModel,
    fit_tiny,
    image_graph,
    write_colour_folder,
    write_multilabel_set,
    write_official_layouts,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny open_clip model config (2 layers, width 64); the model name is its stem."""
    path = tmp_path_factory.mktemp("configs") / "coopkit-test-tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config: Path):
    """The tiny model, random init (seeded), on the CPU. Shared: do not modify it."""
    import torch

    import coopkit

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class colour task: ``train/`` (8 per class) and ``test/`` (6 per class)."""
    root = tmp_path_factory.mktemp("colours")
    write_colour_folder(root / "train", 8, seed=0)
    write_colour_folder(root / "test", 6, seed=1)
    return root


@pytest.fixture(scope="session")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$DATA`` with tiny copies of all 15 official layouts (read-only: copy it to modify)."""
    return write_official_layouts(tmp_path_factory.mktemp("official"))



@pytest.fixture(scope="session")
def check_tensors_file_guarded():
    """A check for a saved run's tensors file: a corrupted copy is refused against the config's
    checksum, and a missing one is named, both before anything is built from them."""

    def check(run: Path, tensors_file: str, method: str, backbone) -> None:
        import coopkit

        blob = (run / tensors_file).read_bytes()
        (run / tensors_file).write_bytes(blob[:-4] + b"\0\0\0\0")
        with pytest.raises(ValueError, match=f"{tensors_file} does not match config.json"):
            coopkit.load(run, backbone=backbone)
        (run / tensors_file).unlink()
        with pytest.raises(FileNotFoundError, match=f"{method} run without {tensors_file}"):
            coopkit.load(run, backbone=backbone)

    return check


# --- a fitted run and its export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def coop(tiny_backbone, image_folder):
    """A fitted CoOp classifier (unified context, class name at the end; :func:`helpers.fit_tiny`).
    One per test module: do not modify it."""
    return fit_tiny(tiny_backbone, image_folder)


@pytest.fixture(scope="module")
def exported(coop, image_folder, tmp_path_factory: pytest.TempPathFactory):
    """The fp32 export of ``coop`` with its text graph, verified on the labelled test images (the
    ``ExportReport``; ``.path`` is the image graph). Copy a file before changing it."""
    from coopkit.exporters import export_onnx

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_onnx(coop, out, "fp32", with_text_encoder=True, verify_data=image_folder / "test")


# --- hand-built ONNX graphs (no torch) ------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_model(tmp_path_factory: pytest.TempPathFactory) -> GraphModel:
    """:func:`helpers.image_graph` with its defaults (5 classes, 32x32 images, fp32), in a folder of
    its own: ``(path, params)``, the params for :func:`helpers.reference`."""
    path = tmp_path_factory.mktemp("graph_model") / "model.onnx"
    return GraphModel(path, image_graph(path))


@pytest.fixture(scope="session")
def openai_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny random-init OpenAI-architecture CLIPs, QuickGELU (``True``) and GELU (``False``): what the
    official deep-prompt trainers (IVLP, MaPLe) are compared on."""
    import torch
    from reference.harness import load_tiny, openai_config

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("openai-tiny")
    return {quick: load_tiny(tmp, f"tiny-{'quick' if quick else 'gelu'}", openai_config(quick_gelu=quick))
            for quick in (True, False)}


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (software WebGPU); skipped without it
    (:func:`helpers.require_browser`)."""
    from helpers import BROWSER_TIMEOUT_MS, CHROMIUM_ARGS, chromium_path, require_browser

    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=BROWSER_TIMEOUT_MS)
        yield b
        b.close()


#: Set in the process that runs the tests marked ``openvino`` (tests/test_openvino_process.py).
OPENVINO_PROCESS_ENV = "COOPKIT_OPENVINO_PROCESS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that load OpenVINO in the test process run in a fresh interpreter of their own: OpenVINO's CPU
    plugin crashed the suite's process (SIGSEGV) after torch had trained in it (the CLIP-LoRA tests),
    and passes alone. Here they are skipped; tests/test_openvino_process.py runs them."""
    if os.environ.get(OPENVINO_PROCESS_ENV) == "1":
        return
    skip = pytest.mark.skip(reason="loads OpenVINO: run in a process of its own by tests/test_openvino_process.py")
    for item in items:
        if item.get_closest_marker("openvino"):
            item.add_marker(skip)


# --- coopkit-tiny, a multi-label run (DualCoOp) and its export, the world's multi-label task ------------------

@pytest.fixture(scope="session")
def tiny_resnet():
    """coopkit-tiny with its shipped weights (a ModifiedResNet, so DualCoOp runs on it), on the CPU.
    Shared: do not modify it. Skips (with every test that needs it) where open_clip is not installed: the
    torch-free runtime run of .ci/run."""
    pytest.importorskip("open_clip")
    import coopkit

    return coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device="cpu")


@pytest.fixture(scope="session")
def multilabel_sets(tmp_path_factory: pytest.TempPathFactory):
    """``(train, val)`` multi-label sets of photo-like images of odd sizes over :data:`MULTILABEL_NAMES`."""
    root = tmp_path_factory.mktemp("multilabel")
    return (write_multilabel_set(root, 10, 0, MULTILABEL_NAMES, photos=True),
            write_multilabel_set(root, 16, 1, MULTILABEL_NAMES, photos=True))


@pytest.fixture(scope="session")
def dualcoop_clf(tiny_resnet, multilabel_sets):
    """A fitted DualCoOp classifier whose negative context is then set near its positive one (so that its
    probabilities are not saturated: logits of a few units) and whose per-label thresholds are each label's
    median probability on the val images, so that some labels apply to an image and others do not.
    Shared: do not modify it."""
    import numpy as np
    import torch

    import coopkit

    train, val = multilabel_sets
    clf = coopkit.fit(train, method="dualcoop", backbone=tiny_resnet, epochs=2, n_ctx_pos=4, n_ctx_neg=4,
                      pos_init="a photo of a", neg_init="a photo of no", progress=False)
    learner = clf.model.prompt_learner
    with torch.no_grad():
        noise = torch.randn(learner.ctx_pos.shape, generator=torch.Generator().manual_seed(0))
        learner.ctx_neg.copy_(learner.ctx_pos + 0.1 * noise)
    medians = np.median(clf.probs(val.paths), axis=0)
    clf.model.thresholds.copy_(torch.as_tensor(medians, dtype=torch.float32))
    return clf


@pytest.fixture(scope="session")
def multilabel_export(dualcoop_clf, tmp_path_factory: pytest.TempPathFactory):
    """The verified fp32 export of ``dualcoop_clf`` (the ``ExportReport``; ``.path`` is the file). Copy it
    before changing it."""
    from coopkit.exporters import export_onnx

    return export_onnx(dualcoop_clf, tmp_path_factory.mktemp("ml_export") / "tags.onnx", "fp32")


@pytest.fixture(scope="session")
def multilabel_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small task of the embedded world (its default multi-label task): ``train.csv`` (40 images),
    ``val.csv`` (24), ``test.csv`` (32) and their images (read-only: write another to modify)."""
    from coopkit.embedded import world

    return world.write_multilabel_task(world.DEFAULT_MULTILABEL_TASK, tmp_path_factory.mktemp("multilabel"),
                                       train_images=40, val_images=24, test_images=32, seed=4)
