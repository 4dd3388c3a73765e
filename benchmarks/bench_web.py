"""The exported classifier in headless Chromium (onnxruntime-web, WebAssembly) beside the Python
runtime on the same machine and the same files.

For each model (the embedded ``coopkit-tiny`` and a ViT-B-32-sized model, random init) and
precision, the script exports a zero-shot classifier (20 classes), serves the demo page with
``examples/web/serve.py`` (cross-origin isolated, so WebAssembly threads work) and measures, for
1 and 2 threads:

* **time to first prediction**: page navigation to the first result of one dropped JPEG (load
  onnxruntime-web, fetch the sidecar and the model, check its sha256, create the session,
  decode, resize, run), best of two fresh browser contexts (empty cache); for Python, a fresh
  interpreter's import + ``Classifier`` + ``predict``, best of two;
* **images/s end to end**: ``Classifier.probs`` on JPEG bytes (decode, Pillow-exact resize and
  crop, graph), batches of ``--batch-size``;
* **images/s graph only**: the session on a prepared uint8 batch.

Throughput is the best of ``--rounds`` runs after one warm-up, on ``--images`` photo-like
JPEGs (640x480 and similar). A benchmark, not a test: it prints a table, never fails on
a ratio, and says how busy the machine was.

    python benchmarks/bench_web.py                                   # both models, fp32 + int8
    python benchmarks/bench_web.py --models coopkit-tiny --json web.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"coopkit-tiny": "synthetic", "ViT-B-32": None}  # name -> pretrained (None: random init)
CLASSNAMES = [f"class {i}" for i in range(20)]
CHROMIUM = "/usr/lib/chromium/chromium"


def _load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs of a few sizes (640x480 and neighbours), written once."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = [(640, 480), (480, 640), (800, 600), (512, 512)][i % 4]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(1, 6, 3)
        img = np.stack([128 + 110 * np.sin(xx / w * f[0] + i), 128 + 110 * np.cos(yy / h * f[1]),
                        128 + 110 * np.sin((xx + yy) / (w + h) * f[2])], -1) + rng.normal(0, 8, (h, w, 3))
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path)
    return out


def _python_first_prediction(model: Path, image: Path, threads: int) -> float:
    code = f"""
import time
t0 = time.perf_counter()
import coopkit.runtime
clf = coopkit.runtime.Classifier({str(model)!r}, device="cpu", threads={threads})
clf.predict([{str(image)!r}])
print(time.perf_counter() - t0)
"""
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=tempfile.gettempdir()).stdout.split()[-1]) for _ in range(2)]
    return min(runs)


def _python_rates(model: Path, images: list[Path], threads: int, batch: int, rounds: int) -> dict[str, float]:
    from coopkit.runtime import Classifier

    clf = Classifier(model, device="cpu", threads=threads, batch_size=batch, workers=threads)
    blobs = [p.read_bytes() for p in images]
    prepared = clf.preprocess(blobs)  # (n, H, W, 3) uint8
    clf.probs(blobs)  # warm-up

    def best(fn: Any) -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return len(images) / min(times)

    def graph() -> None:
        for s in range(0, len(prepared), batch):
            clf.session.run(["probs"], {"images": prepared[s:s + batch]})

    out = {"end_to_end": best(lambda: clf.probs(blobs)), "graph": best(graph)}
    clf.close()
    return out


BROWSER_RATES = """async (arg) => {
  const m = await import('/web/coopkit.js');
  const clf = await m.loadClassifier(arg.model, {backend: 'wasm', batchSize: arg.batch});
  const blobs = [];
  for (const url of arg.images) blobs.push(await (await fetch(url)).blob());
  const [h, w] = clf.imageSize;
  const crops = [];
  for (const b of blobs) crops.push(await clf.preprocess(b));
  await clf.probs(blobs);  // warm-up
  const best = async (fn) => {
    let t = Infinity;
    for (let r = 0; r < arg.rounds; r++) { const s = performance.now(); await fn(); t = Math.min(t, performance.now() - s); }
    return blobs.length / (t / 1000);
  };
  const graph = async () => {
    for (let s = 0; s < crops.length; s += arg.batch) {
      const part = crops.slice(s, s + arg.batch);
      const batch = new Uint8Array(part.length * h * w * 3);
      part.forEach((c, i) => batch.set(c, i * h * w * 3));
      await clf.run(batch, part.length);
    }
  };
  const out = {end_to_end: await best(() => clf.probs(blobs)), graph: await best(graph), threads: clf.threads};
  await clf.dispose();
  return out;
}"""


def _first_prediction(browser: Any, page_url: str, image: Path) -> tuple[float, float, Any]:
    """Navigation to the first result of one dropped image, in a fresh context (empty cache)."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(600_000)
    page.goto(page_url)
    page.wait_for_function("document.body.dataset.state !== undefined")
    if page.evaluate("document.body.dataset.state") != "ready":
        raise RuntimeError(page.inner_text("#error"))
    ready_ms = float(page.evaluate("document.getElementById('status').dataset.readyMs"))
    page.set_input_files("#files", [str(image)])
    page.wait_for_function("document.getElementById('status').dataset.batches === '1'")
    first_ms = float(page.evaluate("document.getElementById('status').dataset.ms"))
    timings = json.loads(page.evaluate("document.getElementById('status').dataset.timings"))
    return (ready_ms + first_ms) / 1000, {"ready_s": ready_ms / 1000, "first_run_s": first_ms / 1000,
                                          **{k.replace("Ms", "_s"): v / 1000 for k, v in timings.items()}}, (context, page)


def _browser(browser: Any, url: str, model_url: str, image: Path, images: list[str], threads: int, batch: int,
             rounds: int) -> dict[str, Any]:
    page_url = f"{url}/examples/web/?model={model_url}&backend=wasm&threads={threads}"
    first, parts, (context, _) = _first_prediction(browser, page_url, image)
    context.close()
    first2, parts2, (context, page) = _first_prediction(browser, page_url, image)  # best of two
    rates = page.evaluate(BROWSER_RATES, {"model": model_url, "images": images, "batch": batch, "rounds": rounds})
    context.close()
    return {"first_prediction_s": min(first, first2), "first_parts": parts if first <= first2 else parts2, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep exports here (default: a temporary folder).")
    args = parser.parse_args()

    import coopkit
    from coopkit.exporters import export_onnx
    from playwright.sync_api import sync_playwright

    spec = importlib.util.spec_from_file_location("coopkit_web_serve", ROOT / "examples" / "web" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="coopkit-bench-web-"))
    work.mkdir(parents=True, exist_ok=True)
    images = _jpegs(work / "img", args.images)
    calibration = _jpegs(work / "calibration", 16, seed=1)  # int8's activation ranges, other images
    server = serve.make_server(work, 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    image_urls = [f"/models/img/{p.name}" for p in images]
    load_before = _load_avg()
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        chromium_version = browser.version
        for name in args.models:
            backbone = coopkit.load_backbone(name, pretrained=MODELS[name], device="cpu")
            clf = coopkit.zero_shot(backbone, CLASSNAMES)
            for precision in args.precisions:
                path = work / f"{name}-{precision}.onnx"
                if not path.is_file() or not path.with_suffix(".json").is_file():
                    export_onnx(clf, path, precision, calibration=calibration if precision == "int8" else None)
                size_mb = path.stat().st_size / 1e6
                for threads in args.threads:
                    web = _browser(browser, url, f"/models/{path.name}", images[0], image_urls, threads,
                                   args.batch_size, args.rounds)
                    py = _python_rates(path, images, threads, args.batch_size, args.rounds)
                    py["first_prediction_s"] = _python_first_prediction(path, images[0], threads)
                    row = {"model": name, "precision": precision, "size_mb": size_mb, "threads": threads,
                           "web": web, "python": py}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del backbone, clf
        browser.close()
    server.shutdown()
    load_after = _load_avg()

    import onnxruntime

    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "chromium": chromium_version,
           "onnxruntime_web": json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["onnxruntime-web"],
           "onnxruntime": onnxruntime.__version__, "load_before": load_before, "load_after": load_after,
           "images": args.images, "batch_size": args.batch_size}
    print(f"\n{env}\n")
    print("| model | precision | threads | first prediction: browser / Python | end to end img/s: browser / Python "
          "| graph img/s: browser / Python |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w, py = r["web"], r["python"]
        print(f"| {r['model']} ({r['size_mb']:.0f} MB) | {r['precision']} | {r['threads']} | "
              f"{w['first_prediction_s']:.2f} s / {py['first_prediction_s']:.2f} s | "
              f"{w['end_to_end']:.1f} / {py['end_to_end']:.1f} ({w['end_to_end'] / py['end_to_end']:.2f}x) | "
              f"{w['graph']:.1f} / {py['graph']:.1f} ({w['graph'] / py['graph']:.2f}x) |")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
