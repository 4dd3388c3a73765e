"""In-graph preprocessing (raw-input files) against the runtime's Pillow preprocessing, per image.

    python benchmarks/bench_preprocess.py                      # 640x480 and 4000x3000, 2 threads
    python benchmarks/bench_preprocess.py --sizes 480x640,3000x4000,1080x1920 --threads 1

For each image size, on one decoded uint8 RGB image at a time (batch 1; decoding is the same
both ways and left out), the median of interleaved rounds of:

* ``pillow``: what the runtime does for a cropped-input file, ``preprocess(array, ...)``
  (``Image.fromarray``, open_clip's resize and centre crop with Pillow, back to an array);
* ``graph``: the preprocessing subgraph of a raw-input file alone
  (:func:`coopkit.exporters.preprocess.preprocess_model`), run by onnxruntime on the CPU with
  ``--threads`` intra-op threads, from the array as ``decode`` hands it over (no copy);

and the ratio ``graph / pillow`` (below 1: the graph is faster). The model's own settings are
open_clip's ViT defaults: 224x224, ``shortest``, bicubic. Memory: each method runs on the
largest size in a fresh process, which reports its peak resident memory above the level it had
with the image, the session and a warm-up run already in place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

SETTINGS = {"image_size": (224, 224), "resize_mode": "shortest", "interpolation": "bicubic"}


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    from coopkit.exporters.verify import synthetic_image

    return synthetic_image(h, w, seed, photo=True)


def _methods(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    from coopkit.exporters.preprocess import preprocess_model
    from coopkit.runtime.contract import INPUT_NAME, ModelMetadata
    from coopkit.runtime.preprocess import decode, preprocess

    meta = ModelMetadata(["a"], **SETTINGS)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(preprocess_model(meta).SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def pillow(img: np.ndarray) -> np.ndarray:
        return preprocess(img, meta.image_size, meta.resize_mode, meta.interpolation)

    def graph(img: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: decode(img)[None]})[0][0]

    return {"pillow": pillow, "graph": graph}


def _time(sizes: list[tuple[int, int]], threads: int, rounds: int) -> list[dict[str, Any]]:
    methods = _methods(threads)
    rows = []
    for h, w in sizes:
        img = _photo(h, w)
        for fn in methods.values():
            fn(img)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):  # interleaved, so that a busy moment hits both
            for name, fn in methods.items():
                t = time.perf_counter()
                fn(img)
                times[name].append(time.perf_counter() - t)
        med = {name: 1000 * statistics.median(v) for name, v in times.items()}
        diff = int(np.abs(methods["graph"](img).astype(int) - methods["pillow"](img).astype(int)).max())
        rows.append({"size": f"{w}x{h}", "pillow_ms": med["pillow"], "graph_ms": med["graph"],
                     "ratio": med["graph"] / med["pillow"], "max_pixel_diff": diff})
    return rows


def _peak_child(method: str, image_file: str, threads: int) -> None:
    """In a fresh process: peak RSS (MB) of running ``method`` on the saved image, above the baseline.

    The baseline is the resident size with the image, the session and a warm-up run in place; the
    high-water mark is reset there (``/proc/self/clear_refs``; ``ru_maxrss`` would carry the parent's).
    """
    fn = _methods(threads)[method]
    img = np.load(image_file)
    fn(_photo(480, 640))  # warm-up on a small image: sessions and code paths in place
    from machine import memory_mb, reset_peak_memory

    base = reset_peak_memory()
    for _ in range(3):
        fn(img)
    print(json.dumps({"method": method, "extra_peak_mb": memory_mb("VmHWM") - base, "image_mb": img.nbytes / 2**20}))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="480x640,3000x4000", help="comma list of HxW")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child[0], args.peak_child[1], args.threads)
        return 0
    import onnxruntime
    import PIL

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load before: {_load()}")
    print(f"onnxruntime {onnxruntime.__version__}, Pillow {PIL.__version__}, {args.threads} onnxruntime thread(s), "
          f"Pillow single-threaded; {SETTINGS}")
    rows = _time(sizes, args.threads, args.rounds)  # type: ignore[arg-type]
    print("\n| image (WxH) | Pillow path | in-graph | in-graph / Pillow | max grey-level diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['pillow_ms']:.2f} ms | {r['graph_ms']:.2f} ms | {r['ratio']:.2f}x | "
              f"{r['max_pixel_diff']} |")
    h, w = max(sizes, key=lambda s: s[0] * s[1])
    print(f"\npeak memory above baseline, {w}x{h} image ({h * w * 3 / 2**20:.1f} MB decoded):")
    with tempfile.TemporaryDirectory() as tmp:
        image_file = os.path.join(tmp, "image.npy")
        np.save(image_file, _photo(h, w))
        for method in ("pillow", "graph"):
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--peak-child", method,
                                  image_file], capture_output=True, text=True, check=True)
            print(f"  {method}: {json.loads(out.stdout.strip().splitlines()[-1])['extra_peak_mb']:.1f} MB")
    print(f"load after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
