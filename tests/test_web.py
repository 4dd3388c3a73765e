"""The exported classifier in a web page: the sidecar ``coopkit export`` writes, the JavaScript
module ``web/coopkit.js`` and the demo page ``examples/web/``, run in a real headless Chromium
(Debian's ``chromium``, driven by Playwright; pages served by ``examples/web/serve.py`` on
127.0.0.1) and compared with the Python runtime on the same files.

The browser tests need ``chromium``, the Python ``playwright`` package (the ``test`` extra) and
``npm ci`` in ``web/``; ``.ci/run`` installs them and sets ``COOPKIT_REQUIRE_BROWSER=1``, which
turns a missing piece into a failure instead of a skip. The screenshot of the demo page after a
classification is kept in ``test-artifacts/web-demo.png``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import struct
import urllib.error
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from helpers import BROWSER_TIMEOUT_MS, require_browser, web_site

from coopkit.runtime import Classifier
from coopkit.runtime.contract import SIDECAR_FORMAT, SIDECAR_ROLES, ModelMetadata, sidecar_name
from coopkit.runtime.preprocess import MAX_PIXELS, ImageDecodeError, load_image, resize_and_crop

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = BROWSER_TIMEOUT_MS


# --- the sidecar (no browser) -------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_writes_a_sidecar_beside_every_file(tiny_backbone, image_folder, tmp_path):
    import coopkit
    from coopkit.exporters import export_onnx

    clf = coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"])
    result = export_onnx(clf, tmp_path / "model.onnx", "int8", calibration=image_folder / "train")
    assert result.sidecar == tmp_path / "model.json"
    side = json.loads(result.sidecar.read_text())
    assert side["format"] == SIDECAR_FORMAT and side["sidecar_version"] == 1
    # the metadata is the one inside the ONNX file (read back by the runtime), whole
    runtime = Classifier(result.path, device="cpu")
    assert ModelMetadata.from_json(json.dumps(side["metadata"])) == runtime.metadata
    assert side["metadata"]["classnames"] == ["red", "green", "blue"] and side["metadata"]["precision"] == "int8"
    assert side["input"] == {"name": "images", "dtype": "uint8", "shape": ["batch", 32, 32, 3], "channels": "RGB",
                             "kind": "cropped"}
    assert side["outputs"] == ["logits", "probs", "image_embeds"]
    # the resolved resize plan: a square open_clip model resizes its short side bicubic, then centre-crops
    assert side["metadata"]["resize_plan"] == {"rule": "shortest_edge", "interpolation": "bicubic", "size": [32, 32],
                                               "crop": True, "fill": 0}
    # checksums computed here with hashlib, independently of the exporter's file_sha256
    assert side["files"] == [{"name": "model.onnx", "role": "model", "bytes": result.path.stat().st_size,
                              "sha256": _sha256(result.path)}]

    # external data and the text graph are listed too, each with its own checksum
    result = export_onnx(clf, tmp_path / "big.onnx", "fp32", size_threshold=0, with_text_encoder=True)
    files = {f["name"]: f for f in json.loads(result.sidecar.read_text())["files"]}
    assert [f["role"] for f in json.loads(result.sidecar.read_text())["files"]][0] == "model"
    assert {n: f["role"] for n, f in files.items()} == {
        "big.onnx": "model", "big.onnx.data": "external_data", "big.text.onnx": "text_model",
        "big.text.onnx.data": "text_external_data"}
    for name, f in files.items():
        assert f["sha256"] == _sha256(tmp_path / name) and f["bytes"] == (tmp_path / name).stat().st_size


def test_cli_export_reports_the_sidecar(tiny_backbone, tmp_path):
    from click.testing import CliRunner

    import coopkit
    from coopkit.cli import main

    coopkit.zero_shot(tiny_backbone, ["cat", "dog"]).save(tmp_path / "run")
    out = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["sidecar"] == str(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["metadata"]["classnames"] == ["cat", "dog"]


def test_runtime_cross_checks_the_sidecar(tiny_backbone, tmp_path, caplog):
    import coopkit
    from coopkit.exporters import export_onnx

    export_onnx(coopkit.zero_shot(tiny_backbone, ["red", "green"]), tmp_path / "a.onnx")
    export_onnx(coopkit.zero_shot(tiny_backbone, ["red", "blue"]), tmp_path / "b.onnx")
    with caplog.at_level(logging.WARNING, logger="coopkit"):
        Classifier(tmp_path / "a.onnx", device="cpu")
    assert "sidecar" not in caplog.text and "describe" not in caplog.text
    shutil.copy(tmp_path / "b.json", tmp_path / "a.json")  # the sidecar of another export
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coopkit"):
        clf = Classifier(tmp_path / "a.onnx", device="cpu")
    assert "a.json does not describe a.onnx" in caplog.text and "classnames differs" in caplog.text
    assert clf.classnames == ["red", "green"]  # the runtime reads the file's own metadata, never the sidecar
    (tmp_path / "a.json").write_text('{"unrelated": "config"}')  # someone else's JSON: not ours to judge
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coopkit"):
        Classifier(tmp_path / "a.onnx", device="cpu")
    assert caplog.text == ""


def test_resize_plan_is_checked_and_round_trips():
    from coopkit.runtime.contract import MetadataError, ResizeSpec

    plan = {"rule": "keep_ratio_longest", "interpolation": "bilinear", "size": [48, 64], "crop": True, "fill": 128}
    meta = ModelMetadata(classnames=["a", "b"], image_size=(48, 64), resize_plan=plan)
    assert meta.resize_plan == ResizeSpec("keep_ratio_longest", "bilinear", (48, 64), True, 128)
    assert ModelMetadata.from_json(meta.to_json()) == meta
    assert ModelMetadata.from_json(json.dumps({"classnames": ["a"], "image_size": [8, 8]})).resize_plan is None  # 0.2.0
    for change, match in [({"rule": "stretch"}, "resize_plan.rule 'stretch' is not one of"),
                          ({"interpolation": "lanczos"}, "resize_plan.interpolation 'lanczos'"),
                          ({"size": [64, 48]}, r"resize_plan.size \(64, 48\) differs from image_size \(48, 64\)"),
                          ({"crop": False}, "resize_plan.crop must be True for rule 'keep_ratio_longest'"),
                          ({"fill": 300}, "resize_plan.fill must be a grey level 0-255")]:
        with pytest.raises(MetadataError, match=match):
            ModelMetadata(classnames=["a", "b"], image_size=(48, 64), resize_plan={**plan, **change})


def test_sidecar_name_and_roles():
    from coopkit.exporters.io import sidecar_role

    assert sidecar_name("model.onnx") == "model.json" and sidecar_name("m.v2.onnx") == "m.v2.json"
    assert sidecar_name("model") == "model.json"
    assert [sidecar_role(n, "m.onnx") for n in ("m.onnx", "m.onnx.data", "m.text.onnx", "m.text.onnx.data",
                                                  "m.tokenizer.json")] == list(SIDECAR_ROLES)
    with pytest.raises(ValueError, match="not a file of the export"):
        sidecar_role("other.onnx", "m.onnx")


# --- the browser --------------------------------------------------------------------------------


COLOR_TASK = "colors"


def _scene_images(folder: Path, n: int, seed: int) -> list[Path]:
    """Scenes of the embedded world's colour task at many sizes and aspect ratios, PNG and JPEG."""
    from coopkit.embedded import world

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        scene = world.task_scene(COLOR_TASK, i % len(world.task_classes(COLOR_TASK)), rng)
        side = int(rng.choice([40, 64, 97, 150]))
        img = world.render(scene, size=side, seed=i)
        w, h = int(side * rng.choice([0.5, 0.75, 1.0, 1.33, 2.0])), side
        img = img.resize((max(w, 8), h), Image.Resampling.LANCZOS)
        path = folder / (f"s{i:03d}.jpg" if i % 3 == 0 else f"s{i:03d}.png")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        out.append(path)
    return out


def _huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header says width x height (400 M pixels), with a truncated body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Exports of coopkit-tiny (zero-shot, the colour task) and test images, served on 127.0.0.1."""
    require_browser()
    import coopkit
    from coopkit.embedded import world
    from coopkit.exporters import export_onnx

    root = tmp_path_factory.mktemp("web")
    images = _scene_images(root / "img", 100, seed=0)
    calibration = _scene_images(root / "calibration", 16, seed=1)  # other scenes than the test's
    clf = coopkit.zero_shot(coopkit.load_backbone(), world.task_classes(COLOR_TASK))
    export_onnx(clf, root / "tiny.onnx", "fp32")
    export_onnx(clf, root / "tiny-int8.onnx", "int8", calibration=calibration)
    export_onnx(clf, root / "tiny-ext.onnx", "fp32", size_threshold=0)  # graph + tiny-ext.onnx.data
    export_onnx(clf, root / "tiny-raw.onnx", "fp32", raw_input=True)  # resizes and crops inside the graph
    # a model whose sidecar does not match it: same size, another checksum
    shutil.copy(root / "tiny.onnx", root / "tampered.onnx")
    side = json.loads((root / "tiny.json").read_text())
    digest = side["files"][0]["sha256"]
    side["files"][0]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    (root / "tampered.json").write_text(json.dumps(side))
    shutil.copy(root / "tiny.onnx", root / "lonely.onnx")  # no sidecar at all
    (root / "notes.txt").write_text("this is not an image\n")
    _huge_png(root / "huge.png")
    with web_site(root) as web:
        yield {"root": root, "images": images, "url": web.url}


def _open_demo(browser: Any, site: dict[str, Any], query: str) -> Any:
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{site['url']}/examples/web/?{query}")
    page.wait_for_function("document.body.dataset.state !== undefined")
    return page


def _in_page(page: Any, body: str, arg: Any = None) -> Any:
    """Run ``body`` (an async function body with ``m`` = web/coopkit.js and ``arg``) in the page."""
    return page.evaluate(f"async (arg) => {{ const m = await import('/web/coopkit.js'); {body} }}", arg)


def _probs_in_page(page: Any, model: str, images: list[str], **options: Any) -> dict[str, Any]:
    return _in_page(page, """
        const clf = await m.loadClassifier(arg.model, arg.options);
        const rows = await clf.probs(arg.images);
        const out = {backend: clf.backend, note: clf.backendNote, threads: clf.threads, rows: rows.map((r) => Array.from(r))};
        await clf.dispose();
        return out;""", {"model": model, "images": images, "options": options})


def _urls(site: dict[str, Any], paths: list[Path]) -> list[str]:
    return [f"/models/{p.relative_to(site['root']).as_posix()}" for p in paths]


def test_preprocessing_equals_the_python_runtime(browser, site):
    """JS decode + resize + crop == load_image + resize_and_crop (Pillow), pixel for pixel, on
    images of many sizes and aspect ratios, for every resize rule and filter the contract allows."""
    import PIL

    folder = site["root"] / "pre"
    folder.mkdir()
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (5, 120), (120, 5), (17, 23), (64, 64), (63, 65), (224, 224), (225, 224), (640, 480),
             (480, 640), (1000, 333), (300, 1000), (257, 129), (100, 1), (900, 1200)]
    names = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(xx / 7.0 + i), 128 + 100 * np.cos(yy / 5.0), (xx * 3 + yy * 5) % 256], -1)
        arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
        names.append(f"p{i}.png")
    img = Image.open(folder / "p8.png")  # 640x480: the decoders' side of the pipeline
    img.save(folder / "q90.jpg", quality=90)
    img.save(folder / "q95_444.jpg", quality=95, subsampling=0)
    img.save(folder / "progressive.jpg", quality=85, progressive=True)
    exif = img.getexif()
    exif[0x0112] = 6  # rotated: the browser and Pillow both apply it
    img.save(folder / "exif_rotated.jpg", quality=92, exif=exif.tobytes())
    img.convert("L").save(folder / "grey.png")
    img.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    img.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "anim.gif")
    img.save(folder / "lossless.webp", lossless=True)
    img.save(folder / "plain.bmp")
    Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    names += ["q90.jpg", "q95_444.jpg", "progressive.jpg", "exif_rotated.jpg", "grey.png", "palette.png", "anim.gif",
              "lossless.webp", "plain.bmp", "sixteen_bit.png"]
    rules = [
        {"image_size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0},
        {"image_size": [64, 64], "resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0},
        {"image_size": [48, 80], "resize_mode": "shortest", "interpolation": "bilinear", "fill_color": 0},
        {"image_size": [64, 64], "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 128},
        {"image_size": [56, 40], "resize_mode": "squash", "interpolation": "bilinear", "fill_color": 0},
        {"image_size": [224, 224], "resize_mode": "shortest", "interpolation": "nearest", "fill_color": 0},
    ]
    # files written by coopkit 0.3 record the resolved plan, and the page applies it instead of deriving it
    from dataclasses import asdict

    from coopkit.exporters.image import resolved_resize

    rules += [{**r, "resize_plan": asdict(resolved_resize(tuple(r["image_size"]), r["resize_mode"], r["interpolation"],
                                                          r["fill_color"]))} for r in rules]
    # a plan that disagrees with resize_mode is followed: it is the plan, not the fields, that the page applies
    rules.append({"image_size": [48, 80], "resize_mode": "shortest", "interpolation": "bicubic", "fill_color": 0,
                  "resize_plan": {"rule": "exact", "interpolation": "bilinear", "size": [48, 80], "crop": False,
                                  "fill": 0}, "expect": ("squash", "bilinear")})
    page = _open_demo(browser, site, "model=/models/tiny.onnx&backend=wasm")
    crops = _in_page(page, """
        const out = [];
        for (const name of arg.names) {
          const {data, width, height} = await m.decodeImage('/models/pre/' + name);
          const rgb = m.rgbaToRgb(data, width, height);
          for (const rule of arg.rules) {
            const crop = m.resizeAndCrop(rgb, width, height, rule);
            let s = '';
            for (let i = 0; i < crop.length; i += 8192) s += String.fromCharCode(...crop.subarray(i, i + 8192));
            out.push(btoa(s));
          }
        }
        return out;""", {"names": names, "rules": rules})
    page.close()
    exact, worst, report = 0, 0, []
    for i, name in enumerate(names):
        img = load_image(folder / name)
        for j, rule in enumerate(rules):
            mode, interpolation = rule.get("expect", (rule["resize_mode"], rule["interpolation"]))
            want = resize_and_crop(img, tuple(rule["image_size"]), mode, interpolation, rule["fill_color"])
            got = np.frombuffer(base64.b64decode(crops[i * len(rules) + j]), np.uint8)
            assert got.size == want.size, f"{name} {rule}: {got.size} values, expected {want.shape}"
            diff = int(np.abs(got.reshape(want.shape).astype(int) - want).max())
            exact += diff == 0
            worst = max(worst, diff)
            if diff:
                report.append(f"{name} {img.size} {rule['resize_mode']}/{rule['interpolation']}: {diff}")
    assert worst <= 1, report
    # Pillow 13's resampling is ported exactly: only the 16-bit PNG may differ (the browser's 16->8 bit
    # rounding); with Pillow 12 or older the pass order differs for tall images (1 level at most).
    if int(PIL.__version__.split(".")[0]) >= 13:
        assert all(r.startswith("sixteen_bit.png") for r in report), report
        assert exact >= (len(names) - 1) * len(rules)


def test_demo_page_classifies_like_the_runtime(browser, site):
    """Drop images (and bad files) on the demo page: top-5 labels and probabilities as the Python
    runtime's, fp32 within 1e-4; unreadable files get a visible message; screenshot kept."""
    images = site["images"][:24]
    bad = [site["root"] / "notes.txt", site["root"] / "huge.png"]
    page = _open_demo(browser, site, "model=/models/tiny.onnx&backend=wasm")
    assert page.evaluate("document.body.dataset.state") == "ready", page.inner_text("body")
    page.set_input_files("#files", [str(p) for p in images[:12] + bad + images[12:]])
    page.wait_for_function("document.getElementById('status').dataset.batches === '1'")
    cards = page.eval_on_selector_all(".card", """els => els.map((e) => ({source: e.dataset.source,
        labels: e.dataset.labels && JSON.parse(e.dataset.labels), probs: e.dataset.probs && JSON.parse(e.dataset.probs),
        error: e.dataset.error, visible: e.offsetHeight > 0 && getComputedStyle(e).visibility !== 'hidden',
        text: e.innerText}))""")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-demo.png"), full_page=True)
    by_name = {c["source"]: c for c in cards}
    assert len(cards) == len(images) + len(bad)

    assert "not an image" in by_name["notes.txt"]["error"] and by_name["notes.txt"]["visible"]
    assert "20000x20000" in by_name["huge.png"]["error"] and "more than the limit of 89,478,485" in by_name["huge.png"]["text"]
    assert by_name["huge.png"]["visible"]
    with pytest.raises(ImageDecodeError):  # the Python runtime refuses the same file
        load_image(site["root"] / "huge.png")
    assert "2 could not be read" in page.inner_text("#status")

    runtime = Classifier(site["root"] / "tiny.onnx", device="cpu")
    for p in runtime.predict(images, top_k=5):
        card = by_name[Path(p.source).name]
        assert card["labels"][0] == p.labels[0], (p.source, card, p)
        py = dict(zip(p.labels, p.probs))
        for label, prob in zip(card["labels"], card["probs"]):
            if label in py:  # near-equal probabilities may swap ranks 2-5; compare by label
                assert abs(prob - py[label]) <= 1e-4, (p.source, label, prob, py[label])
        assert set(card["labels"][:3]) <= set(p.labels), (card["labels"], p.labels)
    page.close()


def test_api_probabilities_match_the_runtime(browser, site):
    """Full probability rows through the module's API, WebAssembly with 1 and 2 threads, fp32
    (within 1e-4), fp32 with external data, a raw-input file, and int8 (same top-1 on at least
    99%)."""
    images = site["images"]  # 100: one int8 disagreement would be 1%
    fp32 = Classifier(site["root"] / "tiny.onnx", device="cpu").probs(images[:24])
    int8 = Classifier(site["root"] / "tiny-int8.onnx", device="cpu").probs(images)
    for threads in (1, 2):
        page = _open_demo(browser, site, f"model=/models/tiny.onnx&backend=wasm&threads={threads}")
        assert page.evaluate("crossOriginIsolated")  # serve.py's headers: threads are possible
        got = _probs_in_page(page, "/models/tiny.onnx", _urls(site, images[:24]), backend="wasm")
        assert got["backend"] == "wasm" and got["threads"] == threads
        diff = np.abs(np.array(got["rows"]) - fp32).max()
        assert diff <= 1e-4, f"{threads} thread(s): max |dprob| {diff:.2e}"
        if threads == 1:
            ext = _probs_in_page(page, "/models/tiny-ext.onnx", _urls(site, images[:8]), backend="wasm")
            assert np.abs(np.array(ext["rows"]) - fp32[:8]).max() <= 1e-4
            q = np.array(_probs_in_page(page, "/models/tiny-int8.onnx", _urls(site, images), backend="wasm")["rows"])
            agree = (q.argmax(1) == int8.argmax(1)).mean()
            assert agree >= 0.99, f"int8 top-1 agreement {agree:.1%} on {len(images)} images"
            assert _in_page(page, "return m.MAX_PIXELS;") == MAX_PIXELS
            # a raw-input file gets the decoded images, as from the Python runtime (one run per size)
            raw = _probs_in_page(page, "/models/tiny-raw.onnx", _urls(site, images[:12]), backend="wasm")
            want = Classifier(site["root"] / "tiny-raw.onnx", device="cpu").probs(images[:12])
            assert np.abs(np.array(raw["rows"]) - want).max() <= 1e-4
            # every kind of input gives the same row: URL (above), Blob, File, ImageData
            kinds = _in_page(page, """
                const clf = await m.loadClassifier('/models/tiny.onnx', {backend: 'wasm'});
                const blob = await (await fetch(arg)).blob();
                const file = new File([blob], 'x.png', {type: blob.type});
                const {data, width, height} = await m.decodeImage(blob);
                const rows = await clf.probs([blob, file, new ImageData(new Uint8ClampedArray(data), width, height)]);
                return rows.map((r) => Array.from(r));""", _urls(site, images[:1])[0])
            assert np.abs(np.array(kinds) - fp32[:1]).max() <= 1e-4
        page.close()


def test_a_vit_with_fused_attention_runs_in_the_browser(browser, site, tiny_backbone):
    """A ViT's fp32 file with onnxruntime's com.microsoft Attention nodes (``fused_attention``)
    answers in WebAssembly as the Python runtime does."""
    import onnx

    import coopkit
    from coopkit.exporters import export_onnx

    path = site["root"] / "vit-attention.onnx"
    export_onnx(coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"]), path, "fp32", fused_attention=True)
    assert "Attention" in {n.op_type for n in onnx.load(os.fspath(path), load_external_data=False).graph.node}
    want = Classifier(path, device="cpu").probs(site["images"][:8])
    page = _open_demo(browser, site, "model=/models/vit-attention.onnx&backend=wasm")
    got = _probs_in_page(page, "/models/vit-attention.onnx", _urls(site, site["images"][:8]), backend="wasm")
    page.close()
    assert got["backend"] == "wasm"
    assert np.abs(np.array(got["rows"]) - want).max() <= 1e-4


@pytest.mark.slow
def test_webgpu_is_used_only_when_it_gives_the_same_answers(browser, site):
    """backend 'auto': WebGPU (software, SwiftShader here) when its probabilities match
    WebAssembly's on a probe batch; whatever it picks must answer as the Python runtime does."""
    page = _open_demo(browser, site, "model=/models/tiny.onnx&backend=wasm")
    if not page.evaluate("async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())"):
        page.close()
        pytest.skip("this Chromium offers no WebGPU adapter, not even SwiftShader")
    images = site["images"][:8]
    urls = _urls(site, images)
    got = _probs_in_page(page, "/models/tiny.onnx", urls, backend="auto")
    assert got["backend"] == "webgpu", got["note"]
    assert "agrees" in got["note"]
    want = Classifier(site["root"] / "tiny.onnx", device="cpu").probs(images)
    assert np.abs(np.array(got["rows"]) - want).max() <= 1e-4
    q = _probs_in_page(page, "/models/tiny-int8.onnx", urls, backend="auto")
    want = Classifier(site["root"] / "tiny-int8.onnx", device="cpu").probs(images)
    assert (np.array(q["rows"]).argmax(1) == want.argmax(1)).mean() >= 0.99, q["note"]
    if q["backend"] == "wasm":
        assert "other answers" in q["note"] or "failed" in q["note"], q["note"]
    page.close()


def test_a_multilabel_file_answers_every_label_that_applies(browser, site, dualcoop_clf, multilabel_sets):
    """A DualCoOp export in the page: each label's own probability as PyTorch gives it, predict() with every
    label at or above its threshold and every label's probability; a coopkit.js from before multi-label files
    (sidecar version 1 at most) refuses the file instead of ranking its sigmoids as a softmax."""
    from coopkit.exporters import export_onnx

    _, val = multilabel_sets
    export_onnx(dualcoop_clf, site["root"] / "tags.onnx")
    folder = site["root"] / "ml"
    folder.mkdir(exist_ok=True)
    images = [Path(shutil.copy(p, folder)) for p in val.paths]
    probs, names, thresholds = dualcoop_clf.probs(val.paths), dualcoop_clf.classnames, dualcoop_clf.thresholds
    page = _open_demo(browser, site, "model=/models/tiny.onnx&backend=wasm")
    got = _in_page(page, """
        const clf = await m.loadClassifier(arg.model, {backend: 'wasm'});
        const preds = await clf.predict(arg.images, {topK: 1});
        const out = {task: clf.task, thresholds: clf.thresholds, preds};
        await clf.dispose();
        const side = await (await fetch(arg.model.replace('.onnx', '.json'))).json();
        const src = await (await fetch('/web/coopkit.js')).text();
        const before = src.replace(/export const SIDECAR_VERSION = [0-9]+;/, 'export const SIDECAR_VERSION = 1;');
        const old = await import(URL.createObjectURL(new Blob([before], {type: 'text/javascript'})));
        try { old.checkSidecar(side, 'tags.json'); out.old = 'accepted'; } catch (e) { out.old = e.message; }
        return out;""", {"model": "/models/tags.onnx", "images": _urls(site, images)})
    page.close()
    assert got["task"] == "multilabel" and got["thresholds"] == [float(t) for t in thresholds]
    assert "tags.json has sidecar_version 2; this coopkit.js reads up to 1" in got["old"]
    for pred, row in zip(got["preds"], probs):
        assert pred["labels"] == [names[i] for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
        np.testing.assert_allclose([pred["labelProbs"][n] for n in names], row, atol=1e-4)


@pytest.mark.parametrize("model, message", [
    ("tampered.onnx", "tampered.onnx does not match its sidecar tampered.json: sha256"),
    ("lonely.onnx", "cannot fetch sidecar"),
    ("absent.onnx", "cannot fetch sidecar"),
])
def test_bad_models_give_a_visible_message(browser, site, model, message):
    page = _open_demo(browser, site, f"model=/models/{model}&backend=wasm")
    assert page.evaluate("document.body.dataset.state") == "failed"
    assert page.is_visible("#error")
    assert message in page.inner_text("#error"), page.inner_text("#error")
    page.close()


def test_missing_scripts_give_a_visible_message(browser, site):
    """When onnxruntime-web cannot be loaded (web/node_modules missing), the page says so."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/onnxruntime-web/dist/*", lambda route: route.fulfill(status=404, body="not found"))
    page.goto(f"{site['url']}/examples/web/?model=/models/tiny.onnx")
    page.wait_for_selector("#error", state="visible")
    assert "npm ci" in page.inner_text("#error")
    page.close()


def test_sha256_without_webcrypto_matches_hashlib(browser, site):
    page = _open_demo(browser, site, "model=/models/tiny.onnx&backend=wasm")
    blobs = [b"", b"abc", bytes(range(55)), bytes(range(56)), bytes(64), os.urandom(100_003)]
    got = _in_page(page, """
        const out = [];
        for (const b64 of arg) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          out.push([await m.sha256Hex(bytes, {subtle: false}), await m.sha256Hex(bytes)]);
        }
        return out;""", [base64.b64encode(b).decode() for b in blobs])
    for blob, (plain, subtle) in zip(blobs, got):
        assert plain == subtle == hashlib.sha256(blob).hexdigest()
    page.close()


def test_serve_script(site):
    """examples/web/serve.py as a user runs it: prints the page's URL and serves the page, the
    module and the model's sidecar with the cross-origin isolation headers."""
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "web" / "serve.py"), str(site["root"] / "tiny.onnx"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/examples/web/?model=/models/tiny.onnx"), url
        base = url.split("/examples/")[0]
        for path, want in [("/examples/web/", "coopkit in the browser"), ("/web/coopkit.js", "loadClassifier"),
                           ("/models/tiny.json", SIDECAR_FORMAT)]:
            with urllib.request.urlopen(base + path, timeout=30) as r:
                assert want in r.read().decode()
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        with pytest.raises(urllib.error.HTTPError):  # nothing outside the model's folder under /models/
            urllib.request.urlopen(base + "/models/../../etc/passwd", timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "web" / "serve.py"), str(site["root"] / "nope.onnx")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "model not found" in out.stderr
