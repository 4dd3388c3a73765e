"""A few CoOp training steps with autocast (bf16/fp16 on CUDA) against fp32: text features equal
within a stated tolerance, step time against fp32; and fit(precision="auto") end to end."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import MODEL, QUICK, best_seconds, cuda_ok, pretrained_for, row

S = "fit"
TOLERANCE = 2e-2  # max |feature difference| of L2-normalised text features, autocast vs fp32


def main() -> None:
    import torch
    import torch.nn.functional as F

    import coopkit
    from coopkit.embedded import world
    from coopkit.features import autocast_for
    from coopkit.prompts import PromptLearner

    device = "cuda" if cuda_ok() else "cpu"
    bb = coopkit.load_backbone(MODEL, pretrained=pretrained_for(MODEL), device=device)
    names = [f"class {i}" for i in range(10 if QUICK else 100)]
    learner = PromptLearner(bb, names, n_ctx=16).to(bb.device)
    opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    x = F.normalize(torch.randn(32, bb.model.text_projection.shape[1], device=bb.device), dim=-1)
    y = torch.randint(len(names), (32,), device=bb.device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for precision in ("fp32", "auto"):  # features first, at the same context
        with torch.no_grad(), autocast_for(bb.device, precision):
            results[precision + "_features"] = learner.text_features().float()
    for precision in ("fp32", "auto"):
        def step() -> None:
            with autocast_for(bb.device, precision):
                loss = F.cross_entropy(100 * x @ learner.text_features().float().T, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        results[precision] = best_seconds(step, sync, repeats=5, warmup=2)
    diff = float((results["auto_features"] - results["fp32_features"]).abs().max())
    label = "bf16/fp16 autocast" if device == "cuda" else "auto (= fp32 on the CPU)"
    row(S, f"text features, {label} vs fp32, K={len(names)}", f"max abs diff {diff:.2g}",
        "ok" if diff <= TOLERANCE else f"ABOVE the tolerance {TOLERANCE:g}")
    row(S, f"training step {device}, K={len(names)}: fp32 / {label}",
        f"{1000 * results['fp32']:.1f} ms / {1000 * results['auto']:.1f} ms", f"{results['fp32'] / results['auto']:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        root = world.write_task("colors", Path(tmp) / "colors", shots_per_class=4, test_per_class=0, seed=1)
        t = time.perf_counter()
        clf = coopkit.fit(root / "train", backbone=coopkit.load_backbone(device=device), shots=4, epochs=5, n_views=1,
                          augment=False, precision="auto", progress=False)
        row(S, f"fit(precision='auto') coopkit-tiny on {device}, 5 epochs", f"{time.perf_counter() - t:.1f} s",
            f"train accuracy {clf.config.metrics['train_accuracy']:.2f}")


if __name__ == "__main__":
    main()
