"""DualCoOp: coopkit's training step against the official one, same weights, same batch, same run.

The official step is sunxm2357/DualCoOp's ``train_coop`` iteration (``models/dualcoop.py`` vendored in
``tests/reference``): the ResNet and its region projection on the batch, then the 2C full 77-token
prompts through the text tower, the region aggregation, the ASL and SGD. coopkit's step starts from the
cached region features (the image encoder is frozen and unprompted) and runs the prompts cut after
their end token with the shared prefix once. Both build on the same random-init OpenAI-architecture
ResNet CLIP (open_clip's weights loaded by the official ``build_model_conv_proj``); their logits are
compared before timing.

    python benchmarks/bench_dualcoop.py                                  # RN50-quickgelu, K = 20 and 80, batch 32
    python benchmarks/bench_dualcoop.py --classes 80 --input-size 448 --steps 3
    python benchmarks/bench_dualcoop.py --model tiny --classes 5 --batch 4 --steps 1     # a smoke run
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
sys.path.insert(0, str(HERE.parent / "tests"))  # the vendored official modules

#: A tiny OpenAI-architecture ResNet for smoke runs (``--model tiny``).
TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def _classnames(k: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(dict.fromkeys(IMAGENET_CLASSNAMES))[:k]


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model: str, k: int, batch: int, input_size: int, steps: int, device: str) -> dict:
    import torch

    import coopkit
    from coopkit.methods.dualcoop import DualCoOp, DualCoOpConfig
    from coopkit.methods.multilabel import asymmetric_loss
    from reference import dualcoop_official

    if model == "tiny":
        path = Path(tempfile.mkdtemp()) / "coopkit-dualcoop-bench-tiny.json"
        path.write_text(json.dumps(TINY))
        model = str(path)
    bb = coopkit.load_backbone(model, pretrained=None, device=device)
    with torch.no_grad():  # on fp16 values, as the official build stores its CLIP before loading
        for p in bb.model.parameters():
            p.copy_(p.half().float())
    names = _classnames(k)
    cfg = dualcoop_official.cfg(input_size=input_size)
    official = dualcoop_official.build(cfg, names, bb.model.state_dict()).to(device)
    ours = DualCoOp(bb, names, DualCoOpConfig(input_size=input_size)).to(device)
    with torch.no_grad():
        ours.prompt_learner.ctx_pos.copy_(official.prompt_learner.ctx_pos)
        ours.prompt_learner.ctx_neg.copy_(official.prompt_learner.ctx_neg)
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    target = (torch.rand(batch, 1, k, device=device) < 0.2).long()
    official.eval()
    with torch.no_grad():
        regions = ours.encode_image(images)  # the cache coopkit trains on: (batch, HW + 1, D)
        ref = official(images)
        diff = float((ours.pair_logits(regions) - ref).abs().max() / ref.abs().max())
    opt_official = dualcoop_official.optimizer(official)
    opt_ours = torch.optim.SGD([ours.prompt_learner.ctx_pos, ours.prompt_learner.ctx_neg], lr=0.002, momentum=0.9,
                               weight_decay=5e-4)

    def official_step() -> None:
        dualcoop_official.train_step(official, opt_official, images, target, cfg)
        if device != "cpu":
            torch.cuda.synchronize()

    def ours_step() -> None:
        loss = asymmetric_loss(ours.pair_logits(regions), target[:, 0])
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        if device != "cpu":
            torch.cuda.synchronize()

    t_official, t_ours = _time(official_step, steps), _time(ours_step, steps)
    return {"model": Path(model).stem, "classes": k, "batch": batch, "input_size": input_size,
            "logit_rel_diff": diff, "official_step_s": round(t_official, 4), "coopkit_step_s": round(t_ours, 4),
            "speedup": round(t_official / t_ours, 2)}


def main() -> None:
    sys.path.insert(0, str(HERE))
    from machine import describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50-quickgelu", help="open_clip ResNet name, or 'tiny'")
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 80])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": describe(torch.get_num_threads())}))
    for k in args.classes:
        print(json.dumps(run(args.model, k, args.batch, args.input_size, args.steps, args.device)), flush=True)


if __name__ == "__main__":
    main()
