"""Export time, file size and fidelity per precision, for the embedded model and a ViT-B-32.

    python benchmarks/bench_export.py                         # both models, all precisions
    python benchmarks/bench_export.py --models tiny --test-per-class 50

For each model a classifier over a task of the synthetic world (``coopkit.embedded.world``) is
exported as fp32, fp16 and int8; every export is verified by ``export_onnx`` itself, and
this script reports: export wall time (tracing, conversion, checking and verification), file
size, the largest logit difference and the top-1 agreement with PyTorch on the task's test
images, both accuracies, and onnxruntime CPU latency per image (batch 16).

* ``tiny``: ``coopkit-tiny`` with its shipped weights, fitted with CoOp on the task (when the
  weights are not installed, the same architecture with random init is used, and the table
  says so);
* ``vit-b-32``: open_clip ``ViT-B-32`` with random init (no download), zero-shot on the task's
  class names: the size of a real deployment, not its accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def _latency_ms(path: Path, precision: str, size: tuple[int, int], batch: int = 16, reps: int = 3) -> float:
    from coopkit.runtime.session import cpu_session

    sess = cpu_session(path)  # the session the exporter verifies with
    x = np.random.default_rng(0).integers(0, 256, (batch, size[0], size[1], 3), dtype=np.uint8)
    sess.run(["logits"], {"images": x})  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(["logits"], {"images": x})
        best = min(best, time.perf_counter() - t)
    return 1000 * best / batch


def _classifiers(models: list[str], task_dir: Path, seed: int) -> list[tuple[str, Any]]:
    import coopkit
    from coopkit.embedded import ASSETS, EMBEDDED_MODEL

    out = []
    if "tiny" in models:
        if (ASSETS / f"{EMBEDDED_MODEL}.safetensors").is_file():
            bb, label = coopkit.load_backbone(EMBEDDED_MODEL, "synthetic", device="cpu"), "coopkit-tiny (synthetic)"
        else:
            print(f"note: {ASSETS / (EMBEDDED_MODEL + '.safetensors')} is not installed; using coopkit-tiny with "
                  "random init (sizes and times are representative, accuracies are not)")
            bb, label = coopkit.load_backbone(EMBEDDED_MODEL, None, device="cpu"), "coopkit-tiny (random init)"
        t = time.perf_counter()
        clf = coopkit.fit(task_dir / "train", backbone=bb, shots=4, epochs=20, n_views=2, n_ctx=8, seed=seed,
                          progress=False)
        print(f"fitted CoOp on {label} in {time.perf_counter() - t:.1f}s")
        out.append((label, clf))
    if "vit-b-32" in models:
        bb = coopkit.load_backbone("ViT-B-32", None, device="cpu")
        classes = coopkit.load_dataset(task_dir / "test").classnames
        out.append(("ViT-B-32 (random init, zero-shot)", coopkit.zero_shot(bb, classes)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit-b-32", help="comma list of: tiny, vit-b-32")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--task", default="colors", help="coopkit.embedded.world task")
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: all)")
    args = parser.parse_args(argv)

    import torch

    from coopkit.embedded import world
    from coopkit.exporters import export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = world.write_task(args.task, Path(tmp) / "task", shots_per_class=4,
                                    test_per_class=args.test_per_class, seed=args.seed, size=64)
        for label, clf in _classifiers(models, task_dir, args.seed):
            for precision in precisions:
                out = Path(tmp) / f"{len(rows)}-{precision}.onnx"
                # int8 calibrates on the run's training images; a zero-shot run has none: the task's
                calib = task_dir / "train" if precision == "int8" and clf.method == "zeroshot" else None
                res = export_onnx(clf, out, precision, verify_data=task_dir / "test", calibration=calib)
                c = res.image
                rows.append((
                    label, precision, f"{res.seconds:.1f}", f"{res.size_bytes / 1e6:.1f}",
                    f"{c.max_abs_logit_diff:.2e}", f"{100 * c.top1_agreement:.1f}%",
                    f"{100 * c.top1_agreement_decisive:.1f}% of {c.n_decisive}" if c.n_decisive is not None else "-",
                    f"{100 * c.accuracy_torch:.1f}%", f"{100 * c.accuracy_onnx:.1f}%",
                    f"{_latency_ms(res.path, precision, res.metadata.image_size):.2f}",
                ))
                print(f"  {label} {precision}: {res.seconds:.1f}s, {res.size_bytes / 1e6:.1f} MB", flush=True)

    header = ("model", "precision", "export s", "size MB", "max |dlogit|", "top-1 agree", "clear calls",
              "acc torch", "acc onnx", "CPU ms/img")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import cpu_model, isa, load

    print(f"\nmachine: {cpu_model()} ({isa()}), {os.cpu_count()} CPUs, {load()} after")
    print(f"task {args.task!r}: {args.test_per_class} test images per class; verification also runs "
          f"{16} generated images; clear calls: int8 agreement where PyTorch's top-2 cosine gap > 0.02; "
          f"latency: onnxruntime CPU, batch 16, {torch.get_num_threads()} threads")
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
