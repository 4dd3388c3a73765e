"""Each method's exported file against CoOp's: size on disk and images/s in the runtime, same run.

Every method that exports a single-label file (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, CLIP-LoRA with
its adapters merged) is fitted briefly on the same backbone (random init unless ``--pretrained``)
and the same few images of the embedded world's ``colors`` task: a step or two, since only the
shape of the fitted model matters here, not its accuracy. Each one is exported as fp32
(``coopkit.exporters.export_onnx``, verified against PyTorch), and the unchanged runtime
(onnxruntime on the CPU) runs every file on the same uint8 crops, interleaved round by round
(``benchmarks/machine.py``'s ``interleaved_speeds``), at batch 1 and at ``--batch``. Each
method's settings are its registered defaults (the official configs) unless named in ``FITS``.

What makes a file slower than CoOp's: the deep-prompt methods' image encoder carries its prompt
tokens through the first layers (IVLP and PromptSRC 4 tokens x 9 layers, MaPLe 2 x 9), CLIP-LoRA
merged has CLIP's own shapes, and CoCoOp's file runs the text tower over every class prompt for
every image (its cost against K is ``bench_cocoop.py --runtime``).

    python benchmarks/bench_method_files.py                         # ViT-B-32, batch 1 and 32
    python benchmarks/bench_method_files.py --model ViT-B-16 --seconds 3
    python benchmarks/bench_method_files.py --model coopkit-test-vit --seconds 0.2   # a smoke run
    python benchmarks/bench_method_files.py --multilabel                 # coopkit-tiny: DualCoOp's file

``--multilabel`` times the multi-label files (CoOp with a sigmoid, DualCoOp with its region
aggregation in the graph) against CoOp's single-label file on a ModifiedResNet backbone
(``coopkit-tiny`` with its shipped weights by default; DualCoOp needs that tower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import photo_batch  # noqa: E402
from machine import describe, interleaved_speeds, load  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Each method's quick fit (``coopkit.fit`` keyword arguments besides data, backbone and shots):
#: one epoch (CLIP-LoRA: one iteration per shot); every other setting is the method's default.
FITS: dict[str, dict[str, Any]] = {
    "coop": dict(epochs=1),
    "cocoop": dict(epochs=1, n_views=1),
    "ivlp": dict(epochs=1),
    "maple": dict(epochs=1),
    "promptsrc": dict(epochs=1),
    "clip-lora": dict(iters_per_shot=1),
}
#: ``--multilabel``: the multi-label methods, fitted on the world's default multi-label task, beside
#: CoOp's single-label file of the same (ModifiedResNet) backbone.
FITS_MULTILABEL: dict[str, dict[str, Any]] = {
    "coop-sigmoid": dict(epochs=1),
    "dualcoop": dict(epochs=1),
}
#: A small random-init ViT for smoke runs (``--model coopkit-test-vit``).
TINY_VIT = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 10, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 10}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="an open_clip ViT name, or coopkit-test-vit (a smoke run)")
    ap.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: random init)")
    ap.add_argument("--methods", nargs="+", default=None, choices=[*FITS, *FITS_MULTILABEL],
                    help="default: every single-label method (with --multilabel: coop and the multi-label ones)")
    ap.add_argument("--multilabel", action="store_true", help="the multi-label files against CoOp's (a ResNet model)")
    ap.add_argument("--batch", type=int, default=32, help="the serving batch, timed beside batch 1")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per file and batch size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.multilabel and args.model == ap.get_default("model"):
        args.model, args.pretrained = "coopkit-tiny", args.pretrained or "synthetic"
    if args.methods is None:
        args.methods = ["coop", *FITS_MULTILABEL] if args.multilabel else list(FITS)

    import torch

    import coopkit
    from coopkit.embedded import world
    from coopkit.exporters import export_onnx
    from coopkit.multilabel_data import load_multilabel
    from coopkit.runtime import Classifier

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name = args.model
        if name == "coopkit-test-vit":
            name = str(root / "coopkit-test-vit.json")
            Path(name).write_text(json.dumps(TINY_VIT))
        backbone = coopkit.load_backbone(name, pretrained=args.pretrained, device="cpu")
        data = world.write_task("colors", root / "colors", shots_per_class=1, test_per_class=0, seed=0)
        tags = None
        if any(m in FITS_MULTILABEL for m in args.methods):
            task = world.write_multilabel_task(world.DEFAULT_MULTILABEL_TASK, root / "tags", train_images=16,
                                               val_images=8, test_images=8)
            tags = load_multilabel(task / "train.csv")
        files: dict[str, Path] = {}
        sizes: dict[str, float] = {}
        for method in args.methods:
            if method in FITS_MULTILABEL:
                clf = coopkit.fit(tags, method=method, backbone=backbone, seed=1, progress=False,
                                  **FITS_MULTILABEL[method])
            else:
                clf = coopkit.fit(data / "train", method=method, backbone=backbone, shots=1, seed=1, progress=False,
                                  **FITS[method])
            report = export_onnx(clf, root / f"{method}.onnx", "fp32")
            files[method] = report.path
            sizes[method] = sum(f.stat().st_size for f in report.files) / 2**20
            print(f"# {method}: exported, {sizes[method]:.1f} MB; {load()}", file=sys.stderr)
        runtimes = {m: Classifier(p, device="cpu", engine="onnxruntime", threads=args.threads, batch_size=args.batch)
                    for m, p in files.items()}
        crops = photo_batch(args.batch, runtimes[args.methods[0]].image_size, seed=3)  # (batch, H, W, 3) uint8
        rows = {m: {"MB": sizes[m]} for m in files}
        for b in (1, args.batch):
            x = crops[:b]
            fns = {m: (lambda clf: lambda: clf.session.run(["logits"], {"images": x}))(clf)
                   for m, clf in runtimes.items()}
            for m, ips in interleaved_speeds(fns, b, args.seconds).items():
                rows[m][f"b{b}"] = ips
            print(f"# batch {b} timed; {load()}", file=sys.stderr)
    machine = describe(args.threads or torch.get_num_threads())
    machine["load_after"] = load()
    base = rows.get("coop")
    print(f"\n{args.model} ({args.pretrained or 'random init'}), fp32 files, onnxruntime on the CPU; machine: "
          f"{machine['cpu']} ({machine['isa']}), {machine['threads']} threads, {machine['load_after']}\n")
    print(f"| method | file MB | images/s, batch 1 | x CoOp | images/s, batch {args.batch} | x CoOp |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        ratio = (lambda k: f"{r[k] / base[k]:.2f}" if base else "n/a")
        print(f"| {m} | {r['MB']:.1f} | {r['b1']:.1f} | {ratio('b1')} | {r[f'b{args.batch}']:.1f} | "
              f"{ratio(f'b{args.batch}')} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
