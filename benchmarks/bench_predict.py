"""Images per second of the streaming collection engine against a plain loop over ``Classifier.predict``.

On a generated folder of JPEG photos (640x480 by default) and an exported zero-shot classifier
(the embedded ``coopkit-tiny``, or a ViT-B-32-sized random-init model), the script times, in
the same process and interleaved round by round (best round of each):

* **loop**: ``for chunk in batches(paths): clf.predict(chunk)``: decode the batch (the
  classifier's own decoding threads), then run it; decoding and inference never overlap;
* **stream**: ``coopkit.runtime.batch.predict_collection(clf, folder, out.jsonl)``, the engine
  behind ``coopkit predict DIR --out``: decoding threads run ahead while the session runs;
* the parts alone: **decode only** (the same threads, no session) and **session only** (the
  prepared crops), whose maximum is the best any overlap can reach and whose sum is what no
  overlap gives.

Then once, ``coopkit predict MODEL DIR --out x.jsonl`` as a command (start-up included), and
with ``--ray-actors 1 2`` the same job with ``--engine ray`` on a local Ray instance for each
pool size (Ray start-up excluded, each actor and each decoding task reserving
``--ray-cpus-per-actor`` / 0.5 CPUs so that two actors fit on two cores).
A benchmark, not a test: it prints a table and never fails on a ratio.

    python benchmarks/bench_predict.py                                  # coopkit-tiny, 512 images
    python benchmarks/bench_predict.py --model ViT-B-32 --precision int8 --images 256
    python benchmarks/bench_predict.py --ray-actors 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import photos  # noqa: E402
from machine import describe, load  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine_info(threads: Any) -> str:
    """CPU, instruction sets, threads and load (``benchmarks/machine.py``), on one line."""
    d = describe(threads)
    return f"{d['cpu']} ({d['isa']}), onnxruntime threads: {threads or 'the runtime default'}, {load()}"


def write_photos(folder: Path, n: int, size: tuple[int, int]) -> list[str]:
    """``n`` photo-like JPEGs (:func:`images.photos`) of ``size`` (w, h)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(photos(n, (size[1], size[0]))):
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def export_model(name: str, precision: str, out: Path) -> Path:
    import coopkit
    from coopkit.exporters import export_onnx

    pretrained = "default" if name == "coopkit-tiny" else None
    backbone = coopkit.load_backbone(name, pretrained=pretrained, device="cpu")
    clf = coopkit.zero_shot(backbone, [f"class {i}" for i in range(20)])
    export_onnx(clf, out, precision=precision)
    return out


def best_of(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Seconds of each fn: best of ``rounds``, interleaved so load from other processes hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coopkit-tiny", help="coopkit-tiny or an open_clip name (random init)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-actors", type=int, nargs="*", default=[], help="also time --engine ray with these pool sizes")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=0.5)
    args = parser.parse_args()

    from coopkit.runtime import Classifier
    from coopkit.runtime.batch import BatchConfig, predict_collection
    from coopkit.runtime.session import default_workers

    before = machine_info(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_photos(root / "photos", args.images, tuple(args.size))
        model = export_model(args.model, args.precision, root / "model.onnx")
        clf = Classifier(model, device="cpu", threads=args.threads, batch_size=args.batch_size)
        cfg = BatchConfig(batch_size=args.batch_size, overwrite=True)
        workers = default_workers()
        crops = clf.preprocess(paths)  # (n, H, W, 3)
        chunks = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]

        def loop() -> None:
            for chunk in chunks:
                clf.predict(chunk)

        def stream() -> None:
            predict_collection(clf, root / "photos", root / "out.jsonl", cfg, progress=False)

        def decode_only() -> None:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(clf.prepare, paths))

        def session_only() -> None:
            for i in range(0, len(crops), args.batch_size):
                clf.run_batch(crops[i : i + args.batch_size])

        secs = best_of({"loop": loop, "stream": stream, "decode": decode_only, "session": session_only}, args.rounds)
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "coopkit", "predict", str(model), str(root / "photos"), "--out",
                              str(root / "cli.jsonl"), "--device", "cpu", "--no-progress", "--batch-size",
                              str(args.batch_size)], capture_output=True, text=True)
        cli_s = time.perf_counter() - start
        assert cli.returncode == 0, cli.stderr
        ray_ips = bench_ray(model, root / "photos", root, args) if args.ray_actors else {}
    n = args.images
    ips = {k: n / v for k, v in secs.items()}
    ideal = n / max(secs["decode"], secs["session"])
    serial = n / (secs["decode"] + secs["session"])
    print(f"\nbefore: {before}\nafter:  {machine_info(args.threads)}")
    print(f"{args.model} {args.precision}, {n} JPEGs {args.size[0]}x{args.size[1]}, batch {args.batch_size}, "
          f"{workers} decoding threads, best of {args.rounds} interleaved rounds\n")
    print("| loop over predict | coopkit predict engine | stream / loop | decode only | session only | "
          "no overlap (sum) | full overlap (max) | CLI incl. start-up |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {ips['loop']:.1f} | {ips['stream']:.1f} | {ips['stream'] / ips['loop']:.2f}x | {ips['decode']:.1f} | "
          f"{ips['session']:.1f} | {serial:.1f} | {ideal:.1f} | {n / cli_s:.1f} |")
    print("(images per second)")
    if ray_ips:
        print("\n| --engine ray, actors | " + " | ".join(str(a) for a in ray_ips) + " |")
        print("|---|" + "---|" * len(ray_ips))
        print("| images/s | " + " | ".join(f"{v:.1f}" for v in ray_ips.values()) + " |")


def bench_ray(model: Path, photos: Path, root: Path, args: argparse.Namespace) -> dict[int, float]:
    """Images per second of predict_ray for each pool size (best of ``args.rounds``), one local Ray instance."""
    import ray

    from coopkit.runtime.batch import BatchConfig
    from coopkit.runtime.ray_engine import RayConfig, predict_ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cfg = BatchConfig(batch_size=args.batch_size, overwrite=True)
        out: dict[int, float] = {}
        for actors in args.ray_actors:
            rcfg = RayConfig(actors=actors, cpus_per_actor=args.ray_cpus_per_actor, decode_cpus=0.5)
            best = min(predict_ray(model, photos, root / "ray.jsonl", cfg, rcfg, progress=False).seconds
                       for _ in range(args.rounds))
            out[actors] = args.images / best
        return out
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
