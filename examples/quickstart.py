"""Fit CoOp on your own folder of labelled images and compare it with a hand-written prompt.

    python examples/quickstart.py my_data/train my_data/test --shots 16 --out runs/mine

``my_data/train`` holds one sub-folder per class (the folder name is the class name). The
default model is coopkit-tiny, the small CLIP that ships with coopkit; pass any open_clip
model and pretrained tag, e.g. ``--model ViT-B-32 --pretrained openai``.
"""

from __future__ import annotations

import argparse
import logging

import coopkit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--model", default="coopkit-tiny")
    ap.add_argument("--pretrained", default="synthetic", help="tag, checkpoint path, or 'none' for random init")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=None, help="default: the paper's schedule by shots")
    ap.add_argument("--out", default="runs/quickstart")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    pretrained = None if args.pretrained == "none" else args.pretrained
    backbone = coopkit.load_backbone(args.model, pretrained)
    classes = coopkit.load_dataset(args.train).classnames

    baseline = coopkit.zero_shot(backbone, classes, ["a photo of a {}."])
    print(f"zero-shot 'a photo of a {{}}.': {baseline.evaluate(args.test)['accuracy']:.1%}")

    clf = coopkit.fit(args.train, backbone=backbone, shots=args.shots, epochs=args.epochs)
    print(f"CoOp, {args.shots} shots:         {clf.evaluate(args.test)['accuracy']:.1%}")
    print(f"saved to {clf.save(args.out)}; predictions for two test images:",
          [p.label for p in clf.predict(coopkit.load_dataset(args.test).paths[:2])])


if __name__ == "__main__":
    main()
