"""coopkit.runtime.engines and engine_choice: every engine answers as the reference engine does
(onnxruntime on the CPU) on every file kind, ``auto`` never picks an engine that disagrees, and its
choice is cached per file, machine and engine version.

The files are real exports of the tiny random-init test backbone (a zero-shot classifier): fp32
with its text graph, fp16, int8, raw input and external data. Engines made to disagree or to fail
are real engines: onnxruntime running a copy of the file whose class weights were rolled, and
OpenVINO asked for a GPU that does not exist.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coopkit
from coopkit.exporters import export_onnx
from coopkit.runtime import Classifier, MetadataError
from coopkit.runtime.engine_choice import CACHE_ENV, choose_engine, machine_info, open_engine
from coopkit.runtime.engines import OnnxruntimeEngine, OpenVINOEngine, Target

onnx = pytest.importorskip("onnx")
#: OpenVINO in the test process: these run in a process of their own (tests/test_openvino_process.py).
pytestmark = pytest.mark.openvino

NAMES = ["red", "green", "blue", "yellow"]
#: Largest probability difference against onnxruntime on the CPU, per file kind (the issue's rule:
#: 1e-5 for fp32 files; fp16 files compute their fp16 ops in fp16 on onnxruntime and in fp32 on
#: OpenVINO; int8 files within the int8 tolerance).
TOLERANCE = {"fp32": 1e-5, "text": 1e-5, "external": 1e-5, "raw": 1e-5, "fused": 1e-5, "fp16": 1e-3, "int8": 1e-2}
KINDS = ("fp32", "fp16", "int8", "raw", "external", "fused")


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


ENGINES = ["onnxruntime"] + (["openvino"] if _has_openvino() else [])
needs_openvino = pytest.mark.skipif(not _has_openvino(), reason="the openvino extra is not installed")


@pytest.fixture(scope="module")
def files(tiny_backbone: Any, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export of the tiny zero-shot classifier per file kind."""
    zs = coopkit.zero_shot(tiny_backbone, NAMES, "a photo of a {}.")
    root = tmp_path_factory.mktemp("engines")
    return {
        "fp32": export_onnx(zs, root / "fp32.onnx", "fp32", with_text_encoder=True).path,
        "fp16": export_onnx(zs, root / "fp16.onnx", "fp16").path,
        "int8": export_onnx(zs, root / "int8.onnx", "int8", calibration=image_folder / "train").path,
        "raw": export_onnx(zs, root / "raw.onnx", "fp32", raw_input=True).path,
        "external": export_onnx(zs, root / "external.onnx", "fp32", size_threshold=0).path,
        "fused": export_onnx(zs, root / "fused.onnx", "fp32", fused_attention=True).path,
    }


@pytest.fixture(scope="module")
def mixed_images(image_folder: Path) -> list[Any]:
    """The task's test images (odd sizes) and two larger generated ones."""
    rng = np.random.default_rng(5)
    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.png"))
    return paths[::2] + [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (41, 33, 3), dtype=np.uint8)]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh engine-choice cache folder for one test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def _assert_same_answers(got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
    """Probabilities within ``tolerance``; the same top-1 wherever the reference's top two are
    more than twice the tolerance apart."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tolerance, np.abs(got - want).max()
    ordered = np.sort(want, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > 2 * tolerance
    assert clear.any()
    np.testing.assert_array_equal(got.argmax(1)[clear], want.argmax(1)[clear])


# --- every engine, every file kind --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_engine_equals_the_reference_on_every_file_kind(files: dict[str, Path], mixed_images: list[Any],
                                                              kind: str, engine: str) -> None:
    ref = Classifier(files[kind], device="cpu")
    clf = Classifier(files[kind], device="cpu", engine=engine)
    assert clf.engine.engine == engine and clf.engine.compute == "fp32" and clf.device == "cpu"
    assert clf.metadata == ref.metadata
    for mine, theirs in ((clf.session.get_inputs(), ref.session.get_inputs()),
                         (clf.session.get_outputs(), ref.session.get_outputs())):
        assert [(n.name, n.type) for n in mine] == [(n.name, n.type) for n in theirs]
        assert [[d if isinstance(d, int) else None for d in n.shape] for n in mine] == \
            [[d if isinstance(d, int) else None for d in n.shape] for n in theirs]
    crops = ref.preprocess(mixed_images)  # (n, H, W, 3): the same graph input for both engines
    tol = TOLERANCE[kind]
    for batch in (crops[:1], crops):
        _, got = clf.run_batch(batch, ("probs", "logits", "image_embeds"))
        _, want = ref.run_batch(batch, ("probs", "logits", "image_embeds"))
        _assert_same_answers(got["probs"], want["probs"], tol)
    # the whole path from image files: on a raw-input file OpenVINO is fed Pillow's crops (its
    # antialiased Resize differs from onnxruntime's), so it answers as the reference graph on crops
    assert clf.resizes_in_graph == (kind == "raw" and engine == "onnxruntime")
    want = ref.probs(mixed_images) if clf.resizes_in_graph or kind != "raw" else ref.session.run(["probs"], {"images": crops})[0]
    _assert_same_answers(clf.probs(mixed_images), want, tol)
    assert [p.label for p in clf.predict(mixed_images, top_k=1)] == [NAMES[i] for i in want.argmax(1)]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_fused_attention_file_answers_as_the_plain_one(files: dict[str, Path], mixed_images: list[Any],
                                                         tiny_backbone: Any, engine: str) -> None:
    """``fused_attention=True``: each vision block's attention is one com.microsoft Attention node
    (heads from the model; plain ops by default), and every engine answers on it as onnxruntime
    does on the plain file."""
    import onnx

    def attention(kind: str) -> list[Any]:
        nodes = onnx.load(os.fspath(files[kind]), load_external_data=False).graph.node
        return [n for n in nodes if n.op_type == "Attention"]

    blocks = tiny_backbone.model.visual.transformer.resblocks
    fused = attention("fused")
    assert len(fused) == len(blocks) and {n.domain for n in fused} == {"com.microsoft"}
    assert {onnx.helper.get_attribute_value(a) for n in fused for a in n.attribute if a.name == "num_heads"} \
        == {blocks[0].attn.num_heads}
    assert not attention("fp32") and not attention("raw")
    plain = Classifier(files["fp32"], device="cpu")
    clf = Classifier(files["fused"], device="cpu", engine=engine)
    crops = plain.preprocess(mixed_images)
    for batch in (crops[:1], crops):
        _assert_same_answers(clf.run_batch(batch, ("probs",))[1]["probs"], plain.run_batch(batch, ("probs",))[1]["probs"],
                             TOLERANCE["fused"])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_text_graph_runs_on_the_image_graph_engine(files: dict[str, Path], mixed_images: list[Any], engine: str) -> None:
    new = ["golden retriever", "fire truck", "x-ray"]
    ref = Classifier(files["fp32"], device="cpu")
    clf = Classifier(files["fp32"], device="cpu", engine=engine)
    np.testing.assert_allclose(clf.text_encoder.class_weights(new), ref.text_encoder.class_weights(new), atol=1e-4, rtol=0)
    assert type(clf.text_encoder.session) is type(clf.session)
    ref.set_classes(new)
    clf.set_classes(new)
    _assert_same_answers(clf.probs(mixed_images), ref.probs(mixed_images), TOLERANCE["text"])


# --- onnxruntime closer to its limit: variants that must not change a bit -----------------------------


@pytest.mark.parametrize("kind", ["fp32", "int8", "raw"])
def test_runtime_variants_give_bitwise_the_same_answers(files: dict[str, Path], mixed_images: list[Any], kind: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """IO binding on the CPU (outputs written into numpy arrays) and onnxruntime's dynamic block base
    (work handed between threads) change where outputs land and which thread runs which block, not
    the arithmetic: the answers are equal bit for bit (benchmarks/bench_engines.py --runtime-variants
    times them)."""
    import onnxruntime as ort

    from coopkit.runtime import classifier
    from coopkit.runtime.session import CPU, run_bound, session_options

    ref = Classifier(files[kind], device="cpu", threads=2)
    crops = ref.preprocess(mixed_images)  # (n, H, W, 3)
    names = ("probs", "logits", "image_embeds")
    monkeypatch.setattr(classifier, "CPU_IO_BINDING", True)  # the switch, as the classifier reads it
    bound = Classifier(files[kind], device="cpu", threads=2)
    assert bound._bound_widths is not None and ref._bound_widths is None  # the bound path runs
    for batch in (crops[:1], crops):
        want = ref.run_batch(batch, names)[1]
        got = bound.run_batch(batch, names)[1]
        for name in names:
            np.testing.assert_array_equal(got[name], want[name])
        outputs = [(n, (len(batch), want[n].shape[1])) for n in names]
        for block in (0, 4):  # onnxruntime's default partitioning, and dynamic blocks
            session = ort.InferenceSession(os.fspath(files[kind]), session_options(2, dynamic_block_base=block),
                                           providers=[CPU])
            for got in (session.run(list(names), {"images": batch}), run_bound(session, {"images": batch}, outputs)):
                for name, value in zip(names, got):
                    np.testing.assert_array_equal(value, want[name])
    assert np.array_equal(bound.probs(mixed_images), ref.probs(mixed_images))  # raw input: decoded images, one run per size
    with pytest.raises(ValueError, match="dynamic_block_base must be an integer >= 0"):
        session_options(2, dynamic_block_base=-1)


# --- compute precision ------------------------------------------------------------------------------


@needs_openvino
def test_openvino_static_batch_models_answer_as_the_dynamic_one(files: dict[str, Path], mixed_images: list[Any]) -> None:
    from coopkit.runtime.engines import OpenVINOSession

    ref = Classifier(files["fp32"], device="cpu")
    crops = ref.preprocess(mixed_images)  # (n, H, W, 3)
    static = OpenVINOSession(files["fp32"], batch_sizes=(4, 1, 4))
    dynamic = OpenVINOSession(files["fp32"])
    assert static.static_batches == (1, 4) and dynamic.static_batches == ()
    assert [n.shape[0] for n in static.get_inputs()] == [None]  # the file's own (dynamic) shapes
    for n in (1, 4, 3, len(crops)):  # static, static, then the dynamic model compiled at first use
        got = static.run(["probs"], {"images": crops[:n]})[0]
        np.testing.assert_allclose(got, dynamic.run(["probs"], {"images": crops[:n]})[0], atol=1e-6, rtol=0)
        _assert_same_answers(got, ref.session.run(["probs"], {"images": crops[:n]})[0], TOLERANCE["fp32"])
    # no static shapes where the input is not crops of one size: a raw-input file, the text graph
    assert OpenVINOSession(files["raw"], batch_sizes=(1, 4)).static_batches == ()
    text = Classifier(files["fp32"], device="cpu", engine="openvino").text_encoder.session
    assert text.static_batches == ()


def _cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@needs_openvino
def test_openvino_computes_fp32_unless_bf16_is_asked(files: dict[str, Path], mixed_images: list[Any]) -> None:
    import openvino as ov

    if not _cpu_has_bf16():
        pytest.skip("this CPU has no bf16 (AVX-512 BF16 or AMX): OpenVINO's default is fp32 here")
    # OpenVINO's own default on this CPU is bf16: what coopkit pins away
    plain = ov.Core().compile_model(os.fspath(files["fp32"]), "CPU")
    assert "bfloat16" in str(plain.get_property("INFERENCE_PRECISION_HINT")).lower()
    ref = Classifier(files["fp32"], device="cpu").probs(mixed_images)
    fp32 = Classifier(files["fp32"], device="cpu", engine="openvino")
    bf16 = Classifier(files["fp32"], device="cpu", engine="openvino", compute="bf16")
    assert (fp32.engine.compute, bf16.engine.compute) == ("fp32", "bf16")
    assert np.abs(fp32.probs(mixed_images) - ref).max() <= 1e-5
    diff = np.abs(bf16.probs(mixed_images) - ref).max()
    assert 1e-5 < diff <= 1e-2  # bf16 really changes the answers, within the bf16 tolerance
    _assert_same_answers(bf16.probs(mixed_images), ref, 1e-2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"engine": "tensorflow"}, "engine 'tensorflow' is not one of"),
    ({"compute": "fp8"}, "compute 'fp8' is not one of"),
    ({"compute": "bf16"}, "needs engine='openvino' or 'auto'"),
    ({"engine": "openvino", "providers": ["CPUExecutionProvider"]}, "providers are onnxruntime's"),
    ({"engine": "openvino", "device": "cuda"}, "device 'cuda' is not one of"),
])
def test_bad_engine_settings_are_named(files: dict[str, Path], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Classifier(files["fp32"], **kwargs)


@needs_openvino
def test_a_file_openvino_cannot_read_is_a_metadata_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model at all")
    with pytest.raises(MetadataError, match="OpenVINO cannot read this model"):
        open_engine(bad, "openvino")


# --- auto: engines that disagree or fail, the cache --------------------------------------------------


class _SlowSession:
    """An onnxruntime session that waits 20 ms before each run: honest, and slower than any other."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, names: Any, feeds: Any) -> Any:
        time.sleep(0.02)
        return self._session.run(names, feeds)


class SlowEngine(OnnxruntimeEngine):
    """onnxruntime on the CPU, made slow; counts how often it opens a file."""

    name = "slow-onnxruntime"

    def __init__(self, version: str = "1") -> None:
        self._version, self.opened = version, 0

    @property
    def version(self) -> str:
        return self._version

    def targets(self, device: str = "auto") -> list[Target]:
        return [Target(self.name, "cpu")]

    def open(self, path: Any, target: Target, compute: str = "fp32", threads: Any = None, spinning: bool = False,
             batch_sizes: Any = ()) -> Any:
        self.opened += 1
        return _SlowSession(super().open(path, Target("onnxruntime", "cpu"), compute, threads, spinning))


class RolledWeightsEngine(OnnxruntimeEngine):
    """onnxruntime on the CPU running a copy of the file whose class weights are rolled by one
    class: fast, and wrong."""

    name = "rolled-weights"

    def targets(self, device: str = "auto") -> list[Target]:
        return [Target(self.name, "cpu")]

    def open(self, path: Any, target: Target, compute: str = "fp32", threads: Any = None, spinning: bool = False,
             batch_sizes: Any = ()) -> Any:
        model = onnx.load(os.fspath(path))
        for tensor in model.graph.initializer:
            values = onnx.numpy_helper.to_array(tensor)
            if values.dtype == np.float32 and values.shape in ((len(NAMES), 64), (64, len(NAMES))):
                axis = values.shape.index(len(NAMES))
                tensor.CopyFrom(onnx.numpy_helper.from_array(np.roll(values, 1, axis=axis), tensor.name))
                break
        else:
            raise AssertionError("no class weight matrix found")
        rolled = Path(path).with_name(f"rolled-{Path(path).name}")
        onnx.save(model, os.fspath(rolled))
        return super().open(rolled, Target("onnxruntime", "cpu"), compute, threads, spinning)


class MissingGPUEngine(OpenVINOEngine):
    """OpenVINO asked for a GPU this machine does not have: it fails to compile."""

    def targets(self, device: str = "auto") -> list[Target]:
        return [Target(self.name, "gpu:7")]


@pytest.mark.parametrize("kind", KINDS)
def test_a_disagreeing_engine_is_never_chosen(files: dict[str, Path], cache: Path, kind: str) -> None:
    slow = SlowEngine()
    choice = choose_engine(files[kind], device="cpu", batch_size=4, engines=[slow, RolledWeightsEngine()],
                           probe_seconds=0.05)
    rolled = choice.measurement("rolled-weights:cpu")
    assert not rolled.eligible and rolled.reason.startswith("disagrees") and rolled.top1_agreement < 1.0
    honest = choice.measurement("slow-onnxruntime:cpu")
    assert honest.eligible and honest.max_prob_diff <= 1e-6 and honest.top1_agreement == 1.0
    assert set(honest.images_per_s) == {"1", "4"} and max(honest.images_per_s.values()) < 4 / 0.02
    assert rolled.score > honest.score  # the wrong engine is the faster one ...
    assert choice.chosen == "slow-onnxruntime:cpu"  # ... and is not chosen


@needs_openvino
def test_an_engine_that_fails_to_load_is_skipped_with_its_reason(files: dict[str, Path], cache: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="coopkit.runtime.engine_choice"):
        choice = choose_engine(files["fp32"], batch_size=4, engines=[OnnxruntimeEngine(), MissingGPUEngine()],
                               probe_seconds=0.05)
    failed = choice.measurement("openvino:gpu:7")
    assert not failed.eligible and failed.reason.startswith("failed to load") and "GPU.7" in failed.reason
    assert choice.chosen == "onnxruntime:cpu"
    assert any("openvino:gpu:7 skipped" in r.getMessage() for r in caplog.records)


def test_the_choice_is_cached_and_measured_again_when_the_file_or_an_engine_changes(
        files: dict[str, Path], cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(files["fp32"].read_bytes())
    slow = SlowEngine(version="1")
    first = choose_engine(path, device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02)
    assert not first.from_cache and slow.opened == 1
    stored = json.loads(Path(first.cache_file).read_text())
    assert Path(first.cache_file).parent == cache / "engines" and stored["chosen"] == "slow-onnxruntime:cpu"
    assert stored["key_fields"]["machine"] == machine_info() and stored["key_fields"]["engines"] == {slow.name: "1"}

    again = choose_engine(path, device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02)
    assert again.from_cache and slow.opened == 1  # nothing measured
    assert again.measurements == first.measurements and again.chosen == first.chosen

    slow._version = "2"  # a new engine version
    assert not choose_engine(path, device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02).from_cache
    assert slow.opened == 2
    model = onnx.load(os.fspath(path))  # the same graph, one more metadata entry: another file
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "note": "edited"})
    onnx.save(model, os.fspath(path))
    assert not choose_engine(path, device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02).from_cache
    assert slow.opened == 3
    assert not choose_engine(path, device="cpu", batch_size=3, engines=[slow], probe_seconds=0.02).from_cache


def test_a_damaged_cache_file_is_measured_again(files: dict[str, Path], cache: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    slow = SlowEngine()
    first = choose_engine(files["int8"], device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02)
    Path(first.cache_file).write_text('{"chosen": "half a')
    with caplog.at_level(logging.WARNING, logger="coopkit.runtime.engine_choice"):
        again = choose_engine(files["int8"], device="cpu", batch_size=2, engines=[slow], probe_seconds=0.02)
    assert not again.from_cache and slow.opened == 2 and "damaged cache file" in caplog.text
    assert json.loads(Path(again.cache_file).read_text())["chosen"] == again.chosen
    assert not [p for p in Path(first.cache_file).parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_classifier_auto_measures_every_installed_engine_once(files: dict[str, Path], mixed_images: list[Any],
                                                              cache: Path) -> None:
    clf = Classifier(files["fp32"], device="cpu", engine="auto", batch_size=4)
    choice = clf.engine.choice
    assert choice is not None and not choice.from_cache and clf.engine.label == choice.chosen
    assert {m.target for m in choice.measurements} == {f"{e}:cpu" for e in ENGINES}
    best = max((m for m in choice.measurements if m.eligible), key=lambda m: m.score)
    assert choice.chosen == best.target and set(best.images_per_s) == {"1", "4"}
    assert clf.engine.to_dict()["auto"]["chosen"] == choice.chosen
    _assert_same_answers(clf.probs(mixed_images), Classifier(files["fp32"], device="cpu").probs(mixed_images), TOLERANCE["fp32"])
    again = Classifier(files["fp32"], device="cpu", engine="auto", batch_size=4)
    assert again.engine.choice.from_cache and again.engine.label == clf.engine.label
    np.testing.assert_array_equal(again.probs(mixed_images), clf.probs(mixed_images))


@needs_openvino
def test_a_cached_choice_that_no_longer_opens_is_measured_again(files: dict[str, Path], cache: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    first = Classifier(files["fp32"], device="cpu", engine="auto", batch_size=2).engine.choice
    stored = json.loads(Path(first.cache_file).read_text())
    gone = {**stored["measurements"][0], "target": "openvino:gpu:7", "compute": "fp32"}  # a device gone since
    Path(first.cache_file).write_text(json.dumps({**stored, "chosen": gone["target"],
                                                  "measurements": stored["measurements"] + [gone]}))
    with caplog.at_level(logging.WARNING, logger="coopkit.runtime.engine_choice"):
        again = Classifier(files["fp32"], device="cpu", engine="auto", batch_size=2)
    assert "the cached choice openvino:gpu:7 no longer opens" in caplog.text
    assert not again.engine.choice.from_cache and again.engine.label in {f"{e}:cpu" for e in ENGINES}
    assert json.loads(Path(first.cache_file).read_text())["chosen"] == again.engine.label  # the cache is put right


def test_devices_are_named_per_engine() -> None:
    from coopkit.runtime.engines import openvino_device

    assert [openvino_device(d) for d in ("auto", "cpu", "gpu", "gpu:1")] == ["CPU", "CPU", "GPU", "GPU.1"]
    for bad in ("cuda", "cuda:0", "cpu:1", "npu"):
        with pytest.raises(ValueError, match="for engine='openvino'"):
            openvino_device(bad)
    assert OnnxruntimeEngine().targets("cpu") == [Target("onnxruntime", "cpu")]
    assert all(t.device.startswith(("cuda:", "tensorrt:")) for t in OnnxruntimeEngine().targets("cuda"))
    if _has_openvino():
        assert OpenVINOEngine().targets("cpu") == [Target("openvino", "cpu")]
        assert all(t.device.startswith("gpu") for t in OpenVINOEngine().targets("gpu"))
