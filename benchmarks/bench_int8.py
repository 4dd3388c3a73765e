"""int8 against fp32 on the embedded world's tasks: agreement, accuracy, batch invariance.

For each task of :mod:`coopkit.embedded.world`, CoOp is fitted on coopkit-tiny (16 shots,
whole-image views, as the demo does), then exported as fp32 and as int8 (static, calibrated
on the run's own training images: what ``coopkit export --precision int8`` does), and, for
comparison, as onnxruntime's dynamic int8 of the same fp32 file (what coopkit shipped before:
activation scales computed over each batch at run time). On the labelled test images it
reports each file's top-1 agreement with the fp32 file, both accuracies, and how far an image's
logits move when other images share its batch. A benchmark: it prints a table, never fails.

    python benchmarks/bench_int8.py                          # all tasks, 50 test images per class
    python benchmarks/bench_int8.py --tasks colors --epochs 20 --test-per-class 20
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _logits(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"images": images[i : i + batch]})[0]
                           for i in range(0, len(images), batch)])


def main() -> None:
    from coopkit.embedded import world

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(world.TASKS))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=None, help="default: the paper's schedule")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.exporters.int8 import int8_targets
    from coopkit.exporters.verify import batch_invariance
    from coopkit.runtime.session import cpu_session
    from coopkit.runtime.preprocess import preprocess

    import onnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import cpu_model, isa, load

    print(f"# coopkit-tiny, CoOp {args.shots} shots, whole-image views, seed {args.seed}; torch threads "
          f"{torch.get_num_threads()}; {cpu_model()} ({isa()}), {load()} before")
    rows = []
    bb = coopkit.load_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            root = world.write_task(task, Path(tmp) / task, shots_per_class=args.shots,
                                    test_per_class=args.test_per_class, seed=0)
            clf = coopkit.fit(root / "train", backbone=bb, shots=args.shots, seed=args.seed, augment=False,
                              epochs=args.epochs, progress=False)
            test = coopkit.load_dataset(root / "test").relabel(clf.classnames)
            images = np.stack([preprocess(p, bb.image_size) for p in test.paths])
            labels = np.asarray(test.labels)
            fp32 = export_onnx(clf, Path(tmp) / f"{task}-fp32.onnx", "fp32").path
            int8 = export_onnx(clf, Path(tmp) / f"{task}-int8.onnx", "int8", verify_data=root / "test")
            dyn = Path(tmp) / f"{task}-dyn.onnx"
            model = onnx.load(os.fspath(fp32))
            quantize_dynamic(fp32, dyn, nodes_to_quantize=int8_targets(model), per_channel=True,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
            ref = _logits(cpu_session(fp32), images)
            for name, path in (("int8 static (calibrated)", int8.path), ("int8 dynamic (before)", dyn)):
                sess = cpu_session(path)
                got = _logits(sess, images)
                rows.append({
                    "task": task, "file": name, "n": len(images),
                    "agree": float((got.argmax(1) == ref.argmax(1)).mean()),
                    "acc_fp32": float((ref.argmax(1) == labels).mean()),
                    "acc_int8": float((got.argmax(1) == labels).mean()),
                    "max_dlogit": float(np.abs(got - ref).max()),
                    "batch": batch_invariance(sess, images, got, n=8),
                    "alpha": int8.int8.smoothing if name.startswith("int8 static") else "-",
                })
            print(f"# {task} done", file=sys.stderr)
    print("| task | int8 file | test images | top-1 = fp32 | accuracy fp32 | accuracy int8 | max abs logit diff | batch invariance (max abs logit change) | smoothing alpha |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['file']} | {r['n']} | {100 * r['agree']:.1f}% | {100 * r['acc_fp32']:.1f} | "
              f"{100 * r['acc_int8']:.1f} | {r['max_dlogit']:.3f} | {r['batch']:.2g} | {r['alpha']} |")


if __name__ == "__main__":
    main()
