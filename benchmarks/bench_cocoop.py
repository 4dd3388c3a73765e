"""CoCoOp: coopkit's training step against the official one, same weights, same batch, same run.

The official step is KaiyangZhou/CoOp's ``trainers/cocoop.py`` (vendored in ``tests/reference``):
the image encoder on the batch, then, image by image, every class's full 77-token prompt through
the text tower. coopkit's step starts from the cached image features (CoCoOp's image encoder is
frozen and unprompted) and sends the prompts of all images and classes through the text tower at
once, cut after their end token, each image's prefix and context computed once for all classes.
Both build on the same random-init OpenAI-architecture CLIP (open_clip's weights loaded into the
official ``clip.build_model``), the paper's config (4 context vectors from "a photo of a", batch 1)
and SGD over the context and the meta-net; the logits of the two are compared before timing.

Each (step, K) runs in its own subprocess, so that its peak memory is its own.

    python benchmarks/bench_cocoop.py                               # K = 10, 100, 1000; ViT-B-16-quickgelu
    python benchmarks/bench_cocoop.py --official-max-classes 1000   # the official step at K = 1000 too (~38 GB)
    python benchmarks/bench_cocoop.py --classes 10 100 --steps 5 --device cuda
    python benchmarks/bench_cocoop.py --model coopkit-test --classes 10 --steps 1    # a tiny smoke run
    python benchmarks/bench_cocoop.py --runtime --classes 10 100 1000               # exported file: images/s

``--runtime`` exports a CoCoOp classifier (fp32, the image encoder + meta-net + text tower over the
class prompts) at each K and times the unchanged runtime on a batch of images (CPU), beside a CoOp
file of the same backbone (constant class weights), so the cost of image-dependent class weights
shows against K.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
#: A tiny OpenAI-architecture config for smoke runs (``--model coopkit-test``).
TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def _classnames(k: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names, seen = [], set()
    for i, n in enumerate(IMAGENET_CLASSNAMES * (1 + k // len(IMAGENET_CLASSNAMES))):
        n = n if n not in seen else f"{n} {i}"
        seen.add(n)
        names.append(n)
    return names[:k]


def _backbone(model: str, device: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import random_backbone

    return random_backbone(model, device, 'coopkit-test', TINY)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(which: str, k: int, steps: int, model: str, batch: int, device: str, precision: str) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE.parent / "tests"))
    from reference import cocoop_official, coop_clip_model

    from coopkit.features import autocast_for
    from coopkit.methods.cocoop import CoCoOpConfig, CoCoOpPromptLearner, load_learner_state

    torch.manual_seed(0)
    bb = _backbone(model, device)
    official_clip = coop_clip_model.build_model({k_: v.cpu() for k_, v in bb.model.state_dict().items()})
    if precision == "fp32":
        official_clip = official_clip.float()
    official_clip = official_clip.to(device).eval()
    bb.model.load_state_dict({k_: v.float() for k_, v in official_clip.state_dict().items()})  # the same weights
    names = _classnames(k)
    size = official_clip.visual.input_resolution
    ref = cocoop_official.CustomCLIP(cocoop_official.cfg(4, "a photo of a", precision, size), names, official_clip)
    ref = ref.to(device)
    for name, p in ref.named_parameters():
        p.requires_grad_("prompt_learner" in name)  # as the official build_model
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(k, (batch,), device=device)
    scale = bb.model.logit_scale.exp()
    ours = CoCoOpPromptLearner(bb, names, CoCoOpConfig())
    load_learner_state(ours, {n: v.float() for n, v in ref.prompt_learner.state_dict().items()
                              if n not in ("token_prefix", "token_suffix")}, "the official tensors")
    with torch.no_grad():
        feats = F.normalize(bb.model.encode_image(images), dim=-1)  # cached, as fit caches them
    result: dict = {"which": which, "K": k}
    if which == "official":
        params = list(ref.prompt_learner.parameters())
        ref.prompt_learner.train()

        def loss_fn():
            return ref(images.type(ref.dtype), labels)
    else:
        params = list(ours.parameters())
        with torch.no_grad():
            ref.prompt_learner.eval()
            official_logits = ref(images.type(ref.dtype)).float()
            mine = ours.logits(feats, scale)
        result["max_rel_logit_diff"] = float((mine - official_logits).abs().max() / official_logits.abs().max())

        def loss_fn():
            with autocast_for(bb.device, precision):
                return F.cross_entropy(ours.logits(feats, scale).float(), labels)
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    sys.path.insert(0, str(HERE))
    from machine import memory_mb, reset_peak_memory

    # the peak of the steps alone: ru_maxrss, which cannot be reset, kept the peak of the official
    # forward above (the logit check), higher than coopkit's whole step, and coopkit's column read 0
    base_rss = reset_peak_memory()

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    result.update(step_s=statistics.median(times), peak_mb=memory_mb("VmHWM") - base_rss, threads=torch.get_num_threads())
    if device.startswith("cuda"):
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def runtime_worker(k: int, model: str, batch: int, repeats: int) -> dict:
    """images/s of exported CoCoOp and CoOp files at K classes, CPU, the unchanged runtime."""
    import numpy as np
    import torch

    import coopkit
    from coopkit.config import RunConfig
    from coopkit.methods.cocoop import CoCoOpConfig, CoCoOpModel, CoCoOpPromptLearner

    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier as RuntimeClassifier

    torch.manual_seed(0)
    bb = _backbone(model, "cpu")
    names = _classnames(k)
    out = {"K": k}
    folder = Path(tempfile.mkdtemp())
    images = np.random.default_rng(0).integers(0, 256, (batch, *bb.image_size, 3), dtype=np.uint8)
    coop = coopkit.zero_shot(bb, names)  # constant class weights: the same file shape as CoOp's
    learner = CoCoOpPromptLearner(bb, names, CoCoOpConfig()).requires_grad_(False).eval()
    cocoop = coopkit.Classifier(bb, RunConfig(method="cocoop", classnames=names, method_config=CoCoOpConfig(),
                                              **bb.run_fields()), CoCoOpModel(bb, learner))
    for label, clf in (("coop", coop), ("cocoop", cocoop)):
        path = folder / f"{label}.onnx"
        export_onnx(clf, path)
        runtime = RuntimeClassifier(path)
        runtime.logits(images)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            runtime.logits(images)
            times.append(time.perf_counter() - t)
        out[f"{label}_images_per_s"] = batch / statistics.median(times)
        out[f"{label}_mb"] = path.stat().st_size / 2**20
    return out


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-16-quickgelu",
                    help="an OpenAI-architecture open_clip model (random init), or coopkit-test (tiny)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (the official configs: 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                    help="fp16: the official PREC fp16 (CLIP in half) against coopkit's fp16 autocast (CUDA)")
    ap.add_argument("--official-max-classes", type=int, default=100,
                    help="skip the official step above this K (its activations grow with K x 77 tokens: 3.8 GB "
                         "measured at K = 100 on ViT-B/16 fp32, so about 38 GB at K = 1000)")
    ap.add_argument("--runtime", action="store_true", help="images/s of the exported file against K")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "runtime":
        print(json.dumps(runtime_worker(args.classes[0], args.model, args.batch, args.steps)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.classes[0], args.steps, args.model, args.batch, args.device,
                                args.precision)))
        return

    import torch

    sys.path.insert(0, str(HERE))
    from machine import describe, load

    print(f"# machine: {json.dumps(describe(torch.get_num_threads()))}; torch {torch.__version__}, device {args.device}")
    common = ["--steps", str(args.steps), "--model", args.model, "--batch", str(args.batch)]
    if args.runtime:
        print(f"# exported fp32 files in the runtime (CPU), {args.model} random init, batch {args.batch}, "
              f"median of {args.steps}")
        print("\n| K | CoOp file images/s | CoCoOp file images/s | CoCoOp / CoOp | CoOp MB | CoCoOp MB |")
        print("|---|---|---|---|---|---|")
        for k in args.classes:
            r = _run(["--worker", "runtime", "--classes", str(k), *common])
            if "error" in r:
                print(f"| {k} | error: {r['error']} | | | | |")
                continue
            print(f"| {k} | {r['coop_images_per_s']:.1f} | {r['cocoop_images_per_s']:.2f} | "
                  f"{r['cocoop_images_per_s'] / r['coop_images_per_s']:.3f} | {r['coop_mb']:.1f} | {r['cocoop_mb']:.1f} |")
        print(f"\n# {load()} after")
        return
    print(f"# one CoCoOp training step, {args.model} random init, batch {args.batch}, n_ctx 4 ('a photo of a'), "
          f"{args.precision}, median of {args.steps} steps; ImageNet class names")
    print("\n| K | coopkit step (s) | official step (s) | speed-up | coopkit peak (MB) | official peak (MB) "
          "| max relative logit difference |")
    print("|---|---|---|---|---|---|---|")
    extra = ["--device", args.device, "--precision", args.precision]
    for k in args.classes:
        ours = _run(["--worker", "coopkit", "--classes", str(k), *common, *extra])
        official = (_run(["--worker", "official", "--classes", str(k), *common, *extra])
                    if k <= args.official_max_classes else {"error": f"not run (K > {args.official_max_classes})"})
        if "error" in ours:
            print(f"| {k} | error: {ours['error']} | | | | | |")
            continue
        peak = "gpu_peak_mb" if "gpu_peak_mb" in ours else "peak_mb"
        if "error" in official:
            print(f"| {k} | {ours['step_s']:.4f} | {official['error']} | - | {ours[peak]:.0f} | - "
                  f"| {ours['max_rel_logit_diff']:.1e} |")
            continue
        print(f"| {k} | {ours['step_s']:.4f} | {official['step_s']:.4f} | {official['step_s'] / ours['step_s']:.1f}x "
              f"| {ours[peak]:.0f} | {official[peak]:.0f} | {ours['max_rel_logit_diff']:.1e} |")
    print(f"\n# {load()} after")


if __name__ == "__main__":
    main()
