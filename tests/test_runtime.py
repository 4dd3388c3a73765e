"""coopkit.runtime without torch: real ONNX graphs (built with onnx.helper) run by real onnxruntime.

Needs only numpy, Pillow, onnx, onnxruntime and pytest, so it also runs in a clean virtual
environment where coopkit is installed without torch. The expected logits are computed
independently in numpy from the same random weights the graphs hold.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from helpers import (  # noqa: E402
    CLASSES,
    LOGIT_SCALE,
    GraphModel,
    image_graph,
    onnx_model,
    photo,
    reference,
    text_graph,
    text_reference,
)

from coopkit.runtime import Classifier, ImageDecodeError, MetadataError, ModelMetadata, Prediction  # noqa: E402
from coopkit.runtime.preprocess import load_image, preprocess, resize_and_crop  # noqa: E402
from coopkit.runtime.session import CPU, CUDA, cuda_device_count, create_session  # noqa: E402
from coopkit.runtime.tokenizers.cleaning import clean_text  # noqa: E402
from coopkit.runtime.tokenizers.clip_bpe import ClipTokenizer, split_words  # noqa: E402


# --- fixtures: the hand-built graphs of helpers.py ----------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime_models")


@pytest.fixture(scope="module")
def clf(graph_model: GraphModel) -> Classifier:
    return Classifier(graph_model.path, device="cpu", threads=1, batch_size=4)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Ten images already at the graph's size, so preprocessing leaves them unchanged."""
    return np.stack([photo(32, 32, seed=i) for i in range(10)])


# --- classifier: outputs against numpy -----------------------------------------------------------


def test_logits_probs_embeds_match_numpy(clf: Classifier, graph_model: GraphModel, crops: np.ndarray) -> None:
    ref = reference(crops, graph_model.params)
    np.testing.assert_allclose(clf.logits(crops), ref["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(clf.probs(crops), ref["probs"], rtol=1e-4, atol=1e-6)
    embeds = clf.embed(crops)
    np.testing.assert_allclose(embeds, ref["image_embeds"], rtol=1e-4, atol=1e-5)
    assert embeds.dtype == np.float32 and embeds.shape == (10, 16)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)


def test_predict_top_k_best_first(clf: Classifier, graph_model: GraphModel, crops: np.ndarray) -> None:
    ref = reference(crops, graph_model.params)["probs"]
    results = clf.predict(list(crops), top_k=3)
    assert len(results) == 10 and all(isinstance(r, Prediction) and r.ok for r in results)
    for i, r in enumerate(results):
        order = np.argsort(-ref[i])[:3]
        assert list(r.labels) == [CLASSES[j] for j in order]
        np.testing.assert_allclose(r.probs, ref[i][order], rtol=1e-4, atol=1e-6)
        assert list(r.probs) == sorted(r.probs, reverse=True)
        assert r.label == r.labels[0] and r.prob == r.probs[0] and r.index == i
    assert len(clf.predict(crops[0], top_k=99)[0].labels) == len(CLASSES)  # capped at n_classes
    assert clf.classnames == CLASSES


def test_mixed_inputs_give_the_same_answer(clf: Classifier, tmp_path: Path) -> None:
    arr = photo(57, 41, seed=3)
    png = tmp_path / "img.png"
    Image.fromarray(arr).save(png)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    inputs = [str(png), png, buf.getvalue(), Image.fromarray(arr), arr, np.concatenate([arr, np.full((41, 57, 1), 255, np.uint8)], axis=2)]
    logits = clf.logits(inputs)
    assert logits.shape == (len(inputs), len(CLASSES))
    for row in logits[1:]:
        np.testing.assert_array_equal(row, logits[0])
    single = clf.predict(str(png))  # one image, not a list: still a list of one result
    assert len(single) == 1 and single[0].source == str(png)


def test_batches_of_any_size_agree(graph_model: GraphModel, crops: np.ndarray) -> None:
    one = Classifier(graph_model.path, device="cpu", batch_size=1, workers=1).logits(crops)
    three = Classifier(graph_model.path, device="cpu", batch_size=3, workers=3).logits(list(crops))
    np.testing.assert_allclose(one, three, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one, reference(crops, graph_model.params)["logits"], rtol=1e-4, atol=1e-4)


def test_static_batch_graph_is_padded(model_dir: Path, crops: np.ndarray) -> None:
    path = model_dir / "static.onnx"
    params = image_graph(path, batch=4)
    c = Classifier(path, device="cpu", batch_size=32)
    assert c.batch_size == 4
    np.testing.assert_allclose(c.logits(crops[:6]), reference(crops[:6], params)["logits"], rtol=1e-4, atol=1e-4)


def test_preprocess_method_returns_the_graph_input(clf: Classifier, tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.fromarray(photo(70, 50)).save(path)
    batch = clf.preprocess([path, photo(20, 90)])
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], preprocess(path, (32, 32)))
    np.testing.assert_allclose(clf.logits([path]), clf.logits(batch[:1]), rtol=1e-6)


def test_zero_images(clf: Classifier) -> None:
    assert clf.predict([]) == []
    assert clf.logits([]).shape == (0, len(CLASSES))
    assert clf.embed([]).shape == (0, 16)


def test_io_binding_path_matches_plain_run(graph_model: GraphModel, crops: np.ndarray) -> None:
    # the CUDA path uses IO binding; the same code runs (and is checked) on the CPU provider
    c = Classifier(graph_model.path, device="cpu")
    plain = c.logits(crops)
    c.use_io_binding = True
    np.testing.assert_array_equal(c.logits(crops), plain)
    assert [r.labels for r in c.predict(crops)] == [r.labels for r in Classifier(graph_model.path, device="cpu").predict(crops)]


def test_thread_safe_results_identical_to_sequential(graph_model: GraphModel) -> None:
    c = Classifier(graph_model.path, device="cpu", batch_size=4, workers=2)
    # images of different sizes, so the resizing runs too
    jobs = [[photo(40 + i, 30 + 2 * i, seed=10 * t + i) for i in range(5)] for t in range(16)]
    sequential = [c.logits(j) for j in jobs]
    results: list[Optional[np.ndarray]] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for idx in range(k, len(jobs), 8):
                for _ in range(3):
                    out = c.logits(jobs[idx])
                    if results[idx] is not None and not np.array_equal(results[idx], out):
                        raise AssertionError("result changed between calls")
                    results[idx] = out
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential):
        np.testing.assert_array_equal(got, want)


# --- preprocessing -------------------------------------------------------------------------------


def test_shortest_edge_crop_arithmetic() -> None:
    # x-ramp image 128x64; nearest downscale by 2 samples source column 2j+1; the centre crop of
    # the 64x32 result starts at column round((64-32)/2) = 16
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[..., 0] = np.arange(128, dtype=np.uint8)[None, :]
    arr[..., 1] = np.arange(64, dtype=np.uint8)[:, None]
    out = resize_and_crop(Image.fromarray(arr), (32, 32), "shortest", "nearest")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], 2 * (np.arange(32) + 16) + 1)
    np.testing.assert_array_equal(out[:, 0, 1], 2 * np.arange(32) + 1)


def test_longest_pads_with_fill_color_and_squash_stretches() -> None:
    img = Image.fromarray(np.full((20, 80, 3), 200, np.uint8))  # 80 wide, 20 high
    out = resize_and_crop(img, (32, 32), "longest", "bilinear", fill_color=7)
    # long side 80 -> 32, short 20 -> round(20/2.5) = 8; padded (32-8)//2 = 12 rows on top
    assert (out[:12] == 7).all() and (out[20:] == 7).all() and (out[12:20] == 200).all()
    squashed = resize_and_crop(img, (24, 16), "squash")
    assert squashed.shape == (24, 16, 3) and (squashed == 200).all()
    tall = resize_and_crop(Image.fromarray(photo(30, 90)), (40, 20), "shortest")  # non-square target
    assert tall.shape == (40, 20, 3)


def test_small_images_are_upscaled_and_odd_modes_converted(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.fromarray(photo(9, 13)[..., 0], mode="L").save(grey)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([photo(50, 30), np.full((30, 50, 1), 128, np.uint8)], axis=2), mode="RGBA").save(rgba)
    for src in (grey, rgba, np.zeros((5, 7), np.uint8), np.zeros((5, 7, 1), np.uint8)):
        out = preprocess(src, (32, 32))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    g = preprocess(grey, (32, 32))
    np.testing.assert_array_equal(g[..., 0], g[..., 1])


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    arr = photo(60, 20)  # landscape pixels, EXIF says rotate 90 degrees: a portrait image
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    assert load_image(path).size == (20, 60)
    upright = load_image(path)
    np.testing.assert_array_equal(preprocess(path, (32, 32)), resize_and_crop(upright, (32, 32)))


# --- bad input -----------------------------------------------------------------------------------


def test_unreadable_image_named_and_skipped(clf: Classifier, tmp_path: Path, crops: np.ndarray) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        clf.predict([crops[0], broken])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        clf.logits([missing])
    inputs = [crops[0], broken, crops[1], missing, b"garbage", crops[2]]
    results = clf.predict(inputs, errors="skip")
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    assert "broken.jpg" in results[1].error and "missing.png" in results[3].error and "bytes" in results[4].error
    assert results[1].labels == () and results[1].label is None and results[1].to_dict()["error"]
    expected = clf.predict([crops[0], crops[1], crops[2]])
    assert [r.labels for r in results if r.ok] == [r.labels for r in expected]
    assert [r.index for r in results] == list(range(6))
    (only_bad,) = clf.predict([broken], errors="skip")  # a batch with nothing readable
    assert not only_bad.ok and only_bad.source == str(broken)
    with pytest.raises(ValueError, match="errors"):
        clf.predict([crops[0]], errors="ignore")
    with pytest.raises(ValueError, match="top_k"):
        clf.predict([crops[0]], top_k=0)
    with pytest.raises(ImageDecodeError, match="float32"):
        clf.predict([crops[0].astype(np.float32)])
    with pytest.raises(ImageDecodeError, match="unsupported"):
        clf.predict([12345])


def test_decompression_bomb_refused(clf: Classifier, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90 Mpx of zeros: a few kB on disk
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageDecodeError, match="bomb|pixels"):
        clf.predict([bomb])
    small = Classifier(clf.path, device="cpu", max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="pixels"):
        small.predict([np.zeros((40, 40, 3), np.uint8)])


def test_missing_and_non_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        Classifier(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \x00\x01\x02" * 10)
    with pytest.raises(MetadataError, match="junk.onnx"):
        Classifier(junk, device="cpu")


def test_onnx_without_coopkit_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx_model(graph, None), str(path))
    with pytest.raises(MetadataError, match="not a coopkit model"):
        Classifier(path, device="cpu")


def test_newer_schema_and_broken_metadata_refused(model_dir: Path) -> None:
    path = model_dir / "future.onnx"
    image_graph(path)
    model = onnx.load(str(path))
    raw = json.loads(model.metadata_props[0].value)
    raw["schema_version"] = 99
    del model.metadata_props[:]
    helper.set_model_props(model, {"coopkit": json.dumps(raw)})
    onnx.save(model, str(path))
    with pytest.raises(MetadataError, match="schema version 99.*upgrade"):
        Classifier(path, device="cpu")
    helper.set_model_props(model, {"coopkit": "{not json"})
    del model.metadata_props[:-1]
    onnx.save(model, str(path))
    with pytest.raises(MetadataError, match="not valid JSON"):
        Classifier(path, device="cpu")


def test_graph_breaking_the_contract_refused(model_dir: Path) -> None:
    path = model_dir / "wrong_size.onnx"
    meta = ModelMetadata(classnames=CLASSES, image_size=(64, 64), embed_dim=16)
    image_graph(path, image_size=(32, 32), meta=meta)
    with pytest.raises(MetadataError, match="image_size"):
        Classifier(path, device="cpu")


# --- devices -------------------------------------------------------------------------------------


def _cuda_works(path: Path) -> bool:
    """Whether onnxruntime really runs ``path`` on a GPU here (asked through the driver first)."""
    if cuda_device_count()[0] == 0:
        return False
    try:
        return create_session(path, device="cuda").get_providers()[0] == CUDA
    except RuntimeError:
        return False


def test_cpu_and_auto_report_the_real_provider(graph_model: GraphModel) -> None:
    assert Classifier(graph_model.path, device="cpu").provider == CPU
    auto = Classifier(graph_model.path, device="auto")
    assert auto.provider == auto.session.get_providers()[0]
    assert auto.provider == (CUDA if _cuda_works(graph_model.path) else CPU)
    assert auto.device == ("cuda" if auto.provider == CUDA else "cpu")
    assert Classifier(graph_model.path, providers=["CPUExecutionProvider"]).provider == CPU


def test_bad_device_and_provider_names(graph_model: GraphModel) -> None:
    with pytest.raises(ValueError, match="device 'tpu'"):
        Classifier(graph_model.path, device="tpu")
    with pytest.raises(ValueError, match="NopeExecutionProvider"):
        Classifier(graph_model.path, providers=["NopeExecutionProvider"])
    with pytest.raises(ValueError, match="threads"):
        Classifier(graph_model.path, device="cpu", threads=0)


def test_cuda_requested_without_cuda_raises_clearly(graph_model: GraphModel) -> None:
    if _cuda_works(graph_model.path):
        pytest.skip("CUDA works here: the error path cannot be provoked")
    with pytest.raises(RuntimeError, match="CUDA cannot run here"):
        Classifier(graph_model.path, device="cuda")


def test_auto_on_a_machine_without_gpu_prints_nothing(graph_model: GraphModel) -> None:
    if cuda_device_count()[0]:
        pytest.skip("a GPU is present")
    code = (
        "import sys; from coopkit.runtime import Classifier; "
        f"c = Classifier({str(graph_model.path)!r}); print(c.provider)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == CPU
    assert proc.stderr == "", proc.stderr


@pytest.mark.gpu
def test_cuda_matches_cpu(graph_model: GraphModel, crops: np.ndarray) -> None:
    if not _cuda_works(graph_model.path):
        pytest.skip("no usable CUDA GPU")
    gpu = Classifier(graph_model.path, device="cuda")
    if gpu.provider != CUDA:
        pytest.skip(f"CUDA provider did not start ({gpu.provider})")
    assert gpu.use_io_binding
    cpu = Classifier(graph_model.path, device="cpu")
    np.testing.assert_allclose(gpu.logits(crops), cpu.logits(crops), rtol=1e-3, atol=1e-3)
    assert create_session(graph_model.path, device="cuda").get_providers()[0] == CUDA


# --- set_classes through a text graph ------------------------------------------------------------


def test_tokenizer_golden_ids() -> None:
    # ids from open_clip.tokenize (an independent implementation), copied here
    tok = ClipTokenizer()
    golden = {
        "a photo of a dog.": [49406, 320, 1125, 539, 320, 1929, 269, 49407],
        "Golden Retriever": [49406, 3878, 28394, 49407],
        "it's a café!": [49406, 585, 568, 320, 15304, 256, 49407],
        "X X X X sea turtle.": [49406, 343, 343, 343, 343, 2102, 10912, 269, 49407],
        "東京": [49406, 48338, 21078, 361, 49407],
    }
    ids = tok(list(golden))
    assert ids.dtype == np.int64 and ids.shape == (5, 77)
    for row, want in zip(ids, golden.values()):
        assert row[: len(want)].tolist() == want and not row[len(want) :].any()
    long = tok(["word " * 200])[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == tok.encode("word")[0]).all()
    assert split_words(clean_text("  It's  “ＦＵＬＬ” ﬁsh&amp;chips 42 ")) == [
        "it", "'s", '"', "full", '"', "fish", "&", "chips", "4", "2",
    ]  # fmt: skip
    assert tok.decode(tok.encode("a photo of a dog.")).strip() == "a photo of a dog ."


@pytest.fixture(scope="module")
def text_model(model_dir: Path) -> dict[str, Any]:
    tok = ClipTokenizer()
    table = text_graph(model_dir / "text.onnx")
    weights = text_reference(table, tok([f"X X {c}." for c in CLASSES])).astype(np.float32)
    path = model_dir / "with_text.onnx"
    te = {"file": "text.onnx", "context_length": 77, "sot_token_id": 49406, "eot_token_id": 49407,
          "prompt_suffix": ".", "prompt_template": "X X {}.", "vocab": "clip_bpe_49408"}  # fmt: skip
    params = image_graph(path, weights=weights, text_encoder=te)
    return {"path": path, "params": params, "table": table, "tok": tok}


def test_set_classes_recomputes_weights(text_model: dict[str, Any], crops: np.ndarray) -> None:
    c = Classifier(text_model["path"], device="cpu")
    before = c.logits(crops)
    names = ["hot_air_balloon", "submarine", "Ångström meter"]
    c.set_classes(names)
    assert c.classnames == names
    prompts = ["X X hot air balloon.", "X X submarine.", "X X Ångström meter."]  # "_" read as a space
    new_w = text_reference(text_model["table"], text_model["tok"](prompts))
    ref = reference(crops, text_model["params"], weights=new_w)
    np.testing.assert_allclose(c.logits(crops), ref["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c.probs(crops), ref["probs"], rtol=1e-4, atol=1e-6)
    top = c.predict(crops, top_k=2)
    assert all(set(r.labels) <= set(names) for r in top)
    assert [r.labels[0] for r in top] == [names[i] for i in ref["logits"].argmax(1)]
    # the original names through the text graph give back the file's own weights
    c.set_classes(CLASSES)
    np.testing.assert_allclose(c.logits(crops), before, rtol=1e-4, atol=1e-4)
    c.reset_classes()
    np.testing.assert_array_equal(c.logits(crops), before)
    with pytest.raises(ValueError, match="duplicate"):
        c.set_classes(["a", "a"])


def test_set_classes_templates_are_averaged(text_model: dict[str, Any], crops: np.ndarray, tmp_path: Path) -> None:
    import shutil

    shutil.copy(text_model["path"].parent / "text.onnx", tmp_path / "text.onnx")
    te = {"file": "text.onnx", "templates": ["a photo of a {}.", "a drawing of a {}."]}
    image_graph(tmp_path / "zs.onnx", text_encoder=te)
    c = Classifier(tmp_path / "zs.onnx", device="cpu")
    c.set_classes(["owl", "cow"])
    tok, table = text_model["tok"], text_model["table"]
    per = [text_reference(table, tok([t.format(n) for n in ["owl", "cow"]])) for t in te["templates"]]
    mean = np.mean([w / np.linalg.norm(w, axis=1, keepdims=True) for w in per], axis=0)
    want = LOGIT_SCALE * mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(c.text_encoder.class_weights(["owl", "cow"]), want, rtol=1e-4, atol=1e-4)


def test_set_classes_without_text_encoder(clf: Classifier) -> None:
    with pytest.raises(RuntimeError, match="with-text-encoder"):
        clf.set_classes(["a", "b"])


def test_set_classes_is_atomic_under_threads(text_model: dict[str, Any], crops: np.ndarray) -> None:
    c = Classifier(text_model["path"], device="cpu", batch_size=2)
    names = ["owl", "cow", "bee"]
    c.set_classes(names)
    want_new = c.predict(crops)
    c.reset_classes()
    want_old = c.predict(crops)
    bad: list[Any] = []

    def reader() -> None:
        for _ in range(20):
            got = c.predict(crops)
            if got not in (want_new, want_old):
                bad.append(got)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for i in range(20):
        c.set_classes(names) if i % 2 == 0 else c.reset_classes()
    for t in threads:
        t.join()
    assert not bad


# --- torch-free, proven ----------------------------------------------------------------------------


def test_runtime_imports_neither_torch_nor_open_clip(graph_model: GraphModel, tmp_path: Path) -> None:
    img = tmp_path / "x.png"
    Image.fromarray(photo(50, 40)).save(img)
    code = f"""
import sys
from coopkit.runtime import Classifier
clf = Classifier({str(graph_model.path)!r})
res = clf.predict([{str(img)!r}], top_k=2)
assert len(res) == 1 and res[0].ok, res
bad = sorted(m for m in ("torch", "open_clip", "onnx", "click", "torchvision") if m in sys.modules)
assert not bad, bad
print("ok", res[0].label)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok ")


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture()
def cli() -> Any:
    pytest.importorskip("click")
    from click.testing import CliRunner

    from coopkit.cli.predict import predict

    return lambda *args: CliRunner().invoke(predict, [str(a) for a in args], catch_exceptions=False)


def test_cli_predict_text_and_json(cli: Any, graph_model: GraphModel, tmp_path: Path, clf: Classifier) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.jpg")
        Image.fromarray(photo(64 + i, 48, seed=i)).save(paths[-1], quality=95)
    expected = clf.predict(paths, top_k=2)
    out = cli(graph_model.path, *paths, "--top-k", "2", "--device", "cpu")
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 3
    for line, want in zip(lines, expected):
        assert line.startswith(str(want.source) + "\t") and f"{want.labels[0]} ({want.probs[0]:.3f})" in line
    out = cli(graph_model.path, *paths, "--json")
    records = [json.loads(line) for line in out.output.strip().splitlines()]
    assert [r["labels"][0] for r in records] == [r.label for r in expected]
    assert all(len(r["labels"]) == 5 and abs(sum(r["probs"]) - 1) < 1e-5 for r in records)  # all 5 classes


def test_cli_bad_input_exit_2(cli: Any, graph_model: GraphModel, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(photo(40, 40)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    out = cli(graph_model.path, good, bad)
    assert out.exit_code == 2
    assert out.stdout.count("\n") == 1 and str(good) in out.stdout  # the good one is still labelled
    assert "bad.png" in out.stderr and out.stderr.count("\n") == 1
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00junk")
    for model_arg, needle in ((tmp_path / "missing.onnx", "not found"), (junk, "not an ONNX file"), (good, "ONNX")):
        out = cli(model_arg, good)
        assert out.exit_code == 2 and needle in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = cli(graph_model.path)  # zero images
    assert out.exit_code == 2


# --- the runtime's configs and extras -------------------------------------------------------------


def test_runtime_configs_share_the_validating_base(caplog: pytest.LogCaptureFixture) -> None:
    from coopkit.runtime.batch import BatchConfig
    from coopkit.runtime.configbase import ConfigMixin
    from coopkit.runtime.ray_engine import RayConfig
    from coopkit.runtime.serve import ServeConfig

    for cls, changed in ((BatchConfig, {"top_k": 3}), (ServeConfig, {"port": 9000}), (RayConfig, {"actors": 2})):
        assert issubclass(cls, ConfigMixin)
        cfg = cls(**changed)
        assert cls.from_json(cfg.to_json()) == cfg
        with caplog.at_level("WARNING"):
            assert cls.from_dict({**cfg.to_dict(), "from_a_newer_coopkit": 1}) == cfg
        assert "from_a_newer_coopkit" in caplog.text
    for make, match in (
        (lambda: BatchConfig(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda: BatchConfig(workers=True), "workers must be an integer >= 1 or None"),
        (lambda: ServeConfig(port=70000), "port must be an integer from 0 to 65535, got 70000"),
        (lambda: ServeConfig(max_wait_ms=float("nan")), "max_wait_ms must be a finite number"),
        (lambda: RayConfig(cpus_per_actor=0), "cpus_per_actor must be a finite number > 0"),
        (lambda: RayConfig(gpus_per_actor=9), "gpus_per_actor must be a finite number >= 0 and <= 8 or None"),
    ):
        with pytest.raises(ValueError, match=match):
            make()


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from coopkit.runtime.writers import check_out

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RuntimeError, match=r"Parquet input or output needs pyarrow \(pip install 'coopkit\[parquet\]'\)"):
        check_out(tmp_path / "labels.parquet")
    with pytest.raises(ImportError):  # also an ImportError, for callers that catch that
        check_out(tmp_path / "labels.parquet")


def test_default_workers_follow_the_usable_cpus() -> None:
    from coopkit.runtime.batch import BatchConfig
    from coopkit.runtime.serve import ServeConfig
    from coopkit.runtime.session import MAX_DEFAULT_WORKERS, default_workers, usable_cpus

    assert default_workers() == max(1, min(MAX_DEFAULT_WORKERS, len(usable_cpus())))
    assert ServeConfig().decodes == default_workers() and ServeConfig(max_decodes=3).decodes == 3
    assert BatchConfig().workers is None  # predict_rows resolves None to default_workers()
