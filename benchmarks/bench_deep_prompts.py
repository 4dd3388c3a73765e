"""One training step of IVLP, MaPLe and PromptSRC: coopkit's against the official module's, same run.

Both steps run on the same machine, the same batch (``--batch`` images, 4 in the official
configs) and the same weights (a random-init OpenAI-architecture CLIP, rounded to fp16 as the
official ``build_model`` stores it), with the same prompts, in alternation; the table gives the
median step and the ratio official / coopkit (> 1: coopkit faster).

* official: ``CustomCLIP(image, label)`` -> cross-entropy, backward, SGD (``forward_backward``'s
  non-amp path); PromptSRC: its trainer's ``forward_backward`` (losses, SGD; no epoch ends here).
  The vendored modules live in ``tests/reference``. On a GPU it runs as its default ``PREC: fp16``
  leaves it (the whole CLIP in fp16); on the CPU in fp32.
* coopkit: :func:`coopkit.methods.deep_prompts.training_step` (fp16 autocast on a GPU, fp32 on
  the CPU): prompts cut after the longest end token, the frozen towers' weights untouched.

    python benchmarks/bench_deep_prompts.py                              # ViT-B-16 (OpenAI shape), K = 10, 100
    python benchmarks/bench_deep_prompts.py --method maple --classes 10 --steps 3
    python benchmarks/bench_deep_prompts.py --model tiny --classes 4 --steps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

#: ``--model tiny``: 4 layers, widths 192 / 128, 32-pixel images (a smoke run, not a timing).
TINY = dict(vision_width=192, text_width=128, layers=4)
METHODS = ("ivlp", "maple", "promptsrc")


def _classnames(k: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return [f"{n} {i}" if IMAGENET_CLASSNAMES.index(n) != i else n for i, n in enumerate(IMAGENET_CLASSNAMES)][:k]


def _backbone(model: str, device: str):
    import open_clip
    import torch

    from reference.harness import load_tiny, openai_config

    if model == "tiny":
        cfg = openai_config(**TINY)
    else:
        cfg = dict(open_clip.get_model_config(model), quick_gelu=True)
    bb = load_tiny(Path(tempfile.mkdtemp()), f"bench-{model}", cfg)
    bb.model.to(device)
    bb.device = torch.device(device)
    return bb


def _config(method: str, model: str):
    from coopkit import methods

    cfg = methods.get(method).make_config()
    if model != "tiny":
        return cfg
    small = {"ivlp": dict(prompt_depth_text=3, prompt_depth_vision=3),
             "maple": dict(prompt_depth=3),
             "promptsrc": dict(prompt_depth_text=3, prompt_depth_vision=3, epochs=20)}[method]
    return methods.get(method).make_config({**cfg.to_dict(), **small})


def _steps(method: str, k: int, model: str, device: str, batch: int):
    """(official step, coopkit step): two closures over the same batch, prompts and weights."""
    import torch

    from coopkit.methods.deep_prompts import training_step
    from coopkit.methods.ivlp import IVLPModel
    from coopkit.methods.maple import MaPLeModel
    from coopkit.methods.promptsrc import PromptSRCModel, SelfRegulation
    from reference import harness

    gpu = device.startswith("cuda")
    bb = _backbone(model, device)
    names = _classnames(k)
    config = _config(method, model)
    torch.manual_seed(0)
    ours = {"ivlp": IVLPModel, "maple": MaPLeModel, "promptsrc": PromptSRCModel}[method](bb, names, config).to(device)
    size = bb.image_size
    pixels = torch.randn(batch, 3, *size, device=device)
    labels = torch.randint(k, (batch,), device=device)
    lr = config.lr
    if method == "promptsrc":
        with harness.promptsrc_shims(bb, config):
            trainer = harness.official_promptsrc(bb, config, names, config.epochs, lr)
        trainer.num_batches = 10**9  # no epoch ends inside the timing
        official = trainer.model
    else:
        build = harness.official_ivlp if method == "ivlp" else harness.official_maple
        official = build(bb, config, names, fp16=gpu)
    (harness.copy_into_official_ivlp if method != "maple" else harness.copy_into_official_maple)(ours, official)
    if gpu:
        official.half()  # PREC fp16: the whole CustomCLIP in half precision, as their build leaves it
    official.to(device).train()
    params = [p for p in official.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if method == "promptsrc":
        trainer.optim, trainer.device = optim, device
        trainer.model.prompt_learner.fixed_embeddings = trainer.model.prompt_learner.fixed_embeddings.to(device)

    def official_step() -> None:
        with harness.half_casts_off() if not gpu else _nothing():
            if method == "promptsrc":
                with harness.promptsrc_shims(bb, config):
                    trainer.forward_backward({"img": pixels, "label": labels})
                return
            loss = official(pixels.half() if gpu else pixels, labels)
            optim.zero_grad()
            loss.backward()
            optim.step()

    ours.train()
    mine = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=5e-4)
    extra = SelfRegulation(ours, config) if method == "promptsrc" else None

    def our_step() -> None:
        training_step(ours, pixels, labels, mine, extra_loss=extra, precision="fp16" if gpu else "fp32")

    return official_step, our_step


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def worker(method: str, k: int, model: str, device: str, batch: int, steps: int) -> dict:
    import torch

    official_step, our_step = _steps(method, k, model, device, batch)

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    official_step(), our_step()  # warm-up
    a, b = [], []
    for _ in range(steps):  # alternating, so that load changes hit both
        a.append(timed(official_step))
        b.append(timed(our_step))
    off, ours = statistics.median(a), statistics.median(b)
    return {"method": method, "K": k, "official_s": off, "coopkit_s": ours, "ratio": off / ours,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--model", default="ViT-B-16", help="an open_clip ViT name (built in OpenAI's shape) or 'tiny'")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.worker:
        print(json.dumps(worker(args.method[0], args.classes[0], args.model, device, args.batch, args.steps)))
        return
    from machine import describe, load

    print(f"# one training step, official module vs coopkit, {args.model} (OpenAI shape, random init), batch "
          f"{args.batch}, median of {args.steps} alternating steps, {device}; machine: {describe()}")
    print("\n| method | K | official step | coopkit step | official / coopkit |")
    print("|---|---|---|---|---|")
    import subprocess

    for method in args.method:
        for k in args.classes:
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--classes", str(k), "--model",
                   args.model, "--batch", str(args.batch), "--steps", str(args.steps), "--device", device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {method} | {k} | error: {(out.stderr.strip().splitlines() or ['killed'])[-1][:120]} | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {method} | {k} | {1000 * r['official_s']:.1f} ms | {1000 * r['coopkit_s']:.1f} ms "
                  f"| {r['ratio']:.2f}x |")
    print(f"\n# {load()} after")


if __name__ == "__main__":
    main()
