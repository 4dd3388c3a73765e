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
    python benchmarks/bench_int8.py --tasks colors --epochs 2 --test-per-class 5 --seconds 0.1   # smoke run

Each task (and the weak model of tests/test_int8.py: a random-init 64-px ViT whose logits are
close) is exported as int8 accuracy-aware (the default: the products that move the answers stay
fp32 until the calibration images agree with fp32 on 99.5% and their margins estimate 99% for
other images) and with every product int8
(``min_agreement=0``), the same with nearest rounding in place of GPTQ's
(``weight_rounding="nearest"``), and with convolutions left float (``convolutions=False``: what
coopkit quantised before; it matters on coopkit-tiny's ResNet tower). ``--large-vit`` adds
random-init ViT-B-32 (near-tie logits at a real model's size). The "centred" column is the mean
logit change after removing each image's mean (a shift of every class, which moves no softmax
answer). The speed columns are each file's
images/s at batch 32 over the fp32 file's on the same engine, interleaved on the same batch:
onnxruntime, and OpenVINO (f32 pinned, static batch 32) where it is installed (the engine that
``engine="auto"`` chose for every file on the AMX machine); the agreement is onnxruntime's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: The weak model of tests/test_int8.py: a random-init 64-pixel ViT, zero-shot over 16 names.
WEAK_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
WEAK_NAMES = ["cat", "dog", "car", "tree", "house", "bird", "boat", "flower", "fish", "lamp", "chair", "cup", "road",
              "hill", "shoe", "bell"]


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
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per file for the speed columns")
    ap.add_argument("--no-weak-vit", dest="weak_vit", action="store_false",
                    help="leave out the weak model (a random-init 64-px ViT, 16 classes zero-shot, close logits)")
    ap.add_argument("--large-vit", action="store_true",
                    help="add random-init ViT-B-32 (20 classes zero-shot: near-tie logits at a real model's size; "
                         "128 calibration and 300 held-out photo-like crops; minutes per export)")
    ap.add_argument("--no-conv-variant", dest="conv_variant", action="store_false",
                    help="leave out the accuracy-aware file with convolutions float")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.exporters.int8 import int8_targets
    from coopkit.exporters.io import ExportVerificationError
    from coopkit.exporters.verify import batch_invariance
    from coopkit.runtime.session import cpu_session
    from coopkit.runtime.preprocess import preprocess
    try:
        import openvino  # noqa: F401

        from coopkit.runtime.engines import OpenVINOSession as openvino_session
    except ImportError:
        openvino_session = None

    import onnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from images import photo_batch
    from machine import cpu_model, interleaved_speeds, isa, load

    print(f"# coopkit-tiny, CoOp {args.shots} shots, whole-image views, seed {args.seed}; torch threads "
          f"{torch.get_num_threads()}; {cpu_model()} ({isa()}), {load()} before")
    rows = []
    bb = coopkit.load_backbone()

    def compare(task: str, clf: Any, images: np.ndarray, labels: np.ndarray, folder: Path, **export: Any) -> None:
        """fp32, accuracy-aware int8, plain int8 (min_agreement=0) and dynamic int8 of ``clf`` on ``images``."""
        fp32 = export_onnx(clf, folder / f"{task}-fp32.onnx", "fp32").path
        variants = {"int8 static, accuracy-aware": ("int8", {}),
                    "int8 static, every product": ("plain", {"min_agreement": 0.0}),
                    "int8 static, every product, nearest rounding": ("nearest", {"min_agreement": 0.0,
                                                                                 "weight_rounding": "nearest"}),
                    "int8 static, accuracy-aware, convolutions float": ("noconv", {"convolutions": False})}
        fp32_model = onnx.load(os.fspath(fp32))
        if not args.conv_variant or not any(n.op_type == "Conv" for n in fp32_model.graph.node):
            variants.pop("int8 static, accuracy-aware, convolutions float")
        files = {}
        for name, (stem, options) in variants.items():
            try:
                files[name] = export_onnx(clf, folder / f"{task}-{stem}.onnx", "int8", **options, **export)
            except ExportVerificationError as e:  # the export's own check refused the file: say so, no file
                rows.append({"task": task, "file": name, "refused": str(e).split(": ", 1)[-1]})
        dyn = folder / f"{task}-dyn.onnx"
        quantize_dynamic(fp32, dyn, nodes_to_quantize=int8_targets(fp32_model), per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        sessions = {"fp32": cpu_session(fp32), **{k: cpu_session(r.path) for k, r in files.items()},
                    "int8 dynamic (before)": cpu_session(dyn)}
        batch = np.ascontiguousarray(images[:32])
        speeds = interleaved_speeds({k: (lambda s: lambda: s.run(["logits"], {"images": batch}))(s)
                                     for k, s in sessions.items()}, len(batch), args.seconds)
        ov_speeds: dict[str, float] = {}
        if openvino_session is not None:
            paths = {"fp32": fp32, **{k: r.path for k, r in files.items()}}
            ov = {k: openvino_session(p, "CPU", "fp32", threads=torch.get_num_threads(), batch_sizes=(len(batch),))
                  for k, p in paths.items()}
            ov_speeds = interleaved_speeds({k: (lambda s: lambda: s.run(["logits"], {"images": batch}))(s)
                                            for k, s in ov.items()}, len(batch), args.seconds)
        ref = _logits(sessions["fp32"], images)
        for name, sess in sessions.items():
            if name == "fp32":
                continue
            got = _logits(sess, images)
            summary = files[name].int8 if name in files else None
            rows.append({
                "task": task, "file": name, "n": len(images),
                "agree": float((got.argmax(1) == ref.argmax(1)).mean()),
                "acc_fp32": float((ref.argmax(1) == labels).mean()) if len(labels) else float("nan"),
                "acc_int8": float((got.argmax(1) == labels).mean()) if len(labels) else float("nan"),
                "max_dlogit": float(np.abs(got - ref).max()),
                "centred": float(np.abs((got - got.mean(1, keepdims=True)) - (ref - ref.mean(1, keepdims=True))).mean()),
                "batch": batch_invariance(sess, images, got, n=8),
                "alpha": summary.smoothing if summary else "-",
                "kept": f"{len(summary.float_nodes)} of {summary.nodes + len(summary.float_nodes)}" if summary else "-",
                "convs": summary.convolutions if summary else "-",
                "speed": speeds[name] / speeds["fp32"],
                "ov_speed": ov_speeds[name] / ov_speeds["fp32"] if name in ov_speeds else float("nan"),
            })
        print(f"# {task} done; {load()}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            root = world.write_task(task, Path(tmp) / task, shots_per_class=args.shots,
                                    test_per_class=args.test_per_class, seed=0)
            clf = coopkit.fit(root / "train", backbone=bb, shots=args.shots, seed=args.seed, augment=False,
                              epochs=args.epochs, progress=False)
            test = coopkit.load_dataset(root / "test").relabel(clf.classnames)
            images = np.stack([preprocess(p, bb.image_size) for p in test.paths])
            compare(task, clf, images, np.asarray(test.labels), Path(tmp), verify_data=root / "test")
        if args.weak_vit:  # tests/test_int8.py's weak model: close logits, photo-like images, no labels
            config = Path(tmp) / "weak-vit.json"
            config.write_text(json.dumps(WEAK_VIT))
            torch.manual_seed(0)
            weak = coopkit.zero_shot(coopkit.load_backbone(str(config), pretrained=None, device="cpu"), WEAK_NAMES)
            compare("weak ViT (random init)", weak, photo_batch(300, (64, 64), seed=7), np.zeros(0, int), Path(tmp),
                    calibration=photo_batch(256, (64, 64), seed=123))
        if args.large_vit:  # near-tie logits at a real size: random-init ViT-B-32, zero-shot
            torch.manual_seed(0)
            large = coopkit.load_backbone("ViT-B-32", pretrained=None, device="cpu")
            compare("ViT-B-32 (random init)", coopkit.zero_shot(large, [f"class {i}" for i in range(20)]),
                    photo_batch(300, large.image_size, seed=7), np.zeros(0, int), Path(tmp),
                    calibration=photo_batch(128, large.image_size, seed=123))
    print("| task | int8 file | test images | top-1 = fp32 | accuracy fp32 | accuracy int8 | max abs logit diff | "
          "mean abs logit diff, centred | batch invariance (max abs logit change) | smoothing alpha | "
          "products kept fp32 | convolutions int8 | speed x fp32, onnxruntime | speed x fp32, OpenVINO |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['task']} | {r['file']} | refused by the export's verification: {r['refused']} |")
            continue
        print(f"| {r['task']} | {r['file']} | {r['n']} | {100 * r['agree']:.1f}% | {100 * r['acc_fp32']:.1f} | "
              f"{100 * r['acc_int8']:.1f} | {r['max_dlogit']:.3f} | {r['centred']:.4f} | {r['batch']:.2g} | {r['alpha']} | {r['kept']} | {r['convs']} | "
              f"{r['speed']:.2f} | {r['ov_speed']:.2f} |")


if __name__ == "__main__":
    main()
